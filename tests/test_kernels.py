"""dovetail's row kernel for int4 and int8 weights (runtime/kernels.py): every row alike for any row count, MatMulNBits' results, and
the graph on ORT's own kernels wherever it cannot run."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dovetail_onnx.runtime import DovetailError, GeneratorParams, Model, TreeSettings, generate, kernels
from dovetail_onnx.runtime.target import Target

LIBRARY, WHY = kernels.rows_library()
needs_kernel = pytest.mark.skipif(LIBRARY is None, reason=f"the row kernel does not run here: {WHY}")
# (K, N, block): a block wider than K, a short last block, SmolLM2's down projection at block 32, the smallest.
SHAPES = [(64, 320, 128), (576, 96, 128), (1536, 48, 32), (16, 16, 16)]


def node_weights(k: int, n: int, block: int, bits: int, seed: int, zero_points: bool = False,
                 form: str = "fp32") -> dict[str, np.ndarray]:
    """MatMulNBits' B and scales (and float zero points) of random weights. `form` "fp16": as a GGUF Q4_1 block
    has them, fp16 scales d and zero points -m/d of fp16 mins m (the kernel then keeps both in fp16); "stepped": as
    a Q4_K or Q6_K file's, each 256 weights' scales (and mins) multiples of one fp16 step, the largest 63 steps."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    weights = {"B": rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8),
               "scales": rng.random(n * blocks, dtype=np.float32) * 0.02}

    def stepped() -> np.ndarray:
        group = 256 // block
        steps = (0.5 + rng.random((n, blocks // group, 1), dtype=np.float32)) * 2e-4
        steps = steps.astype(np.float16).astype(np.float32)
        multiples = rng.integers(1, 64, size=(n, blocks // group, group)).astype(np.float32)
        multiples[:, :, rng.integers(group)] = 63
        return (steps * multiples).reshape(-1)

    if form == "fp16":
        weights["scales"] = weights["scales"].astype(np.float16).astype(np.float32)
    elif form == "stepped":
        weights["scales"] = stepped()
    if zero_points:
        weights["zero_points"] = rng.random(n * blocks, dtype=np.float32) * 2 ** bits
        if form != "fp32":
            mins = -stepped() if form == "stepped" else (
                -weights["scales"] * weights["zero_points"]).astype(np.float16).astype(np.float32)
            weights["zero_points"] = -mins / weights["scales"]
    return weights


def one_node(op: str, domain: str, k: int, n: int, block: int, bits: int, seed: int, zero_points: bool = False,
             form: str = "fp32") -> bytes:
    return node_of(op, domain, k, n, block, bits, node_weights(k, n, block, bits, seed, zero_points, form))


def node_of(op: str, domain: str, k: int, n: int, block: int, bits: int, weights: dict[str, np.ndarray]) -> bytes:
    node = helper.make_node(op, ["A", *weights], ["Y"], domain=domain, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=4)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, "M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])
    model.ir_version = 10
    return model.SerializeToString()


def session(model: bytes, library=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@pytest.fixture(params=["native", "avx2"])
def isa(request, monkeypatch) -> str:
    """The CPU's best path (AVX-512 VNNI here), and the AVX2 one CPUs without it run (chosen per session)."""
    if request.param == "avx2":
        monkeypatch.setenv("DOVETAIL_KERNEL_ISA", "avx2")
    return request.param


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, n, block", SHAPES)
def test_every_row_equals_that_row_run_alone(k, n, block, bits, isa):
    """Up to 8 rows (AVX2: 4) share each unpacked weight tile; more rows cross those groups."""
    rows = session(one_node(kernels.ROWS_OP, kernels.DOMAIN, k, n, block, bits, seed=k), LIBRARY)
    a = np.random.default_rng(1).standard_normal((1, 17, k), dtype=np.float32)
    alone = np.concatenate([rows.run(None, {"A": a[:, i : i + 1]})[0] for i in range(17)], axis=1)
    for m in (*range(1, 11), 17):
        np.testing.assert_array_equal(rows.run(None, {"A": a[:, :m]})[0], alone[:, :m], err_msg=f"{m} rows")


def float_node(k: int, n: int, seed: int) -> tuple[bytes, np.ndarray]:
    """A one-node MatMulFloatRows graph (fp32 weights B [K, N]) and its B."""
    b = np.random.default_rng(seed).standard_normal((k, n), dtype=np.float32)
    node = helper.make_node(kernels.FLOAT_ROWS_OP, ["A", "B"], ["Y"], domain=kernels.DOMAIN)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, "M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(kernels.DOMAIN, 1)])
    model.ir_version = 10
    return model.SerializeToString(), b


@needs_kernel
@pytest.mark.parametrize("k, n", [(576, 96), (1536, 48), (100, 32), (16, 16)])
def test_float_rows_are_each_row_alone_and_a_matmul(k, n, isa):
    """fp32 weights: up to 8 rows (AVX2: 3) share each weight tile, sums in spans of 64 k (K = 100 ends in a short
    one); every row is what it is alone, and the product is numpy's within float rounding."""
    model, b = float_node(k, n, seed=k)
    rows = session(model, LIBRARY)
    a = np.random.default_rng(2).standard_normal((1, 17, k), dtype=np.float32)
    alone = np.concatenate([rows.run(None, {"A": a[:, i : i + 1]})[0] for i in range(17)], axis=1)
    for m in (*range(1, 11), 17):
        np.testing.assert_array_equal(rows.run(None, {"A": a[:, :m]})[0], alone[:, :m], err_msg=f"{m} rows")
    np.testing.assert_allclose(alone[0], a[0].astype(np.float64) @ b, rtol=0, atol=2e-4 * np.sqrt(k))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, n, block", SHAPES)
def test_results_are_matmulnbits_ones(k, n, block, bits, isa):
    """The same int8-activation arithmetic as MatMulNBits at accuracy level 4, so within float rounding of it."""
    a = np.random.default_rng(2).standard_normal((1, 5, k), dtype=np.float32)
    ours = session(one_node(kernels.ROWS_OP, kernels.DOMAIN, k, n, block, bits, seed=k), LIBRARY).run(None, {"A": a})[0]
    reference = session(one_node("MatMulNBits", "com.microsoft", k, n, block, bits, seed=k)).run(None, {"A": a})[0]
    assert ours.shape == reference.shape == (1, 5, n)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def int8_arithmetic(a: np.ndarray, weights: dict[str, np.ndarray], k: int, n: int, block: int, bits: int) -> np.ndarray:
    """The kernel's sums in NumPy: activations rounded to int8 per row and block, exact integer products, and
    w = scale x q + min with min = -scale x zero point (without zero points: scale x (q - 2^(bits-1)))."""
    zero_points = "zero_points" in weights
    blocks = -(-k // block)
    packed = weights["B"].astype(np.int64)
    q = packed if bits == 8 else np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, block)
    scales = weights["scales"].reshape(n, blocks)
    mins = -scales * weights["zero_points"].reshape(n, blocks) if zero_points else 0
    if not zero_points:
        q = q - 2 ** (bits - 1)
    x = np.pad(a.reshape(-1, k), ((0, 0), (0, blocks * block - k))).reshape(-1, blocks, block)
    amax = np.abs(x).max(axis=2, keepdims=True)
    xq = np.rint(x * np.where(amax > 0, np.float32(127) / amax, 0)).astype(np.int64)
    dots = np.einsum("mbk,nbk->mnb", xq, q[:, :, : block])
    x_scale, x_sums = (amax / np.float32(127))[..., 0], xq.sum(axis=2)
    return (dots * scales * x_scale[:, None] + mins * (x_scale * x_sums)[:, None]).sum(axis=2)


@needs_kernel
@pytest.mark.parametrize("form", ["fp32", "fp16"], ids=["fp32 scales", "fp16 scales"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, n, block", SHAPES)
def test_float_zero_points_keep_rows_alike_and_add_each_blocks_min(k, n, block, bits, form, isa):
    """GGUF's Q4_1 blocks (w = d q + m) run as zero points -m/d; ORT's own kernel has no fast path for them."""
    model = one_node(kernels.ROWS_OP, kernels.DOMAIN, k, n, block, bits, seed=k, zero_points=True, form=form)
    rows = session(model, LIBRARY)
    a = np.random.default_rng(3).standard_normal((1, 9, k), dtype=np.float32)
    together = rows.run(None, {"A": a})[0]
    for m in range(9):
        np.testing.assert_array_equal(rows.run(None, {"A": a[:, m : m + 1]})[0][0, 0], together[0, m])
    expected = int8_arithmetic(a, node_weights(k, n, block, bits, k, True, form), k, n, block, bits)
    np.testing.assert_allclose(together[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@needs_kernel
@pytest.mark.parametrize("zero_points", [True, False], ids=["Q4_K-like mins", "Q6_K-like"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k, n, block", [(1536, 48, 32), (512, 32, 16)])
@pytest.mark.parametrize("off_step", [False, True], ids=["stepped", "one scale off its step"])
def test_k_quant_super_block_scales_keep_rows_alike_and_exact(k, n, block, bits, zero_points, off_step, isa):
    """Scales (and mins) that are small multiples of one step per 256 weights, as a Q4_K or Q6_K file's, are kept
    as int8 multiples and fp16 steps whose products are the same floats; a matrix with one scale off its step keeps
    them as they are. Either way: rows alike, the same arithmetic."""
    weights = node_weights(k, n, block, bits, seed=k, zero_points=zero_points, form="stepped")
    if off_step:
        weights["scales"][7] *= 1.001
    rows = session(node_of(kernels.ROWS_OP, kernels.DOMAIN, k, n, block, bits, weights), LIBRARY)
    a = np.random.default_rng(4).standard_normal((1, 9, k), dtype=np.float32)
    together = rows.run(None, {"A": a})[0]
    for m in range(9):
        np.testing.assert_array_equal(rows.run(None, {"A": a[:, m : m + 1]})[0][0, 0], together[0, m])
    expected = int8_arithmetic(a, weights, k, n, block, bits)
    np.testing.assert_allclose(together[0], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_which_nodes_the_kernel_takes():
    assert kernels.rows_kernel_takes(bits=4, k=576, n=960, block_size=128, inputs=3)
    assert kernels.rows_kernel_takes(bits=8, k=576, n=960, block_size=32, inputs=3)
    assert not kernels.rows_kernel_takes(bits=2, k=576, n=960, block_size=128, inputs=3)
    assert kernels.rows_kernel_takes(bits=4, k=576, n=960, block_size=32, inputs=4, float_zero_points=True)
    assert not kernels.rows_kernel_takes(bits=4, k=576, n=960, block_size=128, inputs=4)  # packed zero points
    assert not kernels.rows_kernel_takes(bits=4, k=576, n=968, block_size=128, inputs=3)  # a partial tile


@needs_kernel
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_target_runs_the_kernel_graph_and_needs_no_padding(quantized, precision):
    model = quantized[precision]
    assert model.manifest.target.kernel_file == "target.rows.onnx" in model.manifest.checksums
    assert model.target.graph.name == "target.rows.onnx" and model.target.row_step == 1


@pytest.mark.parametrize("why", ["no C++ compiler found (install g++ or set CXX)", "this CPU has no AVX2"])
def test_without_the_kernel_the_target_runs_ort_kernels_and_says_why(quantized, monkeypatch, caplog, why):
    monkeypatch.setattr("dovetail_onnx.runtime.target.rows_library", lambda: (None, why))
    manifest = quantized["int4"].manifest
    target = Target(manifest.folder / manifest.target.file, manifest.target, threads=1)
    assert target.graph.name == "target.onnx"
    assert why in caplog.text


def test_without_dovetails_kernels_a_quantized_target_verifies_chains_only(quantized, monkeypatch):
    """ORT's attention sums a tree row's keys in another order than sequential decoding: a tree is refused there."""
    monkeypatch.setattr("dovetail_onnx.runtime.target.rows_library", lambda: (None, "no C++ compiler found"))
    model = Model(quantized["int4"].manifest.folder, draft_device="cpu", threads=1)
    assert model.target.verify == "chain"
    with pytest.raises(DovetailError, match=r"^--top-k must be 1 for this target here, got 3: .*it verifies trees\) "):
        generate(model, model.encode_prompt("hello"), GeneratorParams(max_new_tokens=4, tree=TreeSettings(3, 2, 6)))


@needs_kernel
def test_a_kernel_graph_exported_before_its_trees_were_checked_says_re_export(quantized, tmp_path):
    """An artifact without `kernel_verify` (exported before TreeAttention's tree check) verifies chains, and says how
    to get trees."""
    from clirun import edited_artifact

    source = quantized["int4"].manifest.folder
    wide = edited_artifact(source, tmp_path / "wide", lambda raw: raw["target"].pop("kernel_verify"))
    with pytest.raises(DovetailError, match=r"field 'tree': top_k must be 1 for this target here, got 3"):
        Model(wide, draft_device="cpu", threads=1)  # a branching default with no graph that verifies trees

    def old(raw: dict) -> None:  # such an export stored a chain as its default
        raw["target"].pop("kernel_verify")
        raw["tree"].update(top_k=1, total_tokens=min(raw["tree"]["total_tokens"], raw["tree"]["depth"] + 1))

    folder = edited_artifact(source, tmp_path / "old", old)
    model = Model(folder, draft_device="cpu", threads=1)
    assert model.target.graph.name == "target.rows.onnx" and model.target.verify == "chain"
    with pytest.raises(DovetailError, match=r"^--top-k must be 1 for this target here, got 3: its kernel graph was "
                                            r"exported before trees were checked on it, .*re-export the artifact"):
        generate(model, model.encode_prompt("hello"), GeneratorParams(max_new_tokens=4, tree=TreeSettings(3, 2, 6)))


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """rows_library() asked afresh, on a CPU it takes, with an empty cache folder and no prebuilt library (a wheel's);
    forgotten again afterwards."""
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "FOLDER", tmp_path / "package")
    monkeypatch.setattr(kernels, "cpu_supports_rows_kernel", lambda: True)
    kernels.rows_library.cache_clear()
    yield tmp_path
    kernels.rows_library.cache_clear()


@pytest.mark.parametrize("setting, value", [("CXX", "false"), ("CXX", "no-such-compiler"), ("DOVETAIL_CACHE", "file")])
def test_a_failed_build_is_a_reason_not_a_crash(unbuilt, monkeypatch, setting, value):
    """A compiler that fails or does not exist, or a cache folder that cannot be made."""
    (unbuilt / "file").write_text("")
    monkeypatch.setenv(setting, value if value == "false" else str(unbuilt / value))
    library, why = kernels.rows_library()
    assert library is None and why.startswith("building it failed")
    assert not list(unbuilt.rglob("*.so"))


def test_a_library_onnxruntime_cannot_load_is_one_line(quantized, tmp_path, monkeypatch):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not a library")
    monkeypatch.setattr("dovetail_onnx.runtime.target.rows_library", lambda: (broken, ""))
    manifest = quantized["int4"].manifest
    with pytest.raises(DovetailError, match=f"cannot load kernel library {broken}: .*; delete it to rebuild it$"):
        Target(manifest.folder / manifest.target.file, manifest.target, threads=1)


def test_kernels_can_be_turned_off(unbuilt, monkeypatch):
    monkeypatch.setenv("DOVETAIL_KERNELS", "0")
    assert kernels.rows_library() == (None, "DOVETAIL_KERNELS=0")


@pytest.mark.parametrize("name, value", [("DOVETAIL_KERNELS", "off"), ("DOVETAIL_KERNEL_ISA", "avx512")])
def test_a_bad_kernel_setting_is_one_line_naming_it(unbuilt, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(DovetailError, match=f"^{name}={value} is .*; (set|unset) "):
        kernels.rows_library()


def test_a_cpu_without_avx2_keeps_ort_kernels(unbuilt, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_supports_rows_kernel", lambda: False)
    assert kernels.rows_library() == (None, "this CPU has no AVX2")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_plain_graph_stays_lossless_where_the_kernel_cannot_run(quantized, monkeypatch, precision):
    """A machine without the kernel runs target.onnx, padded to its exact row multiple: still its own output."""
    from test_oracle import assert_oracle_chain_exact

    monkeypatch.setattr("dovetail_onnx.runtime.target.rows_library", lambda: (None, "no C++ compiler found"))
    model = Model(quantized[precision].manifest.folder, draft_device="cpu", threads=1)
    assert model.target.graph.name == "target.onnx"
    assert_oracle_chain_exact(model, f"{precision} on MatMulNBits")
