"""Hostile and broken model files: each is refused by `load_model` with a one-line error naming the
problem and its own exit code, quickly and without reading anything outside the model's folder.

Exit codes (see qcb_onnx/errors.py and SECURITY.md): 2 unsupported, 3 not a (valid) ONNX file,
7 unsafe external data, 8 broken graph, 9 bad weights.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx.cli import main
from qcb_onnx.errors import (
    CalibrationDataError,
    ExternalDataError,
    InvalidGraphError,
    InvalidWeightsError,
    ModelFileError,
    OutputExistsError,
    QcbError,
    UnsupportedModelError,
    UsageError,
    VerificationError,
)
from qcb_onnx.load import load_model

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"


# --------------------------------------------------------------------------------------------------
# Model builders


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "fc": rng.normal(size=(10, 4)).astype(np.float32),
    }


def _nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]


def small_model(
    weights: dict[str, np.ndarray] | None = None,
    nodes: list[onnx.NodeProto] | None = None,
    initializers: list[onnx.TensorProto] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """A 1x8x8 -> 10 Conv+Relu+GAP+Gemm model, valid unless the arguments break it."""
    weights = _weights() if weights is None else weights
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()] if initializers is None else initializers
    graph = helper.make_graph(
        _nodes() if nodes is None else nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _refused(source, error: type[QcbError], *fragments: str) -> str:
    """load_model raises exactly `error` (not a subclass), with a one-line message holding `fragments`."""
    start = time.perf_counter()
    with pytest.raises(QcbError) as info:
        load_model(source)
    assert time.perf_counter() - start < 5, "refusal must be fast"
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_exit_codes_are_distinct_per_failure_class():
    """The documented exit codes: one per failure class (UsageError shares 2 with unsupported
    models, as it always did), new classes still caught by `except ModelFileError`."""
    codes = {
        UnsupportedModelError: 2,
        UsageError: 2,
        ModelFileError: 3,
        CalibrationDataError: 4,
        OutputExistsError: 5,
        VerificationError: 6,
        ExternalDataError: 7,
        InvalidGraphError: 8,
        InvalidWeightsError: 9,
    }
    for cls, code in codes.items():
        assert cls.exit_code == code, cls
    model_codes = [ModelFileError, ExternalDataError, InvalidGraphError, InvalidWeightsError]
    assert len({c.exit_code for c in model_codes}) == len(model_codes)
    assert all(issubclass(c, ModelFileError) for c in model_codes)


def test_valid_model_loads(tmp_path):
    """The baseline: the builder's model passes every check, from a path and in memory."""
    path = _save(small_model(), tmp_path / "ok.onnx")
    assert len(load_model(path).graph.node) == 5
    assert len(load_model(small_model()).graph.node) == 5


# --------------------------------------------------------------------------------------------------
# Not an ONNX file


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"not a model")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "empty"),
        (PNG_HEADER + b"\x00" * 64, "PNG"),
        (_zip_bytes(), "zip"),
        (pickle.dumps({"state_dict": [1.0, 2.0]}, protocol=4), "pickle"),
        (b"\x93NUMPY\x01\x00" + b" " * 40, "NumPy"),
        (b"this is not a protobuf at all", "not a valid ONNX model"),
        (small_model().SerializeToString()[:-37], "not a valid ONNX model"),
        (small_model().SerializeToString()[:150], "not a valid ONNX model"),
    ],
    ids=["empty", "png", "zip", "pickle", "npy", "text", "truncated-end", "truncated-head"],
)
def test_not_onnx(tmp_path, payload, fragment):
    """Empty files, images, archives, pickles and truncated protobufs: ModelFileError (3), saying
    what the file looks like when we can tell, and never unpickling anything."""
    path = tmp_path / "model.onnx"
    path.write_bytes(payload)
    _refused(path, ModelFileError, str(path), fragment)


def test_not_a_regular_file(tmp_path):
    """A directory or a FIFO given as the model: refused from stat, without blocking on the FIFO."""
    _refused(tmp_path, ModelFileError, "not a file")
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    _refused(fifo, ModelFileError, "not a file")


@pytest.mark.parametrize("opset", [7, 10, 30])
def test_opset_out_of_range(tmp_path, opset):
    """Opsets outside 11..23: UnsupportedModelError (2) naming the opset."""
    model = small_model(opset=opset)
    _refused(_save(model, tmp_path / "m.onnx"), UnsupportedModelError, f"opset {opset}")


# --------------------------------------------------------------------------------------------------
# Broken graphs


def test_cycle():
    """Two nodes feeding each other: InvalidGraphError (8) naming a node on the cycle; bounded work."""
    nodes = _nodes()
    nodes[1] = helper.make_node("Add", ["c", "loop"], ["r"], name="add")
    nodes.insert(2, helper.make_node("Relu", ["r"], ["loop"], name="back"))
    _refused(small_model(nodes=nodes), InvalidGraphError, "cycle", "'add'")


def test_self_loop():
    """A node reading its own output is a cycle too."""
    nodes = _nodes()
    nodes[1] = helper.make_node("Max", ["c", "r"], ["r"], name="selfish")
    _refused(small_model(nodes=nodes), InvalidGraphError, "cycle", "'selfish'")


def test_two_nodes_produce_one_name():
    """SSA violated: InvalidGraphError naming the tensor and both nodes."""
    nodes = _nodes()
    nodes.insert(2, helper.make_node("Sigmoid", ["c"], ["r"], name="second"))
    _refused(small_model(nodes=nodes), InvalidGraphError, "'r'", "'relu'", "'second'", "twice")


def test_duplicate_initializer():
    """The same initializer name twice (which copy would be quantized?): InvalidGraphError."""
    w = _weights()
    inits = [numpy_helper.from_array(w["w"], "w"), numpy_helper.from_array(w["fc"], "fc")]
    inits.append(numpy_helper.from_array(-w["w"], "w"))
    _refused(small_model(initializers=inits), InvalidGraphError, "initializer 'w'", "twice")


def test_node_output_shadows_initializer():
    """A node writing to an initializer's name would silently replace a weight: refused."""
    nodes = _nodes()
    nodes.insert(0, helper.make_node("Neg", ["x"], ["w"], name="shadow"))
    _refused(small_model(nodes=nodes), InvalidGraphError, "'shadow'", "'w'", "initializer")


def test_dangling_input():
    """A node reading a tensor nothing defines: InvalidGraphError naming node and tensor."""
    nodes = _nodes()
    nodes[1] = helper.make_node("Add", ["c", "ghost"], ["r"], name="haunted")
    _refused(small_model(nodes=nodes), InvalidGraphError, "'ghost'", "'haunted'")


def test_hostile_names_stay_on_one_line():
    """Names are attacker-controlled: newlines in them are escaped, long ones shortened."""
    nodes = _nodes()
    nodes[1] = helper.make_node("Add", ["c", "evil\nerror: fake second line" + "x" * 5000], ["r"], name="n\r\n")
    message = _refused(small_model(nodes=nodes), InvalidGraphError, "nothing defines")
    assert len(message) < 500


def test_unsorted_dag_is_sorted_without_touching_the_argument():
    """Nodes out of topological order (but acyclic) are sorted; the caller's proto is unchanged."""
    model = small_model(nodes=list(reversed(_nodes())))
    before = model.SerializeToString()
    loaded = load_model(model)
    assert [n.name for n in loaded.graph.node] == ["conv", "relu", "gap", "flat", "fc"]
    assert model.SerializeToString() == before


@pytest.mark.parametrize("storage", ["raw", "float_data"])
def test_initializer_dims_do_not_match_data(storage):
    """Declared dims that do not match the data length: InvalidGraphError naming the initializer."""
    w = _weights()
    if storage == "raw":
        bad = numpy_helper.from_array(w["w"], "w")
    else:
        bad = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], w["w"].ravel().tolist())
    bad.dims[0] = 5
    inits = [bad, numpy_helper.from_array(w["fc"], "fc")]
    _refused(small_model(initializers=inits), InvalidGraphError, "initializer 'w'", "[5, 1, 3, 3]")


# --------------------------------------------------------------------------------------------------
# Bad weights


def test_zero_sized_weight():
    """A Conv weight with no elements: InvalidWeightsError (9) naming it and its node."""
    w = _weights()
    w["w"] = np.zeros((0, 1, 3, 3), np.float32)
    _refused(small_model(weights=w), InvalidWeightsError, "initializer 'w'", "'conv'", "no elements")


def test_zero_sized_non_weight_is_fine():
    """Empty constants are legitimate elsewhere (Resize's roi in exported models): accepted."""
    nodes = _nodes()
    nodes.insert(0, helper.make_node("Resize", ["x", "roi", "scales"], ["x2"], name="resize", mode="nearest"))
    nodes[1] = helper.make_node("Conv", ["x2", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    w = _weights()
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.zeros((0,), np.float32), "roi"),
        numpy_helper.from_array(np.ones(4, np.float32), "scales"),
    ]
    assert len(load_model(small_model(nodes=nodes, initializers=inits)).graph.node) == 6


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weight(value):
    """NaN/Inf in a weight: InvalidWeightsError naming the initializer and the first bad index."""
    w = _weights()
    w["fc"][3, 2] = value
    kind = "NaN" if np.isnan(value) else "infinite"
    _refused(small_model(weights=w), InvalidWeightsError, "initializer 'fc'", kind, "(3, 2)")


def test_nan_in_constant_node():
    """NaN hidden in a Constant node's value (lifted to an initializer later) is found too."""
    nodes = _nodes()
    nodes[1] = helper.make_node("Add", ["c", "k"], ["r"], name="add")
    value = numpy_helper.from_array(np.array([0.0, np.nan, 0.0, 0.0], np.float32).reshape(1, 4, 1, 1), "kv")
    nodes.insert(0, helper.make_node("Constant", [], ["k"], name="const", value=value))
    _refused(small_model(nodes=nodes), InvalidWeightsError, "Constant node 'const'", "NaN")


def test_nan_in_float16_weight():
    """Half-precision weights are checked as well."""
    w = _weights()
    w["w"] = w["w"].astype(np.float16)
    w["w"][1, 0, 0, 0] = np.nan
    _refused(small_model(weights=w), InvalidWeightsError, "initializer 'w'", "NaN")


def test_inf_clip_bound_is_fine():
    """+Inf as a Clip bound is legitimate (ReLU-like clamps): accepted."""
    nodes = _nodes()
    nodes[1] = helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip")
    inits = [numpy_helper.from_array(v, k) for k, v in _weights().items()]
    inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(np.inf), "hi")]
    load_model(small_model(nodes=nodes, initializers=inits))


@pytest.mark.parametrize(
    "dims",
    [[2**20, 2**20, 4], [2**31 + 1], [2**62, 2**62], [-1, 4], [1] * 65],
    ids=["2^42", "2^31+1", "overflow", "negative", "rank65"],
)
def test_huge_or_negative_dims(tmp_path, dims):
    """Dims declaring > 2**31 elements (or negative, or rank > 64) are refused from the dims alone,
    before any allocation: the file is tiny, the check is instant, memory stays flat."""
    bad = onnx.TensorProto()
    bad.name, bad.data_type = "w", TensorProto.FLOAT
    bad.dims.extend(dims)
    bad.raw_data = b"\x00" * 16
    inits = [bad, numpy_helper.from_array(_weights()["fc"], "fc")]
    path = _save(small_model(initializers=inits), tmp_path / "huge.onnx")
    assert path.stat().st_size < 2000
    _refused(path, InvalidWeightsError, "initializer 'w'")


def test_all_zero_conv_channel_converts(tmp_path):
    """An all-zero output channel (range 0) is legitimate: scale 1.0 like ORT, integers all 0,
    and the conversion succeeds (3 calibration samples, nearest rounding)."""
    from qcb_onnx.emit import read_weight_ints
    from qcb_onnx.pipeline import convert

    w = _weights()
    w["w"][2] = 0.0
    path = _save(small_model(weights=w), tmp_path / "zero.onnx")
    calib = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    q = convert(path, calib, method="nearest", iters=50, device="cpu", providers="cpu", calib_size=3)
    ints = read_weight_ints(q, "w")
    assert ints.shape == (4, 1, 3, 3)
    assert not ints[2].any()
    assert ints[[0, 1, 3]].any()
    scale = next(numpy_helper.to_array(t) for t in q.graph.initializer if t.name == "w_scale")
    assert scale[2] == np.float32(1.0)


# --------------------------------------------------------------------------------------------------
# External data


def _external(tmp_path: Path, name: str = "ext") -> Path:
    """The small model saved with every initializer in one external file next to it."""
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(
        small_model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return path


def _set_location(path: Path, location: str, initializer: str = "w") -> None:
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        if t.name == initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def watched_reads(monkeypatch):
    """Every path opened through open()/os.open() while loading, and onnx's own external-data
    loader made to fail: proof of what was (not) read."""
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(os.path.realpath(os.fsdecode(file)))
        return real_os_open(file, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("onnx must not load external data on its own")

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", forbidden)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", forbidden)
    monkeypatch.setattr(onnx, "load_external_data_for_model", forbidden)
    return opened


def test_external_data_loads(tmp_path, watched_reads):
    """Legitimate external data (how models over 2 GB are stored) loads with the right values,
    read by us from inside the folder only, and the result is self-contained."""
    path = _external(tmp_path)
    assert (path.parent / "weights.bin").stat().st_size > 0
    watched_reads.clear()
    model = load_model(path)
    got = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, value in _weights().items():
        np.testing.assert_array_equal(got[name], value)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    folder = str(path.parent.resolve())
    ours = [p for p in watched_reads if p.startswith(str(tmp_path.resolve()))]  # not library imports
    assert ours and all(p.startswith(folder) for p in ours)


def test_checker_never_sees_external_bytes(tmp_path, monkeypatch):
    """The ONNX checker runs on a copy whose external tensors are empty placeholders, so a model
    whose weights total more than 2 GB is checked without serializing them (protobuf's limit)."""
    seen = []
    real = onnx.checker.check_model

    def spy(model, *args, **kwargs):
        seen.append(model.ByteSize())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    path = _external(tmp_path)
    load_model(path)
    weights_bytes = sum(v.nbytes for v in _weights().values())
    assert seen and max(seen) < weights_bytes


def test_external_data_via_cli_converts(tmp_path, capsys):
    """An external-data model converts end to end through the CLI."""
    path = _external(tmp_path)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "q.onnx"
    code = main(["convert", str(path), "--calib", str(calib), "--out", str(out), "--method", "nearest", "--quiet"])
    assert code == 0, capsys.readouterr().err
    onnx.checker.check_model(onnx.load(out))


def _secret(tmp_path: Path) -> Path:
    """A file outside the model folder, the size of the real weights (so only the location is wrong)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 4096)
    return secret


@pytest.mark.parametrize(
    "location",
    ["../secret.bin", "sub/../../secret.bin", "..\\secret.bin", "ABSOLUTE", "symlink.bin", "linkdir/secret.bin"],
)
def test_external_data_path_traversal(tmp_path, watched_reads, location):
    """A crafted location escaping the folder (``..``, absolute path, symlinked file or folder):
    ExternalDataError (7) naming the initializer; the outside file is never opened, by us or onnx."""
    path = _external(tmp_path)
    secret = _secret(tmp_path)
    if location == "ABSOLUTE":
        location = str(secret)
    elif location == "symlink.bin":
        os.symlink(secret, path.parent / "symlink.bin")
    elif location == "linkdir/secret.bin":
        os.symlink(tmp_path, path.parent / "linkdir")
    _set_location(path, location)
    watched_reads.clear()
    _refused(path, ExternalDataError, "initializer 'w'", "outside the model folder")
    assert str(secret.resolve()) not in watched_reads


def test_external_data_missing_short_or_fifo(tmp_path, watched_reads):
    """Missing file, data past the end of the file, a FIFO as data file (would block a reader):
    ExternalDataError, decided from stat alone, never hanging."""
    path = _external(tmp_path)
    _set_location(path, "nope.bin")
    _refused(path, ExternalDataError, "not found")
    _set_location(path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(b"\x00" * 10)
    _refused(path, ExternalDataError, "past the end")
    os.mkfifo(path.parent / "pipe.bin")
    _set_location(path, "pipe.bin")
    _refused(path, ExternalDataError, "not a regular file")


def test_external_data_length_mismatch(tmp_path):
    """External data whose length does not match the declared dims: InvalidGraphError (8)."""
    path = _external(tmp_path)
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].dims[0] = 2
    path.write_bytes(model.SerializeToString())
    _refused(path, InvalidGraphError, "initializer 'w'", "external data holds")


def test_external_data_in_memory_is_refused(tmp_path):
    """A ModelProto with unresolved external references has no folder to check against: refused."""
    model = onnx.load(_external(tmp_path), load_external_data=False)
    _refused(model, ExternalDataError, "external file")


def test_cli_path_traversal_exit_code(tmp_path, capsys):
    """Through the CLI: exit code 7, one stderr line, no output file."""
    path = _external(tmp_path)
    _secret(tmp_path)
    _set_location(path, "../secret.bin")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    code = main(["convert", str(path), "--calib", str(calib), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == ExternalDataError.exit_code, err
    assert err.startswith("error: ") and "\n" not in err and "secret.bin" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("png", ModelFileError),
        ("cycle", InvalidGraphError),
        ("nan", InvalidWeightsError),
        ("opset", UnsupportedModelError),
    ],
)
def test_cli_exit_codes(tmp_path, capsys, kind, error):
    """Each class of bad model through `main`: its own exit code, one line, no output file."""
    path = tmp_path / "m.onnx"
    if kind == "png":
        path.write_bytes(PNG_HEADER)
    elif kind == "cycle":
        nodes = _nodes()
        nodes[1] = helper.make_node("Max", ["c", "r"], ["r"], name="selfish")
        _save(small_model(nodes=nodes), path)
    elif kind == "nan":
        w = _weights()
        w["w"][0, 0, 0, 0] = np.nan
        _save(small_model(weights=w), path)
    else:
        _save(small_model(opset=9), path)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out.onnx"
    code = main(["convert", str(path), "--calib", str(calib), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == error.exit_code, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
