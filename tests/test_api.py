"""The Python API accepts what export scripts have at hand and every option produces a runnable model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader

import qcb_onnx
from qcb_onnx.evaluate import predict


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str = "input") -> None:
        self.batches = iter([{name: x[i : i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.batches, None)


def test_calibration_data_reader(qcb_model, digits):
    """An onnxruntime CalibrationDataReader works as calibration input, like quantize_static's."""
    model = qcb_onnx.convert(str(qcb_model), Reader(digits[0][:128]), iters=50, providers="cpu")
    assert (predict(model, digits[2], providers="cpu") == digits[3]).mean() > 0.8


@pytest.mark.parametrize(
    "options",
    [
        {"method": "adaround"},
        {"method": "nearest", "per_channel": False},
        {"calib_method": "percentile"},
        {"calib_method": "mse"},
        {"w_bits": 6},
        {"w_bits": 3, "a_bits": None},
        {"strength": 1.0, "guide": "neuron"},
    ],
    ids=["adaround", "nearest-pt", "percentile", "mse", "w6", "w3-weight-only", "fixed-strength-neuron"],
)
def test_options_give_runnable_models(qcb_model, digits, options):
    """Each method, scheme and calibration option yields a verified model ORT runs with useful accuracy."""
    model = qcb_onnx.convert(onnx.load(qcb_model), digits[0][:128], iters=50, providers="cpu", **options)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcb_onnx.method"] == options.get("method", "efrap")
    assert (predict(model, digits[2], providers="cpu") == digits[3]).mean() > 0.7


def test_usage_errors(qcb_model, digits):
    """Bad option values are QcbErrors with a message, not tracebacks from deep inside."""
    for bad in ({"method": "stochastic"}, {"w_bits": 9}, {"a_bits": 6}, {"iters": 0}, {"calib_method": "kl"}):
        with pytest.raises(qcb_onnx.QcbError):
            qcb_onnx.convert(str(qcb_model), digits[0][:16], providers="cpu", **bad)
