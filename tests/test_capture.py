"""Tests for qcb_onnx.capture.GraphModule.

The executor is only useful if it computes what ONNX Runtime computes, so most tests build a
one-node ONNX graph per op and attribute variant and compare against ORT's CPU provider.  The rest
check the features the quantization passes rely on: early stopping, parameter overrides, the
tensor hook, autograd, and up-front rejection of unsupported or broken graphs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx.capture import GraphModule, UnsupportedOps
from qcb_onnx.errors import CalibrationDataError, InvalidGraphError, ModelFileError, UnsupportedModelError, UsageError

RNG = np.random.default_rng(20240611)
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def rand(*shape: int, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return RNG.uniform(low, high, size=shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@dataclass
class Const:
    """Marks a node input that the test graph stores as an initializer instead of a graph input."""

    value: np.ndarray


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for name, v in inputs.items()
        ],
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        initializer=[numpy_helper.from_array(v, name) for name, v in (initializers or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def single_node(
    op: str, args: list, attrs: dict, opset: int, n_outputs: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One-node model: float arrays become graph inputs, Const / integer / bool arrays initializers."""
    names, feeds, inits = [], {}, {}
    for i, arg in enumerate(args):
        if arg is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(arg, Const):
            inits[name] = arg.value
        elif arg.dtype == np.float32:
            feeds[name] = arg
        else:
            inits[name] = arg
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op, names, outputs, name=f"{op.lower()}_node", **attrs)
    return make_model([node], feeds, outputs, inits, opset), feeds


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = ort_run(model, feeds)
    got = GraphModule(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for name, want in expected.items():
        actual = got[name].detach().cpu().numpy()
        assert actual.shape == want.shape, name
        assert actual.dtype == want.dtype, name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(actual, want, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(actual, want, err_msg=name)


def case(op: str, *args, opset: int = 17, outputs: int = 1, id: str, **attrs):  # noqa: A002
    return pytest.param(op, list(args), attrs, opset, outputs, id=f"{op}-{id}-op{opset}")


X4 = rand(2, 3, 7, 7)

CASES = [
    # ---- Conv -----------------------------------------------------------------------------
    case("Conv", rand(1, 3, 8, 8), rand(4, 3, 3, 3), rand(4), pads=[1, 1, 1, 1], opset=13, id="pads"),
    case("Conv", rand(1, 3, 8, 8), rand(4, 3, 3, 3), rand(4), pads=[1, 1, 1, 1], id="pads"),
    case("Conv", rand(2, 3, 9, 9), rand(4, 3, 3, 3), strides=[2, 2], id="stride-nobias"),
    case("Conv", rand(1, 3, 9, 9), rand(4, 3, 3, 3), dilations=[2, 2], pads=[0, 1, 2, 0], id="dil-asym"),
    case("Conv", rand(1, 4, 7, 7), rand(6, 2, 3, 3), rand(6), group=2, pads=[1, 1, 1, 1], id="groups"),
    case("Conv", rand(1, 4, 7, 7), rand(4, 1, 3, 3), rand(4), group=4, strides=[2, 1], id="depthwise"),
    case("Conv", rand(1, 3, 8, 9), rand(2, 3, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2], id="same-up"),
    case("Conv", rand(1, 3, 8, 9), rand(2, 3, 4, 2), auto_pad="SAME_LOWER", strides=[2, 2], id="same-lo"),
    case("Conv", rand(1, 3, 8, 9), rand(2, 3, 3, 3), auto_pad="VALID", strides=[2, 1], id="valid"),
    case("Conv", rand(2, 3, 10), rand(5, 3, 3), rand(5), pads=[1, 2], strides=[2], id="1d"),
    case("Conv", rand(2, 4, 12), rand(4, 2, 3), group=2, dilations=[3], id="1d-dil-groups"),
    case("Conv", rand(1, 2, 5, 6, 4), rand(3, 2, 2, 3, 2), pads=[1, 0, 1, 0, 1, 1], id="3d"),
    # ---- Gemm / MatMul --------------------------------------------------------------------
    case("Gemm", rand(3, 4), rand(4, 5), rand(5), id="default"),
    case("Gemm", rand(4, 3), rand(4, 5), rand(3, 5), transA=1, alpha=0.5, beta=2.0, id="transA"),
    case("Gemm", rand(3, 4), rand(5, 4), rand(1), transB=1, id="transB"),
    case("Gemm", rand(3, 4), rand(5, 4), transB=1, opset=13, id="noC"),
    case("MatMul", rand(3, 4), rand(4, 5), id="2d"),
    case("MatMul", rand(2, 3, 4), rand(4, 5), id="batched"),
    case("MatMul", rand(2, 1, 3, 4), rand(3, 4, 2), id="broadcast"),
    case("MatMul", rand(4), rand(4, 5), id="vec-mat"),
    case("MatMul", rand(3, 4), rand(4), id="mat-vec"),
    # ---- elementwise binary ---------------------------------------------------------------
    case("Add", rand(2, 3, 4), rand(4), id="bcast"),
    case("Add", i64(1, 2, 3), i64(10), id="int"),
    case("Sub", rand(2, 1, 4), rand(3, 1), id="bcast"),
    case("Mul", rand(2, 3, 4), rand(3, 1), id="bcast"),
    case("Div", rand(2, 3, 4), rand(1, 4, low=0.5, high=2.0), id="bcast"),
    case("Div", i64(7, -7, 9, -9), i64(2, 2, -4, -4), id="int-trunc"),
    case("Pow", rand(2, 3, low=0.1), rand(2, 3), id="float"),
    case("Pow", rand(2, 3), Const(i64(2)), id="int-exp"),
    case("Equal", i64(1, 2, 3), i64(1, 5, 3), id="int"),
    case("Less", rand(3, 4), rand(4), id="float"),
    case("Greater", rand(3, 4), rand(4), id="float"),
    case("Where", np.array([True, False, True]), rand(2, 3), rand(3), id="bcast"),
    case("Max", rand(2, 3), rand(3), rand(2, 1), id="variadic"),
    case("Min", rand(2, 3), rand(3), id="variadic"),
    case("Sum", rand(2, 3), rand(3), rand(1), id="variadic"),
    case("Mean", rand(2, 3), rand(3), id="variadic"),
    case("PRelu", rand(2, 3, 4, 4), rand(3, 1, 1), id="channel"),
    # ---- elementwise unary ----------------------------------------------------------------
    *[case(op, rand(2, 3, 4), id="basic") for op in ("Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Abs")],
    *[case(op, rand(2, 3, 4), id="basic") for op in ("Floor", "Ceil", "Softplus", "Elu", "Identity")],
    *[case(op, rand(2, 3, 4, low=0.1), id="positive") for op in ("Sqrt", "Log", "Reciprocal")],
    case("Not", np.array([True, False]), id="bool"),
    case("LeakyRelu", rand(2, 3, 4), id="default"),
    case("LeakyRelu", rand(2, 3, 4), alpha=0.2, id="alpha"),
    case("HardSigmoid", rand(2, 3, 4, low=-5, high=5), id="default"),
    case("HardSigmoid", rand(2, 3, 4, low=-5, high=5), alpha=0.3, beta=0.4, id="alpha-beta"),
    case("HardSwish", rand(2, 3, 4, low=-5, high=5), id="basic"),
    case("Gelu", rand(2, 3, 4), opset=20, id="exact"),
    case("Gelu", rand(2, 3, 4), approximate="tanh", opset=20, id="tanh"),
    case("Clip", rand(2, 3, 4), Const(f32(-0.5)), Const(f32(0.7)), opset=11, id="min-max"),
    case("Clip", rand(2, 3, 4), None, Const(f32(0.7)), opset=13, id="max-only"),
    case("Clip", rand(2, 3, 4), Const(f32(-0.5)), opset=17, id="min-only"),
    case("Clip", rand(2, 3, 4), opset=17, id="none"),
    case("Dropout", rand(2, 3), opset=13, id="inference"),
    case("Dropout", rand(2, 3), opset=13, outputs=2, id="mask"),
    # ---- pooling --------------------------------------------------------------------------
    case("MaxPool", X4, kernel_shape=[2, 2], strides=[2, 2], id="k2s2"),
    case("MaxPool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], id="pads"),
    case("MaxPool", X4, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, id="ceil"),
    case(
        "MaxPool",
        rand(1, 1, 6, 6),
        kernel_shape=[2, 2],
        strides=[2, 2],
        pads=[0, 0, 1, 1],
        ceil_mode=1,
        id="ceil-drop-window",
    ),  # fmt: skip
    case("MaxPool", X4, kernel_shape=[3, 2], pads=[0, 1, 2, 0], strides=[2, 1], id="asym-pads"),
    case("MaxPool", X4, kernel_shape=[2, 2], dilations=[2, 2], id="dilations"),
    case("MaxPool", X4, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", id="same-upper"),
    case("MaxPool", X4, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER", id="same-lower"),
    case("MaxPool", rand(2, 3, 11), kernel_shape=[3], strides=[2], pads=[1, 1], id="1d"),
    case("AveragePool", X4, kernel_shape=[2, 2], strides=[2, 2], id="k2s2"),
    case("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], id="pads-exclude"),
    case("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, id="pads-include"),
    case("AveragePool", X4, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, id="ceil"),
    case(
        "AveragePool",
        X4,
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 0, 1, 0],
        ceil_mode=1,
        count_include_pad=1,
        id="ceil-include",
    ),  # fmt: skip
    case("AveragePool", X4, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", id="same-upper"),
    case("AveragePool", X4, kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER", id="same-lower"),
    case("AveragePool", X4, kernel_shape=[2, 2], dilations=[2, 2], opset=19, id="dilations"),
    case("AveragePool", rand(2, 3, 11), kernel_shape=[3], strides=[2], pads=[1, 1], id="1d"),
    case("GlobalAveragePool", X4, id="2d"),
    case("GlobalAveragePool", rand(2, 3, 5), id="1d"),
    case("GlobalMaxPool", X4, id="2d"),
    # ---- normalization / softmax / reductions --------------------------------------------
    case("BatchNormalization", X4, rand(3), rand(3), rand(3), rand(3, low=0.5), epsilon=1e-3, id="basic"),
    case("BatchNormalization", X4, rand(3), rand(3), rand(3), rand(3, low=0.5), opset=13, id="basic"),
    case("LayerNormalization", rand(2, 3, 8), rand(8), rand(8), id="last-axis"),
    case("LayerNormalization", rand(2, 3, 8), rand(3, 8), axis=1, epsilon=1e-3, id="axis1-nobias"),
    case("Softmax", rand(2, 3, 4), axis=1, opset=11, id="flatten-axis1"),
    case("Softmax", rand(2, 3, 4), opset=11, id="flatten-default"),
    case("Softmax", rand(2, 3, 4), axis=1, opset=13, id="axis1"),
    case("Softmax", rand(2, 3, 4), opset=13, id="default"),
    case("LogSoftmax", rand(2, 3, 4), axis=-2, opset=13, id="axis-2"),
    case("ReduceMean", rand(2, 3, 4), axes=[1], keepdims=0, opset=13, id="attr"),
    case("ReduceMean", rand(2, 3, 4), i64(-1, 0), opset=18, id="input"),
    case("ReduceMean", rand(2, 3, 4), opset=18, id="all"),
    case("ReduceMean", rand(2, 3, 4), noop_with_empty_axes=1, opset=18, id="noop"),
    case("ReduceSum", rand(2, 3, 4), i64(2), keepdims=0, opset=13, id="input"),
    case("ReduceMax", rand(2, 3, 4), axes=[0, 2], opset=13, id="attr"),
    case("ReduceMin", rand(2, 3, 4), i64(1), opset=18, id="input"),
    # ---- shape manipulation ---------------------------------------------------------------
    *[case("Flatten", rand(2, 3, 4, 5), axis=a, id=f"axis{a}") for a in (0, 1, 2, -1)],
    case("Reshape", rand(2, 3, 4), i64(0, -1), id="zero-minus1"),
    case("Reshape", rand(2, 3, 4), i64(4, -1, 2), id="infer"),
    case("Reshape", rand(2, 3, 4), i64(-1), opset=13, id="flat"),
    case("Reshape", rand(2, 3, 4), i64(6, 4), allowzero=1, opset=14, id="allowzero"),
    case("Transpose", rand(2, 3, 4), id="default"),
    case("Transpose", rand(2, 3, 4, 5), perm=[0, 2, 3, 1], id="nhwc"),
    case("Concat", rand(2, 3, 4), rand(2, 1, 4), axis=1, id="axis1"),
    case("Concat", rand(2, 3), rand(2, 2), rand(2, 1), axis=-1, id="three"),
    case("Concat", i64(1, 2), i64(3), axis=0, id="int"),
    case("Split", rand(2, 6), Const(i64(2, 4)), axis=1, opset=13, outputs=2, id="sizes-input"),
    case("Split", rand(6, 2), opset=13, outputs=3, id="equal"),
    case("Split", rand(2, 6), axis=1, split=[1, 5], opset=11, outputs=2, id="sizes-attr"),
    case("Split", rand(7, 2), num_outputs=3, opset=18, outputs=3, id="num-outputs"),
    case("Slice", rand(5, 6), i64(1, 0), i64(4, -1), id="basic"),
    case("Slice", rand(5, 6), i64(1), i64(INT64_MAX), i64(-1), i64(2), id="huge-end-step2"),
    case("Slice", rand(5, 6), i64(-1), i64(INT64_MIN), i64(0), i64(-1), id="reverse"),
    case("Slice", rand(5, 6), i64(4, 5), i64(0, 1), i64(0, 1), i64(-2, -3), id="neg-steps"),
    case("Slice", rand(5, 6), i64(-100), i64(100), i64(1), opset=11, id="clamped"),
    case("Squeeze", rand(1, 3, 1, 4), axes=[0, -2], opset=11, id="attr"),
    case("Squeeze", rand(1, 3, 1, 4), i64(2), opset=13, id="input"),
    case("Squeeze", rand(1, 3, 1, 4), opset=13, id="all"),
    case("Unsqueeze", rand(3, 4), axes=[0, 3], opset=11, id="attr"),
    case("Unsqueeze", rand(3, 4), i64(-1, 0), opset=13, id="input"),
    case("Expand", rand(3, 1), i64(2, 1, 4), id="bidirectional"),
    case("Tile", rand(2, 3), i64(2, 1), id="basic"),
    case("Pad", rand(1, 2, 4, 5), i64(0, 0, 1, 2, 0, 0, 2, 1), Const(f32(1.5)), id="constant"),
    case("Pad", rand(1, 2, 4, 5), i64(0, 0, 1, 2, 0, 0, 2, 1), mode="reflect", id="reflect"),
    case("Pad", rand(1, 2, 4, 5), i64(0, 0, 1, 2, 0, 0, 2, 1), mode="edge", opset=11, id="edge"),
    case("Pad", rand(1, 2, 4, 5), i64(0, 1, -1, 0, 0, 0, 1, -2), id="negative"),
    case("Pad", rand(1, 2, 4, 5), i64(1, 2, 3, 0), None, i64(-1, 2), opset=18, id="axes"),
    case("Pad", rand(1, 2, 4, 5), i64(0, 0, 1, 2, 0, 0, 2, 1), mode="wrap", opset=19, id="wrap"),
    case("Gather", rand(4, 3), i64(0, 2, -1), id="axis0"),
    case("Gather", rand(2, 4, 3), np.array([[0, 3], [1, -2]]), axis=1, id="2d-indices"),
    case("Gather", rand(2, 4, 3), np.array(2, dtype=np.int64), axis=-1, id="scalar"),
    case("Gather", i64(5, 6, 7), np.array(1, dtype=np.int64), id="shape"),
    case("Shape", rand(2, 3, 4), id="default"),
    case("Shape", rand(2, 3, 4), start=1, opset=15, id="start"),
    case("Shape", rand(2, 3, 4), start=-2, end=-1, opset=15, id="start-end"),
    case("Size", rand(2, 3, 4), id="basic"),
    case("Cast", rand(2, 3, low=-9, high=9), to=TensorProto.INT64, id="f2i"),
    case("Cast", i64(1, -2, 3), to=TensorProto.FLOAT, id="i2f"),
    case("Cast", rand(2, 3), to=TensorProto.BOOL, id="f2b"),
    case("Cast", i64(1, 2), to=TensorProto.INT32, id="i2i32"),
    case("ConstantOfShape", i64(2, 3), id="default"),
    case("ConstantOfShape", i64(2, 3), value=numpy_helper.from_array(i64(7)), id="int"),
    case("ConstantOfShape", i64(4), value=numpy_helper.from_array(f32(2.5)), id="float"),
    case(
        "Range",
        np.array(1, dtype=np.int64),
        np.array(10, dtype=np.int64),
        np.array(3, dtype=np.int64),
        id="int",
    ),  # fmt: skip
    # ---- Resize ---------------------------------------------------------------------------
    *[
        case(
            "Resize",
            rand(1, 2, 3, 4),
            None,
            Const(f32(1, 1, 2, 2)),
            mode="nearest",
            coordinate_transformation_mode=ctm,
            nearest_mode=nm,
            opset=13,
            id=f"up-{ctm}-{nm}",
        )  # fmt: skip
        for ctm in ("asymmetric", "half_pixel", "align_corners")
        for nm in ("floor", "round_prefer_floor", "round_prefer_ceil", "ceil")
    ],
    case("Resize", rand(1, 2, 6, 8), None, Const(f32(1, 1, 0.5, 0.5)), opset=13, id="down-default"),
    case("Resize", rand(1, 2, 5, 7), None, None, Const(i64(1, 2, 8, 10)), opset=13, id="sizes-default"),
    case(
        "Resize",
        rand(1, 2, 5, 7),
        Const(np.zeros(0, np.float32)),
        Const(f32(1, 1, 1.5, 2.5)),
        coordinate_transformation_mode="asymmetric",
        opset=11,
        id="opset11-frac",
    ),  # fmt: skip
    *[
        case(
            "Resize",
            rand(1, 2, 4, 5),
            None,
            Const(f32(1, 1, 2, 1.5)),
            mode="linear",
            coordinate_transformation_mode=ctm,
            opset=13,
            id=f"linear-{ctm}",
        )  # fmt: skip
        for ctm in ("half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel")
    ],
    case(
        "Resize",
        rand(1, 2, 6, 9),
        None,
        None,
        Const(i64(1, 2, 4, 4)),
        mode="linear",
        opset=13,
        id="linear-down-sizes",
    ),  # fmt: skip
    case(
        "Resize",
        rand(1, 2, 5, 1),
        None,
        None,
        Const(i64(1, 2, 3, 1)),
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
        opset=13,
        id="linear-pytorch-len1",
    ),  # fmt: skip
    case("Resize", rand(1, 2, 5, 7), None, None, Const(i64(8, 9)), axes=[2, 3], opset=18, id="axes"),
    case(
        "Resize",
        rand(1, 2, 5, 7),
        None,
        None,
        Const(i64(10, 10)),
        axes=[2, 3],
        keep_aspect_ratio_policy="not_larger",
        opset=18,
        id="not-larger",
    ),  # fmt: skip
    case(
        "Resize",
        rand(1, 2, 4, 6),
        None,
        Const(f32(1, 1, 2, 2)),
        mode="linear",
        coordinate_transformation_mode="half_pixel_symmetric",
        opset=19,
        id="hp-symmetric",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("op", "args", "attrs", "opset", "n_outputs"), CASES)
def test_op_matches_onnxruntime(op: str, args: list, attrs: dict, opset: int, n_outputs: int) -> None:
    """Each supported op / attribute variant / opset computes exactly what ONNX Runtime computes."""
    model, feeds = single_node(op, args, attrs, opset, n_outputs)
    assert_matches_ort(model, feeds)


@pytest.mark.parametrize(
    "attr",
    [
        helper.make_attribute("value", numpy_helper.from_array(rand(2, 3))),
        helper.make_attribute("value_float", 1.25),
        helper.make_attribute("value_floats", [1.0, -2.0, 3.5]),
        helper.make_attribute("value_int", 4),
        helper.make_attribute("value_ints", [1, 2, 3]),
    ],
    ids=lambda a: a.name,
)
def test_constant_variants_match_onnxruntime(attr: onnx.AttributeProto) -> None:
    """Constant supports every numeric value attribute form, with ONNX's dtypes (float32 / int64)."""
    const = helper.make_node("Constant", [], ["c"], name="const")
    const.attribute.append(attr)
    x = rand(2, 3) if attr.name.endswith(("float", "floats", "value")) else i64(1, 1, 1)
    if attr.name == "value_int":
        x = i64(5)
    nodes = [const, helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    assert_matches_ort(make_model(nodes, {"x": x}, ["y", "c"]), {"x": x})


# ---- whole models ----------------------------------------------------------------------------


class SmallCNN(torch.nn.Module):
    """Conv+BN+ReLU, MaxPool, a residual block, global average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(8),
        )
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def export_small_cnn() -> onnx.ModelProto:
    torch.manual_seed(0)
    net = SmallCNN()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    net.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(2, 3, 16, 16),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization nodes
        )
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def small_cnn() -> onnx.ModelProto:
    return export_small_cnn()


def test_torch_exported_cnn_matches_onnxruntime(small_cnn: onnx.ModelProto) -> None:
    """A torch-exported CNN (Conv, BN, ReLU, MaxPool, residual Add, GAP, Flatten, Gemm) matches ORT."""
    op_types = {node.op_type for node in small_cnn.graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Gemm"} <= op_types
    feeds = {"image": rand(2, 3, 16, 16)}
    assert_matches_ort(small_cnn, feeds)


def chain_model() -> onnx.ModelProto:
    """x -> Relu(a) -> Mul(w)(b) -> Exp(c) -> Reshape to an impossible shape (d)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Mul", ["a", "w"], ["b"], name="mul"),
        helper.make_node("Exp", ["b"], ["c"], name="exp"),
        helper.make_node("Reshape", ["c", "bad_shape"], ["d"], name="reshape"),
    ]
    return make_model(nodes, {"x": rand(2, 3)}, ["d"], {"w": rand(3), "bad_shape": i64(7, 7)})


def test_outputs_stop_execution_early() -> None:
    """Requesting an intermediate tensor runs only the nodes up to it: later ones never execute."""
    graph = GraphModule(chain_model())
    seen: list[str] = []

    def record(name: str, value: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return value

    x = torch.from_numpy(rand(2, 3))
    result = graph.run({"x": x}, on_tensor=record, outputs=["b"])
    assert seen == ["x", "a", "b"]
    assert set(result) == {"b"}
    torch.testing.assert_close(result["b"], torch.relu(x) * graph.params["w"])
    with pytest.raises(InvalidGraphError, match="(?i)reshape"):  # the full graph does reach the broken node
        graph.run({"x": x})


def test_outputs_may_name_inputs_and_initializers() -> None:
    """outputs= accepts graph inputs and initializers and then runs no node at all."""
    graph = GraphModule(chain_model())
    x = torch.from_numpy(rand(2, 3))
    result = graph.run({"x": x}, outputs=["x", "w"])
    torch.testing.assert_close(result["x"], x)
    torch.testing.assert_close(result["w"], graph.params["w"])
    with pytest.raises(UsageError):
        graph.run({"x": x}, outputs=["nope"])


def test_feeds_are_checked() -> None:
    """A missing feed is a calibration-data error; a feed for no graph input is a usage error."""
    graph = GraphModule(chain_model())
    with pytest.raises(CalibrationDataError, match="'x'"):
        graph.run({}, outputs=["a"])
    with pytest.raises(UsageError, match="'y'"):
        graph.run({"x": torch.zeros(2, 3), "y": torch.zeros(1)}, outputs=["a"])


def test_params_override_changes_result() -> None:
    """params= replaces an initializer for this run only; the stored params stay untouched."""
    model = make_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"x": rand(4, 3)},
        ["y"],
        {"w": rand(2, 3), "b": rand(2)},
    )
    graph = GraphModule(model)
    x = torch.from_numpy(rand(4, 3))
    zeros = torch.zeros(2, 3)
    y = graph.run({"x": x}, params={"w": zeros})["y"]
    torch.testing.assert_close(y, graph.params["b"].expand(4, 2))
    doubled = graph.run({"x": x}, params={"w": 2 * graph.params["w"]})["y"]
    plain = graph.run({"x": x})["y"]
    torch.testing.assert_close(doubled - graph.params["b"], 2 * (plain - graph.params["b"]))
    with pytest.raises(UsageError):
        graph.run({"x": x}, params={"w": torch.zeros(3, 2)})
    with pytest.raises(UsageError):
        graph.run({"x": x}, params={"unknown": zeros})


def test_on_tensor_result_feeds_consumers() -> None:
    """The hook's return value replaces the tensor for every consumer and in the returned dict."""
    model = make_model(
        [
            helper.make_node("Constant", [], ["one"], name="one", value_float=1.0),
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "one"], ["y"], name="add"),
            helper.make_node("Mul", ["r", "w"], ["z"], name="scale"),
        ],
        {"x": rand(5)},
        ["y", "z"],
        {"w": rand(5)},
    )
    graph = GraphModule(model)
    x = torch.from_numpy(rand(5))
    seen: list[str] = []

    def hook(name: str, value: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return value * 2 if name == "r" else value

    out = graph.run({"x": x}, on_tensor=hook, outputs=["y", "z", "r"])
    r = 2 * torch.relu(x)
    torch.testing.assert_close(out["r"], r)
    torch.testing.assert_close(out["y"], r + 1)
    torch.testing.assert_close(out["z"], r * graph.params["w"])
    assert seen == ["x", "r", "y", "z"]  # initializers and Constant outputs are not hooked


def test_gradient_flows_to_override_param(small_cnn: onnx.ModelProto) -> None:
    """Autograd works through the whole CNN: a param override receives a finite, non-zero gradient."""
    graph = GraphModule(small_cnn)
    conv_weight = next(name for name, p in graph.params.items() if p.dim() == 4)
    weight = graph.params[conv_weight].clone().requires_grad_(True)
    image = torch.from_numpy(rand(2, 3, 16, 16)).requires_grad_(True)
    logits = graph.run({"image": image}, params={conv_weight: weight})["logits"]
    logits.square().sum().backward()
    assert weight.grad is not None and image.grad is not None
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_gradient_matches_torch_reference() -> None:
    """Gradients through Conv/Pad/Resize/pooling/Softmax equal those of the same torch expression."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["c", "pads"], ["p"], name="pad", mode="reflect"),
        helper.make_node("Resize", ["p", "", "scales"], ["u"], name="up", mode="linear"),
        helper.make_node("AveragePool", ["u"], ["a"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("MaxPool", ["a"], ["m"], name="max", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["m"], ["f"], name="flat"),
        helper.make_node("Softmax", ["f"], ["y"], name="softmax"),
    ]
    inits = {"w": rand(2, 3, 3, 3), "pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "scales": f32(1, 1, 2, 2)}
    graph = GraphModule(make_model(nodes, {"x": rand(1, 3, 6, 6)}, ["y"], inits))
    x = torch.from_numpy(rand(1, 3, 6, 6))
    weights = []
    for compute in ("graph", "torch"):
        w = graph.params["w"].clone().requires_grad_(True)
        if compute == "graph":
            y = graph.run({"x": x}, params={"w": w})["y"]
        else:
            t = torch.nn.functional.conv2d(x, w, padding=1)
            t = torch.nn.functional.pad(t, (1, 1, 1, 1), mode="reflect")
            t = torch.nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
            t = torch.nn.functional.max_pool2d(torch.nn.functional.avg_pool2d(t, 2), 2)
            y = torch.softmax(t.flatten(1), dim=1)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        weights.append(w.grad)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


# ---- validation ------------------------------------------------------------------------------


def test_unsupported_ops_are_listed_on_one_line() -> None:
    """All unsupported op types (and custom domains, subgraph ops) are named with their nodes at once."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu_ok"),
        helper.make_node("NonMaxSuppression", ["r", "r"], ["nms"], name="nms_1"),
        helper.make_node("Loop", ["", ""], [], name="loop_0", body=body),
        helper.make_node("FusedConv", ["r"], ["fc"], name="fused", domain="com.microsoft"),
        helper.make_node("NonMaxSuppression", ["r", "r"], ["nms2"], name="nms_2"),
        helper.make_node("Resize", ["r", "", "s"], ["up"], name="cubic_up", mode="cubic"),
    ]
    model = make_model(nodes, {"x": rand(1, 2, 3, 3)}, ["up"], {"s": f32(1, 1, 2, 2)})
    with pytest.raises(UnsupportedModelError) as info:
        GraphModule(model)
    message = str(info.value)
    assert isinstance(info.value, UnsupportedOps)
    assert "\n" not in message
    assert message.startswith("unsupported op types: NonMaxSuppression (nodes 'nms_1', 'nms_2')")
    assert "Loop (node 'loop_0')" in message
    assert "com.microsoft.FusedConv (node 'fused')" in message
    assert "Resize (node 'cubic_up': mode='cubic')" in message
    assert "relu_ok" not in message


def test_consumed_maxpool_indices_are_rejected() -> None:
    """MaxPool's Indices output is not computed, so a graph that uses it is rejected up front."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2, 2]),
        helper.make_node("Cast", ["idx"], ["z"], name="cast", to=TensorProto.FLOAT),
    ]
    with pytest.raises(UnsupportedModelError, match="MaxPool \\(node 'pool': outputs 'idx'\\)"):
        GraphModule(make_model(nodes, {"x": rand(1, 1, 4, 4)}, ["y", "z"]))


def test_old_opset_is_rejected() -> None:
    """Models below opset 11 (attribute-only forms of Pad/Clip/Resize...) are rejected clearly."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": rand(2)}, ["y"], opset=10)
    with pytest.raises(UnsupportedModelError, match="opset 10"):
        GraphModule(model)


def test_cycle_is_a_model_file_error() -> None:
    """A cyclic graph is structurally invalid: ModelFileError naming a node on the cycle."""
    nodes = [
        helper.make_node("Relu", ["x"], ["pre"], name="entry"),
        helper.make_node("Add", ["pre", "c"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Neg", ["b"], ["c"], name="neg"),
    ]
    with pytest.raises(ModelFileError, match="graph has a cycle through node '(add|relu|neg)'"):
        GraphModule(make_model(nodes, {"x": rand(2)}, ["c"]))


def test_undefined_tensor_is_a_model_file_error() -> None:
    """A node reading a tensor that nothing defines is reported as a broken model file."""
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    with pytest.raises(ModelFileError, match="'ghost'"):
        GraphModule(make_model(nodes, {"x": rand(2)}, ["y"]))


def test_nodes_are_sorted_and_producer_indexes_them() -> None:
    """Nodes stored out of order are topologically sorted; producer() indexes the sorted list."""
    nodes = [
        helper.make_node("Neg", ["b"], ["y"], name="last"),
        helper.make_node("Relu", ["x"], ["a"], name="first"),
        helper.make_node("Mul", ["a", "w"], ["b"], name="middle"),
    ]
    model = make_model(nodes, {"x": rand(3)}, ["y"], {"w": rand(3)})
    graph = GraphModule(model)
    assert [n.name for n in graph.nodes] == ["first", "middle", "last"]
    assert graph.input_names == ["x"]
    assert graph.output_names == ["y"]
    assert (graph.producer("a"), graph.producer("b"), graph.producer("y")) == (0, 1, 2)
    assert graph.producer("x") is None and graph.producer("w") is None
    with pytest.raises(KeyError):
        graph.producer("missing")
    x = rand(3)
    y = graph.run({"x": torch.from_numpy(x)})["y"].numpy()
    np.testing.assert_allclose(y, -np.maximum(x, 0) * numpy_helper.to_array(model.graph.initializer[0]))


def test_float64_initializers_and_feeds_become_float32() -> None:
    """Floating initializers and feeds of other precisions are computed in float32."""
    model = make_model(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        {"x": rand(3).astype(np.float64)},
        ["y"],
        {"w": rand(3).astype(np.float64)},
    )
    graph = GraphModule(model)
    assert graph.params["w"].dtype == torch.float32
    y = graph.run({"x": np.ones(3, dtype=np.float64)})["y"]
    assert y.dtype == torch.float32


def test_resumed_run_equals_fresh_runs(small_cnn: onnx.ModelProto) -> None:
    """A paused run resumed tensor by tensor (as the layer loop does, weights of not-yet-run nodes
    changing in between) gives exactly what a fresh run with the same weights gives."""
    gm = GraphModule(small_cnn)
    feeds = {"image": rand(2, 3, 16, 16)}
    wanted = [n.input[0] for n in gm.nodes if n.op_type in ("Conv", "Gemm")] + gm.output_names
    frontier = gm.start(feeds)
    params: dict[str, torch.Tensor] = {}
    for name in wanted:
        got = gm.resume(frontier, [name], params=params)[name]
        torch.testing.assert_close(got, gm.run(feeds, params=params, outputs=[name])[name], rtol=0, atol=0)
        for node in gm.nodes[frontier.next :]:  # perturb weights only the rest of the run reads
            for w in node.input[1:2]:
                if w in gm.params:
                    params[w] = gm.params[w] * 1.01
