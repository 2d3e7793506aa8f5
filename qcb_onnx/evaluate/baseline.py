"""The standard path a QCB is built to wake: onnxruntime.quantization.quantize_static, same scheme."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from .. import large
from ..data import batch_size_for, input_specs
from ..errors import UsageError
from ..load import default_opset


class _ArrayReader(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, batch_size: int = 64) -> None:
        self.items = iter([{name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(
    model: onnx.ModelProto,
    calib: np.ndarray,
    w_bits: int,
    a_bits: int | None,
    per_channel: bool,
    *,
    a_symmetric: bool = False,
    int32_bias: bool = True,
) -> onnx.ModelProto:
    """The standard path: onnxruntime.quantization.quantize_static (QDQ, MinMax) with the same scheme;
    `a_symmetric` is its QInt8 + ActivationSymmetric, `int32_bias` False its QuantizeBias False."""
    if w_bits not in (4, 8):
        raise UsageError(f"ORT's quantize_static supports 4- and 8-bit weights, not {w_bits}")
    if a_bits not in (4, 8):
        raise UsageError("ORT's quantize_static always quantizes activations: give --a-bits 8 or 4")
    if (w_bits == 4 or a_bits == 4) and (default_opset(model) or 0) < 21:
        model = large.convert_version(model, 21)
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        src, dst = Path(tmp) / "fp.onnx", Path(tmp) / "q.onnx"
        large.save(model, src)
        quantize_static(
            str(src),
            str(dst),
            _ArrayReader(_input_name(model), calib, batch_size_for(input_specs(model), 64)),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8 if a_symmetric else QuantType.QUInt8 if a_bits == 8 else QuantType.QUInt4,
            weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
            use_external_data_format=large.is_large(model),
            extra_options={"ActivationSymmetric": a_symmetric, "QuantizeBias": int32_bias},
        )
        return onnx.load(dst)  # external data (if any) is read here, before the folder goes


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static logs 'consider pre-processing' warnings on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)
