"""A GGUF file's own quantized blocks as MatMulNBits weights (`--precision gguf`).

transformers dequantizes a GGUF to fp32, and int4/int8 export then quantizes those values a second time: the
4-bit levels of a Q4_1 block (w = d q + m) do not survive a symmetric 4-bit grid, so int4 SmolLM2 keeps to the
GGUF's own greedy answer for ~2 tokens. Q4_0, Q4_1, Q5_0 and Q8_0 blocks of 32 map onto MatMulNBits exactly
(Q4_1's min as a float zero point -m/d, Q5_0 on the 8-bit grid), so the exported graph computes with the very
weights llama.cpp would; so do the K-quants of a Q4_K_M file: Q4_K's 32-value sub-blocks (scale d·sc, min
dmin·m) and Q6_K's 16-value ones on the 8-bit grid. Other types (f16, f32, Q5_K, ...) are quantized to 8 bits
per 32 values, the nearest to lossless MatMulNBits has; export says how many.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, dequantize, get_tensor_name_map
from onnx import helper, numpy_helper
from transformers import PreTrainedModel

from dovetail_onnx.runtime.errors import DovetailError

log = logging.getLogger(__name__)
BLOCK = 32  # values per block of the types mapped exactly (Q6_K: 16) and of the 8-bit fallback
# Bytes per block (of 32 values; of 256 for the K-quants) of the types mapped exactly.
EXACT = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q5_0: 22,
         GGMLQuantizationType.Q8_0: 34, GGMLQuantizationType.Q4_K: 144, GGMLQuantizationType.Q6_K: 210}
# What dequantized weights may differ by once a min is a zero point (Q4_1's -m/d times d): float rounding only.
MAPPING_TOLERANCE = 1e-6


@dataclass
class Blocks:
    """Weights as MatMulNBits reads them, unpacked: w[n, k] = scales[n, k // block] (q[n, k] - zero point), the
    zero point 2^(bits-1) when `zero_points` is None."""

    q: np.ndarray  # uint8 [N, K], below 2^bits
    scales: np.ndarray  # float32 [N, K // block]
    zero_points: np.ndarray | None  # float32 [N, K // block]
    bits: int
    block: int = BLOCK
    exact: bool = True  # the GGUF's own values, not quantized again

    def dequantized(self) -> np.ndarray:
        zero = self.zero_points if self.zero_points is not None else np.float32(2 ** (self.bits - 1))
        n, k = self.q.shape
        per_block = self.q.reshape(n, -1, self.block).astype(np.float32) - np.asarray(zero)[..., None]
        return (per_block * self.scales[..., None]).reshape(n, k)

    def rows(self, order: np.ndarray) -> Blocks:
        zero_points = None if self.zero_points is None else self.zero_points[order]
        return replace(self, q=self.q[order], scales=self.scales[order], zero_points=zero_points)


def read_blocks(raw: np.ndarray, kind: GGMLQuantizationType) -> Blocks | None:
    """The blocks of one tensor's rows (`raw`: uint8 [N, bytes per row], as GGUFReader gives them), or None for a
    type that has no exact MatMulNBits form. Layouts as ggml defines them: in the 32-value types, each
    half-block's values sit in the low nibbles of 16 bytes (values 0-15) and the high nibbles (16-31)."""
    if kind not in EXACT:
        return None
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, EXACT[kind])

    def half(at: int) -> np.ndarray:  # the fp16 at byte `at` of every block
        return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    if kind == GGMLQuantizationType.Q4_K:
        return _q4_k(blocks, half(0), half(2))
    if kind == GGMLQuantizationType.Q6_K:
        return _q6_k(blocks, half(208))
    d = half(0)
    if kind == GGMLQuantizationType.Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(q.reshape(n, -1), d, None, 8)
    packed = blocks[..., -16:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    if kind == GGMLQuantizationType.Q4_0:
        return Blocks(q.reshape(n, -1), d, None, 4)
    if kind == GGMLQuantizationType.Q5_0:  # 5th bits from a 32-bit mask; w = d (q - 16) = d (q + 112 - 128)
        high = blocks[..., 2:6].copy().view("<u4")[..., 0]
        fifth = ((high[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        return Blocks((q | fifth).reshape(n, -1) + np.uint8(112), d, None, 8)
    return _with_mins(q, d, half(2))  # Q4_1: w = d q + m


def _with_mins(q: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> Blocks:
    """4-bit blocks w = scale q + min ([N, blocks, 32] q) as zero points -min / scale. A block whose scale is 0
    holds its min alone: scale min, q 0, zero point -1."""
    flat = scales == 0
    q = np.where(flat[..., None], np.uint8(0), q)
    zero_points = np.where(flat, np.float32(-1), -mins / np.where(flat, 1, scales)).astype(np.float32)
    return Blocks(q.reshape(q.shape[0], -1), np.where(flat, mins, scales).astype(np.float32), zero_points, 4)


def _q4_k(blocks: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> Blocks:
    """Q4_K: 256 values as 8 sub-blocks of 32, w = d sc q - dmin m with 6-bit sc and m packed in 12 bytes (the
    first four sub-blocks' in the low 6 bits of bytes 0-3 and 4-7, the last four's low 4 bits in bytes 8-11 and
    high 2 bits in the top bits of bytes 0-7); sub-blocks 2i and 2i+1 share 32 bytes, low and high nibbles."""
    packed = blocks[..., 4:16]
    low, high, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 63, (rest & 15) | (low >> 6) << 4], axis=-1).astype(np.float32)
    m = np.concatenate([high & 63, (rest >> 4) | (high >> 6) << 4], axis=-1).astype(np.float32)
    nibbles = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    q = (nibbles & 15).reshape(*blocks.shape[:2], 8, 32)
    n = blocks.shape[0]
    return _with_mins(q.reshape(n, -1, 32), (d[..., None] * sc).reshape(n, -1), -(dmin[..., None] * m).reshape(n, -1))


def _q6_k(blocks: np.ndarray, d: np.ndarray) -> Blocks:
    """Q6_K: 256 values as 16 sub-blocks of 16 with int8 scales, w = d sc (q - 32); in each half of 128 values,
    quarter g takes the low (g < 2) or high nibbles of 32 of its 64 low-bit bytes and bits 2g, 2g+1 of its 32
    high-bit bytes. On the 8-bit grid: q + 96 around 128."""
    n, count = blocks.shape[:2]
    low = blocks[..., :128].reshape(n, count, 2, 1, 2, 32) >> np.array([0, 4], np.uint8)[:, None, None]
    high = blocks[..., 128:192].reshape(n, count, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    q = (low & 15).reshape(n, count, 2, 4, 32) | (high & 3) << 4
    scales = d[..., None] * blocks[..., 192:208].view(np.int8).astype(np.float32)
    return Blocks(q.reshape(n, -1) + np.uint8(96), scales.reshape(n, -1), None, 8, block=16)


def quantize_8bit(weights: np.ndarray) -> Blocks:
    """Symmetric 8 bits per 32 values (scale: the block's largest magnitude / 127) for blocks without an exact
    form: the closest MatMulNBits comes to the GGUF's own values."""
    n, k = weights.shape
    per_block = weights.reshape(n, -1, BLOCK)
    scales = (np.abs(per_block).max(axis=2) / 127).astype(np.float32)
    q = np.rint(per_block / np.where(scales > 0, scales, 1)[..., None]).astype(np.int16) + 128
    return Blocks(q.astype(np.uint8).reshape(n, k), scales, None, 8, exact=False)


def joined(parts: list[Blocks]) -> Blocks | None:
    """Blocks stacked by rows (q, k and v into one projection), or None where they differ in bits or block (a
    Q4_K_M file's Q4_K q and k with a Q6_K v): MatMulNBits has one of each a node."""
    if len({(p.bits, p.block) for p in parts}) > 1:
        return None
    bits = parts[0].bits
    zero = [p.zero_points if p.zero_points is not None else np.full_like(p.scales, 2 ** (bits - 1)) for p in parts]
    any_zero = any(p.zero_points is not None for p in parts)
    return Blocks(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]),
                  np.concatenate(zero) if any_zero else None, bits, parts[0].block, all(p.exact for p in parts))


class GGUFWeights:
    """A GGUF's matrices by Hugging Face weight name, in the row order of the model transformers loaded from it
    (llama.cpp stores Llama's q and k rows permuted; the order is found by matching dequantized rows)."""

    def __init__(self, path: Path, model: PreTrainedModel):
        try:
            self.reader = GGUFReader(path)
            arch = str(self.reader.fields["general.architecture"].contents())
        except (OSError, ValueError, KeyError) as exc:
            raise DovetailError(f"cannot read GGUF {path}: {exc}; pass the .gguf file the target came from") from exc
        archs = {name: key for key, name in MODEL_ARCH_NAMES.items()}
        if arch not in archs:
            raise DovetailError(f"GGUF {path} is a {arch} model, which gguf-py cannot name tensors of; use "
                                "--precision int4 or int8")
        self.names = get_tensor_name_map(archs[arch], model.config.num_hidden_layers)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.state = model.state_dict()
        self.kept: Counter[str] = Counter()  # matrices in their own blocks, by type
        self.requantized: list[str] = []

    def blocks(self, hf_name: str) -> Blocks:
        """The weight `hf_name` ([N, K] in the model) as blocks, exact where its GGUF type allows."""
        weights = self.state[hf_name].detach().float().numpy()
        gguf_name = self.names.get_name(hf_name, try_suffixes=(".weight",))
        # A model with tied embeddings reads its output matrix from token_embd when the file has no output.weight.
        for name in [gguf_name, "token_embd.weight"] if gguf_name == "output.weight" else [gguf_name]:
            tensor = self.tensors.get(name)
            if tensor is None:
                continue
            order = row_order(dequantize(tensor.data, tensor.tensor_type).reshape(weights.shape), weights)
            if order is None:
                continue
            blocks = read_blocks(np.asarray(tensor.data), tensor.tensor_type)
            if blocks is None:
                self.requantized.append(f"{name} ({tensor.tensor_type.name})")
                return quantize_8bit(weights)
            self.kept[tensor.tensor_type.name] += 1
            return blocks.rows(order)
        raise DovetailError(f"the GGUF has no tensor whose values are the model's {hf_name} (looked for {gguf_name}); "
                            "pass the .gguf file the target was loaded from")


def row_order(gguf_rows: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
    """Indices such that gguf_rows[order] == weights bit for bit, or None if no reordering of rows gives it."""
    if gguf_rows.shape != weights.shape:
        return None
    if np.array_equal(gguf_rows, weights):
        return np.arange(len(weights))
    where = {row.tobytes(): i for i, row in enumerate(gguf_rows)}
    order = [where.get(row.tobytes()) for row in weights]
    return None if None in order else np.array(order)


def hf_names(initializer: str) -> list[str]:
    """The Hugging Face weights behind an onnxruntime-genai builder's MatMulNBits weight initializer:
    `model.layers.3.attn.qkv_proj.MatMul.weight_Q4` -> q, k and v of `model.layers.3.self_attn`."""
    module = initializer.split(".MatMul.")[0].replace(".attn.", ".self_attn.")
    if module.endswith("qkv_proj"):
        return [f"{module[: -len('qkv_proj')]}{part}_proj.weight" for part in "qkv"]
    return [f"{module}.weight"]


def use_gguf_blocks(graph_path: Path, model: PreTrainedModel, gguf: Path) -> None:
    """Rewrite the builder's int4 graph at `graph_path` (+ `.data`) so that every MatMulNBits, and the quantized
    embedding a tied lm_head shares, holds the GGUF's own blocks; each exact node is checked against the model."""
    weights = GGUFWeights(gguf, model)
    proto = onnx.load(str(graph_path))
    g = proto.graph
    initializers = {t.name: t for t in g.initializer}
    replaced: dict[str, Blocks] = {}
    for node in [n for n in g.node if n.op_type == "MatMulNBits"]:  # split_node adds nodes
        names = hf_names(node.input[1])
        if any(name not in weights.state for name in names):
            raise DovetailError(f"cannot match the builder's {node.name} to the model's weights ({', '.join(names)}); "
                                "report the model and versions")
        parts = [weights.blocks(name) for name in names]
        for part, name in zip(parts, names):
            if not part.exact:
                continue
            reference = weights.state[name].float().numpy()
            error = np.abs(part.dequantized() - reference).max() / max(float(np.abs(reference).max()), 1e-30)
            if error > MAPPING_TOLERANCE:
                raise DovetailError(f"the GGUF's blocks for {name} do not give the model's weights (relative "
                                    f"error {error:.1e}); report the model and versions")
        if (blocks := joined(parts)) is None:
            split_node(node, parts, initializers, g)
            continue
        set_blocks(node, blocks, initializers, g)
        replaced[node.input[1]] = blocks
    for node in (n for n in g.node if n.op_type == "GatherBlockQuantized"):
        reshape = next((n for n in g.node if n.op_type == "Reshape" and n.output[0] == node.input[0]), None)
        blocks = replaced.get(reshape.input[0]) if reshape else None
        if blocks is None:
            continue
        if blocks.zero_points is not None:
            raise DovetailError("the GGUF's output matrix has zero points, which the quantized embedding sharing it "
                                "cannot read; use --precision int8")
        shape = f"{reshape.input[0]}/rows"
        g.initializer.append(numpy_helper.from_array(np.array(blocks.q.shape, np.int64) * [1, blocks.bits] // [1, 8],
                                                     shape))
        reshape.input[1] = shape
        set_attributes(node, bits=blocks.bits, block_size=blocks.block)
    kept = ", ".join(f"{count} {kind}" for kind, count in sorted(weights.kept.items()))
    log.info(f"gguf: the file's own blocks for {sum(weights.kept.values())} matrices ({kept})")
    if weights.requantized:
        log.warning(f"{len(weights.requantized)} GGUF matrices have no exact MatMulNBits form and were quantized to "
                    f"8 bits per {BLOCK} values: {', '.join(weights.requantized[:3])}"
                    f"{', ...' if len(weights.requantized) > 3 else ''}")
    data = graph_path.with_name(graph_path.name + ".data")
    data.unlink()
    onnx.save(proto, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)


def split_node(node: onnx.NodeProto, parts: list[Blocks], initializers: dict[str, onnx.TensorProto],
               g: onnx.GraphProto) -> None:
    """Replace a joined projection whose parts differ in bits or block by one MatMulNBits a part and a Concat of
    their outputs, so each keeps its exact form."""
    at = list(g.node).index(node)
    pieces = []
    for i, part in enumerate(parts):
        piece = onnx.NodeProto()
        piece.CopyFrom(node)
        piece.name, piece.output[0] = f"{node.name}/part{i}", f"{node.output[0]}/part{i}"
        del piece.input[3:]
        piece.input[1], piece.input[2] = f"{node.input[1]}/part{i}", f"{node.input[2]}/part{i}"
        for name in piece.input[1:3]:
            initializers[name] = g.initializer.add(name=name)
        set_attributes(piece, N=part.q.shape[0])
        set_blocks(piece, part, initializers, g)
        pieces.append(piece)
    concat = helper.make_node("Concat", [p.output[0] for p in pieces], [node.output[0]], axis=-1,
                              name=f"{node.name}/concat")
    for name in node.input[1:3]:
        g.initializer.remove(initializers.pop(name))
    g.node.remove(node)
    for offset, new in enumerate([*pieces, concat]):
        g.node.insert(at + offset, new)


def set_attributes(node: onnx.NodeProto, **values: int) -> None:
    for attribute in node.attribute:
        if attribute.name in values:
            attribute.i = values[attribute.name]


def set_blocks(node: onnx.NodeProto, blocks: Blocks, initializers: dict[str, onnx.TensorProto],
               g: onnx.GraphProto) -> None:
    """Put `blocks` into a MatMulNBits node: B packed as MatMulNBits stores it (at 4 bits, even k in the low
    nibble), scales, float zero points as a fourth input when the blocks have them, and the matching attributes."""
    n, k = blocks.q.shape
    q = blocks.q.reshape(n, k // blocks.block, blocks.block)
    packed = q if blocks.bits == 8 else q[..., 0::2] | q[..., 1::2] << 4
    initializers[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(packed), node.input[1]))
    initializers[node.input[2]].CopyFrom(numpy_helper.from_array(blocks.scales, node.input[2]))
    if blocks.zero_points is not None:
        name = f"{node.input[1]}/zero_points"
        g.initializer.append(numpy_helper.from_array(blocks.zero_points, name))
        del node.input[3:]
        node.input.append(name)
    set_attributes(node, bits=blocks.bits, block_size=blocks.block)
