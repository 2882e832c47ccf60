"""The CLI end to end, and the runtime working with torch and transformers unimportable."""
from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from clirun import edited_artifact, fails
from dovetail_onnx.cli.main import main
from dovetail_onnx.runtime import GeneratorParams, Model, generate, kernels, sessions
from dovetail_onnx.runtime.bench import tune_tree, tuning_trees
from dovetail_onnx.runtime.manifest import EXPORT_QUANTIZED_TREE

# Blocks the build-side packages the way a deploy machine lacks them: any import raises ImportError.
NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'optimum', 'safetensors.torch'):\n"
    "    sys.modules[name] = None\n"
)


def test_generate_json(artifacts, models, references):
    result = CliRunner().invoke(main, ["generate", str(artifacts["llama"]), "--prompt", "hello there",
                                       "--max-new-tokens", "24", "--json", "--draft-device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    prompt = models["llama"].encode_prompt("hello there")
    expected = references("llama", prompt, 24)
    eos = models["llama"].manifest.eos_token_ids
    cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    assert out["token_ids"] == expected[:cut]
    assert out["text"] == models["llama"].tokenizer.decode(expected[:cut])
    stats = out["stats"]
    assert stats["new_tokens"] == len(out["token_ids"])
    assert stats["target_provider"] == "CPUExecutionProvider"
    assert stats["draft_provider"] == "CPUExecutionProvider"
    for key in ("target_forwards", "mean_accepted", "tokens_per_s"):
        assert key in stats


def test_generate_streams_text_from_stdin(artifacts):
    result = CliRunner().invoke(main, ["generate", str(artifacts["qwen2"]), "--raw", "--max-new-tokens", "16",
                                       "--mode", "target-only"], input="abc")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and "per target forward" in result.stderr


def test_runtime_and_generate_without_torch(artifacts):
    script = NO_TORCH + (
        "from dovetail_onnx.runtime import Model, kernels, GeneratorParams, generate\n"
        f"model = Model({str(artifacts['llama'])!r}, draft_device='cpu')\n"
        "tokens, stats = generate(model, model.encode_prompt('hi'), GeneratorParams(max_new_tokens=12))\n"
        "assert stats.new_tokens == len(tokens) > 0\n"
        "from dovetail_onnx.cli.main import main\n"
        f"main(['generate', {str(artifacts['llama'])!r}, '--prompt', 'hi', '--max-new-tokens', '8', '--json'])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["stats"]["new_tokens"] > 0


def test_bench_reports_exact_outputs_and_sweeps(artifacts, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"question_id": 0, "turns": ["one"]}\n{"question_id": 1, "turns": ["two"]}\n')
    result = CliRunner().invoke(main, ["bench", str(artifacts["qwen2"]), "--prompts", str(prompts), "--max-new-tokens",
                                       "12", "--tree-tokens", "4,8", "--draft-device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    graph = "target.rows.onnx" if kernels.rows_library()[0] else "target.onnx"  # dovetail's kernels where they build
    assert out["identical"] is True and out["prompts"] == 2 and out["target_graph"] == graph
    assert [run["tree_tokens"] for run in out["runs"]] == [4, 8]
    for key in ("mean_accepted", "speedup", "tokens_per_s", "baseline_tokens_per_s"):
        assert key in out


def test_bench_without_a_prompt_file_runs_our_own_prompts(artifacts):
    """What `make demo` runs: the tuned default against target-only on the prompts export --tune uses."""
    result = CliRunner().invoke(main, ["bench", str(artifacts["llama"]), "--n", "2", "--max-new-tokens", "6",
                                       "--draft-device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompts"] == 2 and out["identical"] is True


def test_bench_runs_onnxruntime_genai_side_by_side(artifacts, genai_dir, tmp_path):
    """Same graph family, same fp32 weights: genai's greedy tokens equal our target-only tokens."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["one"]}\n{"turns": ["two"]}\n')
    result = CliRunner().invoke(main, ["bench", str(artifacts["llama"]), "--prompts", str(prompts), "--max-new-tokens",
                                       "12", "--tree-tokens", "4", "--draft-device", "cpu", "--threads", "1",
                                       "--baseline-genai", str(genai_dir), "--json"])
    assert result.exit_code == 0, result.output
    genai = json.loads(result.stdout)["genai"]
    assert genai["identical_to_target_only"] == 2
    assert genai["tokens_per_s"] > 0 and genai["target_only_ratio"] > 0


def test_bench_summarizes_each_category_of_a_mixed_file(artifacts, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"category": "qa", "turns": ["one"]}\n{"category": "code", "turns": ["two"]}\n'
                       '{"category": "qa", "turns": ["three"]}\n')
    result = CliRunner().invoke(main, ["bench", str(artifacts["llama"]), "--prompts", str(prompts), "--max-new-tokens",
                                       "10", "--tree-tokens", "4,6", "--draft-device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["by_category"]) == {"qa", "code"}
    assert [r["identical_count"] for r in out["by_category"]["qa"]] == [2, 2]
    assert [r["tree_tokens"] for r in out["by_category"]["code"]] == [4, 6]
    table = CliRunner().invoke(main, ["bench", str(artifacts["llama"]), "--prompts", str(prompts),
                                      "--max-new-tokens", "10", "--draft-device", "cpu"])
    assert table.exit_code == 0 and "by category" in table.stdout


def test_bench_refuses_a_folder_that_is_not_a_genai_model(artifacts, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["one"]}\n')
    fails(["bench", str(artifacts["llama"]), "--prompts", str(prompts), "--baseline-genai", str(tmp_path)],
          "has no genai_config.json")


def test_bench_profiles_and_tunes_the_default_tree(artifacts, tmp_path):
    folder = edited_artifact(artifacts["llama"], tmp_path / "a", lambda raw: None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["one"]}\n')
    result = CliRunner().invoke(main, ["bench", str(folder), "--prompts", str(prompts), "--max-new-tokens", "12",
                                       "--tree-tokens", "3,5", "--draft-device", "cpu", "--profile", "--tune", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["profile"]["target_ms"][next(iter(out["profile"]["target_ms"]))]) == {"1", "2", "4", "8", "16", "32"}
    assert out["profile"]["drafter_ms_per_forward"] > 0
    best = max(out["runs"], key=lambda r: r["speedup"])
    assert out["tuned"]["total_tokens"] == best["tree_tokens"]
    assert Model(folder).manifest.tree.total_tokens == best["tree_tokens"]


def test_bench_sizes_trees_by_the_step_cost_it_measures_and_tune_stores_it(artifacts, tmp_path):
    folder = edited_artifact(artifacts["llama"], tmp_path / "a", lambda raw: None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["one"]}\n')
    args = ["bench", str(folder), "--prompts", str(prompts), "--max-new-tokens", "12", "--tree-tokens", "5",
            "--draft-device", "cpu", "--json"]
    result = CliRunner().invoke(main, [*args, "--sizing", "fixed,cost"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["sizing"] for r in out["runs"]] == ["fixed", "cost"] and all(r["identical"] for r in out["runs"])
    assert len(out["step_ms"]) == 5 and all(ms > 0 for ms in out["step_ms"])
    result = CliRunner().invoke(main, [*args, "--sizing", "cost", "--tune"])
    assert result.exit_code == 0, result.output
    stored = Model(folder).manifest.tree
    assert stored.total_tokens == 5 and stored.step_ms == tuple(json.loads(result.stdout)["step_ms"])
    fails(["generate", str(folder), "--prompt", "hi", "--tree-tokens", "9"],
          "--tree-tokens 9 is beyond the 5 tree sizes whose step cost was measured (step_ms); use fewer, or --sizing fixed")
    for sizing in ("cost", "fixed"):
        result = CliRunner().invoke(main, ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "6",
                                           "--draft-device", "cpu", "--sizing", sizing, "--json"])
        assert result.exit_code == 0, result.output


def test_tuning_stores_one_of_the_candidate_trees(artifacts, quantized, tmp_path):
    for name, source in (("fp32", artifacts["llama"]), ("int4", quantized["int4"].manifest.folder)):
        folder = edited_artifact(source, tmp_path / name, lambda raw: None)
        model = Model(folder, draft_device="cpu")
        best, summary = tune_tree(model, max_new_tokens=8)
        assert Model(folder).manifest.tree == best and summary["identical"] and summary["speedup"] > 0
        assert best in tuning_trees(model, best.step_ms)
        assert not best.step_ms or len(best.step_ms) == 16 and all(ms > 0 for ms in best.step_ms)


def test_compare_counts_matching_tokens(models, quantized, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["one"]}\n{"turns": ["two"]}\n')
    fp32 = str(models["llama"].manifest.folder)
    same = CliRunner().invoke(main, ["compare", fp32, fp32, "--prompts", str(prompts), "--max-new-tokens", "10"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["identical"] == 2
    int4 = CliRunner().invoke(main, ["compare", str(quantized["int4"].manifest.folder), fp32, "--prompts", str(prompts),
                                     "--max-new-tokens", "10"])
    out = json.loads(int4.stdout)
    assert all(0 <= m <= 10 for m in out["matching"]) and out["mean_matching_tokens"] == sum(out["matching"]) / 2


def test_bench_rejects_a_bad_prompt_file(artifacts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no turns"}\n')
    result = CliRunner().invoke(main, ["bench", str(artifacts["qwen2"]), "--prompts", str(bad)])
    assert result.exit_code == 1 and "not a Spec-Bench line" in result.stderr


def test_check_against_transformers(artifacts, hf_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["check me"]}\n{"turns": ["and me"]}\n')
    result = CliRunner().invoke(main, ["check", str(artifacts["qwen2"]), str(hf_dirs["qwen2"]), "--prompts", str(prompts),
                                       "--max-new-tokens", "20"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "2/2 prompts identical" in result.stdout


def test_without_a_gpu_auto_drafts_on_the_cpu_quietly_and_cuda_refuses(artifacts, monkeypatch):
    """onnxruntime-gpu would run on the CPU where no GPU is usable: `auto` then drafts on the CPU and says nothing
    (CUDA was not asked for), `cuda` refuses in one line."""
    monkeypatch.setattr(sessions, "gpu_driver", lambda: False)
    args = ["generate", str(artifacts["llama"]), "--prompt", "hi", "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(main, args + ["--draft-device", "auto"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["stats"]["draft_provider"] == "CPUExecutionProvider"
    assert "CUDA" not in result.stderr and "note:" not in result.stderr, result.stderr
    fails(args + ["--draft-device", "cuda"], "asked for CUDA but")


def test_a_gpu_whose_cuda_provider_does_not_start_is_reported_never_silent(artifacts, monkeypatch):
    """A GPU driver is present but ONNX Runtime runs the session on the CPU (here: none is there at all)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA provider")
    monkeypatch.setattr(sessions, "gpu_driver", lambda: True)
    session, used = sessions.open_session(artifacts["llama"] / "drafter.onnx", "auto", 1, "drafter")
    if used == "cuda":
        pytest.skip("a GPU is usable here")
    args = ["generate", str(artifacts["llama"]), "--prompt", "hi", "--max-new-tokens", "4"]
    assert "note: drafter fell back to the CPU" in CliRunner().invoke(main, args).stderr
    fails(args + ["--draft-device", "cuda"], "asked for CUDA but ONNX Runtime runs it on the CPU")


def test_chat_turns_stream_the_replies_of_generate(artifacts, models):
    """Two turns, /stats, /reset, then Ctrl-D: each reply is generate's for the conversation so far."""
    from dovetail_onnx.runtime import GeneratorParams, generate

    model = models["qwen2"]
    messages = [{"role": "user", "content": "hi"}]
    first, _ = generate(model, model.tokenizer.chat(messages), GeneratorParams(max_new_tokens=12))
    messages += [{"role": "assistant", "content": model.tokenizer.decode(first)}, {"role": "user", "content": "more"}]
    second, _ = generate(model, model.tokenizer.chat(messages), GeneratorParams(max_new_tokens=12))
    result = CliRunner().invoke(main, ["chat", str(artifacts["qwen2"]), "--max-new-tokens", "12", "--draft-device",
                                       "cpu"], input="hi\nmore\n/stats\n/reset\n")
    assert result.exit_code == 0, result.output
    replies = [model.tokenizer.decode(first), model.tokenizer.decode(second)]
    assert f">>> {replies[0]}\n>>> {replies[1]}\n>>> " in result.stdout
    assert "prompt tokens reused from the last turn" in result.stdout and "(a new conversation)" in result.stdout


def test_ctrl_c_stops_a_chat_reply_not_the_chat(artifacts, monkeypatch):
    from dovetail_onnx.runtime import Generator

    step = Generator.generate_next_token
    calls = {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Generator, "generate_next_token", interrupted)
    result = CliRunner().invoke(main, ["chat", str(artifacts["qwen2"]), "--max-new-tokens", "12", "--draft-device",
                                       "cpu"], input="hi\nagain\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(" [stopped]") == 1 and calls["n"] > 3


def test_serve_without_fastapi_says_what_to_install(artifacts):
    script = NO_TORCH + (
        "sys.modules['fastapi'] = None\n"
        "from dovetail_onnx.cli.main import main\n"
        f"main(['serve', {str(artifacts['llama'])!r}])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 1 and "pip install 'dovetail-onnx[serve]'" in run.stderr


def test_quantized_export_stores_a_chains_rows_wider_and_runs_it_as_a_chain_on_ort(hf_dirs, tmp_path, monkeypatch):
    """A verify row costs about as much as a target-only token on a quantized CPU target, so its default verifies a
    chain of EXPORT_QUANTIZED_TREE.depth's rows (an explicit --depth's), wider at the first level where dovetail's
    kernels verify trees; on ONNX Runtime's graph, which verifies chains only, the same default runs as the chain."""
    for args, depth in (([], EXPORT_QUANTIZED_TREE.depth), (["--depth", "5"], 5)):
        folder = tmp_path / f"int8-{depth}"
        result = CliRunner().invoke(main, ["export", str(hf_dirs["llama"]), "-o", str(folder), "--drafter", "random",
                                           "--precision", "int8", "--no-cpu-drafter", *args])
        assert result.exit_code == 0, result.output
        model = Model(folder, draft_device="cpu")
        top_k = EXPORT_QUANTIZED_TREE.top_k if model.manifest.target.kernel_verify == "tree" else 1
        assert (model.manifest.tree.top_k, model.manifest.tree.depth, model.manifest.tree.total_tokens) == \
            (top_k, depth, depth + 1)
        assert model.tree == model.manifest.tree.on(model.target.verify)
    monkeypatch.setattr("dovetail_onnx.runtime.target.rows_library", lambda: (None, "DOVETAIL_KERNELS=0"))
    model = Model(folder, draft_device="cpu")
    assert model.target.verify == "chain" and (model.tree.top_k, model.tree.depth, model.tree.total_tokens) == (1, 5, 6)
    prompt = model.encode_prompt("hi")
    greedy, _ = generate(model, prompt, GeneratorParams(10, mode="target-only"))
    assert generate(model, prompt, GeneratorParams(10))[0] == greedy
