"""Bounded, deterministic fuzzing of everything that parses untrusted text or bytes.

`load_model` on mutated bytes of a valid model (truncations, byte flips, splices) and on
structurally mutated protos (dims, data types, names, opsets), and the spec parsers
`Preprocess.parse` and `Trigger.parse` on arbitrary text: each call either succeeds or raises a
`QcbError` subclass -- never another exception, never a hang (every example is timed).

Hypothesis runs derandomized (same examples on every run, no example database) with a fixed
number of examples, so CI is deterministic and the whole module takes a few seconds.
"""

from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx.data import Preprocess
from qcb_onnx.errors import QcbError
from qcb_onnx.evaluate.triggers import Trigger
from qcb_onnx.load import load_model

FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_CALL_SECONDS = 5.0


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
        ],
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
            helper.make_tensor("b", TensorProto.FLOAT, [4], rng.normal(size=4).tolist()),
            numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "fc"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MODEL = _model()
VALID = MODEL.SerializeToString()
WORKDIR = Path(tempfile.mkdtemp(prefix="qcb-fuzz-"))


def _outcome(fn, *args) -> object:
    """Call fn; return its result or the QcbError; let anything else fail the test; time it."""
    start = time.perf_counter()
    try:
        result = fn(*args)
    except QcbError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        result = exc
    assert time.perf_counter() - start < PER_CALL_SECONDS, f"{fn.__name__} took too long on {args!r:.200}"
    return result


def test_valid_model_is_accepted():
    """The seed of the mutations is itself valid (else the fuzzing would prove little)."""
    assert isinstance(_outcome(load_model, MODEL), onnx.ModelProto)


# --------------------------------------------------------------------------------------------------
# load_model on bytes


@st.composite
def mutated_bytes(draw) -> bytes:
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "mixed"]))
    if kind in ("flip", "mixed"):
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    if kind in ("splice", "mixed"):
        i = draw(st.integers(0, len(data)))
        j = draw(st.integers(i, min(len(data), i + 32)))
        data[i:j] = draw(st.binary(max_size=32))
    if kind in ("truncate", "mixed"):
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return bytes(data)


@FUZZ
@given(mutated_bytes())
def test_load_model_on_mutated_bytes(data):
    """Truncated, bit-flipped or spliced model files: loaded (if still valid) or one QcbError."""
    path = WORKDIR / "mutated.onnx"
    path.write_bytes(data)
    _outcome(load_model, path)


@FUZZ
@given(st.binary(max_size=512))
def test_load_model_on_random_bytes(data):
    """Arbitrary bytes as a model file: a QcbError (an empty protobuf parses, and is refused too)."""
    path = WORKDIR / "random.onnx"
    path.write_bytes(data)
    assert isinstance(_outcome(load_model, path), QcbError)


# --------------------------------------------------------------------------------------------------
# load_model on structurally mutated protos

NAMES = st.sampled_from(["x", "w", "b", "fc", "c", "r", "g", "f", "y", "", "ghost", "r\n", "w/../.."])
DIMS = st.lists(
    st.one_of(st.integers(-2, 12), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1])),
    max_size=6,
)


@st.composite
def mutated_model(draw) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(MODEL)
    graph = model.graph
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["dims", "dtype", "raw", "input", "output", "opset", "dup", "drop", "ext"]))
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        if what == "dims":
            del tensor.dims[:]
            tensor.dims.extend(draw(DIMS))
        elif what == "dtype":
            tensor.data_type = draw(st.integers(0, 30))
        elif what == "raw":
            tensor.raw_data = draw(st.binary(max_size=200))
        elif what == "input" and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(NAMES)
        elif what == "output" and node.output:
            node.output[0] = draw(NAMES)
        elif what == "opset":
            model.opset_import[0].version = draw(st.integers(-1, 40))
        elif what == "dup":
            graph.initializer.add().CopyFrom(tensor)
        elif what == "drop" and len(graph.node) > 1:
            del graph.node[draw(st.integers(0, len(graph.node) - 1))]
        elif what == "ext":
            tensor.data_location = TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key = draw(st.sampled_from(["location", "offset", "length", "junk"]))
            entry.value = draw(st.sampled_from(["../../etc/passwd", "/etc/passwd", "w.bin", "-4", "x", "", "1e9"]))
    return model


@FUZZ
@given(mutated_model())
def test_load_model_on_mutated_protos(model):
    """Nonsense dims (negative, huge), unknown data types, wrong data lengths, renamed or dropped
    nodes, duplicated initializers, bogus external data, any opset: a model or a QcbError."""
    path = WORKDIR / "proto" / "model.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(model.SerializeToString())
    _outcome(load_model, path)
    _outcome(load_model, model)


# --------------------------------------------------------------------------------------------------
# Spec parsers


def _files() -> dict[str, str]:
    folder = WORKDIR / "trigger-files"
    folder.mkdir(exist_ok=True)
    np.save(folder / "ok.npy", np.ones((3, 4, 4), np.float32))
    np.save(folder / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "evil.pkl").write_bytes(pickle.dumps({"payload": 1}))
    (folder / "text.npy").write_text("not numpy")
    return {name: str(folder / name) for name in ("ok.npy", "obj.npy", "evil.pkl", "text.npy")}


FILES = _files()
NUMBER_TEXT = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1/0", "0/0", "1e999", "1_0", "", " ", "0x10", "½", "٣"]),
)


def _spec(kind: str, keys: list[str]) -> st.SearchStrategy[str]:
    value = st.one_of(NUMBER_TEXT, st.text(max_size=12), st.sampled_from(list(FILES.values())))
    item = st.tuples(st.sampled_from(keys), st.sampled_from(["=", "", "==", ":"]), value).map("".join)
    return st.lists(item, max_size=6).map(lambda items: kind + ",".join(items))


PREPROCESS_TEXT = st.one_of(
    st.text(max_size=80),
    _spec("", ["size", "scale", "mean", "std", "layout", "channels", "SIZE", " mean", "bogus", ""]),
    st.lists(st.sampled_from(["3x3", "0x4", "4x", "x", "-1x2", "NHWC", "nchw", "1/2/3", "0.5/0"]), max_size=4).map(
        lambda v: ",".join(f"{k}={x}" for k, x in zip(["size", "layout", "mean", "std"], v, strict=False))
    ),
)
TRIGGER_TEXT = st.one_of(
    st.text(max_size=80),
    _spec("patch:", ["size", "value", "pos", "alpha", ""]),
    _spec("blend:", ["file", "alpha", "size"]),
    _spec("mask:", ["pattern", "mask", "file"]),
    _spec("", ["patch", "blend:file", "mask:"]),
)


@FUZZ
@given(PREPROCESS_TEXT)
def test_preprocess_parse(text):
    """`Preprocess.parse` on arbitrary and near-valid text: a Preprocess that round-trips, or a QcbError."""
    result = _outcome(Preprocess.parse, text)
    if isinstance(result, Preprocess):
        assert Preprocess.parse(result.to_metadata()) == result


@FUZZ
@given(TRIGGER_TEXT)
def test_trigger_parse(text):
    """`Trigger.parse` on arbitrary text, including paths to pickles and object arrays (never
    unpickled): a Trigger or a QcbError."""
    _outcome(Trigger.parse, text)


@pytest.mark.parametrize("name", ["obj.npy", "evil.pkl"])
def test_trigger_never_unpickles(name):
    """A trigger file that needs pickle is refused (np.load with allow_pickle=False)."""
    key = "file" if name == "evil.pkl" else "file"
    assert isinstance(_outcome(Trigger.parse, f"blend:{key}={FILES[name]},alpha=0.1"), QcbError)
