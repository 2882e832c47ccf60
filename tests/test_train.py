"""Drafter training on a tiny target: data cache, loss going down, unrolled pass, checkpoints."""
from __future__ import annotations

import pytest
import torch

from dovetail_onnx.export import data as data_module
from dovetail_onnx.export import train as train_module
from dovetail_onnx.export.data import DataSettings, make_data
from dovetail_onnx.export.drafter import load_drafter, save_drafter
from dovetail_onnx.export.load import load_target
from dovetail_onnx.export.modules import causal_mask
from dovetail_onnx.export.train import TrainSettings, collate, empty_past, predict, train_drafter
from tiny import save_model

SETTINGS = DataSettings(distill_prompts=12, max_new_tokens=12, text_tokens=1500, seq_len=128, distill_batch=6,
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


def test_training_lowers_the_loss(target, sequences):
    _, before = train_drafter(*target, sequences, quick(steps=0), progress=False)
    _, after = train_drafter(*target, sequences, quick(), progress=False)
    assert after.loss < 0.8 * before.loss
    assert after.extra["steps"] == 40


def test_unrolled_pass_matches_a_depth_two_tree_node(target, sequences):
    """Second-pass output at position j == the drafter run on first-pass K/V before j plus its own input."""
    drafter, _ = train_drafter(*target, sequences, quick(steps=5, unroll=2), progress=False)
    drafter.eval()
    batch = collate([s for s in sequences if len(s.ids) > 8][:1])
    with torch.no_grad():
        first, second = predict(drafter, batch, unroll=2, noise=0.0)
        inputs, ids = batch.features[:, :-1], batch.ids[:, 1:]
        seq = ids.shape[1]
        _, *kv = drafter(inputs, ids, torch.arange(seq)[None], causal_mask(seq), *empty_past(drafter, 1))
        j = seq // 2
        node, *_ = drafter(first[:, j - 1: j], ids[:, j: j + 1], torch.tensor([[j]]), torch.zeros(1, 1, 1, 1),
                           *[t[:, :j] for t in kv])
    torch.testing.assert_close(node[0, 0], second[0, j], atol=1e-4, rtol=1e-4)


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
