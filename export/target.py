"""Export the target LLM to `target.onnx`: tree mask in, logits + last hidden states + new K/V out."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from dovetail_onnx.export.modules import causal_mask, decoder_layer
from dovetail_onnx.export.onnx_io import export_graph, kv_names, run_graph
from dovetail_onnx.runtime.errors import DovetailError

# fp32 graph against fp32 PyTorch: differences come from op order and fused kernels only.
LOGIT_TOLERANCE = 1e-3


def dims_of(config) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, config.num_key_value_heads, head_dim


class TargetGraph(nn.Module):
    """The causal LM forward with the runtime's KV and mask contract (see modules.py)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head
        self.dims = dims_of(model.config)

    def forward(self, input_ids, position_ids, attention_mask, *past):
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(x, position_ids)
        new_kv = []
        for i, layer in enumerate(self.model.layers):
            x, k, v = decoder_layer(layer, x, cos, sin, past[2 * i], past[2 * i + 1], attention_mask, self.dims)
            new_kv += [k, v]
        hidden = self.model.norm(x)
        return (self.lm_head(hidden), hidden, *new_kv)


def export_target(model: PreTrainedModel, path: Path) -> None:
    """Write `path` and check it against the PyTorch model; raise if the logits drift."""
    config = model.config
    _, kv_heads, head_dim = dims_of(config)
    layers = config.num_hidden_layers
    past_len, seq = 3, 4
    example = (
        torch.randint(0, config.vocab_size, (1, seq)),
        torch.arange(past_len, past_len + seq)[None],
        causal_mask(seq),
        *[torch.randn(1, past_len, kv_heads * head_dim) for _ in range(2 * layers)],
    )
    past_names, new_names = kv_names(layers, "past"), kv_names(layers, "new")
    export_graph(
        TargetGraph(model),
        example,
        path,
        input_names=["input_ids", "position_ids", "attention_mask", *past_names],
        output_names=["logits", "hidden_states", *new_names],
        dynamic_axes={
            "input_ids": {1: "seq"},
            "position_ids": {1: "seq"},
            "attention_mask": {2: "seq", 3: "window"},
            **{n: {1: "past"} for n in past_names},
            "logits": {1: "seq"},
            "hidden_states": {1: "seq"},
            **{n: {1: "seq"} for n in new_names},
        },
    )
    validate_target(model, path)


def validate_target(model: PreTrainedModel, path: Path, prompt_len: int = 12) -> float:
    """Prefill, then a small tree step (two branches), against transformers with a 4D mask."""
    config = model.config
    _, kv_heads, head_dim = dims_of(config)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=generator)
    # Tree: root, two children of the root, one grandchild under the second child.
    tree_tokens = torch.randint(0, config.vocab_size, (1, 4), generator=generator)
    parents = [-1, 0, 0, 2]
    tree = np.full((4, 4), np.finfo(np.float32).min, dtype=np.float32)
    depth = []
    for i, p in enumerate(parents):
        tree[i, i] = 0.0
        node, d = p, 0
        while node >= 0:
            tree[i, node] = 0.0
            node, d = parents[node], d + 1
        depth.append(d)

    total = prompt_len + 4
    full = np.full((total, total), np.finfo(np.float32).min, dtype=np.float32)
    full[:prompt_len, :prompt_len] = causal_mask(prompt_len).numpy()[0, 0]
    full[prompt_len:, :prompt_len] = 0.0
    full[prompt_len:, prompt_len:] = tree
    positions = list(range(prompt_len)) + [prompt_len + d for d in depth]
    with torch.no_grad():
        reference = model(
            input_ids=torch.cat((prompt, tree_tokens), dim=1),
            position_ids=torch.tensor([positions]),
            attention_mask=torch.from_numpy(full)[None, None],
        ).logits[0].numpy()

    empty = np.zeros((1, 0, kv_heads * head_dim), dtype=np.float32)
    feeds = {
        "input_ids": prompt.numpy(),
        "position_ids": np.arange(prompt_len)[None],
        "attention_mask": causal_mask(prompt_len).numpy(),
        **{n: empty for n in kv_names(config.num_hidden_layers, "past")},
    }
    out = run_graph(path, feeds)
    errors = [np.abs(out["logits"][0] - reference[:prompt_len]).max()]
    feeds = {
        "input_ids": tree_tokens.numpy(),
        "position_ids": np.array([[prompt_len + d for d in depth]]),
        "attention_mask": tree[None, None],
        **{p: out[n] for p, n in zip(kv_names(config.num_hidden_layers, "past"), kv_names(config.num_hidden_layers, "new"))},
    }
    out = run_graph(path, feeds)
    errors.append(np.abs(out["logits"][0] - reference[prompt_len:]).max())
    worst = float(max(errors))
    if not worst <= LOGIT_TOLERANCE:
        raise DovetailError(
            f"exported target disagrees with PyTorch: max |Δlogit| {worst:.2e} > {LOGIT_TOLERANCE:g}; "
            "report the model and versions"
        )
    return worst
