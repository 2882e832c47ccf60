"""Deploy side of dovetail-onnx: ONNX Runtime only, no torch, no transformers."""

from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.generator import Generator, GeneratorParams, Model, Stats, generate
from dovetail_onnx.runtime.manifest import TreeSettings
from dovetail_onnx.runtime.sampling import SamplingParams

__all__ = ["DovetailError", "Generator", "GeneratorParams", "Model", "SamplingParams", "Stats", "TreeSettings",
           "generate"]
