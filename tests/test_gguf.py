"""`--precision gguf`: a GGUF's own quantized blocks in the target graph, unchanged, and speculative decoding on
them identical to their target-only decoding."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map, quants
from rich.console import Console

from dovetail_onnx.export import artifact
from dovetail_onnx.export.artifact import export_artifact
from dovetail_onnx.export.gguf import GGUFWeights, read_blocks
from dovetail_onnx.runtime import DovetailError, Model, kernels
from dovetail_onnx.runtime.target import Target
from dovetail_onnx.runtime.tree import causal
from test_oracle import assert_oracle_chain_exact
from tiny import make_model, make_tokenizer

# Layer 0 as SmolLM2's file has it (Q4_1 throughout, Q8_0 embedding tied to the output); layer 1 with every other
# type: Q5_0 (8-bit grid), Q4_0, Q8_0, and F16, which has no exact MatMulNBits form and is quantized to 8 bits;
# its q, k and v differ in bits, as a Q4_K_M file's can, so they cannot share one node.
LAYER_1 = {"self_attn.q_proj": Q.Q5_0, "self_attn.k_proj": Q.Q4_1, "self_attn.v_proj": Q.Q5_0,
           "self_attn.o_proj": Q.Q4_0, "mlp.gate_proj": Q.Q8_0, "mlp.up_proj": Q.F16, "mlp.down_proj": Q.Q4_1}


def llama_cpp_order(name: str, rows: int, config) -> np.ndarray:
    """The row order llama.cpp's converter stores Llama's q and k projections in (rotary halves interleaved)."""
    heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
    if "q_proj" not in name and "k_proj" not in name:
        return np.arange(rows)
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def kind_of(name: str, embedding: Q = Q.Q8_0) -> Q:
    if "embed_tokens" in name:
        return embedding
    parts = name.split(".")  # model.layers.<i>.<block>.<matrix>.weight
    return Q.Q4_1 if parts[2] == "0" else LAYER_1[f"{parts[3]}.{parts[4]}"]


def write_gguf(model, path, embedding: Q = Q.Q8_0, arch: str = "llama") -> None:
    """The tiny Llama as a GGUF: every matrix quantized with gguf-py, and the model's weights set to exactly the
    values transformers would load from it."""
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    writer = GGUFWriter(path, arch)
    with torch.no_grad():
        for name, weight in model.state_dict().items():
            if weight.dim() != 2 or name == "lm_head.weight":
                continue
            kind = kind_of(name, embedding)
            order = llama_cpp_order(name, weight.shape[0], model.config)
            stored = weight.numpy()[order]
            raw = stored.astype(np.float16) if kind == Q.F16 else quants.quantize(stored, kind)
            values = quants.dequantize(raw, kind).reshape(stored.shape)
            weight.copy_(torch.from_numpy(values[np.argsort(order)]))
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), raw,
                              raw_dtype=kind if kind != Q.F16 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, tokenizer = make_model("llama"), make_tokenizer()
    write_gguf(model, root / "tiny.gguf")
    return model, tokenizer, root / "tiny.gguf"


@pytest.fixture(scope="module")
def gguf_model(gguf_target, tmp_path_factory):
    model, tokenizer, path = gguf_target
    out = tmp_path_factory.mktemp("gguf-artifact")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact, "load_target", lambda _: (model, tokenizer))
        export_artifact(path, out, "random", 1, precision="gguf", console=Console(stderr=True, quiet=True))
    return Model(out, draft_device="cpu", threads=1)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0])
def test_blocks_read_are_the_values_ggml_stores(kind):
    weights = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    weights[0, :32] = 0.25  # a Q4_1 block of one value: its d is 0
    raw = quants.quantize(weights, kind)
    blocks = read_blocks(raw, kind)
    assert blocks.bits == (4 if kind in (Q.Q4_0, Q.Q4_1) else 8)
    assert (blocks.zero_points is not None) == (kind == Q.Q4_1)
    np.testing.assert_allclose(blocks.dequantized(), quants.dequantize(raw, kind), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind, offsets", [(Q.Q4_K, (0, 2)), (Q.Q6_K, (208,))])
def test_k_quant_blocks_read_are_the_values_ggml_stores(kind, offsets):
    """gguf-py cannot write K-quants, so their blocks are random bytes with finite fp16 scales (d, dmin)."""
    width = {Q.Q4_K: 144, Q.Q6_K: 210}[kind]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(5, 3, width), dtype=np.uint8)
    for at in offsets:
        raw[..., at : at + 2] = (rng.random((5, 3, 1)) * 0.01).astype(np.float16).view(np.uint8)
    raw = raw.reshape(5, -1)
    blocks = read_blocks(raw, kind)
    assert (blocks.bits, blocks.block) == ((4, 32) if kind == Q.Q4_K else (8, 16))
    expected = quants.dequantize(raw, kind)
    np.testing.assert_allclose(blocks.dequantized(), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_the_graph_holds_the_files_blocks(gguf_model):
    spec = gguf_model.manifest.target
    assert (spec.precision, spec.block_size, spec.verify) == ("gguf", 32, "chain")
    graph = onnx.load(str(gguf_model.manifest.folder / spec.file), load_external_data=False).graph
    nodes = {n.name: ({a.name: a.i for a in n.attribute}, len(n.input)) for n in graph.node
             if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    bits = {name: attributes["bits"] for name, (attributes, _) in nodes.items()}
    for matrix in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
        attributes, inputs = nodes[f"/model/layers.0/{matrix}/MatMul_Q4"]
        assert (attributes["bits"], attributes["block_size"], inputs) == (4, 32, 4)  # Q4_1: float zero points
    assert [bits[f"/model/layers.1/{m}/MatMul_Q4"] for m in ("attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                                                             "mlp/down_proj")] == [4, 8, 8, 4]
    # q (Q5_0), k (Q4_1) and v (Q5_0) each keep their own form, joined after their nodes.
    assert [nodes[f"/model/layers.1/attn/qkv_proj/MatMul_Q4/part{i}"][0]["bits"] for i in range(3)] == [8, 4, 8]
    assert [n.op_type for n in graph.node if n.name == "/model/layers.1/attn/qkv_proj/MatMul_Q4/concat"] == ["Concat"]
    assert bits["/model/embed_tokens/GatherBlockQuantized"] == bits["/lm_head/MatMul_Q4"] == 8


def test_speculative_output_is_the_gguf_targets_own(gguf_model):
    if kernels.rows_library()[0]:  # Q4_1's zero points run on the row kernel, which needs no padding
        assert gguf_model.target.graph.name == "target.rows.onnx" and gguf_model.target.row_step == 1
    assert_oracle_chain_exact(gguf_model, "gguf")


def test_where_the_row_kernel_cannot_run_ort_computes_the_same_blocks(gguf_model, monkeypatch, caplog):
    """ORT's MatMulNBits takes float zero points too, by a far slower path, which the runtime says."""
    monkeypatch.setattr("dovetail_onnx.runtime.target.rows_library", lambda: (None, "no C++ compiler found"))
    model = Model(gguf_model.manifest.folder, draft_device="cpu", threads=1)
    assert model.target.graph.name == "target.onnx"
    assert "(no C++ compiler found); its blocks with zero points (Q4_1, Q4_K) take MatMulNBits' fp32 path" in \
        caplog.text
    assert_oracle_chain_exact(model, "gguf on MatMulNBits")


def test_the_graph_computes_what_pytorch_computes_with_the_files_values(gguf_target, gguf_model):
    """The PyTorch model holds the dequantized GGUF; the graph differs only by its int8 activations."""
    model, _, _ = gguf_target
    spec = gguf_model.manifest.target
    target = Target(gguf_model.manifest.folder / spec.file, spec, threads=1)
    prompt = np.arange(3, 40)
    target.start(len(prompt), len(prompt))
    logits = target.forward(prompt, np.arange(len(prompt)), causal(len(prompt)))[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(prompt)[None]).logits[0].numpy()
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.9


def test_export_counts_what_it_kept_and_what_it_quantized(gguf_target):
    model, _, path = gguf_target
    weights = GGUFWeights(path, model)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        weights.blocks(name)
    assert weights.kept == {"Q4_1": 1, "Q8_0": 1}  # the tied head is token_embd's Q8_0
    assert weights.requantized == ["blk.1.ffn_up.weight (F16)"]


def test_a_gguf_that_is_not_the_models_is_named(gguf_target):
    model, _, path = gguf_target
    other = make_model("llama", seed=1)
    with pytest.raises(DovetailError, match="the GGUF has no tensor whose values are the model's .*; pass the .gguf"):
        GGUFWeights(path, other).blocks("model.layers.0.self_attn.q_proj.weight")


def test_a_file_that_is_no_gguf_is_named(gguf_target, tmp_path):
    model, _, _ = gguf_target
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf" * 64)
    with pytest.raises(DovetailError, match=f"^cannot read GGUF {broken}: .*; pass the .gguf file the target came from$"):
        GGUFWeights(broken, model)


def test_an_architecture_gguf_py_cannot_name_is_refused(tmp_path):
    model = make_model("llama")
    write_gguf(model, tmp_path / "odd.gguf", arch="no-such-arch")
    with pytest.raises(DovetailError, match="is a no-such-arch model, which gguf-py cannot name tensors of; use --precision int4 or int8$"):
        GGUFWeights(tmp_path / "odd.gguf", model)


def test_a_tied_head_with_zero_points_is_refused_in_one_line(tmp_path):
    """The quantized embedding the tied head shares (GatherBlockQuantized) has no float zero points."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    write_gguf(model, tmp_path / "tied.gguf", embedding=Q.Q4_1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifact, "load_target", lambda _: (model, tokenizer))
        with pytest.raises(DovetailError, match="output matrix has zero points, .*; use --precision int8$"):
            export_artifact(tmp_path / "tied.gguf", tmp_path / "out", "random", precision="gguf",
                            console=Console(stderr=True, quiet=True))


def test_gguf_precision_needs_a_gguf_file(hf_dirs, tmp_path):
    with pytest.raises(DovetailError, match="--precision gguf reads a GGUF file's own blocks, .* no .gguf file"):
        export_artifact(hf_dirs["llama"], tmp_path / "out", "random", precision="gguf",
                        console=Console(stderr=True, quiet=True))
    with pytest.raises(DovetailError, match="--block-size applies to int8 and int4 targets"):
        export_artifact(hf_dirs["llama"], tmp_path / "out", "random", precision="gguf", block_size=64)
