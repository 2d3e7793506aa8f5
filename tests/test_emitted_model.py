"""The emitted QDQ model is valid ONNX, holds exactly the optimiser's integers, and ORT computes
what our PyTorch simulation computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from qcb_onnx import convert
from qcb_onnx.emit import read_weight_ints
from qcb_onnx.evaluate.score import predict
from qcb_onnx.pipeline import quantize


@pytest.fixture(scope="module")
def converted(qcb_model, digits):
    xtr = digits[0][:256]
    out = {}
    for w_bits, a_bits in [(4, 8), (8, 8), (4, 4), (8, None)]:
        out[(w_bits, a_bits)] = convert(
            onnx.load(qcb_model), xtr, w_bits=w_bits, a_bits=a_bits, iters=300, providers="cpu"
        )
    return out


@pytest.mark.parametrize("key", [(4, 8), (8, 8), (4, 4), (8, None)], ids=["w4a8", "w8a8", "w4a4", "w8-weight-only"])
def test_model_is_valid_and_runs_in_ort(converted, digits, key):
    """check_model(full_check) passes and ORT's CPU EP runs the model at every supported bit width."""
    model = converted[key]
    onnx.checker.check_model(model, full_check=True)
    pred = predict(model, digits[2], providers="cpu")
    assert (pred == digits[3]).mean() > 0.8


def test_int4_weights_round_trip(converted):
    """4-bit weights are stored as ONNX INT4 (opset 21) and read back as the same integers in [-8, 7]."""
    model = converted[(4, 8)]
    assert any(o.domain in ("", "ai.onnx") and o.version >= 21 for o in model.opset_import)
    int4 = [t for t in model.graph.initializer if t.name.endswith("weight_quantized")]
    assert int4 and all(t.data_type == TensorProto.INT4 for t in int4)
    for t in int4:
        ints = read_weight_ints(model, t.name[: -len("_quantized")])
        assert ints.min() >= -8 and ints.max() <= 7
        assert ints.shape == tuple(t.dims)


def test_weights_are_the_optimisers_decisions(qcb_model, digits):
    """The written integers are floor(w/s) + the optimiser's decisions, and differ from nearest where it flipped."""
    import json

    fp = onnx.load(qcb_model)
    calib = digits[0][:256]
    efrap = convert(fp, calib, w_bits=4, iters=300, providers="cpu")
    nearest = convert(fp, calib, w_bits=4, method="nearest", providers="cpu")
    flips = json.loads({p.key: p.value for p in efrap.metadata_props}["qcb_onnx.flip_ratios"])
    for name, ratio in flips.items():
        a, b = read_weight_ints(efrap, name), read_weight_ints(nearest, name)
        assert np.abs(a - b).max() <= 1  # only the bracketing integer can be chosen
        assert abs(float((a != b).mean()) - ratio) < 0.02, name  # metadata says what the file holds


@pytest.mark.parametrize(("w_bits", "a_bits"), [(4, 8), (8, 8), (4, 4)], ids=["w4a8", "w8a8", "w4a4"])
def test_ort_agrees_with_simulation(qcb_model, digits, w_bits, a_bits):
    """ORT's top-1 on the emitted model agrees with our PyTorch simulation of it on >= 99% of test inputs."""
    result = quantize(onnx.load(qcb_model), digits[0][:256], w_bits=w_bits, a_bits=a_bits, iters=200, providers="cpu")
    x = digits[2]
    ort_pred = predict(result.model, x, providers="cpu")
    sim_pred = result.simulate(x).argmax(1)
    assert (sim_pred == ort_pred).mean() >= 0.99


def test_int8_model_fuses_into_qlinear_ops(converted, tmp_path):
    """ORT's CPU EP fuses the W8A8 model's DQ->Conv->Q / Gemm into QLinearConv and QGemm kernels."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(converted[(8, 8)].SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert "QLinearConv" in ops
    assert "Conv" not in ops


def test_int8_storage_holds_the_same_4bit_integers_and_fuses(converted, qcb_model, digits, tmp_path):
    """--int8-storage writes the W4 model's very integers in INT8 tensors (opset 13, no INT4), which
    ORT's CPU EP fuses into QLinearConv; predictions match the INT4 model's."""
    int4 = converted[(4, 8)]
    int8 = convert(onnx.load(qcb_model), digits[0][:256], w_bits=4, iters=300, int8_storage=True, providers="cpu")
    weights = [t for t in int8.graph.initializer if t.name.endswith("weight_quantized")]
    assert weights and all(t.data_type == TensorProto.INT8 for t in weights)
    assert max(o.version for o in int8.opset_import if o.domain in ("", "ai.onnx")) < 21
    for t in weights:
        name = t.name[: -len("_quantized")]
        np.testing.assert_array_equal(read_weight_ints(int8, name), read_weight_ints(int4, name))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(int8.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    agree = (predict(int8, digits[2], providers="cpu") == predict(int4, digits[2], providers="cpu")).mean()
    assert agree > 0.99


def test_unnamed_nodes_survive_relu_folding():
    """Graphs whose nodes have no names (hand-built models) keep every node but the folded Relus."""
    from onnx import helper

    rng = np.random.default_rng(0)

    def const(name, shape):
        return helper.make_tensor(
            name, TensorProto.FLOAT, shape, rng.normal(size=int(np.prod(shape))).astype(np.float32)
        )

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "unnamed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [const("w1", [4, 1, 3, 3]), const("w2", [4, 4, 3, 3]), const("fc", [10, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    result = quantize(model, x, method="nearest", providers="cpu")
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 1 and "GlobalAveragePool" in ops and "Flatten" in ops
    assert "Relu" not in ops  # both folded into their Conv's Q/DQ, as ORT does
    assert (predict(result.model, x, providers="cpu") == result.simulate(x).argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("a_bits", [8, 4])
def test_relu6_is_folded_into_the_quantizer(a_bits):
    """Conv -> Clip(0, 6) (ReLU6, as in MobileNet-V2) loses its Clip to the Q before it, as ORT's
    ClipQuantFusion does at 8 bits; at 4 bits ORT's own fusion throws on UINT4, so without our fold
    ORT cannot even load the model. The verified output holds no Clip."""
    import torch

    from qcb_onnx.redteam.train import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    x = np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32) * 4
    fp = export_onnx(net, x)
    assert sum(n.op_type == "Clip" for n in fp.graph.node) == 2
    q = convert(fp, x, method="nearest", w_bits=4, a_bits=a_bits, providers="cpu")  # verify() runs ORT
    assert not any(n.op_type == "Clip" for n in q.graph.node)
    official = convert(fp, x, method="efrap-official", iters=5, w_bits=4, a_bits=a_bits, providers="cpu")
    assert not any(n.op_type == "Clip" for n in official.graph.node)  # its loss clamps like ReLU6
    assert (predict(q, x, providers="cpu") == predict(fp, x, providers="cpu")).mean() > 0.8
