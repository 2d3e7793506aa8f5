"""A learned rounding's layer takes the mean of its output error into its bias (weights.py, moments.py).

What is proved: on the calibration images, the quantized layer's mean output per channel equals the
FP layer's, where the same integers with the model's own bias are off by the rounding's mean error;
the corrected bias is what ONNX Runtime runs (int32 with quantized activations, FP32 without);
nearest rounding keeps ORT's bias.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx.pipeline import quantize
from qcb_onnx.quantsim import quantize_bias


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """One 3x3 Conv with a bias whose output is the graph output: the mean error is this layer's."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _channel_mean(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64).mean(axis=(0, 2, 3))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (256, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("method", ["efrap", "adaround"])
def test_bias_takes_the_mean_output_error(images, method):
    model = _conv_model()
    fp = _channel_mean(_run(model, images))
    conv = quantize(model, images, method=method, w_bits=4, per_channel=False, iters=200, providers="cpu")
    corrected = _channel_mean(conv.simulate(images)) - fp
    # the same integers with the model's own bias, quantized as ORT would
    raw = dataclasses.replace(conv.state, biases=dict(conv.state.biases))
    bias = numpy_helper.to_array(model.graph.initializer[1])
    raw.biases["b"] = quantize_bias(bias, conv.state.acts["x"].scale, conv.state.weights["w"])
    uncorrected = _channel_mean(conv.simulate(images, state=raw)) - fp
    assert np.abs(uncorrected).max() > 5e-3  # the 4-bit per-tensor rounding does shift the mean
    assert np.abs(corrected).max() < 0.1 * np.abs(uncorrected).max()
    # and ONNX Runtime runs that bias: its mean matches the simulation's
    np.testing.assert_allclose(_channel_mean(_run(conv.model, images)) - fp, corrected, atol=2e-3)


def test_weights_only_model_gets_a_corrected_fp32_bias(images):
    model = _conv_model()
    fp = _channel_mean(_run(model, images))
    conv = quantize(model, images, method="efrap", w_bits=4, a_bits=None, per_channel=False, providers="cpu")
    written = {t.name: numpy_helper.to_array(t) for t in conv.model.graph.initializer}
    assert written["b"].dtype == np.float32
    assert not np.array_equal(written["b"], numpy_helper.to_array(model.graph.initializer[1]))
    assert np.abs(_channel_mean(_run(conv.model, images)) - fp).max() < 1e-4  # exact input: exact mean


def test_nearest_keeps_the_models_bias(images):
    model = _conv_model()
    conv = quantize(model, images, method="nearest", w_bits=4, per_channel=False, providers="cpu")
    bias = numpy_helper.to_array(model.graph.initializer[1])
    expected = quantize_bias(bias, conv.state.acts["x"].scale, conv.state.weights["w"])
    np.testing.assert_array_equal(conv.state.biases["b"].ints, expected.ints)
