"""Export a drafter to `drafter.onnx` with top-k inside the graph.

Only `max_top_k` ids and log-probs per node leave the drafter's device, never vocabulary-sized logits.
The input features are gathered inside the graph (`hidden_states[:, hidden_index]`), so a tree step
reads its parents' features straight from the previous step's `out_hidden`, which never leaves the
device; only the accepted tokens' target features come in from the host.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dovetail_onnx.export.drafter import Drafter
from dovetail_onnx.export.modules import causal_mask
from dovetail_onnx.export.onnx_io import export_graph, run_graph
from dovetail_onnx.runtime.buffers import KVCache
from dovetail_onnx.runtime.errors import DovetailError

TOLERANCE = 1e-3


class DrafterGraph(nn.Module):
    def __init__(self, drafter: Drafter, max_top_k: int, draft_vocab: int = 0):
        super().__init__()
        self.drafter = drafter
        self.max_top_k = max_top_k
        vocab = drafter.draft_vocab(draft_vocab)
        weight = drafter.lm_head.weight if vocab is None else drafter.lm_head.weight[vocab]
        self.head = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("vocab_ids", torch.arange(weight.shape[0]) if vocab is None else vocab)

    def forward(self, hidden_states, hidden_index, input_ids, position_ids, attention_mask, *past):
        features = hidden_states[:, hidden_index]
        hidden, *new_kv = self.drafter(features, input_ids, position_ids, attention_mask, *past)
        logprobs = torch.log_softmax(torch.matmul(hidden, self.head.t()).float(), dim=-1)
        values, index = torch.topk(logprobs, self.max_top_k, dim=-1)
        return (self.vocab_ids[index], values, hidden, *new_kv)


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of the MatMul weights: the drafter for CPU drafting.

    A CPU draft step is bound by reading weights; int8 reads a quarter. (On CUDA the fp32 graph is
    used: these int8 kernels are CPU ones.) The target still verifies every token, so the output
    cannot change; only the acceptance rate can.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        logging.disable(logging.WARNING)  # it advises a pre-processing pass that changes nothing here
        try:
            quantize_dynamic(source, out, weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"MatMulConstBOnly": True}, use_external_data_format=True)
        finally:
            logging.disable(logging.NOTSET)
        for produced in (out, out.with_name(out.name + ".data")):
            shutil.move(produced, target.parent / produced.name)


def export_drafter(drafter: Drafter, path: Path, max_top_k: int, draft_vocab: int = 0) -> None:
    config = drafter.config
    layers, width = config.num_layers, config.num_key_value_heads * config.head_dim
    past_len, seq = 3, 4
    example = (
        torch.randn(1, seq + 1, config.hidden_size),
        torch.tensor([3, 0, 1, 1]),
        torch.randint(0, config.vocab_size, (1, seq)),
        torch.arange(past_len, past_len + seq)[None],
        causal_mask(seq),
        *[torch.randn(1, past_len, width) for _ in range(2 * layers)],
    )
    past_names, new_names = KVCache.names(layers, "past"), KVCache.names(layers, "new")
    graph = DrafterGraph(drafter, max_top_k, draft_vocab)
    export_graph(
        graph,
        example,
        path,
        input_names=["hidden_states", "hidden_index", "input_ids", "position_ids", "attention_mask", *past_names],
        output_names=["topk_ids", "topk_logprobs", "out_hidden", *new_names],
        dynamic_axes={
            "hidden_states": {1: "rows"},
            "hidden_index": {0: "seq"},
            "input_ids": {1: "seq"},
            "position_ids": {1: "seq"},
            "attention_mask": {2: "seq", 3: "window"},
            **{n: {1: "past"} for n in past_names},
            "topk_ids": {1: "seq"},
            "topk_logprobs": {1: "seq"},
            "out_hidden": {1: "seq"},
            **{n: {1: "seq"} for n in new_names},
        },
    )
    out = run_graph(path, {k: v.numpy() for k, v in zip(
        ["hidden_states", "hidden_index", "input_ids", "position_ids", "attention_mask", *past_names], example)})
    with torch.no_grad():
        ids, values, *_ = graph(*example)
    error = float(np.abs(out["topk_logprobs"] - values.numpy()).max())
    if not error <= TOLERANCE:
        raise DovetailError(f"exported drafter disagrees with PyTorch: max |Δlogprob| {error:.2e} > {TOLERANCE:g}")
