"""qcb-onnx: quantize untrusted FP32 ONNX models with EFRAP rounding instead of nearest rounding."""

__version__ = "0.2.0"

from .convert import convert  # noqa: E402
from .errors import QcbError  # noqa: E402

__all__ = ["QcbError", "__version__", "convert"]
