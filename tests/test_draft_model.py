"""A standalone small LM of the target's tokenizer drafts (`export --draft-model`), losslessly."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from clirun import fails
from dovetail_onnx.cli.main import main
from dovetail_onnx.runtime import GeneratorParams, Model, TreeSettings, generate
from tiny import make_tokenizer, save_model

PROMPTS = ["hello world", "1, 2, 3, 4, 1, 2, 3, 4,", "Speculative decoding is"]


def export(target, out, *options: str) -> str:
    result = CliRunner().invoke(main, ["export", str(target), "-o", str(out), *options])
    assert result.exit_code == 0, result.output
    return result.stderr


@pytest.fixture(scope="module")
def drafted(hf_dirs, tmp_path_factory) -> dict[str, Model]:
    """The tiny Llama drafted for by another tiny Llama (other weights, the same tokenizer), by a tiny Qwen2 (another
    architecture, the same tokenizer), and by itself (every drafted token is the target's own)."""
    root = tmp_path_factory.mktemp("draft-model")
    other = save_model("llama", root / "other", seed=1)
    out = {}
    for name, source in (("other", other), ("qwen2", hf_dirs["qwen2"]), ("itself", hf_dirs["llama"])):
        export(hf_dirs["llama"], root / name, "--draft-model", str(source), "--top-k", "4", "--depth", "4",
               "--tree-tokens", "8", "--min-prob", "0")
        out[name] = Model(root / name, threads=1)
    return out


@pytest.mark.parametrize("name", ["other", "qwen2", "itself"])
def test_greedy_equals_transformers_for_trees_and_chains(name, drafted, references):
    model = drafted[name]
    assert type(model.drafter).__name__ == "DraftModel" and model.draft_provider == "CPUExecutionProvider"
    for text in PROMPTS:
        prompt = model.encode_prompt(text, raw=True)
        expected = references("llama", prompt, 40)
        for tree in (None, TreeSettings(1, 4, 5), TreeSettings(4, 2, 6, min_prob=0.2)):
            for lookup in (True, False):
                params = GeneratorParams(40, tree=tree, stop_at_eos=False, lookup=lookup)
                assert generate(model, prompt, params)[0] == expected, (text, tree, lookup)


def test_a_draft_model_that_is_the_target_gets_its_chains_accepted(drafted):
    """Its chain of 4 is the target's own greedy continuation: every step accepts it whole (τ 5 but for the end)."""
    model = drafted["itself"]
    prompt = model.encode_prompt("Speculative decoding is", raw=True)
    _, stats = generate(model, prompt, GeneratorParams(40, tree=TreeSettings(1, 4, 5), stop_at_eos=False,
                                                       lookup=False))
    assert stats.mean_accepted > 4.5 and stats.draft_forwards >= 4 * stats.target_forwards


def test_cli_generate_json_equals_transformers(hf_dirs, tmp_path, references):
    """The CEO's check: the target exported with --draft-model, generate --raw --json both ways."""
    export(hf_dirs["llama"], tmp_path / "art", "--draft-model", str(save_model("llama", tmp_path / "d", seed=1)))
    prompt = Model(tmp_path / "art").encode_prompt("1, 2, 3, 4, 1, 2, 3, 4,", raw=True)
    for mode in ("speculative", "target-only"):
        result = CliRunner().invoke(main, ["generate", str(tmp_path / "art"), "--prompt", "1, 2, 3, 4, 1, 2, 3, 4,",
                                           "--raw", "--json", "--max-new-tokens", "32", "--ignore-eos", "--mode", mode])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["token_ids"] == references("llama", prompt, 32)


def test_a_quantized_target_with_a_draft_model_equals_its_own_target_only(hf_dirs, tmp_path):
    export(hf_dirs["llama"], tmp_path / "art", "--precision", "int4", "--draft-model", str(hf_dirs["qwen2"]))
    model = Model(tmp_path / "art", threads=1)
    assert model.manifest.draft_model.precision == "int4"
    for text in PROMPTS:
        prompt = model.encode_prompt(text, raw=True)
        target_only, _ = generate(model, prompt, GeneratorParams(40, mode="target-only", stop_at_eos=False))
        assert generate(model, prompt, GeneratorParams(40, stop_at_eos=False))[0] == target_only


def test_a_draft_model_with_another_tokenizer_is_refused(hf_dirs, tmp_path):
    other = save_model("llama", tmp_path / "other", seed=1)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(other)
    fails(["export", str(hf_dirs["llama"]), "-o", str(tmp_path / "out"), "--draft-model", str(other)],
          "has another tokenizer than the target")


def test_a_draft_model_and_a_drafter_are_one_too_many(hf_dirs, tmp_path):
    fails(["export", str(hf_dirs["llama"]), "-o", str(tmp_path / "out"), "--draft-model", str(hf_dirs["qwen2"]),
           "--drafter", "random"], "drop --drafter")


def test_where_cuda_is_asked_for_the_draft_model_runs_its_plain_graph_and_says_when_it_fell_back(drafted, monkeypatch,
                                                                                                 caplog):
    """dovetail's kernels are CPU operators: a draft model bound for CUDA takes the graph without them. Here a GPU
    driver is pretended and ONNX Runtime's CUDA provider cannot start, so it drafts on the CPU and says so."""
    import onnxruntime as ort

    from dovetail_onnx.runtime import sessions

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA provider")
    monkeypatch.setattr(sessions, "gpu_driver", lambda: True)
    model = Model(drafted["other"].manifest.folder, draft_device="auto", threads=1)
    if model.drafter.device == "cuda":
        pytest.skip("a GPU is usable here")
    assert model.drafter.graph == "draft.onnx" and model.target.graph.name == "target.rows.onnx"
    assert "draft model fell back to the CPU" in caplog.text


def test_a_draft_model_with_a_shorter_context_bounds_the_artifacts(hf_dirs, tmp_path):
    import transformers

    short = save_model("llama", tmp_path / "short", seed=1)
    config = transformers.AutoConfig.from_pretrained(short)
    config.max_position_embeddings = 128
    config.save_pretrained(short)
    export(hf_dirs["llama"], tmp_path / "art", "--draft-model", str(short))
    assert Model(tmp_path / "art").manifest.context_length == 128
    fails(["generate", str(tmp_path / "art"), "--prompt", "x" * 200, "--raw"], "exceeds the model's context of 128")
