"""qcb-onnx: quantize untrusted FP32 ONNX models with EFRAP rounding instead of nearest rounding."""

__version__ = "0.1.0"
