"""A target with no trained drafter exports and speculates by prompt lookup alone, losslessly."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from clirun import fails
from dovetail_onnx.cli.main import main
from dovetail_onnx.runtime import GeneratorParams, Model, SamplingParams, generate

PROMPTS = ["hello world", "1, 2, 3, 4, 1, 2, 3, 4,", "Speculative decoding is"]


@pytest.fixture(scope="session")
def lookup_artifacts(hf_dirs, tmp_path_factory) -> dict[str, tuple]:
    """Each tiny target exported the way a user's own model is: no drafter option, none shipped for it."""
    root, out = tmp_path_factory.mktemp("lookup"), {}
    for kind, precision in (("llama", "fp32"), ("qwen2", "fp32"), ("llama", "int4")):
        folder = root / f"{kind}-{precision}"
        result = CliRunner().invoke(main, ["export", str(hf_dirs[kind]), "-o", str(folder), "--precision", precision])
        assert result.exit_code == 0, result.output
        out[f"{kind}-{precision}"] = folder, result.stderr
    return out


def test_export_says_what_it_drafts_with_and_how_to_get_a_drafter(lookup_artifacts):
    folder, printed = lookup_artifacts["llama-fp32"]
    assert "drafts by prompt lookup" in printed and "dovetail-onnx train" in printed
    manifest = json.loads((folder / "dovetail.json").read_text())
    assert manifest["drafter"] is None and manifest["tree"]["top_k"] == 1
    assert not list(folder.glob("drafter*"))


@pytest.mark.parametrize("name", ["llama-fp32", "qwen2-fp32"])
def test_greedy_equals_transformers_speculative_and_target_only(name, lookup_artifacts, references):
    model = Model(lookup_artifacts[name][0], threads=1)
    assert model.drafter is None and model.draft_provider == "prompt lookup"
    copied = 0
    for text in PROMPTS:
        prompt = model.encode_prompt(text, raw=True)
        expected = references(name.split("-")[0], prompt, 40)
        target_only, _ = generate(model, prompt, GeneratorParams(40, mode="target-only", stop_at_eos=False))
        speculative, stats = generate(model, prompt, GeneratorParams(40, stop_at_eos=False))
        assert target_only == speculative == expected, text
        assert stats.draft_forwards == 0
        copied += stats.accepted_copied
    assert copied > 0  # a tiny random model repeats itself, and lookup copies it


def test_cli_generate_json_equals_transformers(lookup_artifacts, references):
    folder = lookup_artifacts["llama-fp32"][0]
    prompt = Model(folder).encode_prompt("1, 2, 3, 4, 1, 2, 3, 4,", raw=True)
    for mode in ("speculative", "target-only"):
        result = CliRunner().invoke(main, ["generate", str(folder), "--prompt", "1, 2, 3, 4, 1, 2, 3, 4,", "--raw",
                                           "--json", "--max-new-tokens", "32", "--ignore-eos", "--mode", mode])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["token_ids"] == references("llama", prompt, 32)
        assert out["stats"]["draft_provider"] == "prompt lookup"


def test_a_quantized_target_equals_its_own_target_only(lookup_artifacts):
    model = Model(lookup_artifacts["llama-int4"][0], threads=1)
    for text in PROMPTS:
        prompt = model.encode_prompt(text, raw=True)
        target_only, _ = generate(model, prompt, GeneratorParams(40, mode="target-only", stop_at_eos=False))
        assert generate(model, prompt, GeneratorParams(40, stop_at_eos=False))[0] == target_only


def test_sampling_with_a_seed_repeats_and_bench_checks_exactness(lookup_artifacts):
    model = Model(lookup_artifacts["llama-fp32"][0], threads=1)
    params = GeneratorParams(24, sampling=SamplingParams(temperature=0.8, seed=3), stop_at_eos=False)
    prompt = model.encode_prompt("roll", raw=True)
    assert generate(model, prompt, params)[0] == generate(model, prompt, params)[0]
    result = CliRunner().invoke(main, ["bench", str(lookup_artifacts["llama-fp32"][0]), "--n", "2",
                                       "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identical"] is True


def test_no_lookup_leaves_nothing_to_draft_with(lookup_artifacts):
    fails(["generate", str(lookup_artifacts["llama-fp32"][0]), "--prompt", "hi", "--no-lookup"],
          "--no-lookup leaves nothing to draft with")
