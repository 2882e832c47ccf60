"""ONNX Runtime sessions, and the truth about which execution provider runs them.

onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and then silently runs
on the CPU, so the provider in use is read back from the session, never assumed. On a machine with no
GPU driver, `auto` does not ask for CUDA at all: ORT would only log its provider's load failure.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import onnxruntime as ort

from dovetail_onnx.runtime.errors import DovetailError

DEVICES = ("auto", "cuda", "cpu")
log = logging.getLogger(__name__)


@functools.cache
def gpu_driver() -> bool:
    """Whether NVIDIA's driver library loads: CUDA cannot run without it."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def wants_cuda(device: str) -> bool:
    """Whether a session on `device` asks ONNX Runtime for CUDA: `cuda` always (and is refused where it cannot
    run), `auto` where the CUDA provider is there and a GPU driver loads."""
    listed = "CUDAExecutionProvider" in ort.get_available_providers()
    return device == "cuda" or device == "auto" and listed and gpu_driver()


def usable_cores() -> int:
    """Cores this process may run on (a container's affinity, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def session_options(threads: int | None, spin: bool, libraries: tuple[Path, ...] = ()) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a session's own warnings (node placement, unused initializers) are not the user's
    for library in libraries:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as exc:  # ORT reports a library it cannot load as its generic failure
            raise DovetailError(f"cannot load kernel library {library}: {str(exc).splitlines()[0]}; delete it to "
                                "rebuild it") from exc
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(path: Path, device: str, threads: int | None, role: str, spin: bool = True,
                 libraries: tuple[Path, ...] = ()) -> tuple[ort.InferenceSession, str]:
    """Return (session, device actually used: 'cuda' or 'cpu').

    `spin=False` stops the session's idle threads from busy-waiting: the drafter's would otherwise
    take the cores from the target's verify forward that runs right after it (measured: verify of an
    8-token tree 59 -> 34 ms, 2 threads). `libraries`: custom-op libraries the graph needs (runtime/kernels.py).
    """
    if device not in DEVICES:
        raise DovetailError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    cuda_listed = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not (cuda_listed and gpu_driver()):
        why = "this ONNX Runtime has no CUDA provider" if not cuda_listed else "no GPU driver (libcuda.so.1) is found"
        raise DovetailError(f"{role} asked for CUDA but {why}; install onnxruntime-gpu on a machine with an NVIDIA "
                            "GPU, or pass --draft-device cpu")
    want_cuda = wants_cuda(device)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    options = session_options(threads, spin, libraries)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; all mean a bad graph file
        raise DovetailError(f"cannot load {path}: {str(exc).splitlines()[0]}; re-export the artifact") from exc
    used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    if device == "cuda" and used != "cuda":
        raise DovetailError(
            f"{role} asked for CUDA but ONNX Runtime runs it on the CPU (no usable GPU, or CUDA/cuDNN libraries "
            "missing for onnxruntime-gpu); fix the CUDA install or pass --draft-device cpu"
        )
    if device == "auto" and want_cuda and used != "cuda":
        log.warning(f"{role} fell back to the CPU: a GPU driver is present but ONNX Runtime's CUDA provider did not "
                    "start (CUDA or cuDNN libraries missing?)")
    return session, used


def check_io(session: ort.InferenceSession, role: str, inputs: dict[str, dict[int, int]],
             outputs: dict[str, dict[int, int]]) -> None:
    """The graph must have exactly these inputs and at least these outputs, with the given sizes on the given
    axes: a manifest that disagrees with its graphs (layers, widths, heads, top-k) is caught here, at load,
    not as a shape error mid-generation."""
    declared_inputs = {i.name: i.shape for i in session.get_inputs()}
    declared_outputs = {o.name: o.shape for o in session.get_outputs()}
    if extra := sorted(set(declared_inputs) - set(inputs)):
        raise DovetailError(f"{role} graph has input {extra[0]}, which the manifest does not account for "
                            "(num_layers?); re-export the artifact")
    for kind, declared, expected in (("input", declared_inputs, inputs), ("output", declared_outputs, outputs)):
        for name, sizes in expected.items():
            shape = declared.get(name)
            if shape is None:
                raise DovetailError(f"{role} graph has no {kind} {name}; it is not a dovetail-onnx graph of this "
                                    "manifest (num_layers?), re-export it")
            for axis, size in sizes.items():
                if shape[axis] != size:
                    raise DovetailError(f"{role} graph {kind} {name} has shape {shape}, the manifest implies {size} "
                                        f"on axis {axis % len(shape)}; re-export the artifact")
