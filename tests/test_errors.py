"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

from dovetail_onnx.cli.main import main
from dovetail_onnx.export.drafter import random_drafter, save_drafter
from tiny import make_model, make_tokenizer


def fails(args: list[str], match: str) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.output, result.exception)
    # A fallback note (drafter on CPU) may come first; the error itself is one line.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def test_missing_artifact_folder(tmp_path):
    fails(["generate", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist")


def test_folder_without_manifest(tmp_path):
    fails(["generate", str(tmp_path), "--prompt", "hi"], "not a dovetail-onnx artifact")


@pytest.mark.parametrize("name", ["target.onnx.data", "drafter.onnx"])
def test_truncated_graph_is_caught_by_checksum(name, artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["llama"], broken)
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 2])
    fails(["generate", str(broken), "--prompt", "hi"], "SHA-256 mismatch")


def test_corrupt_manifest(artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["llama"], broken)
    (broken / "dovetail.json").write_text("{not json")
    fails(["generate", str(broken), "--prompt", "hi"], "corrupt")


def test_prompt_longer_than_context(artifacts):
    fails(["generate", str(artifacts["llama"]), "--raw", "--prompt", "x" * 600], "exceeds the model's context")


def test_max_new_tokens_zero(artifacts):
    fails(["generate", str(artifacts["llama"]), "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens")


def test_top_k_above_graph(artifacts):
    fails(["generate", str(artifacts["llama"]), "--prompt", "hi", "--top-k", "99"], "--top-k 99")


def test_no_prompt(artifacts):
    fails(["generate", str(artifacts["llama"]), "--prompt", ""], "no prompt")


def test_unknown_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(tmp_path / "gpt2")
    make_tokenizer().save_pretrained(tmp_path / "gpt2")
    fails(["export", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out")], "unsupported architecture")


def test_missing_target(tmp_path):
    fails(["export", str(tmp_path / "none"), "-o", str(tmp_path / "out")], "target not found")


@pytest.mark.parametrize("change", [{"hidden_size": 32, "intermediate_size": 64}, {"vocab_size": 400}])
def test_drafter_for_another_target(change, hf_dirs, tmp_path):
    other = make_model("llama")
    config = other.config
    for key, value in change.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    other = type(other)(config)
    save_drafter(random_drafter(other, make_tokenizer(), 1), tmp_path / "drafter")
    fails(["export", str(hf_dirs["llama"]), "-o", str(tmp_path / "out"), "--drafter", str(tmp_path / "drafter")],
          "was made for another target")


def test_no_shipped_drafter_for_this_target(hf_dirs, tmp_path):
    fails(["export", str(hf_dirs["qwen2"]), "-o", str(tmp_path / "out")], "no shipped drafter matches")


def test_missing_drafter_folder(hf_dirs, tmp_path):
    fails(["export", str(hf_dirs["llama"]), "-o", str(tmp_path / "out"), "--drafter", str(tmp_path / "none")],
          "no drafter at")


def test_error_in_a_real_process_has_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dovetail_onnx.cli.main", "generate", str(tmp_path / "x"), "--prompt", "hi"],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
