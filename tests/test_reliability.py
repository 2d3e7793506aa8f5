"""The promise of `convert` under attack (issue 25's mutation campaign): a user mistake or a hostile
file ends in one line on stderr with its documented exit code, no traceback, and nothing left in the
output folder; a valid model is never rejected.  Every case runs the CLI on the shipped digits
sample (or a mutation of it) at `--w-bits 4 --calib-size 64`, as the campaign did."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx import output, pipeline
from qcb_onnx.cli import main
from qcb_onnx.errors import (
    CalibrationDataError,
    InvalidGraphError,
    InvalidWeightsError,
    ModelFileError,
    OutputError,
    UsageError,
    VerificationError,
)
from qcb_onnx.rounding.efrap import prepare
from qcb_onnx.rounding.problem import LayerProblem
from qcb_onnx.scheme import weight_grid

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "qcb_digits.onnx"
CALIB = ROOT / "samples" / "calib.npy"
FAST = ("--w-bits", "4", "--calib-size", "64", "--quiet", "--providers", "cpu")


def _convert(capsys, model, out, *extra, calib=CALIB) -> tuple[int, str]:
    code = main(["convert", str(model), "--calib", str(calib), "--out", str(out), *FAST, *map(str, extra)])
    return code, capsys.readouterr().err.strip()


def _one_line_error(code: int, err: str, expected: int, *fragments: str) -> None:
    assert code == expected, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def _only(folder: Path, *names: str) -> None:
    """Nothing but `names` in `folder`: no output, no temporary file, no checkpoint."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def _sample(tmp_path: Path, edit=None, name: str = "model.onnx") -> Path:
    """The digits sample, optionally edited with the onnx API, saved into tmp_path."""
    model = onnx.load(SAMPLE)
    if edit is not None:
        edit(model)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _runs_in_ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _first_conv_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return _init(model, conv.input[1])


# --------------------------------------------------------------------------------------------------
# 1. the output location, checked before any work


def _no_conversion(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the conversion ran although the output location is unusable")

    monkeypatch.setattr(pipeline, "quantize", fail)


def test_output_in_missing_folder(capsys, tmp_path, monkeypatch):
    """--out in a folder that does not exist: exit 11 before any work, nothing created."""
    _no_conversion(monkeypatch)
    code, err = _convert(capsys, SAMPLE, tmp_path / "missing" / "out.onnx")
    _one_line_error(code, err, OutputError.exit_code, "missing")
    _only(tmp_path)


def test_output_folder_not_writable(capsys, tmp_path, monkeypatch):
    """A read-only folder or file system (the probe file cannot be created): exit 11 before any work.
    Simulated, because root writes into chmod-555 folders and CI cannot mount a read-only one."""
    _no_conversion(monkeypatch)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output.tempfile, "mkstemp", read_only)
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx")
    _one_line_error(code, err, OutputError.exit_code, "Read-only file system", str(tmp_path))
    _only(tmp_path)


def test_write_failure_after_conversion(capsys, tmp_path, monkeypatch):
    """A disk that fails while the model is written: exit 11, no temporary file, no checkpoint."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.large, "save", full)
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx")
    _one_line_error(code, err, OutputError.exit_code, "No space left on device")
    _only(tmp_path)


def test_output_is_a_directory(capsys, tmp_path):
    """--out naming an existing directory, even with --force: exit 11, the directory untouched."""
    (tmp_path / "out.onnx").mkdir()
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx", "--force")
    _one_line_error(code, err, OutputError.exit_code, "directory")
    _only(tmp_path, "out.onnx")
    assert not any((tmp_path / "out.onnx").iterdir())


def test_output_is_the_input_model(capsys, tmp_path):
    """--out equal to the model (here through a different spelling), with --force: refused, model intact."""
    model = _sample(tmp_path)
    before = model.read_bytes()
    code, err = _convert(capsys, model, tmp_path / "." / "model.onnx", "--force")
    _one_line_error(code, err, UsageError.exit_code, "input model")
    assert model.read_bytes() == before
    _only(tmp_path, "model.onnx")


# --------------------------------------------------------------------------------------------------
# 2./3. magnitudes that overflow float32 arithmetic


def test_huge_finite_weight_is_refused(capsys, tmp_path):
    """A bit flip giving 3e36 in one Conv weight: exit 9 naming the tensor, before any work."""

    def flip(model):
        w = _first_conv_weight(model)
        values = numpy_helper.to_array(w).copy()
        values.flat[5] = 3e36
        w.CopyFrom(numpy_helper.from_array(values, w.name))

    code, err = _convert(capsys, _sample(tmp_path, flip), tmp_path / "out.onnx")
    _one_line_error(code, err, InvalidWeightsError.exit_code, "features.0.weight", "3e+36")
    _only(tmp_path, "model.onnx")


def test_calibration_that_overflows_activations(capsys, tmp_path):
    """Finite calibration values x 1e38: exit 4 naming the first tensor they overflow, nothing left."""
    calib = tmp_path / "huge.npy"
    np.save(calib, (np.load(CALIB) * np.float32(1e38)).astype(np.float32))
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx", calib=calib)
    _one_line_error(code, err, CalibrationDataError.exit_code, "tensor", "overflow")
    _only(tmp_path, "huge.npy")


def test_solver_survives_an_indefinite_moment_matrix():
    """Rounding error in a second-moment matrix can leave it indefinite; the EFRAP solver then damps
    harder instead of failing the Cholesky factorisation."""
    grid = weight_grid(4)
    w = torch_tensor([[0.3, -0.2], [0.1, 0.4]])
    problem = LayerProblem(w, torch_tensor([[0.1], [0.1]]), w.floor(), w.floor() * 0, grid, 1, None)
    problem.moments = type("M", (), {})()
    problem.moments.A = torch_tensor([[[1.0, 2.0], [2.0, 1.0]]])  # eigenvalues 3 and -1
    problem.moments.Q = torch_tensor([[[0.0, 0.0], [0.0, 0.0]]])
    target, U, _ = prepare(problem)
    assert bool(target.isfinite().all()) and bool(U.isfinite().all())


def torch_tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# 4./5. broken structure


def test_pass_failure_is_one_line(capsys, tmp_path, monkeypatch):
    """Whatever a normalize pass raises on a hostile graph (onnx_ir's SerdeError among them) ends as a
    one-line model-file error, not a traceback."""
    import onnx_ir

    import qcb_onnx.passes

    def broken_pass():
        def run(model):
            raise onnx_ir.serde.SerdeError("Error calling deserialize_node with: name: 'x'")

        return run

    monkeypatch.setattr(qcb_onnx.passes, "normalize_pass", broken_pass)
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx")
    _one_line_error(code, err, ModelFileError.exit_code, "deserialize_node")
    _only(tmp_path)


@pytest.mark.parametrize("rank", [2, 5])
def test_conv_weight_of_wrong_rank(capsys, tmp_path, rank):
    """A Conv weight of rank 2 or 5 on a rank-4 input: exit 8 naming the node, before any work."""

    def reshape(model):
        w = _first_conv_weight(model)
        values = numpy_helper.to_array(w)
        shape = (values.shape[0], -1) if rank == 2 else (*values.shape, 1)
        w.CopyFrom(numpy_helper.from_array(values.reshape(shape), w.name))

    code, err = _convert(capsys, _sample(tmp_path, reshape), tmp_path / "out.onnx")
    _one_line_error(code, err, InvalidGraphError.exit_code, "Conv", "rank")
    _only(tmp_path, "model.onnx")


def test_kernel_shape_that_contradicts_the_weight(capsys, tmp_path):
    """kernel_shape [5, 5] on a 3x3 weight: our executor would run it, ORT would not; exit 8 up front."""

    def lie(model):
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        kept = [a for a in conv.attribute if a.name != "kernel_shape"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("kernel_shape", [5, 5])])

    code, err = _convert(capsys, _sample(tmp_path, lie), tmp_path / "out.onnx")
    _one_line_error(code, err, InvalidGraphError.exit_code, "kernel_shape")
    _only(tmp_path, "model.onnx")


def test_library_logging_stays_off_stderr(capsys, tmp_path, monkeypatch):
    """A model whose only output is an initializer: nothing to quantize (exit 2), and nothing but the
    error line on stderr, even with a library logging a traceback on the way (kept behind --verbose)."""
    import logging

    def constant_output(model):
        del model.graph.output[:]
        model.graph.output.append(helper.make_tensor_value_info("features.0.bias", TensorProto.FLOAT, [16]))

    real = pipeline.load_model

    def logging_load(*args, **kwargs):
        logging.getLogger("onnx_ir").error("Traceback (most recent call last): a library's own report")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_model", logging_load)
    code, err = _convert(capsys, _sample(tmp_path, constant_output), tmp_path / "out.onnx")
    _one_line_error(code, err, UsageError.exit_code, "no Conv, Gemm or MatMul")
    _only(tmp_path, "model.onnx")


# --------------------------------------------------------------------------------------------------
# 6./7. valid models that must convert


def _converts(capsys, tmp_path, edit) -> onnx.ModelProto:
    code, err = _convert(capsys, _sample(tmp_path, edit), tmp_path / "out.onnx")
    assert code == 0, err
    x = np.load(CALIB)[:4]
    _runs_in_ort(tmp_path / "out.onnx", x)
    return onnx.load(tmp_path / "out.onnx")


def test_static_batch_of_one(capsys, tmp_path):
    """An input declared (1, 1, 8, 8): calibrated and verified in batches the model accepts."""

    def static(model):
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = 1

    out = _converts_single(capsys, tmp_path, static)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def _converts_single(capsys, tmp_path, edit) -> onnx.ModelProto:
    code, err = _convert(capsys, _sample(tmp_path, edit), tmp_path / "out.onnx")
    assert code == 0, err
    _runs_in_ort(tmp_path / "out.onnx", np.load(CALIB)[:1])
    return onnx.load(tmp_path / "out.onnx")


def test_initializer_that_is_also_a_graph_input(capsys, tmp_path):
    """IR < 4 style: every weight also listed as a graph input.  Treated as constants (as ORT's
    quant_pre_process does), quantized, and the input list of the output holds the data input only."""

    def listed(model):
        model.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
        )

    out = _converts(capsys, tmp_path, listed)
    assert [i.name for i in out.graph.input] == ["input"]
    assert any(t.name.endswith("weight_quantized") for t in out.graph.initializer)


def test_graph_output_that_is_an_initializer(capsys, tmp_path):
    """A second graph output that is a constant: kept in the written model."""

    def extra(model):
        model.graph.output.append(helper.make_tensor_value_info("features.0.bias", TensorProto.FLOAT, [16]))

    out = _converts(capsys, tmp_path, extra)
    assert [o.name for o in out.graph.output][-1] == "features.0.bias"


def test_graph_input_that_is_also_an_output(capsys, tmp_path):
    """The input passed through as a second output: the written model is valid and returns it as is."""

    def echo(model):
        model.graph.output.append(model.graph.input[0])

    _converts(capsys, tmp_path, echo)
    x = np.load(CALIB)[:4]
    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    assert np.array_equal(outs[-1], x)


def test_node_name_in_broken_utf8(capsys, tmp_path):
    """A node name whose bytes are not UTF-8 (ORT does not care, onnx_ir refuses to write it): repaired
    on load, the model converts."""

    def garble(model):
        model.graph.node[1].name = "relu-MARK"
        data = model.SerializeToString().replace(b"-MARK", b"-\xeaARK")  # an invalid continuation byte
        model.ParseFromString(data)
        assert isinstance(model.graph.node[1].name, bytes)

    _converts(capsys, tmp_path, garble)


def test_model_local_function_is_inlined(capsys, tmp_path):
    """A Relu wrapped in a model-local function: inlined by normalize, then converted as usual."""

    def wrap(model):
        relu = next(n for n in model.graph.node if n.op_type == "Relu")
        body = [helper.make_node("Relu", ["a"], ["b"])]
        model.functions.append(
            helper.make_function("local", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
        )
        relu.op_type, relu.domain = "MyRelu", "local"
        model.opset_import.append(helper.make_opsetid("local", 1))

    _converts(capsys, tmp_path, wrap)


# --------------------------------------------------------------------------------------------------
# 8./9. determinism and clean-up


def test_two_runs_are_byte_identical(capsys, tmp_path):
    """Same model, data, options: the same bytes (no timing or path in the model)."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _convert(capsys, SAMPLE, a)[0] == 0
    assert _convert(capsys, SAMPLE, b)[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_checkpoints_removed_after_a_failure(capsys, tmp_path, monkeypatch):
    """A verification failure (exit 6) removes every checkpoint the run wrote; only an interrupt keeps them."""

    def reject(*args, **kwargs):
        raise VerificationError("ORT and the PyTorch simulation agree on only 0.0% of top-1 predictions")

    monkeypatch.setattr(pipeline, "verify", reject)
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx")
    _one_line_error(code, err, VerificationError.exit_code)
    _only(tmp_path)


def test_checkpoints_removed_after_a_crash(tmp_path, monkeypatch):
    """An unexpected exception in the solver (a qcb-onnx bug) keeps its traceback but leaves no checkpoint."""
    from qcb_onnx.rounding import Efrap

    calls = {"n": 0}
    real = Efrap.solve

    def crash_on_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("solver bug")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Efrap, "solve", crash_on_second)
    with pytest.raises(RuntimeError, match="solver bug"):
        pipeline.quantize(str(SAMPLE), str(CALIB), w_bits=4, calib_size=64, checkpoint=tmp_path / "c.npz")
    _only(tmp_path)


# --------------------------------------------------------------------------------------------------
# 10. smaller ones


def test_npz_key_used_for_a_single_input_is_named(capsys, tmp_path):
    """An .npz whose only array is not named after the input: used, and a note says which array."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=np.load(CALIB))
    code = main(["convert", str(SAMPLE), "--calib", str(calib), "--out", str(tmp_path / "o.onnx"), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 0, err
    assert "note:" in err and "'images'" in err and "'input'" in err


def test_image_symlinked_outside_the_folder_is_refused(capsys, tmp_path):
    """An ImageFolder member that is a link leaving the folder: exit 4, the outside file never opened."""
    from PIL import Image

    folder = tmp_path / "calib" / "0"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    secret = tmp_path / "secret.png"
    shutil.copy(folder / "a.png", secret)
    (folder / "b.png").symlink_to(secret)
    out = tmp_path / "out"
    out.mkdir()
    code, err = _convert(
        capsys, SAMPLE, out / "o.onnx", "--preprocess", "size=8x8,channels=1", calib=tmp_path / "calib"
    )
    _one_line_error(code, err, CalibrationDataError.exit_code, "b.png", "outside")
    _only(out)


def test_exclude_names_must_exist(capsys, tmp_path):
    """--exclude with a name that is neither a node nor an ONNX op type: exit 2 before any work; a real
    op type absent from the model is fine (generic lists work across models)."""
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx", "--exclude", "features.9/Conv")
    _one_line_error(code, err, UsageError.exit_code, "features.9/Conv")
    _only(tmp_path)
    code, err = _convert(capsys, SAMPLE, tmp_path / "out.onnx", "--exclude", "LSTM,Gemm")
    assert code == 0, err
    names = {t.name for t in onnx.load(tmp_path / "out.onnx").graph.initializer}
    assert "classifier.weight" in names and "classifier.weight_quantized" not in names
