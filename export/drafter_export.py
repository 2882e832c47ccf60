"""Export a drafter to `drafter.onnx` with top-k inside the graph.

Only `max_top_k` ids and log-probs per node leave the drafter's device, never vocabulary-sized logits.
The input features are gathered inside the graph (`hidden_states[:, hidden_index]`), so a tree step
reads its parents' features straight from the previous step's `out_hidden`, which never leaves the
device; only the accepted tokens' target features come in from the host.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dovetail_onnx.export.drafter import GROUP, Drafter
from dovetail_onnx.export.gguf import Blocks, set_blocks
from dovetail_onnx.export.modules import causal_mask
from dovetail_onnx.export.onnx_io import export_graph, run_graph
from dovetail_onnx.export.target import write_rows_graph
from dovetail_onnx.runtime.buffers import KVCache
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.kernels import rows_library

TOLERANCE = 1e-3
# Both kernels quantize activations to int8 per block by the same rule, but one on a rounding edge may go either way
# in float arithmetic done in another order (a random tiny drafter: 6e-3); a broken kernel is off by whole units.
KERNEL_TOLERANCE = 0.05
# The CPU drafter (`quantize_int4`) and the same on dovetail's row kernel (runtime/kernels.py).
CPU_FILE, CPU_KERNEL_FILE = "drafter.int4.onnx", "drafter.int4.rows.onnx"


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


def quantize_int4(source: Path, target: Path) -> None:
    """The drafter for CPU drafting: every MatMul by a weight matrix as ONNX Runtime's MatMulNBits, 4 bits with one
    fp32 scale per 32 weights along K (symmetric, -7..7), and the embedding table in uint8 (ONNX Runtime's dynamic
    quantization of its Gather).

    A CPU draft step is bound by reading weights: 4 bits read half of int8's, and dovetail's row kernel
    (`write_rows_graph`) runs these nodes at the target's speed. The grid is the one `pack_int4` stores a drafter
    on, so a drafter shipped in int4 keeps its decoder layer's weights exactly (ONNX Runtime's own 4-bit quantizer
    maps to -8..7 and would move every one of them). The target still verifies every token, so the output cannot
    change; only the acceptance rate can.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        gathered = Path(tmp) / target.name
        logging.disable(logging.WARNING)  # it advises a pre-processing pass that changes nothing here
        try:
            quantize_dynamic(source, gathered, weight_type=QuantType.QUInt8, op_types_to_quantize=["Gather"],
                             use_external_data_format=True)
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(gathered))
    graph = model.graph
    matrices = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    nodes, replaced = [], set()
    for node in graph.node:
        weights = matrices.get(node.input[1]) if node.op_type == "MatMul" else None
        if weights is None or weights.dims[0] % GROUP:
            nodes.append(node)
            continue
        k, n = weights.dims
        groups = numpy_helper.to_array(weights).T.reshape(n, k // GROUP, GROUP)
        scales = np.maximum(np.abs(groups).max(axis=2) / 7, np.finfo(np.float32).tiny).astype(np.float32)
        q = (np.clip(np.round(groups / scales[..., None]), -7, 7) + 8).astype(np.uint8).reshape(n, k)
        name = f"{weights.name}.int4"
        quantized = helper.make_node("MatMulNBits", [node.input[0], name, f"{name}.scales"], list(node.output),
                                     name=f"{node.name}.int4", domain="com.microsoft", K=k, N=n, bits=4,
                                     block_size=GROUP, accuracy_level=4)
        set_blocks(quantized, Blocks(q, scales, None, 4, GROUP),
                   {i: graph.initializer.add(name=i) for i in quantized.input[1:]}, graph)
        replaced.add(weights.name)
        nodes.append(quantized)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    target.with_name(target.name + ".data").unlink(missing_ok=True)
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target.name + ".data", size_threshold=1024)


def export_drafter(drafter: Drafter, path: Path, max_top_k: int, draft_vocab: int = 0) -> dict[str, np.ndarray]:
    """Write the drafter graph at `path`, checked against PyTorch; returns the inputs it was checked on."""
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
    feeds = {k: v.numpy() for k, v in zip(
        ["hidden_states", "hidden_index", "input_ids", "position_ids", "attention_mask", *past_names], example)}
    out = run_graph(path, feeds)
    with torch.no_grad():
        ids, values, *_ = graph(*example)
    error = float(np.abs(out["topk_logprobs"] - values.numpy()).max())
    if not error <= TOLERANCE:
        raise DovetailError(f"exported drafter disagrees with PyTorch: max |Δlogprob| {error:.2e} > {TOLERANCE:g}")
    return feeds


def export_cpu_drafter(source: Path, feeds: dict[str, np.ndarray]) -> str | None:
    """`CPU_FILE` beside the drafter graph at `source` (`quantize_int4`), and `CPU_KERNEL_FILE`, the same on
    dovetail's row kernel, checked against it on `feeds` where the kernels build here. Returns the kernel graph's
    name, None where the kernel takes none of its nodes."""
    path, rows = source.with_name(CPU_FILE), source.with_name(CPU_KERNEL_FILE)
    quantize_int4(source, path)
    if not write_rows_graph(path, rows)[0]:
        return None
    if library := rows_library()[0]:
        expected = run_graph(path, feeds)["topk_logprobs"]
        error = float(np.abs(run_graph(rows, feeds, (library,))["topk_logprobs"] - expected).max())
        if not error <= KERNEL_TOLERANCE:
            raise DovetailError(f"the CPU drafter on dovetail's row kernel disagrees with ONNX Runtime's MatMulNBits: "
                                f"max |Δlogprob| {error:.2e} > {KERNEL_TOLERANCE:g}; report the CPU and versions")
    return CPU_KERNEL_FILE
