"""dovetail's TreeAttention (runtime/kernels/tree_attention.cpp): GroupQueryAttention's results, a row alike however
many run with it, and a tree row bit for bit its token decoded alone after its ancestors."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dovetail_onnx.export.target import use_tree_attention
from dovetail_onnx.runtime import kernels
from dovetail_onnx.runtime.tree import MASKED, Tree, causal

LIBRARY, WHY = kernels.rows_library()
needs_kernel = pytest.mark.skipif(LIBRARY is None, reason=f"dovetail's kernels do not run here: {WHY}")
HEADS, KV_HEADS, POSITIONS = 4, 2, 64


def attention_node(op: str, dim: int, **attributes) -> helper.NodeProto:
    inputs = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos_cache", "sin_cache", "position_ids",
              "attention_bias", ""]
    settings = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, "scale": dim ** -0.5, "do_rotary": 1,
                "rotary_interleaved": 0, "local_window_size": -1, "softcap": 0.0, **attributes}
    domain = kernels.DOMAIN if op == kernels.ATTENTION_OP else "com.microsoft"
    return helper.make_node(op, inputs, ["out", "present_key", "present_value"], domain=domain, **settings)


def one_attention(op: str, dim: int) -> ort.InferenceSession:
    angles = np.arange(POSITIONS)[:, None] * 10000.0 ** (-np.arange(dim // 2) / (dim // 2))
    caches = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache")]
    f, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    graph = helper.make_graph(
        [attention_node(op, dim)], "one",
        [helper.make_tensor_value_info("qkv", f, [1, "S", (HEADS + 2 * KV_HEADS) * dim]),
         *(helper.make_tensor_value_info(name, f, [1, KV_HEADS, "P", dim]) for name in ("past_key", "past_value")),
         helper.make_tensor_value_info("seqlens_k", i32, [1]), helper.make_tensor_value_info("total", i32, []),
         helper.make_tensor_value_info("position_ids", i64, [1, "S"]),
         helper.make_tensor_value_info("attention_bias", f, [1, 1, "S", "T"])],
        [helper.make_tensor_value_info(name, f, None) for name in ("out", "present_key", "present_value")], caches)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(kernels.DOMAIN, 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if op == kernels.ATTENTION_OP:
        options.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(session, qkv, past_key, past_value, positions, bias):
    total = past_key.shape[2] + len(qkv)
    return session.run(None, {"qkv": qkv[None], "past_key": past_key, "past_value": past_value,
                              "seqlens_k": np.array([total - 1], np.int32), "total": np.array(total, np.int32),
                              "position_ids": positions[None].astype(np.int64), "attention_bias": bias[None, None]})


def inputs(dim: int, past: int, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((rows, (HEADS + 2 * KV_HEADS) * dim), dtype=np.float32)
    past_key, past_value = (rng.standard_normal((1, KV_HEADS, past, dim), dtype=np.float32) for _ in range(2))
    return qkv, past_key, past_value


def with_past(mask: np.ndarray, past: int) -> np.ndarray:
    """A [S, S] bias among new rows, the past visible to all."""
    return np.concatenate((np.zeros((len(mask), past), np.float32), mask), axis=1)


@needs_kernel
@pytest.mark.parametrize("dim", [16, 80])
def test_results_are_group_query_attention_ones(dim):
    """A causal chunk over a past, and a tree step, against ORT's own kernel on the same inputs."""
    ours, theirs = one_attention(kernels.ATTENTION_OP, dim), one_attention("GroupQueryAttention", dim)
    tree = Tree(np.zeros(5, np.int64), np.array([-1, 0, 0, 1, 1]))
    for past, positions, mask in ((9, 9 + np.arange(6), causal(6)[0, 0]), (20, 20 + tree.depth, tree.mask()[0, 0])):
        qkv, past_key, past_value = inputs(dim, past, len(positions))
        bias = with_past(mask, past)
        for mine, reference in zip(run(ours, qkv, past_key, past_value, positions, bias),
                                   run(theirs, qkv, past_key, past_value, positions, bias)):
            np.testing.assert_allclose(mine, reference, rtol=0, atol=2e-5)


@needs_kernel
def test_a_tree_row_is_its_token_decoded_alone_after_its_ancestors():
    """What lets a quantized target verify trees: not close, equal."""
    dim, past = 64, 30
    session = one_attention(kernels.ATTENTION_OP, dim)
    tree = Tree(np.zeros(7, np.int64), np.array([-1, 0, 0, 1, 1, 2, 4]))
    qkv, past_key, past_value = inputs(dim, past, len(tree))
    tree_out = run(session, qkv, past_key, past_value, past + tree.depth, with_past(tree.mask()[0, 0], past))[0][0]
    for leaf_path in tree.paths():
        keys, values = past_key, past_value
        for node in leaf_path:
            out, keys, values = run(session, qkv[[node]], keys, values, past + tree.depth[[node]],
                                    np.zeros((1, keys.shape[2] + 1), np.float32))
            np.testing.assert_array_equal(out[0, 0], tree_out[node], err_msg=f"node {node}")


@needs_kernel
def test_masked_keys_and_padding_rows_change_nothing():
    """A lone row run among rows it cannot see, or with attention rows beyond its own (the runtime's padding for
    ORT's attention), is the row run alone."""
    dim, past = 16, 11
    session = one_attention(kernels.ATTENTION_OP, dim)
    qkv, past_key, past_value = inputs(dim, past, 4)
    alone = run(session, qkv[:1], past_key, past_value, np.array([past]), with_past(np.zeros((1, 1), np.float32), past))
    hidden = np.full((4, 4), MASKED, np.float32)
    np.fill_diagonal(hidden, 0.0)
    among = run(session, qkv, past_key, past_value, past + np.zeros(4, np.int64), with_past(hidden, past))
    np.testing.assert_array_equal(among[0][:, :1], alone[0])
    np.testing.assert_array_equal(among[1][:, :, : past + 1], alone[1])


@needs_kernel
def test_a_position_past_the_rotary_cache_is_an_error_not_a_read_past_it():
    session = one_attention(kernels.ATTENTION_OP, 16)
    qkv, past_key, past_value = inputs(16, 3, 1)
    with pytest.raises(Exception, match="position past the rotary cache"):
        run(session, qkv, past_key, past_value, np.array([POSITIONS]), with_past(np.zeros((1, 1), np.float32), 3))


@pytest.mark.parametrize("attribute", [{"local_window_size": 64}, {"softcap": 30.0}, {"rotary_interleaved": 1}])
def test_attention_it_does_not_cover_keeps_group_query_attention(attribute):
    graph = helper.make_graph([attention_node("GroupQueryAttention", 16, **attribute)], "one", [], [])
    assert not use_tree_attention(graph)
    assert graph.node[0].op_type == "GroupQueryAttention"


def test_the_lone_row_padding_goes_with_group_query_attention():
    """The padding nodes (export/target.py pad_lone_query) are dropped: TreeAttention computes a lone row alike."""
    from dovetail_onnx.export.target import pad_lone_query

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["qkv"], name="/layer/qkv"),
                               attention_node("GroupQueryAttention", 16),
                               helper.make_node("MatMul", ["out", "w"], ["y"], name="/layer/o")], "one", [], [])
    graph.node[1].name = "/layer/attn"
    pad_lone_query(graph)
    assert use_tree_attention(graph)
    assert [(n.op_type, list(n.input)[:1], list(n.output)[:1]) for n in graph.node] == [
        ("MatMul", ["x"], ["qkv"]), (kernels.ATTENTION_OP, ["qkv"], ["out"]), ("MatMul", ["out"], ["y"])]
    assert not [t.name for t in graph.initializer if t.name.startswith("/dovetail/")]
