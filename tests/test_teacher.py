"""Training data from an exported (int4) target: its answers are the artifact's own target-only output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dovetail_onnx.cli.main import main
from dovetail_onnx.export import artifact as artifact_module
from dovetail_onnx.export.artifact import shipped_drafter
from dovetail_onnx.export.data import DataSettings, make_data
from dovetail_onnx.export.drafter import random_drafter, save_drafter
from dovetail_onnx.export.load import load_target
from dovetail_onnx.export.teacher import ArtifactTeacher
from dovetail_onnx.runtime import GeneratorParams, generate
from dovetail_onnx.runtime.errors import DovetailError

SETTINGS = DataSettings(distill_prompts=8, max_new_tokens=10, text_tokens=300, seq_len=128, chunk=4, heldout_every=4)


@pytest.fixture(scope="module")
def llama(hf_dirs):
    return load_target(hf_dirs["llama"])


def test_answers_and_features_are_the_artifacts_own(llama, quantized, tmp_path):
    model = quantized["int4"]
    teacher = ArtifactTeacher(model.manifest.folder, *llama, threads=1)
    sequences = make_data(*llama, tmp_path, SETTINGS, progress=False, teacher=teacher)
    answered = [s for s in sequences if s.kind == "distill"]
    assert answered and any(s.kind == "text" for s in sequences)
    for s in answered:
        prompt = s.ids[: s.start].tolist()
        tokens, _ = generate(model, prompt, GeneratorParams(max_new_tokens=SETTINGS.max_new_tokens, mode="target-only"))
        assert s.ids[s.start:].tolist() == tokens
        model.target.start(len(s.ids), 1)
        _, features = model.target.prefill(s.ids.numpy())
        np.testing.assert_allclose(s.features.float().numpy(), features, rtol=1e-3, atol=1e-3)
    pytorch = make_data(*llama, tmp_path, SETTINGS, progress=False)
    assert len({p.parent for p in tmp_path.glob("*/distill-*.st")}) == 2, "the two teachers share a cache"
    assert [s.ids.tolist() for s in pytorch if s.kind == "text"] == [s.ids.tolist() for s in sequences if s.kind == "text"]


def test_teacher_from_another_model_is_refused(llama, artifacts, tmp_path):
    with pytest.raises(DovetailError, match="exported from another model .*; pass an artifact exported from this"):
        ArtifactTeacher(artifacts["qwen2"], *llama)
    older = shutil.copytree(artifacts["llama"], tmp_path / "older")
    manifest = json.loads((older / "dovetail.json").read_text())
    del manifest["source"]
    (older / "dovetail.json").write_text(json.dumps(manifest))
    with pytest.raises(DovetailError, match="does not record the model it was exported from .*; export it again"):
        ArtifactTeacher(older, *llama)


def test_cli_teacher_must_be_an_artifact(hf_dirs, tmp_path):
    result = CliRunner().invoke(main, ["train", str(hf_dirs["llama"]), "-o", str(tmp_path / "d"),
                                       "--teacher", str(tmp_path), "--data-only"])
    assert result.exit_code != 0 and "is not a dovetail-onnx artifact" in result.output
    assert "Traceback" not in result.output and not Path(tmp_path / "d").exists()


def test_train_with_a_teacher_records_its_precision(hf_dirs, quantized, tmp_path):
    out = tmp_path / "drafter"
    result = CliRunner().invoke(main, [
        "train", str(hf_dirs["llama"]), "-o", str(out), "--teacher", str(quantized["int4"].manifest.folder),
        "--distill-prompts", "8", "--max-new-tokens", "10", "--text-tokens", "300", "--seq-len", "128",
        "--steps", "2", "--batch-tokens", "256", "--cache", str(tmp_path / "cache"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["teacher_precision"] == "int4"


def test_export_prefers_the_drafter_made_for_its_precision(llama, tmp_path, monkeypatch):
    for name, precision in (("general", "fp32"), ("for-int4", "int4")):
        drafter = random_drafter(*llama, 1)
        drafter.config.teacher_precision = precision
        save_drafter(drafter, tmp_path / name)
    monkeypatch.setattr(artifact_module, "SHIPPED", tmp_path)
    assert shipped_drafter(*llama, "int4").name == "for-int4"
    assert shipped_drafter(*llama, "int8").name == "general"
    assert shipped_drafter(*llama).name == "general"
    (tmp_path / "general" / "config.json").unlink()
    assert shipped_drafter(*llama).name == "for-int4"  # the only one made for this target
