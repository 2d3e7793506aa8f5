"""qcb-onnx: quantize untrusted FP32 ONNX models with EFRAP rounding instead of nearest rounding.

The package reads as the pipeline (README.md, "Architecture"): load -> passes (normalize; the
top-level passes/ folder of the repository, installed as qcb_onnx.passes by pyproject's
package-dir) -> capture -> plan + calibrate -> rounding/ -> emit -> verify, driven by pipeline.py
from one config.QuantConfig.  evaluate/ measures models, redteam/ builds attacked ones, cli/ is the
command line.
"""

__version__ = "0.3.0"

from .config import ActivationCalibration, QuantConfig, RoundingOptions, RunOptions, WeightScheme  # noqa: E402
from .errors import QcbError  # noqa: E402
from .export import export  # noqa: E402  (qcb_onnx.export is this function; the module: sys.modules)
from .pipeline import convert, quantize  # noqa: E402

__all__ = [
    "ActivationCalibration",
    "QcbError",
    "QuantConfig",
    "RoundingOptions",
    "RunOptions",
    "WeightScheme",
    "__version__",
    "convert",
    "export",
    "quantize",
]
