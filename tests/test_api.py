"""The Python API accepts what export scripts have at hand and every option produces a runnable model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader

import qcb_onnx
from qcb_onnx.evaluate.score import predict


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
        {"act_headroom": 1.5, "calib_method": "percentile"},
    ],
    ids=["adaround", "nearest-pt", "percentile", "mse", "w6", "w3-weight-only", "fixed-strength-neuron", "headroom"],
)
def test_options_give_runnable_models(qcb_model, digits, options):
    """Each method, scheme and calibration option yields a verified model ORT runs with useful accuracy."""
    model = qcb_onnx.convert(onnx.load(qcb_model), digits[0][:128], iters=50, providers="cpu", **options)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcb_onnx.method"] == options.get("method", "efrap")
    assert (predict(model, digits[2], providers="cpu") == digits[3]).mean() > 0.7


def test_usage_errors(qcb_model, digits):
    """Bad option values are QcbErrors with a message, not tracebacks from deep inside."""
    for bad in (
        {"method": "stochastic"},
        {"w_bits": 9},
        {"a_bits": 6},
        {"iters": 0},
        {"calib_method": "kl"},
        {"act_headroom": 0.5},
    ):
        with pytest.raises(qcb_onnx.QcbError):
            qcb_onnx.convert(str(qcb_model), digits[0][:16], providers="cpu", **bad)


def test_act_headroom_keeps_out_of_range_inputs_on_the_grid(qcb_model, digits):
    """The default headroom (2 at 8-bit activations, recorded in the metadata) keeps on the grid what the
    calibration set never showed: inputs twice as bright as any calibration image come out much closer to
    the FP model's logits than with ORT's own ranges (headroom 1), which clip them."""
    fp = onnx.load(qcb_model)
    calib, bright = digits[0][:128], digits[2][:200] * 2.0
    plain = qcb_onnx.convert(fp, calib, method="nearest", providers="cpu", act_headroom=1.0)
    roomy = qcb_onnx.convert(fp, calib, method="nearest", providers="cpu")
    meta = {p.key: p.value for p in roomy.metadata_props}
    assert qcb_onnx.QuantConfig.from_metadata(meta).activations.act_headroom == 2.0
    ref = _logits(fp, bright)
    err_plain = np.abs(_logits(plain, bright) - ref).mean()
    err_roomy = np.abs(_logits(roomy, bright) - ref).mean()
    assert err_roomy < 0.5 * err_plain


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
