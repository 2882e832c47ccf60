"""Small helpers of the drafter export: torch.onnx.export, a plain ORT check run."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch


def export_graph(module: torch.nn.Module, example: tuple, path: Path, **kwargs) -> None:
    """TorchScript exporter: our wrappers are plain tensor code, and it keeps the sizes symbolic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), opset_version=17, dynamo=False, **kwargs)
    # Re-save with one external-data file beside the graph, so the artifact is two files a graph.
    # onnx appends to an existing data file, so a re-export into the same folder must remove it first.
    model = onnx.load(str(path))
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def run_graph(path: Path, feeds: dict[str, np.ndarray], libraries: tuple[Path, ...] = ()) -> dict[str, np.ndarray]:
    """All outputs of the graph at `path` on the CPU; `libraries`: custom-op libraries it needs."""
    options = ort.SessionOptions()
    for library in libraries:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
