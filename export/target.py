"""Export the target LLM to `target.onnx`: onnxruntime-genai's fused graph, adapted to the tree contract.

onnxruntime-genai's model builder writes the fastest CPU graph ONNX Runtime has for these models:
merged QKV, GroupQueryAttention with rotary embedding and a KV cache updated in place, fused
RMSNorms, and MatMulNBits weights for int8/int4. Its attention takes positions from the cache
length and masks causally; a token tree needs explicit positions (past + depth) and an ancestor
mask, which GroupQueryAttention accepts as its `position_ids` and `attention_bias` inputs. So the
builder's graph is kept whole and only those two graph inputs are wired into every attention node.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.export.gguf import use_gguf_blocks
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.kernels import (ATTENTION_OP, DOMAIN, FLOAT_ROWS_OP, ROWS_OP, rows_kernel_takes,
                                           rows_library)
from dovetail_onnx.runtime.manifest import DEFAULT_BLOCK_SIZES, GraphSpec
from dovetail_onnx.runtime.target import ROW_STEPS, Target
from dovetail_onnx.runtime.tree import MASKED, Tree, causal

# MatMulNBits with int8 activations (accuracy level 4) is the fast CPU kernel for quantized weights.
BUILDER_OPTIONS = {"fp32": [], "int8": ["accuracy_level=4"], "int4": ["accuracy_level=4"], "gguf": ["accuracy_level=4"]}
# gguf: the builder's int4 graph (block 32, the GGUF's), its weights then replaced by the GGUF's own (export/gguf.py).
BUILDER_PRECISION = {"fp32": "fp32", "int8": "int8", "int4": "int4", "gguf": "int4"}
# It quantizes activations, so a 1e-7 difference upstream can flip a rounding and move logits by ~0.5.
# Two such differences exist, and both are avoided rather than tolerated:
# - GroupQueryAttention computes a lone query row by another GEMM path (MLAS's one-row kernel) than several, 2e-7
#   apart, while rows of a 2- to 16-row call agree bit for bit. So the quantized graph's attention always runs at
#   least two rows: a lone row is doubled inside the graph and the copy dropped after attention
#   (`pad_lone_query`; the runtime passes positions and bias for `attention_rows`). At block 32 the MatMulNBits rows
#   themselves are bit-identical for any row count (measured per SmolLM2 shape, bits 4 and 8), so the rest of the
#   graph runs one row; at block 128 an odd last row takes another path. Kernels are chosen by CPU, so the runtime
#   finds the row multiple that is exact on its CPU before relying on it (Target.row_step);
# - a tree row whose attention skips other branches' keys sums in another order than sequential decoding:
#   quantized targets verify chains (top_k 1), whose rows are bit-identical to sequential decoding.
# Both are differences of ORT's GroupQueryAttention. The kernel graph (write_rows_graph) runs dovetail's
# TreeAttention instead, which has neither: there no row is padded and quantized targets verify trees too.
ATTENTION_ROWS = {"fp32": 1, "int8": 2, "int4": 2, "gguf": 2}
VERIFY = {"fp32": "tree", "int8": "chain", "int4": "chain", "gguf": "chain"}
# fp32 graph against fp32 PyTorch: differences come from op order and fused kernels only.
LOGIT_TOLERANCE = 1e-3
GQA_KEY, GQA_VALUE, GQA_POSITION_IDS, GQA_ATTENTION_BIAS, GQA_HEAD_SINK = 1, 2, 9, 10, 11


def dims_of(config) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, config.num_key_value_heads, head_dim


def target_spec(model: PreTrainedModel, precision: str, block_size: int | None = None,
                file: str = "target.onnx") -> GraphSpec:
    c = model.config
    _, kv_heads, head_dim = dims_of(c)
    return GraphSpec(file=file, num_layers=c.num_hidden_layers, kv_heads=kv_heads,
                     kv_width=kv_heads * head_dim, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                     precision=precision, attention_rows=ATTENTION_ROWS[precision], verify=VERIFY[precision],
                     block_size=None if precision == "fp32" else block_size or DEFAULT_BLOCK_SIZES[precision])


def export_target(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, precision: str,
                  block_size: int | None = None, gguf: Path | None = None) -> GraphSpec:
    """Write `path` (+ `.data`), check it, and return its manifest entry. `block_size`: weights per scale of a
    quantized target (default: DEFAULT_BLOCK_SIZES); fp32 takes none. `gguf`: the file whose blocks a gguf
    target holds."""
    spec = target_spec(model, precision, block_size, path.name)
    quantized = [f"block_size={spec.block_size}"] if spec.block_size else []
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise DovetailError("export needs onnxruntime-genai's model builder; run `pip install "
                            "onnxruntime-genai-cuda==0.18.0` (the -cuda build installs beside onnxruntime-gpu)")
    with tempfile.TemporaryDirectory() as tmp:
        source, built = Path(tmp) / "hf", Path(tmp) / "built"
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(built),
                   "-p", BUILDER_PRECISION[precision], "-e", "cpu", "-c", str(Path(tmp) / "cache"),
                   "--extra_options", "include_hidden_states=true", *BUILDER_OPTIONS[precision], *quantized]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
            raise DovetailError(f"onnxruntime-genai's model builder failed ({last}); report the model and versions")
        if precision == "gguf":
            use_gguf_blocks(built / "model.onnx", model, gguf)
        # A window on every layer (Mistral v0.1, Phi-3) the builder leaves out; alternating layers (Gemma) it keeps.
        uniform = None if getattr(model.config, "layer_types", None) else getattr(model.config, "sliding_window", None)
        if window := adapt_graph(built / "model.onnx", path, spec.head_dim, spec.attention_rows, uniform):
            spec = spec.model_copy(update={"sliding_window": window})
    # Every graph also gets this one: the same weights, with dovetail's kernels for MatMulNBits and attention.
    rows_file = f"{path.stem}.rows.onnx"
    written, tree_attention = write_rows_graph(path, path.with_name(rows_file))
    if written:
        spec = spec.model_copy(update={"kernel_file": rows_file})
        # Both graphs run on users' CPUs (dovetail's kernels' where they build), so both are checked where they build
        # here; elsewhere the runtime's own row check (Target.row_step) is what stands between it and a user. On
        # TreeAttention a quantized target's tree rows equal sequential decoding too: checked on a two-branch tree
        # before the manifest lets it verify trees there (`kernel_verify`).
        if rows_library()[0]:
            if tree_attention:
                validate_target(model, path, spec.model_copy(update={"verify": "tree"}), kernels=True)
                spec = spec.model_copy(update={"kernel_verify": "tree"})
            else:
                validate_target(model, path, spec, kernels=True)
    checked = validate_target(model, path, spec, kernels=False)
    return spec.model_copy(update={"row_step": checked.row_step})


def write_rows_graph(path: Path, rows_path: Path) -> tuple[bool, bool]:
    """Write the graph at `path` again with dovetail's kernels (runtime/kernels.py) where they take a node: every
    MatMulNBits the row kernel takes, every MatMul by an fp32 weight matrix of whole 16-column tiles, and attention
    as TreeAttention (`use_tree_attention`). It reads the same weights file. Returns (written: False when they
    take no node, attention on TreeAttention)."""
    graph = onnx.load(str(path), load_external_data=False)
    floats = {t.name: t for t in graph.graph.initializer if t.data_type == TensorProto.FLOAT}
    attention = use_tree_attention(graph.graph)
    taken = []
    for node in graph.graph.node:
        weights = floats.get(node.input[1]) if node.op_type == "MatMul" else None
        if weights is not None and len(weights.dims) == 2 and weights.dims[1] % 16 == 0:
            node.op_type, node.domain = FLOAT_ROWS_OP, DOMAIN
            taken.append(node)
        elif node.op_type == "MatMulNBits":
            a = {attribute.name: attribute.i for attribute in node.attribute}
            inputs = [i for i in node.input if i]
            if rows_kernel_takes(a["bits"], a["K"], a["N"], a["block_size"], len(inputs),
                                 float_zero_points=len(node.input) > 3 and node.input[3] in floats):
                node.op_type, node.domain = ROWS_OP, DOMAIN
                taken.append(node)
    if taken or attention:
        graph.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        onnx.save(graph, str(rows_path))
    return bool(taken or attention), attention


def use_tree_attention(g: onnx.GraphProto) -> bool:
    """Run every GroupQueryAttention as dovetail's TreeAttention (kernels/tree_attention.cpp: the same inputs and
    outputs, each row computed alike however many run, tree rows equal to sequential decoding), dropping the lone
    query row's padding (`pad_lone_query`), which it does not need. False, graph unchanged, where a node uses what
    TreeAttention does not (a sliding window, softcap, interleaved rotary, unpacked Q/K/V, a head sink)."""
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    supported = {"local_window_size": -1, "softcap": 0.0, "rotary_interleaved": 0}
    if not attention or any(helper.get_attribute_value(a) != supported[a.name]
                            for n in attention for a in n.attribute if a.name in supported):
        return False
    # Separate K and V (Qwen3's per-head norms come between the projection and attention) or a head sink.
    if any(name for n in attention for i, name in enumerate(n.input) if i in (GQA_KEY, GQA_VALUE, GQA_HEAD_SINK)):
        return False
    producer = {output: n for n in g.node for output in n.output}
    padding = set()
    for node in attention:
        pad = producer.get(node.input[0])
        if pad is not None and pad.name.endswith("/pad"):
            double = producer[pad.input[0]]
            node.input[0] = double.input[0]
            unpad = next(n for n in g.node if n.name.endswith("/unpad") and n.input[0] == node.output[0])
            node.output[0] = unpad.output[0]
            padding.update((pad.name, double.name, unpad.name))
        node.op_type, node.domain = ATTENTION_OP, DOMAIN
    if padding:
        padding.update(("/dovetail/query_rows", "/dovetail/own_rows"))
        kept = [n for n in g.node if n.name not in padding]
        del g.node[:]
        g.node.extend(kept)
        kept_initializers = [t for t in g.initializer if t.name not in ("/dovetail/zero", "/dovetail/axis")]
        del g.initializer[:]
        g.initializer.extend(kept_initializers)
    return True


def adapt_graph(source: Path, path: Path, head_dim: int, attention_rows: int,
                uniform_window: int | None = None) -> int | None:
    """Wire `position_ids` and `attention_bias` graph inputs into every GroupQueryAttention node, declare the
    KV head size (so a manifest that disagrees is caught at load), pad a lone query row when `attention_rows`
    is 2, and move the graph and its weights to `path` (the weights are renamed on disk, never loaded).

    A sliding-window node (Gemma-2's local layers, Mistral's window) reads `attention_bias_local` instead, which
    the runtime masks to the window itself: GroupQueryAttention's own window treats the KV buffer as a ring of the
    window's size, which a buffer of kept tree rows is not. `uniform_window`: the model's window on every layer,
    applied to every node where the builder set none. Returns the window (None: no node has one)."""
    graph = onnx.load(str(source), load_external_data=False)
    g = graph.graph
    for value in [*g.input, *g.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[3].dim_value = head_dim
    rows = "sequence_length" if attention_rows == 1 else "attention_rows"
    g.input.extend([
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", rows]),
        helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, ["batch_size", 1, rows, "total_sequence_length"]),
    ])
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not attention:
        raise DovetailError("the builder's graph has no GroupQueryAttention node; report the model and versions")
    windows = set()
    for node in attention:
        while len(node.input) <= GQA_ATTENTION_BIAS:
            node.input.append("")
        node.input[GQA_POSITION_IDS], node.input[GQA_ATTENTION_BIAS] = "position_ids", "attention_bias"
        window = next((a.i for a in node.attribute if a.name == "local_window_size" and a.i > 0), None)
        if window:
            windows.add(window)
            for attribute in node.attribute:
                if attribute.name in ("local_window_size", "sliding_window_cache"):
                    attribute.i = -1 if attribute.name == "local_window_size" else 0
            node.input[GQA_ATTENTION_BIAS] = "attention_bias_local"
    if uniform_window and not windows:
        windows.add(uniform_window)
        for node in attention:
            node.input[GQA_ATTENTION_BIAS] = "attention_bias_local"
    if len(windows) > 1:
        raise DovetailError(f"the builder's graph has several attention windows {sorted(windows)}; report the model")
    if windows:
        g.input.append(helper.make_tensor_value_info("attention_bias_local", TensorProto.FLOAT,
                                                     ["batch_size", 1, rows, "total_sequence_length"]))
    if attention_rows == 2:
        pad_lone_query(g)
    data = path.name + ".data"
    for tensor in g.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source.with_name(source.name + ".data"), path.with_name(data))
    onnx.save(graph, str(path))
    return windows.pop() if windows else None


def pad_lone_query(g: onnx.GraphProto) -> None:
    """Run every attention node over as many query rows as `position_ids` has (the runtime gives it two when one
    token runs): the packed Q/K/V rows are doubled and cut to that count before the node, and its output is cut
    back to the graph's own rows after it; for two or more rows both cuts keep the rows as they are. On int4
    SmolLM2 at 100 tokens of context this costs 0.4-0.6 ms of a 6-7 ms forward, mostly the second attention row
    (an Expand instead of Concat + Slice measured 0.27 ms slower)."""
    names = {name: f"/dovetail/{name}" for name in ("query_rows", "own_rows", "zero", "axis")}
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), names["zero"]),
                          numpy_helper.from_array(np.array([1], np.int64), names["axis"])])
    nodes = [helper.make_node("Shape", [source], [names[rows]], start=1, end=2, name=names[rows])
             for source, rows in (("position_ids", "query_rows"), ("input_ids", "own_rows"))]
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        packed, out, prefix = node.input[0], node.output[0], node.name
        node.input[0], node.output[0] = f"{prefix}/padded_query", f"{prefix}/padded_output"
        nodes += [helper.make_node("Concat", [packed, packed], [f"{prefix}/doubled_query"], axis=1, name=f"{prefix}/double"),
                  helper.make_node("Slice", [f"{prefix}/doubled_query", names["zero"], names["query_rows"], names["axis"]],
                                   [node.input[0]], name=f"{prefix}/pad"),
                  node,
                  helper.make_node("Slice", [node.output[0], names["zero"], names["own_rows"], names["axis"]], [out],
                                   name=f"{prefix}/unpad")]
    del g.node[:]
    g.node.extend(nodes)


def validate_target(model: PreTrainedModel, path: Path, spec: GraphSpec, prompt_len: int = 12,
                    kernels: bool = True) -> Target:
    """A prefill and a tree step (two branches; a chain for chain-verifying targets) on the graph: every row
    must equal sequential decoding of its root path (bit for bit when quantized), and in fp32 the logits must
    equal PyTorch's. Returns the Target it checked with (its `row_step` is the one this CPU needs)."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, spec.vocab_size, (prompt_len,), generator=generator).numpy()
    shape = [-1, 0, 0, 2] if spec.verify == "tree" else [-1, 0, 1, 2]
    tree = Tree(torch.randint(0, spec.vocab_size, (4,), generator=generator).numpy(), np.array(shape))
    # The row multiple is what this check finds out (and export records), so the runtime's note about a CPU that
    # needs more than the exporting one has nothing to compare with yet: claim the most there is.
    target = Target(path, spec.model_copy(update={"row_step": max(ROW_STEPS)}), threads=None, kernels=kernels)
    target.start(prompt_len + len(tree), len(tree))
    prefill_logits = target.forward(prompt, np.arange(prompt_len), causal(prompt_len))[0].copy()
    target.kv.keep(np.arange(prompt_len))
    tree_logits = target.forward(tree.tokens, prompt_len + tree.depth, tree.mask())[0].copy()
    errors = []
    for leaf_path in tree.paths():
        target.kv.length = prompt_len
        for node in leaf_path:
            row = target.forward(tree.tokens[[node]], np.array([target.kv.length]), np.zeros((1, 1, 1, 1), np.float32))
            target.kv.keep(np.arange(1))
            errors.append(np.abs(row[0][0] - tree_logits[node]).max())
    if spec.precision == "fp32":
        errors += _against_pytorch(model, prompt, tree, prefill_logits, tree_logits)
    worst = float(max(errors))
    # A quantized target's rows must equal its sequential decoding exactly: its speculative output is its own.
    tolerance = LOGIT_TOLERANCE if spec.precision == "fp32" else 0.0
    if not worst <= tolerance:
        raise DovetailError(
            f"exported target disagrees with {'PyTorch' if spec.precision == 'fp32' else 'sequential decoding'}: "
            f"max |Δlogit| {worst:.2e} > {tolerance:g}; report the model and versions"
        )
    return target


def _against_pytorch(model, prompt: np.ndarray, tree: Tree, prefill_logits: np.ndarray, tree_logits: np.ndarray):
    n, t = len(prompt), len(tree)
    full = np.full((n + t, n + t), MASKED, dtype=np.float32)
    full[:n, :n] = np.where(np.tril(np.ones((n, n), dtype=bool)), 0.0, MASKED)
    full[n:, :n] = 0.0
    full[n:, n:] = tree.mask()[0, 0]
    positions = np.concatenate((np.arange(n), n + tree.depth))
    mask = torch.from_numpy(full)[None, None]
    if window := getattr(model.config, "sliding_window", None):  # keys at least `window` positions back are out
        local = torch.from_numpy(np.where(positions[:, None] - positions[None, :] < window, full, MASKED))[None, None]
        types = getattr(model.config, "layer_types", None)  # Gemma's alternate local and global layers
        mask = {kind: local if kind == "sliding_attention" else mask for kind in types} if types else local
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(np.concatenate((prompt, tree.tokens)))[None],
                          position_ids=torch.from_numpy(positions)[None], attention_mask=mask).logits[0].numpy()
    return [np.abs(prefill_logits - reference[:n]).max(), np.abs(tree_logits - reference[n:]).max()]
