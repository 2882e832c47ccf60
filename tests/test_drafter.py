"""Drafter checkpoints: our folder format and the Dovetail / EAGLE reference layouts."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from dovetail_onnx.export.artifact import SHIPPED
from dovetail_onnx.export.drafter import Drafter, DrafterConfig, load_drafter, random_drafter, save_drafter
from dovetail_onnx.export.modules import causal_mask
from dovetail_onnx.runtime.manifest import load_manifest
from dovetail_onnx.runtime.tree import additive
from tiny import make_model, make_tokenizer


def outputs(drafter: Drafter, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = drafter.config
    features = torch.randn(1, 5, config.hidden_size, generator=generator)
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=generator)
    empty = torch.zeros(1, 0, config.num_key_value_heads * config.head_dim)
    with torch.no_grad():
        hidden, *_ = drafter(features, ids, torch.arange(5)[None], causal_mask(5), *[empty] * (2 * config.num_layers))
    return hidden


@pytest.mark.parametrize("fusion", ["dgf", "eagle"])
def test_folder_round_trip(fusion, tmp_path):
    target, tokenizer = make_model("llama"), make_tokenizer()
    drafter = random_drafter(target, tokenizer, 2, fusion)
    save_drafter(drafter, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", target, tokenizer)
    assert loaded.config.fusion == fusion and loaded.config.num_layers == 2
    torch.testing.assert_close(outputs(loaded), outputs(drafter))


@pytest.mark.parametrize("fusion,keys", [("dgf", {"W_z", "W_1", "W_2", "input_layernorm.weight"}),
                                         ("eagle", {"fc.weight", "fc.bias"})])
def test_reference_layouts_load(fusion, keys, tmp_path):
    """Dovetail's HCSD and EAGLE's pytorch_model.bin: same names, embeddings/head from the target."""
    target, tokenizer = make_model("qwen2"), make_tokenizer()
    drafter = random_drafter(target, tokenizer, 2, fusion)
    state = drafter.trained_state_dict()
    assert keys <= set(state)
    state["embed_tokens.weight"] = torch.zeros(1)  # references may carry their own copy; it is ignored
    (tmp_path / "ref").mkdir()
    torch.save(state, tmp_path / "ref" / "pytorch_model.bin")
    loaded = load_drafter(tmp_path / "ref", target, tokenizer)
    assert loaded.config.fusion == fusion and loaded.config.num_layers == 2
    torch.testing.assert_close(outputs(loaded), outputs(drafter))


def test_drafter_graph_tree_step_matches_sequential(artifacts):
    """A draft node that sees only its ancestors among earlier draft rows equals running its path alone."""
    session = ort.InferenceSession(str(artifacts["llama"] / "drafter.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    spec = load_manifest(artifacts["llama"]).drafter
    layers = spec.num_layers
    rng = np.random.default_rng(0)

    def run(feats, ids, pos, mask, past):
        feeds = {"hidden_states": feats[None].astype(np.float32), "hidden_index": np.arange(len(ids)),
                 "input_ids": np.array([ids]), "position_ids": np.array([pos]), "attention_mask": mask}
        for i in range(layers):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = past[2 * i][None], past[2 * i + 1][None]
        out = dict(zip(names, session.run(names, feeds)))
        return out, [out[f"new_{k}.{i}"][0] for i in range(layers) for k in ("key", "value")]

    empty = [np.zeros((0, spec.kv_width), np.float32)] * (2 * layers)
    feats = rng.standard_normal((6, spec.hidden_size))
    ids = list(rng.integers(0, 300, 6))
    # Stable past: 3 rows. Level 1: nodes a, b (each sees itself). Level 2: node c under b.
    _, stable = run(feats[:3], ids[:3], [0, 1, 2], additive(np.tril(np.ones((3, 3), bool)))[None, None], empty)
    _, level1 = run(feats[3:5], ids[3:5], [3, 3], additive(np.eye(2, dtype=bool))[None, None], stable)
    past = [np.concatenate((s, n)) for s, n in zip(stable, level1)]
    tree_out, _ = run(feats[5:6], ids[5:6], [4], additive(np.array([[False, True, True]]))[None, None], past)

    _, seq_b = run(feats[4:5], ids[4:5], [3], np.zeros((1, 1, 1, 1), np.float32), stable)
    past = [np.concatenate((s, n)) for s, n in zip(stable, seq_b)]
    seq_out, _ = run(feats[5:6], ids[5:6], [4], np.zeros((1, 1, 1, 1), np.float32), past)
    np.testing.assert_allclose(tree_out["topk_logprobs"], seq_out["topk_logprobs"], atol=1e-4)
    np.testing.assert_array_equal(tree_out["topk_ids"], seq_out["topk_ids"])


@pytest.mark.parametrize("folder", sorted(p.parent for p in SHIPPED.glob("*/config.json")), ids=lambda p: p.name)
def test_shipped_drafters_are_complete_and_small(folder):
    """Each shipped drafter names the target it was trained for, ranks that target's whole vocabulary,
    carries its recipe and stays ≤ 40 MB."""
    assert (folder / "RECIPE.md").is_file()
    assert (folder / "model.safetensors").stat().st_size <= 40 * 2**20
    config = DrafterConfig(**json.loads((folder / "config.json").read_text()))
    assert config.target["vocab_size"] == config.vocab_size
    assert 0 < config.draft_vocab_size <= config.vocab_size
    ranking = load_file(str(folder / "model.safetensors"))["token_ranking"]
    assert sorted(ranking.tolist()) == list(range(config.vocab_size))
