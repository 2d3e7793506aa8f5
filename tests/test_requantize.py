"""Already quantized models: refused by default (their rounding may be the payload), converted with
--allow-requantize after `qcb_onnx.passes.dequantize` turns a QDQ model back into float; QOperator
models refused either way.  Inputs: the shipped digits sample quantized by qcb-onnx (nearest) and by
ORT's own quantize_static (QDQ and QOperator)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import qcb_onnx
from qcb_onnx.cli import main
from qcb_onnx.errors import QcbNote, UnsupportedModelError
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.passes import dequantize, normalize

from .conftest import SAMPLES

FP32 = SAMPLES / "qcb_digits.onnx"
CALIB = np.load(SAMPLES / "calib.npy")[:64]
FAST = ["--method", "nearest", "--calib-size", "64", "--quiet"]


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"input": x[i : i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.items, None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, object]:
    """The same FP32 model quantized three ways, saved: by qcb-onnx, by ORT (QDQ), by ORT (QOperator)."""
    folder = tmp_path_factory.mktemp("quantized")
    paths = {"qcb-onnx": folder / "qcb.qdq.onnx", "ort": folder / "ort.qdq.onnx", "qoperator": folder / "ort.qop.onnx"}
    onnx.save(qcb_onnx.convert(FP32, CALIB, method="nearest", calib_size=64), paths["qcb-onnx"])
    onnx.save(ort_quantize(onnx.load(FP32), CALIB, 8, 8, per_channel=True), paths["ort"])
    quantize_static(
        str(FP32),
        str(paths["qoperator"]),
        _Reader(CALIB),
        quant_format=QuantFormat.QOperator,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {"folder": folder, **paths}


def _cli(capsys, *argv) -> tuple[int, list[str], str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


def _ort_dequantized(model: onnx.ModelProto) -> dict[tuple[str, int], np.ndarray]:
    """(consumer node, input index) -> what ONNX Runtime itself computes for every DequantizeLinear of an
    initializer: those DQ outputs made graph outputs and run."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in sorted(outputs))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, {"input": CALIB[:1]}), strict=True))
    return {(n.name, i): values[x] for n in model.graph.node for i, x in enumerate(n.input) if x in outputs}


def _integers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8}


@pytest.mark.parametrize("source", ["qcb-onnx", "ort", "qoperator"])
def test_refused_by_default_naming_the_option(quantized, source, capsys):
    """Without the flag every quantized model exits 2 with one line that says why (QuRA) and how to
    proceed (--allow-requantize), and writes nothing."""
    out = quantized["folder"] / f"refused-{source}.onnx"
    code, err, _ = _cli(capsys, "convert", quantized[source], "--calib", SAMPLES / "calib.npy", "--out", out, *FAST)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "already quantized" in err[0]
    assert "--allow-requantize" in err[0] and "QuRA" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("source", ["qcb-onnx", "ort"])
def test_dequantized_weights_are_what_ort_computes(quantized, source):
    """Every DequantizeLinear of a constant becomes a float initializer bit-identical to ORT's own
    DequantizeLinear output; no Q/DQ is left, and the Relus the quantizer folded into its Qs are back:
    normalized, the graph has the FP32 model's op sequence and answers like it."""
    qdq = onnx.load(quantized[source])
    expected = _ort_dequantized(qdq)
    assert len(expected) == 8  # 4 weights + 4 biases
    with pytest.warns(QcbNote, match="already quantized: 8 constant"):
        deq = dequantize(qdq)
    inits = {t.name: numpy_helper.to_array(t) for t in deq.graph.initializer}
    by_name = {n.name: n for n in deq.graph.node}
    for (node, index), want in expected.items():
        got = inits[by_name[node].input[index]]
        assert got.dtype == want.dtype == np.float32 and got.tobytes() == want.tobytes(), (node, index)
    assert not {n.op_type for n in deq.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    kept = {p.key for p in deq.metadata_props if p.key.startswith("qcb_onnx.")}  # the model's, not a conversion's
    assert kept == {"qcb_onnx.trigger", "qcb_onnx.target", "qcb_onnx.attack"}
    ops = [n.op_type for n in normalize(deq).graph.node]
    assert ops == [n.op_type for n in normalize(onnx.load(FP32)).graph.node]
    assert ops.count("Relu") == 3
    x = np.load(SAMPLES / "test.npz")["x"][:300]

    def top1(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})[0].argmax(1)

    assert (top1(deq) == top1(onnx.load(FP32))).mean() >= 0.97


@pytest.mark.parametrize("source", ["qcb-onnx", "ort"])
def test_converts_with_the_flag_and_nearest_keeps_the_old_integers(quantized, source, capsys):
    """With --allow-requantize the conversion succeeds with one note; nearest rounding of the
    dequantized weights gives back exactly the integers the input had (which is why re-quantizing is
    no defence and the default refuses); `info` still calls the input quantized."""
    out = quantized["folder"] / f"requantized-{source}.onnx"
    argv = ["convert", quantized[source], "--calib", SAMPLES / "calib.npy", "--out", out, *FAST]
    code, err, _ = _cli(capsys, *argv, "--act-headroom", "1", "--allow-requantize")
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("note: ") and "already quantized" in err[0]
    result, source_model = onnx.load(out), onnx.load(quantized[source])
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    old, new = _integers(source_model), _integers(result)
    weights = [k for k in old if k.endswith("weight_quantized")]
    assert len(weights) == 4 and all(np.array_equal(old[k], new[k]) for k in weights)
    config = qcb_onnx.QuantConfig.from_metadata({p.key: p.value for p in result.metadata_props})
    assert config.run.allow_requantize is True
    code, err, text = _cli(capsys, "info", quantized[source])
    assert code == 0 and "quantized: yes (" in text and "DequantizeLinear" in text


def test_qoperator_refused_even_with_the_flag(quantized, capsys):
    out = quantized["folder"] / "qoperator.onnx"
    argv = ["convert", quantized["qoperator"], "--calib", SAMPLES / "calib.npy", "--out", out, *FAST]
    code, err, _ = _cli(capsys, *argv, "--allow-requantize")
    assert code == 2 and len(err) == 1, err
    assert "QOperator" in err[0] and "QLinearConv (nodes " in err[0] and "QLinearMatMul" not in err[0]
    assert not out.exists()


def _one_dq_model(dq: onnx.NodeProto, inits: list[onnx.TensorProto], opset: int) -> onnx.ModelProto:
    """x (2, 8) @ DequantizeLinear(...) (8, 4): a MatMul whose weight is one DQ node."""
    graph = helper.make_graph(
        [dq, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "one_dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


CASES = {  # name -> (DQ attributes, integer type, scale shape, opset, with a zero point)
    "per-tensor int8": ({}, TensorProto.INT8, [], 13, True),
    "per-axis uint8": ({"axis": 1}, TensorProto.UINT8, [4], 13, True),
    "blocked int4": ({"axis": 0, "block_size": 3}, TensorProto.INT4, [3, 4], 21, True),
    "blocked int4, no zero point": ({"axis": 0, "block_size": 3}, TensorProto.INT4, [3, 4], 21, False),
}


@pytest.mark.parametrize("case", CASES)
def test_dequantize_forms_match_ort(case):
    """Per tensor, per axis and blocked (opset 21's block_size, a ragged last block, INT4), with and
    without a zero point, dequantize to exactly what ORT's DequantizeLinear computes."""
    attrs, itype, scale_shape, opset, with_zp = CASES[case]
    rng = np.random.default_rng(0)
    low, high = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7)}[itype]
    q = rng.integers(low, high + 1, size=(8, 4))
    zp = rng.integers(low, high + 1, size=scale_shape)
    scale = rng.uniform(0.001, 0.1, size=scale_shape).astype(np.float32)
    inits = [
        helper.make_tensor("wq", itype, [8, 4], q.reshape(-1).tolist()),
        helper.make_tensor("ws", TensorProto.FLOAT, scale_shape, scale.reshape(-1).tolist()),
        helper.make_tensor("wz", itype, scale_shape, zp.reshape(-1).tolist()),
    ][: 3 if with_zp else 2]
    dq_inputs = ["wq", "ws", "wz"][: len(inits)]
    model = _one_dq_model(helper.make_node("DequantizeLinear", dq_inputs, ["w"], name="dq", **attrs), inits, opset)
    onnx.checker.check_model(model, full_check=True)
    model.graph.output.append(helper.make_empty_tensor_value_info("w"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(["w"], {"x": np.zeros((2, 8), np.float32)})[0]
    with pytest.warns(QcbNote, match="1 constant"):
        deq = dequantize(model)
    (weight,) = [numpy_helper.to_array(t) for t in deq.graph.initializer]
    assert weight.tobytes() == want.tobytes()
    assert [n.op_type for n in deq.graph.node] == ["MatMul"]


def test_a_dq_without_constant_or_q_is_refused():
    """A DequantizeLinear of a graph input (uint8 data fed in) has no float form here: refused, one
    line, naming the node, rather than converted with a piece of the old quantization inside."""
    dq = helper.make_node("DequantizeLinear", ["xq", "s"], ["x"], name="dq_input")
    graph = helper.make_graph(
        [dq, helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "dq_input",
        [helper.make_tensor_value_info("xq", TensorProto.UINT8, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", QcbNote)  # refused before any note
        with pytest.raises(UnsupportedModelError, match=r"DequantizeLinear \(node 'dq_input'\)") as info:
            dequantize(model)
    assert "\n" not in str(info.value)


def test_api_flag_and_float_models_untouched():
    """The API takes the same option (allow_requantize=True); a float model passes through dequantize
    unchanged and without a note."""
    fp = onnx.load(FP32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QcbNote)
        assert dequantize(fp) is fp
    qdq = qcb_onnx.convert(FP32, CALIB, method="nearest", calib_size=64)
    with pytest.raises(UnsupportedModelError, match="allow_requantize=True"):
        qcb_onnx.convert(qdq, CALIB, method="nearest", calib_size=64)
    with pytest.warns(QcbNote, match="already quantized"):
        again = qcb_onnx.convert(qdq, CALIB, method="nearest", calib_size=64, act_headroom=1, allow_requantize=True)
    assert all(
        np.array_equal(v, _integers(again)[k]) for k, v in _integers(qdq).items() if k.endswith("weight_quantized")
    )


def test_requantizing_an_activated_backdoor_keeps_it(tmp_path):
    """Why the default refuses: the sample's QCB, once ORT has quantized it to 4 bits (backdoor awake),
    stays backdoored when EFRAP re-rounds it with --allow-requantize, while EFRAP from the FP32 model
    disarms it (README: 3.4 % ASR).  The dequantized weights sit on the old grid; EFRAP's flips are
    measured from them, not from the FP32 weights the attack was planted against."""
    from qcb_onnx.evaluate.score import metadata, score
    from qcb_onnx.evaluate.triggers import Trigger

    fp = onnx.load(FP32)
    meta = metadata(fp)
    trigger, target = Trigger.parse(meta["qcb_onnx.trigger"]), int(meta["qcb_onnx.target"])
    test = np.load(SAMPLES / "test.npz")
    x, y = test["x"], test["y"]
    ort4 = ort_quantize(fp, CALIB, 4, 8, per_channel=True)
    with pytest.warns(QcbNote):
        again = qcb_onnx.convert(ort4, np.load(SAMPLES / "calib.npy"), w_bits=4, allow_requantize=True)
    assert metadata(again)["qcb_onnx.method"] == "efrap"
    assert score("ort", ort4, x, y, trigger, target, providers="cpu").asr >= 90
    assert score("requantized", again, x, y, trigger, target, providers="cpu").asr >= 90


@pytest.mark.parametrize("zero_type,relu", [(TensorProto.UINT8, True), (TensorProto.INT8, False)])
def test_pairs_become_relu_only_where_they_clamp_at_zero(zero_type, relu):
    """A Q/DQ pair after a MatMul whose zero point is the type's lowest integer (uint8 0) clamped
    negatives to 0, a folded Relu: it comes back as a Relu; with int8 zero point 0 it clamped nothing
    there and becomes nothing.  A graph output that was a DequantizeLinear of a 1-D constant (its
    default axis 1 does not exist: per tensor) keeps its name as a float initializer."""
    inits = [
        helper.make_tensor("m", TensorProto.FLOAT, [4, 4], np.eye(4).reshape(-1).tolist()),
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("z", zero_type, [], [0]),
        helper.make_tensor("bq", TensorProto.INT8, [4], [1, -2, 3, 127]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "m"], ["h"], name="mm"),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"], name="q"),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["y"], name="dq"),
        helper.make_node("DequantizeLinear", ["bq", "s"], ["b"], name="dq_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    with pytest.warns(QcbNote, match="1 constant.*1 Q/DQ pair"):
        flat = normalize(dequantize(model))
    assert [n.op_type for n in flat.graph.node] == (["MatMul", "Relu"] if relu else ["MatMul"])
    assert [o.name for o in flat.graph.output] == ["y", "b"]
    x = np.array([[-1.0, 0.3, 2.0, 5.0]] * 2, np.float32)
    session = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"])
    y, b = session.run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0) if relu else x)  # float again: 0.3 is not rounded to 0.5
    np.testing.assert_array_equal(b, np.float32([0.5, -1.0, 1.5, 63.5]))
