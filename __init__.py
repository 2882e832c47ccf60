"""dovetail-onnx: CPU target + GPU drafter speculative decoding on ONNX Runtime."""

__version__ = "0.1.0"
