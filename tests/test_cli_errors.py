"""Bad input ends in one line on stderr, a non-zero exit code and no output file, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcb_onnx.cli import main
from qcb_onnx.errors import (
    CalibrationDataError,
    ModelFileError,
    OutputExistsError,
    UnsupportedModelError,
    UsageError,
)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A 1x8x8 -> 10 Conv+Gemm model, enough for the CLI to get past loading."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], rng.normal(size=36).astype(np.float32))
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [10, 4], rng.normal(size=40).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("m") / "small.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    return path


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if not line.startswith(("WARNING", "  "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_not_an_onnx_file(capsys, tmp_path, calib):
    """A text file given as model: ModelFileError naming the file, nothing written."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a protobuf")
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, "convert", bad, "--calib", calib, "--out", out, "--quiet")
    _assert_one_line_error(code, err, ModelFileError.exit_code, str(bad))
    assert not out.exists()


def test_missing_model(capsys, tmp_path, calib):
    """A model path that does not exist."""
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, "convert", tmp_path / "nope.onnx", "--calib", calib, "--out", out, "--quiet")
    _assert_one_line_error(code, err, ModelFileError.exit_code, "nope.onnx")
    assert not out.exists()


def test_unsupported_op(capsys, tmp_path, calib):
    """An op outside the supported set is named with its node in one line, exit code 2."""
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("NonZero", ["c"], ["nz"], name="mystery_node"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, [4, "K"])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], [0.1] * 18)],
    )
    path = tmp_path / "nz.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, "convert", path, "--calib", calib, "--out", out, "--quiet")
    _assert_one_line_error(code, err, UnsupportedModelError.exit_code, "NonZero", "mystery_node")
    assert not out.exists()


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((4, 1, 9, 9), np.float32), "shape"),
        (np.zeros((4, 1, 8, 8), np.int32), "int32"),
        (np.full((4, 1, 8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((0, 1, 8, 8), np.float32), "empty"),
    ],
    ids=["shape", "dtype", "nan", "empty"],
)
def test_bad_calibration(capsys, tmp_path, small_model, array, fragment):
    """Calibration data that does not fit the model is refused before any work, naming the problem."""
    path = tmp_path / "calib.npy"
    np.save(path, array)
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, "convert", small_model, "--calib", path, "--out", out, "--quiet")
    _assert_one_line_error(code, err, CalibrationDataError.exit_code)
    assert fragment.lower() in err.lower()
    assert not out.exists()


def test_missing_calibration_file(capsys, tmp_path, small_model):
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, "convert", small_model, "--calib", tmp_path / "none.npy", "--out", out, "--quiet")
    _assert_one_line_error(code, err, CalibrationDataError.exit_code, "none.npy")
    assert not out.exists()


@pytest.mark.parametrize(
    "option,value",
    [("--act-headroom", v) for v in ("0.5", "nan", "inf")] + [("--error-budget", v) for v in ("-0.1", "nan", "inf")],
)
def test_bad_number_options(capsys, tmp_path, small_model, calib, option, value):
    """A headroom that would shrink ranges or make no grid, a negative or non-finite error budget: a
    usage error naming the option, before any work and with no output."""
    out = tmp_path / "out.onnx"
    code, err = _run(capsys, "convert", small_model, "--calib", calib, "--out", out, "--quiet", option, value)
    _assert_one_line_error(code, err, UsageError.exit_code, option, value)
    assert not out.exists()


def test_existing_output_needs_force(capsys, tmp_path, small_model, calib):
    """An existing output is never overwritten without --force, and is with it."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    code, err = _run(capsys, "convert", small_model, "--calib", calib, "--out", out, "--quiet", "--iters", "20")
    _assert_one_line_error(code, err, OutputExistsError.exit_code, str(out))
    assert out.read_bytes() == b"keep me"
    code, err = _run(
        capsys, "convert", small_model, "--calib", calib, "--out", out, "--quiet", "--iters", "20", "--force"
    )
    assert code == 0, err
    onnx.checker.check_model(onnx.load(out))
    assert not list(tmp_path.glob(".out.onnx.*"))  # no temporary file left behind


def test_subprocess_exit_code_and_stderr(tmp_path, calib):
    """Through `python -m qcb_onnx`, as users run it: non-zero exit, one stderr line, no traceback."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcb_onnx",
            "convert",
            str(bad),
            "--calib",
            str(calib),
            "--out",
            str(tmp_path / "o.onnx"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == ModelFileError.exit_code
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "o.onnx").exists()
