"""Runtime presets (`--target`): each writes the conventions its runtime needs, runs in ONNX Runtime,
and with `--method nearest` equals what quantize_static writes under the same conventions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qcb_onnx import convert
from qcb_onnx.cli import main
from qcb_onnx.config import TARGETS, QuantConfig
from qcb_onnx.emit import read_weight_ints
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.evaluate.score import predict
from qcb_onnx.redteam.train import export_onnx
from qcb_onnx.redteam.zoo import SmallCNN


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=8).eval()
    with torch.no_grad():  # bias the last layer so ORT's int32 bias has something to hold
        model.classifier.bias.add_(0.5)
    return model


@pytest.fixture(scope="module")
def fp_model() -> onnx.ModelProto:
    return export_onnx(_small_cnn(), np.zeros((1, 1, 8, 8), np.float32))


@pytest.fixture(scope="module")
def dynamo_model() -> onnx.ModelProto:
    """torch's default exporter: its own node names and a static batch of 1."""
    return torch.onnx.export(_small_cnn(), (torch.zeros(1, 1, 8, 8),), dynamo=True).model_proto


def _zero_points(model: onnx.ModelProto, op: str) -> list[np.ndarray]:
    init = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(init[n.input[2]]) for n in model.graph.node if n.op_type == op and len(n.input) > 2]


def _activation_params(model: onnx.ModelProto) -> list[tuple[float, int, int]]:
    init = {t.name: t for t in model.graph.initializer}
    return [
        (float(numpy_helper.to_array(init[n.input[1]])), int(numpy_helper.to_array(init[n.input[2]])),
         init[n.input[2]].data_type)
        for n in model.graph.node if n.op_type == "QuantizeLinear"
    ]  # fmt: skip


@pytest.mark.parametrize("target", list(TARGETS))
def test_each_target_runs_in_ort_with_its_conventions(fp_model, digits, target):
    """Every preset's output loads and runs in ORT (the verification inside convert compares ORT with our
    simulation too) and holds the conventions the preset documents."""
    calib = digits[0][:64]
    config = QuantConfig.for_target(target, QuantConfig.from_options(method="nearest", providers="cpu"))
    model = convert(fp_model, calib, config)
    assert predict(model, digits[2][:32], providers="cpu").shape == (32,)
    acts = _activation_params(model)
    ints = {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}
    if target == "int4-weight-only":
        assert not acts and ints == {TensorProto.INT4}
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
        return
    symmetric = target in ("ort-cuda", "tensorrt")
    assert {t for _, _, t in acts} == {TensorProto.INT8 if symmetric else TensorProto.UINT8}
    if symmetric:
        assert all(zp == 0 for _, zp, _ in acts)
        assert any(n.op_type == "Relu" for n in model.graph.node), "a symmetric Q does not clip at 0: Relu stays"
    int32 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT32]
    assert bool(int32) == (target != "tensorrt"), "TensorRT keeps FP32 biases"
    assert all(not z.any() for z in _zero_points(model, "DequantizeLinear") if z.dtype == np.int8)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize(("target", "int32_bias"), [("ort-cuda", True), ("tensorrt", False)])
def test_symmetric_targets_equal_quantize_static(fp_model, dynamo_model, digits, target, int32_bias, exporter):
    """Nearest under the S8S8 presets writes quantize_static's integers and, at headroom 1, its activation
    grids (QInt8 + ActivationSymmetric, QuantizeBias as the preset), with either exporter's graph."""
    fp = fp_model if exporter == "torchscript" else dynamo_model
    calib = digits[0][:128]
    config = QuantConfig.for_target(target, QuantConfig.from_options(method="nearest", providers="cpu"))
    ours = convert(fp, calib, QuantConfig.from_options(config, act_headroom=1.0))
    ref = ort_quantize(fp, calib, 8, 8, True, a_symmetric=True, int32_bias=int32_bias)
    weights = [t.name.removesuffix("_quantized") for t in ref.graph.initializer if t.name.endswith("weight_quantized")]
    assert len(weights) == 4
    for name in weights:
        np.testing.assert_array_equal(read_weight_ints(ours, name), read_weight_ints(ref, name), err_msg=name)
    mine, theirs = _activation_params(ours), _activation_params(ref)
    assert len(mine) == len(theirs) > 4
    for (s, zp, t), (rs, rzp, rt) in zip(mine, theirs, strict=True):
        assert s == pytest.approx(rs, rel=1e-5) and zp == rzp == 0 and t == rt == TensorProto.INT8
    assert bool([t for t in ref.graph.initializer if t.data_type == TensorProto.INT32]) == int32_bias


def test_flags_override_the_target_and_bad_combinations_are_one_line(tmp_path, capsys):
    """--target sets defaults only: an explicit flag wins; a preset that cannot hold is a usage error."""
    sample, calib = "samples/qcb_digits.onnx", "samples/calib.npy"
    out = tmp_path / "w8.onnx"
    args = ["convert", sample, "--calib", calib, "--out", str(out), "--method", "nearest", "--calib-size", "32"]
    assert main([*args, "--target", "int4-weight-only", "--w-bits", "8", "--block-size", "none", "--quiet"]) == 0
    assert {t.data_type for t in onnx.load(out).graph.initializer if t.name.endswith("_quantized")} == {
        TensorProto.INT8
    }
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    capsys.readouterr()
    assert main([*args, "--force", "--target", "tensorrt", "--a-bits", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--a-symmetric needs 8-bit activations" in err[0]
    with pytest.raises(SystemExit):
        main([*args, "--force", "--target", "tflite"])
