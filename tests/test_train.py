"""Drafter training on a tiny target: data cache, loss going down, unrolled pass, checkpoints."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dovetail_onnx.cli.train import train as train_command
from dovetail_onnx.export import data as data_module
from dovetail_onnx.export import train as train_module
from dovetail_onnx.export.data import DataSettings, make_data
from dovetail_onnx.export.drafter import load_drafter, save_drafter
from dovetail_onnx.export.load import load_target
from dovetail_onnx.export.modules import causal_mask
from dovetail_onnx.export.train import TrainSettings, collate, empty_past, predict, train_drafter
from dovetail_onnx.runtime.errors import DovetailError
from tiny import save_model

SETTINGS = DataSettings(distill_prompts=12, max_new_tokens=12, text_tokens=1500, seq_len=128, distill_batch=6, chunk=4,
                        heldout_every=4)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = save_model("llama", tmp_path_factory.mktemp("tiny-llama"))
    return load_target(folder)


@pytest.fixture(scope="module")
def sequences(target, tmp_path_factory):
    return make_data(*target, tmp_path_factory.mktemp("cache"), SETTINGS)


def quick(**changes) -> TrainSettings:
    base = dict(steps=40, batch_tokens=512, lr=3e-3, warmup=4, checkpoint_every=20, eval_tokens=512)
    return TrainSettings(**(base | changes))


def test_data_is_cached_and_split(target, sequences, tmp_path, monkeypatch):
    kinds = {s.kind for s in sequences}
    assert kinds == {"distill", "text"}
    assert any(s.heldout for s in sequences) and not all(s.heldout for s in sequences)
    for s in sequences:
        assert s.features.shape == (len(s.ids), 64) and s.features.dtype == torch.float16
    cache = tmp_path / "cache"
    make_data(*target, cache, SETTINGS)

    def fail(*args, **kwargs):
        raise AssertionError("the cached data was recomputed")

    monkeypatch.setattr(data_module, "greedy_answers", fail)
    monkeypatch.setattr(data_module, "text_features", fail)
    again = make_data(*target, cache, SETTINGS)
    assert [s.ids.tolist() for s in again] == [s.ids.tolist() for s in sequences]


def test_more_data_extends_the_cache(target, sequences, tmp_path, monkeypatch):
    """Asking for more prompts and text keeps every cached sequence and makes only the new chunks."""
    cache = tmp_path / "cache"
    small = make_data(*target, cache, SETTINGS)
    made = []
    answer = data_module.greedy_answers
    monkeypatch.setattr(data_module, "greedy_answers", lambda model, prompts, *rest: made.append(len(prompts))
                        or answer(model, prompts, *rest))
    bigger = replace(SETTINGS, distill_prompts=2 * SETTINGS.distill_prompts, text_tokens=2 * SETTINGS.text_tokens)
    large = make_data(*target, cache, bigger)
    assert 0 < sum(made) <= SETTINGS.distill_prompts
    for kind in data_module.KINDS:
        before = [s.ids.tolist() for s in small if s.kind == kind]
        after = [s.ids.tolist() for s in large if s.kind == kind]
        assert len(after) > len(before) and after[: len(before)] == before


def test_skipped_prompts_are_neither_made_nor_loaded(target, sequences, tmp_path, monkeypatch):
    """--distill-skip leaves whole leading chunks out: only the later chunks are made, and they are the
    same answers as in the full data (text stays whole)."""
    made = []
    answer = data_module.greedy_answers
    monkeypatch.setattr(data_module, "greedy_answers", lambda model, prompts, *rest: made.append(prompts)
                        or answer(model, prompts, *rest))
    skipped = make_data(*target, tmp_path / "cache", replace(SETTINGS, distill_skip=SETTINGS.chunk + 1))
    full = [s.ids.tolist() for s in sequences if s.kind == "distill"]
    tail = [s.ids.tolist() for s in skipped if s.kind == "distill"]
    assert 0 < len(tail) < len(full) and tail == full[len(full) - len(tail):]
    assert sum(len(p) for p in made) <= SETTINGS.distill_prompts - SETTINGS.chunk
    assert [s.ids.tolist() for s in skipped if s.kind == "text"] == [s.ids.tolist() for s in sequences
                                                                      if s.kind == "text"]


def test_cached_answers_only_uses_what_is_made(target, sequences, tmp_path, monkeypatch):
    """answer=False makes no self-distilled chunk: the cached ones of the range load (a gap is left out) and the
    teacher-forced text is still made."""
    cache = tmp_path / "cache"
    make_data(*target, cache, replace(SETTINGS, distill_prompts=SETTINGS.chunk))  # chunk 0 only

    def fail(*args, **kwargs):
        raise AssertionError("an answer was generated")

    monkeypatch.setattr(data_module, "greedy_answers", fail)
    loaded = make_data(*target, cache, SETTINGS, answer=False)
    answers = [s.ids.tolist() for s in loaded if s.kind == "distill"]
    assert answers and answers == [s.ids.tolist() for s in sequences if s.kind == "distill"][: len(answers)]
    assert any(s.kind == "text" for s in loaded)


def test_empty_answer_ranges_are_refused(target, tmp_path):
    """A skip past every prompt, or cached answers where none are cached, would train on text alone: one line."""
    with pytest.raises(DovetailError, match="--distill-skip .* leaves none"):
        make_data(*target, tmp_path / "cache", replace(SETTINGS, distill_skip=SETTINGS.distill_prompts))
    with pytest.raises(DovetailError, match="no self-distilled answers are cached.*drop --cached-answers"):
        make_data(*target, tmp_path / "cache", SETTINGS, answer=False)


def test_prompt_stream_keeps_its_prefix_and_leaves_benchmark_code_out():
    prompts = data_module.distill_prompts(300, seed=0)
    assert data_module.distill_prompts(120, seed=0) == prompts[:120]
    assert len({str(p) for p in prompts}) == len(prompts)
    code = data_module.stdlib_functions()
    assert len(code) > 1000 and all(f["doc"] and f["source"].startswith("def ") for f in code)
    # the benchmark's own functions (e.g. textwrap.dedent, difflib.unified_diff) are not there
    names = {f["name"] for f in code}
    assert "dedent" not in names and "unified_diff" not in names and "collapse_addresses" not in names


def test_code_mix_is_its_own_stream_and_the_general_one_keeps_its_cache_key():
    """Caches made before mixes existed stay valid; a code mix is mostly code and never shares a cache."""
    assert DataSettings().key({"name": "tiny"}) == "21340a5d92d910ee"  # the key data v1 and v2 were cached under
    assert DataSettings(mix="code").key({"name": "tiny"}) != DataSettings().key({"name": "tiny"})
    prompts = data_module.distill_prompts(200, seed=0, mix="code")
    assert data_module.distill_prompts(80, seed=0, mix="code") == prompts[:80]

    def about_code(stream: list[list[dict]]) -> int:
        return sum("Python" in p[-1]["content"] or "```python" in p[-1]["content"] for p in stream)

    general = data_module.distill_prompts(200, seed=0)
    assert about_code(prompts) > 0.6 * len(prompts) and about_code(prompts) > 2 * about_code(general)
    assert set(data_module.MIXES) == {c for p in train_command.params if p.name == "mixes" for c in p.type.choices}


def test_several_mixes_read_each_stream_and_the_text_once(tmp_path):
    """`--mix general --mix code` answers both streams' prompts, each in its own cache; the text is made once."""
    from click.testing import CliRunner

    folder = save_model("llama", tmp_path / "tiny-llama")
    cache = tmp_path / "cache"
    result = CliRunner().invoke(train_command, [
        str(folder), "-o", str(tmp_path / "d"), "--mix", "general", "--mix", "code", "--distill-prompts", "4",
        "--max-new-tokens", "4", "--text-tokens", "300", "--seq-len", "128", "--cache", str(cache), "--data-only",
        "--threads", "1"])
    assert result.exit_code == 0, result.output
    folders = {json.loads((f / "settings.json").read_text())["mix"]: f for f in cache.iterdir()}
    assert set(folders) == {"general", "code"}
    assert all(list(f.glob("distill-*.st")) for f in folders.values())
    assert list(folders["general"].glob("text-*.st")) and not list(folders["code"].glob("text-*.st"))


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_bf16_autocast_only_where_the_cpu_has_bf16_units():
    """oneDNN's own check also says yes on AVX-512 without BF16, where it emulates bf16 several times slower."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert train_module.native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert TrainSettings().bf16 == train_module.native_bf16()


def test_training_lowers_the_loss(target, sequences):
    _, before = train_drafter(*target, sequences, quick(steps=0), progress=False)
    _, after = train_drafter(*target, sequences, quick(), progress=False)
    # The cross-entropy against a random target's flat distribution has a high floor; top-1 shows the learning.
    assert after.loss < before.loss and after.extra["all_top1"] > 0.2 > 10 * before.extra["all_top1"]
    assert after.extra["steps"] == 40


def test_unrolled_passes_match_tree_nodes_at_depth_two_and_three(target, sequences):
    """Pass 2 at position j == a depth-2 node: first-pass K/V before j, then its own input. Pass 3 at j ==
    a depth-3 node: first-pass K/V before j − 1, the depth-2 node at j − 1, then its own input."""
    drafter, _ = train_drafter(*target, sequences, quick(steps=5, unroll=3), progress=False)
    drafter.eval()
    batch = collate([s for s in sequences if len(s.ids) > 8][:1])
    with torch.no_grad():
        first, second, third = predict(drafter, batch, unroll=3, noise=0.0)
        inputs, ids = batch.features[:, :-1], batch.ids[:, 1:]
        seq = ids.shape[1]
        _, *kv = drafter(inputs, ids, torch.arange(seq)[None], causal_mask(seq), *empty_past(drafter, 1, "cpu"))
        j = seq // 2
        visible = torch.zeros(1, 1, 1, 1)
        depth2, *kv2 = drafter(first[:, j - 2: j - 1], ids[:, j - 1: j], torch.tensor([[j - 1]]), visible,
                               *[t[:, : j - 1] for t in kv])
        node, *_ = drafter(first[:, j - 1: j], ids[:, j: j + 1], torch.tensor([[j]]), visible,
                           *[t[:, :j] for t in kv])
        path = [torch.cat((t[:, : j - 1], new), dim=1) for t, new in zip(kv, kv2)]
        node3, *_ = drafter(depth2, ids[:, j: j + 1], torch.tensor([[j]]), visible, *path)
    torch.testing.assert_close(node[0, 0], second[0, j], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(depth2[0, 0], second[0, j - 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(node3[0, 0], third[0, j], atol=1e-4, rtol=1e-4)


def test_init_starts_from_a_drafters_weights(target, sequences, tmp_path):
    trained, _ = train_drafter(*target, sequences, quick(steps=20), progress=False)
    save_drafter(trained, tmp_path / "drafter")
    _, fresh = train_drafter(*target, sequences, quick(steps=0), progress=False)
    _, warm = train_drafter(*target, sequences, quick(steps=0), progress=False,
                            init=load_drafter(tmp_path / "drafter", *target))
    _, again = train_drafter(*target, sequences, quick(steps=20), progress=False)
    assert warm.loss == pytest.approx(again.loss, rel=1e-4) and warm.loss < fresh.loss
    init = load_drafter(tmp_path / "drafter", *target)
    init.token_ranking = init.token_ranking.flip(0)  # ranked on other data than this run's
    kept, _ = train_drafter(*target, sequences, quick(steps=1), progress=False, init=init)
    assert torch.equal(kept.token_ranking, init.token_ranking)  # its draft vocabulary stays
    with pytest.raises(DovetailError, match="--layers 1 or more"):
        train_drafter(*target, sequences, quick(steps=0, fusion="eagle"), progress=False, init=init)


def test_added_layers_start_as_the_identity_and_then_learn(target, sequences, tmp_path):
    """A deeper drafter grown from a shallower one predicts what it did, to the last bit of its held-out
    loss, and its added layers move once trained; fewer layers than --init's are refused."""
    shallow, _ = train_drafter(*target, sequences, quick(steps=10), progress=False)
    save_drafter(shallow, tmp_path / "shallow")
    _, same = train_drafter(*target, sequences, quick(steps=0), progress=False,
                            init=load_drafter(tmp_path / "shallow", *target))
    _, grown = train_drafter(*target, sequences, quick(steps=0, layers=3), progress=False,
                             init=load_drafter(tmp_path / "shallow", *target))
    assert grown.loss == pytest.approx(same.loss, rel=1e-6) and grown.acc1 == same.acc1
    deep, _ = train_drafter(*target, sequences, quick(steps=3, layers=2), progress=False,
                            init=load_drafter(tmp_path / "shallow", *target))
    assert deep.layers[1].mlp.down_proj.weight.abs().sum() > 0
    save_drafter(deep, tmp_path / "deep")
    with pytest.raises(DovetailError, match="--layers 2 or more"):
        train_drafter(*target, sequences, quick(steps=0), progress=False, init=load_drafter(tmp_path / "deep", *target))


def test_a_narrower_mlp_trains_saves_and_must_match_its_init(target, sequences, tmp_path):
    """--intermediate-size keeps a large target's drafter small; the width travels in config.json, and an --init
    or a checkpoint of another width is refused in one line."""
    narrow, _ = train_drafter(*target, sequences, quick(steps=3, intermediate_size=32), tmp_path / "run.pt",
                              progress=False)
    assert narrow.layers[0].mlp.up_proj.weight.shape == (32, narrow.config.hidden_size)
    save_drafter(narrow, tmp_path / "narrow", "int8")
    loaded = load_drafter(tmp_path / "narrow", *target)
    assert loaded.config.intermediate_size == 32
    with pytest.raises(DovetailError, match="--intermediate-size 32"):
        train_drafter(*target, sequences, quick(steps=0), progress=False, init=loaded)
    with pytest.raises(DovetailError, match="checkpoint .* is for"):
        train_drafter(*target, sequences, quick(steps=1), tmp_path / "run.pt", resume=True, progress=False)


def test_checkpoint_round_trip(target, sequences, tmp_path):
    drafter, _ = train_drafter(*target, sequences, quick(steps=5), progress=False)
    save_drafter(drafter, tmp_path / "drafter")
    loaded = load_drafter(tmp_path / "drafter", *target)
    batch = collate(sequences[:2])
    with torch.no_grad():
        expected = predict(drafter.eval(), batch, unroll=2, noise=0.0)
        got = predict(loaded.eval(), batch, unroll=2, noise=0.0)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)


def test_int8_weights_round_trip(target, sequences, tmp_path):
    """int8 storage (per-row scales) keeps the drafter's predictions and shrinks its matrices 4x."""
    drafter, _ = train_drafter(*target, sequences, quick(steps=5), progress=False)
    save_drafter(drafter, tmp_path / "fp32")
    save_drafter(drafter, tmp_path / "int8", "int8")
    stored = load_file(str(tmp_path / "int8" / "model.safetensors"))
    assert stored["W_z"].dtype == torch.int8 and stored["W_z.int8_scale"].shape == (drafter.W_z.shape[0], 1)
    assert stored["layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert (tmp_path / "int8" / "model.safetensors").stat().st_size < (tmp_path / "fp32" / "model.safetensors").stat().st_size / 3
    loaded = load_drafter(tmp_path / "int8", *target)
    assert torch.equal(loaded.token_ranking, drafter.token_ranking)
    torch.testing.assert_close(loaded.W_1, drafter.W_1, atol=drafter.W_1.abs().max().item() / 127, rtol=0)
    batch = collate(sequences[:2])
    with torch.no_grad():
        expected = predict(drafter.eval(), batch, unroll=2, noise=0.0)
        got = predict(loaded.eval(), batch, unroll=2, noise=0.0)
    for a, b in zip(expected, got):
        assert (a - b).abs().max() < 0.05 * a.abs().max()
    del stored["W_z.int8_scale"]
    save_file(stored, str(tmp_path / "int8" / "model.safetensors"))
    with pytest.raises(DovetailError, match="W_z has no W_z.int8_scale"):
        load_drafter(tmp_path / "int8", *target)


def test_int4_weights_round_trip(target, sequences, tmp_path):
    """int4 storage (a scale per 32 weights of a row) keeps the predictions close and stores a byte per two weights;
    a matrix whose rows do not split into groups of 32 stays int8, and a packed matrix without scales is refused."""
    drafter, _ = train_drafter(*target, sequences, quick(steps=5, intermediate_size=48), progress=False)
    save_drafter(drafter, tmp_path / "int4", "int4")
    stored = load_file(str(tmp_path / "int4" / "model.safetensors"))
    assert stored["W_z"].dtype == torch.uint8 and stored["W_z"].shape == (128, 32)
    assert stored["W_z.int4_scale"].shape == (128, 2)
    assert stored["layers.0.mlp.down_proj.weight"].dtype == torch.int8  # 48 columns: no groups of 32
    loaded = load_drafter(tmp_path / "int4", *target)
    assert torch.equal(loaded.token_ranking, drafter.token_ranking)
    group_max = drafter.W_z.detach().reshape(128, -1, 32).abs().amax(dim=2, keepdim=True)
    assert ((loaded.W_z - drafter.W_z).reshape(128, -1, 32).abs() <= group_max / 14 + 1e-3).all()
    batch = collate(sequences[:2])
    with torch.no_grad():
        expected = predict(drafter.eval(), batch, unroll=2, noise=0.0)
        got = predict(loaded.eval(), batch, unroll=2, noise=0.0)
    for a, b in zip(expected, got):
        assert (a - b).norm() < 0.2 * a.norm()  # int4 rounding: 1/14 of a group's largest weight
    del stored["W_z.int4_scale"]
    save_file(stored, str(tmp_path / "int4" / "model.safetensors"))
    with pytest.raises(DovetailError,
                       match=r"W_z has no W_z.int4_scale; save the drafter again \(`dovetail-onnx train --weights int4`\)"):
        load_drafter(tmp_path / "int4", *target)


def test_resume_continues_where_it_stopped(target, sequences, tmp_path, monkeypatch):
    straight, _ = train_drafter(*target, sequences, quick(steps=10), progress=False)
    checkpoint = tmp_path / "run.pt"
    save = train_module.save_checkpoint

    def save_then_interrupt(path, drafter, optimizer, step, settings):
        save(path, drafter, optimizer, step, settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(*target, sequences, quick(steps=10, checkpoint_every=6), checkpoint, progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    assert torch.load(checkpoint, weights_only=False)["step"] == 6
    resumed, metrics = train_drafter(*target, sequences, quick(steps=10), checkpoint, resume=True, progress=False)
    assert metrics.extra["steps"] == 10
    for key, value in straight.trained_state_dict().items():
        torch.testing.assert_close(resumed.trained_state_dict()[key], value)


def test_chunked_scoring_equals_whole_batch(target, sequences):
    """Evaluation scores positions a chunk at a time to bound memory; the loss and hits must not change."""
    drafter, _ = train_drafter(*target, sequences, quick(steps=5), progress=False)
    drafter.eval()
    batch = collate(sequences[:4])
    settings = quick()
    with torch.no_grad():
        preds = predict(drafter, batch, unroll=2, noise=0.0)
        whole, whole_hits = train_module.losses(drafter, preds, batch, settings)
        chunked, chunked_hits = train_module.losses(drafter, preds, batch, settings, chunk_rows=7)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(whole_hits, chunked_hits):
        assert torch.equal(a, b)


def test_training_device_auto_takes_the_cpu_here_and_cuda_without_a_gpu_is_one_line(monkeypatch):
    """Dovetail trains drafters on a GPU; where PyTorch sees none, auto trains on the CPU and cuda is refused before
    any data is made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_module.train_device("auto") == "cpu" and train_module.train_device("cpu") == "cpu"
    with pytest.raises(DovetailError, match=r"--device cuda, but PyTorch .* sees no CUDA GPU; .* --device cpu$"):
        train_module.train_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_module.train_device("auto") == "cuda"


def test_the_cli_refuses_cuda_before_the_data_step(tmp_path, monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_module, "train_drafter", lambda *a, **k: pytest.fail("trained"))
    result = CliRunner().invoke(train_command, [str(tmp_path / "no-target"), "-o", str(tmp_path / "d"), "--device",
                                                "cuda"])
    assert result.exit_code == 1 and "sees no CUDA GPU" in result.stderr


def test_training_reports_its_device(target, sequences):
    _, metrics = train_drafter(*target, sequences, quick(steps=2, device="cpu"), progress=False)
    assert metrics.extra["device"] == "cpu"
