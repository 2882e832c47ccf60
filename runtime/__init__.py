"""Deploy side of dovetail-onnx: ONNX Runtime only, no torch, no transformers."""

from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.generator import Generator, GeneratorParams, Model, Stats, generate
from dovetail_onnx.runtime.manifest import TreeSettings

__all__ = ["DovetailError", "Generator", "GeneratorParams", "Model", "Stats", "TreeSettings", "generate"]
