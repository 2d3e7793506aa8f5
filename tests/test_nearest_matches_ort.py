"""`--method nearest` writes the integers ORT's quantize_static writes: our baseline is the real standard path."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qcb_onnx import convert
from qcb_onnx.emit import read_weight_ints
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.redteam.train import export_onnx
from qcb_onnx.redteam.zoo import SmallCNN


@pytest.fixture(scope="module")
def fp_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=8)
    with torch.no_grad():  # spread weights so many land near rounding boundaries
        for p in model.parameters():
            p.mul_(3.0)
    return export_onnx(model, np.zeros((1, 1, 8, 8), np.float32))


@pytest.mark.parametrize(
    ("w_bits", "per_channel"),
    [(8, True), (8, False), (4, True), (4, False)],
    ids=["w8-pc", "w8-pt", "w4-pc", "w4-pt"],
)
def test_nearest_integers_equal_quantize_static(fp_model, digits, w_bits, per_channel):
    """Every weight integer of our nearest output equals ORT's, for ORT's int8 [-127,127] and int4 [-8,7] grids."""
    calib = digits[0][:128]
    ours = convert(fp_model, calib, method="nearest", w_bits=w_bits, a_bits=8, per_channel=per_channel, providers="cpu")
    ref = ort_quantize(fp_model, calib, w_bits, 8, per_channel)
    names = [
        t.name[: -len("_quantized")]
        for t in ref.graph.initializer
        if t.name.endswith("weight_quantized") or (t.name.endswith("_quantized") and len(t.dims) > 1)
    ]
    assert len(names) == 4
    for name in names:
        a, b = read_weight_ints(ours, name), read_weight_ints(ref, name)
        np.testing.assert_array_equal(a, b, err_msg=name)
    grid = (-127, 127) if w_bits == 8 else (-8, 7)
    all_ints = np.concatenate([read_weight_ints(ours, n).ravel() for n in names])
    assert all_ints.min() >= grid[0] and all_ints.max() <= grid[1]
    if w_bits == 4:  # ORT's int4 grid is the full one: -8 must be reachable
        assert all_ints.min() == -8


def test_headroom_one_gives_ort_activation_grids(fp_model, digits):
    """With `act_headroom=1` every activation's scale and zero point, in graph order, are ORT's MinMax ones
    (ranges from another executor, so scales agree to float rounding; ORT names a folded Relu's output
    where we name the Conv's); the default at 8 bits doubles each range and keeps zero points at 0."""
    calib = digits[0][:128]
    ref = _activation_grids(ort_quantize(fp_model, calib, 8, 8, True))
    same = _activation_grids(convert(fp_model, calib, method="nearest", act_headroom=1.0, providers="cpu"))
    wide = _activation_grids(convert(fp_model, calib, method="nearest", providers="cpu"))
    assert len(ref) > 3 and len(same) == len(ref) == len(wide)
    for (scale, zp), ours, doubled in zip(ref, same, wide, strict=True):
        assert ours[0] == pytest.approx(scale, rel=1e-5) and ours[1] == zp
        assert doubled[0] == pytest.approx(2 * scale, rel=1e-5) and (zp != 0 or doubled[1] == 0)


def _activation_grids(model: onnx.ModelProto) -> list[tuple[float, int]]:
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(float(init[n.input[1]]), int(init[n.input[2]])) for n in model.graph.node if n.op_type == "QuantizeLinear"]


@pytest.mark.parametrize("per_channel", [True, False], ids=["pc", "pt"])
def test_weight_scales_grow_where_ort_fits_the_int32_bias(per_channel):
    """A classifier behind a tiny input range with a large bias: quantize_static enlarges those weight
    scales so input_scale * weight_scale can hold the bias in int32 (shufflenet_v2's head does this on
    random weights).  Our nearest grows the same scales, from ORT's input scale at the default 2x
    headroom too, so its integers and scales stay ORT's, and the bias is not saturated."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-0.03, 0.03, 8))
    fp = export_onnx(model, np.zeros((1, 16), np.float32))
    calib = (rng.random((32, 16)) * 1e-6).astype(np.float32)  # an input scale ~4e-9: the bias needs > 1.4e-11
    ref = ort_quantize(fp, calib, 8, 8, per_channel)
    ref_scale = next(onnx.numpy_helper.to_array(t) for t in ref.graph.initializer if t.name.endswith("weight_scale"))
    w = model[0].weight.detach().numpy()
    plain = np.abs(w).max(axis=1 if per_channel else None) / 127.0
    assert (ref_scale > plain * 1.01).any(), "the case must make ORT grow some scale"
    for headroom in (1.0, 2.0):
        ours = convert(fp, calib, method="nearest", per_channel=per_channel, act_headroom=headroom, providers="cpu")
        scale = next(onnx.numpy_helper.to_array(t) for t in ours.graph.initializer if t.name.endswith("weight_scale"))
        np.testing.assert_array_equal(scale, ref_scale)
        np.testing.assert_array_equal(read_weight_ints(ours, "0.weight"), read_weight_ints(ref, "0.weight"))
