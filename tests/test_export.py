"""Export writes a self-contained folder, and exporting again into it leaves the same files."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from dovetail_onnx.export.artifact import export_artifact
from dovetail_onnx.export.drafter import pack_int4, unpack_int8
from dovetail_onnx.export import drafter_export
from dovetail_onnx.export.drafter_export import quantize_int4
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.kernels import rows_library
from dovetail_onnx.runtime.manifest import load_manifest


def test_re_export_into_the_same_folder_keeps_sizes(hf_dirs, tmp_path):
    quiet = Console(quiet=True)
    export_artifact(hf_dirs["llama"], tmp_path / "a", "random", 1, console=quiet)
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "a").iterdir()}
    export_artifact(hf_dirs["llama"], tmp_path / "a", "random", 1, console=quiet)
    assert {f.name: f.stat().st_size for f in (tmp_path / "a").iterdir()} == sizes
    manifest = json.loads((tmp_path / "a" / "dovetail.json").read_text())
    assert set(manifest["sha256"]) == {"target.onnx", "target.onnx.data", "target.rows.onnx", "drafter.onnx",
                                       "drafter.onnx.data", "drafter.int4.onnx", "drafter.int4.onnx.data",
                                       "drafter.int4.rows.onnx", "tokenizer.json"}
    drafter = load_manifest(tmp_path / "a").drafter
    assert (drafter.cpu_file, drafter.kernel_file) == ("drafter.int4.onnx", "drafter.int4.rows.onnx")


def test_cpu_drafter_keeps_weights_stored_in_int4_exactly(tmp_path):
    """A matrix on the grid `pack_int4` stores drafters on (-7..7 times one scale per 32 weights of an output)
    comes out of `quantize_int4` unchanged; one off the grid moves by at most half a step."""
    torch.manual_seed(0)
    on_grid = unpack_int8(pack_int4({"w": torch.randn(48, 64)}), tmp_path)["w"].T.contiguous().numpy()
    off_grid = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["y"]), helper.make_node("MatMul", ["x", "b"], ["z"])], "g", [x],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, w]) for n, w in (("y", 48), ("z", 32))],
        [numpy_helper.from_array(on_grid, "a"), numpy_helper.from_array(off_grid, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx")
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}

    def weights(name: str) -> np.ndarray:
        packed, scales = stored[f"{name}.int4"], stored[f"{name}.int4.scales"]
        q = np.stack((packed & 15, packed >> 4), axis=-1).reshape(packed.shape[0], -1, 32).astype(np.float32) - 8
        return (q * scales.reshape(packed.shape[0], -1, 1)).reshape(packed.shape[0], -1).T

    assert np.array_equal(weights("a"), on_grid)
    step = np.abs(off_grid).reshape(2, 32, 32).max(axis=1) / 7
    assert (np.abs(weights("b") - off_grid).reshape(2, 32, 32) <= step[:, None] / 2 * 1.0001).all()


def test_a_row_kernel_drafter_that_disagrees_stops_the_export_in_one_line(hf_dirs, tmp_path, monkeypatch):
    """The CPU drafter on dovetail's row kernel is checked against it on ONNX Runtime's MatMulNBits."""
    if not rows_library()[0]:
        pytest.skip("dovetail's kernels do not build here")
    run_graph = drafter_export.run_graph

    def off_on_the_kernel(path, feeds, libraries=()):
        out = run_graph(path, feeds, libraries)
        return {**out, "topk_logprobs": out["topk_logprobs"] + 1} if libraries else out

    monkeypatch.setattr(drafter_export, "run_graph", off_on_the_kernel)
    with pytest.raises(DovetailError, match=r"^the CPU drafter on dovetail's row kernel disagrees .*; report the CPU"):
        export_artifact(hf_dirs["llama"], tmp_path / "a", "random", 1, console=Console(quiet=True))
    assert not (tmp_path / "a" / "dovetail.json").exists()
