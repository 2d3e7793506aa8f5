"""`qcb_onnx.export`: torch.onnx.export + the conversion pipeline in one call.  Both exporters give the
integers `convert` gives on the same FP32 file, `auto` falls back to TorchScript with a note, and
every failure is one line with nothing written."""

from __future__ import annotations

import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

import qcb_onnx
from qcb_onnx.errors import (
    CalibrationDataError,
    InvalidWeightsError,
    OutputError,
    OutputExistsError,
    QcbNote,
    UnsupportedModelError,
    UsageError,
)
from qcb_onnx.redteam.zoo import build

export_module = sys.modules["qcb_onnx.export"]  # qcb_onnx.export is the function
CALIB = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
FAST = {"method": "nearest", "calib_size": 32}
REAL_EXPORT = torch.onnx.export


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("smallcnn", width=4, in_channels=1)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """The FP32 intermediates go to a temporary folder of this test only, so 'nothing left' is checkable
    (torch keeps caches of its own there: only our qcb-export-* folders count)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _ints(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    kinds = (TensorProto.INT8, TensorProto.INT32)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type in kinds}


def _failing(exporter: str, message: str = "boom: nothing works\n  File 'x.py', line 1\nhints ..."):
    """torch.onnx.export that raises for `exporter` ("dynamo", "torchscript" or "both") and runs otherwise;
    it records in which mode every module was when it was called."""
    seen = []

    def fake(model, *args, **kwargs):
        seen.append(all(not m.training for m in model.modules()))
        which = "dynamo" if kwargs.get("dynamo", True) else "torchscript"
        if exporter in (which, "both"):
            raise RuntimeError(message)
        return REAL_EXPORT(model, *args, **kwargs)

    return fake, seen


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_give_converts_integers(model, exporter, tmp_path, private_tmp):
    """The written model loads in ORT, takes any batch size, and holds exactly the int8 weights (and
    int32 biases) `convert` writes from the same FP32 file; the model is back in training mode and the
    temporary folder is gone."""
    model.train()
    out, fp32 = tmp_path / "q.onnx", tmp_path / "fp32.onnx"
    result = qcb_onnx.export(model, CALIB[:1], CALIB, out, exporter=exporter, fp32_path=fp32, **FAST)
    assert result.exporter == exporter and result.written == [out, fp32]
    assert model.training and all(m.training for m in model.modules())
    assert not list(private_tmp.glob("qcb-export-*"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": CALIB[:5]})
    assert logits.shape == (5, 10)
    written, reference = _ints(onnx.load(out)), _ints(qcb_onnx.convert(fp32, CALIB, **FAST))
    assert sum(k.endswith("weight_quantized") for k in written) == 4
    assert written.keys() == reference.keys()
    assert all(np.array_equal(written[k], reference[k]) for k in written)
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["qcb_onnx.method"] == "nearest"


def test_auto_falls_back_to_torchscript_with_a_note(model, tmp_path, monkeypatch):
    """When the dynamo exporter raises, auto exports with TorchScript and says why in one note (the
    first line of torch's message); the model was in eval mode for every export attempt."""
    fake, seen = _failing("dynamo")
    monkeypatch.setattr(torch.onnx, "export", fake)
    with pytest.warns(QcbNote) as notes:
        result = qcb_onnx.export(model, torch.from_numpy(CALIB[:1]), CALIB, tmp_path / "q.onnx", **FAST)
    assert result.exporter == "torchscript" and (tmp_path / "q.onnx").exists()
    (note,) = [str(n.message) for n in notes if issubclass(n.category, QcbNote)]
    assert "dynamo exporter failed (boom: nothing works)" in note and "\n" not in note
    assert seen == [True, True]


@pytest.mark.parametrize(
    "exporter,failing,fragment",
    [
        ("dynamo", "dynamo", "torch.onnx.export (dynamo exporter) failed: boom: nothing works"),
        ("torchscript", "torchscript", "torch.onnx.export (torchscript exporter) failed: boom"),
        ("auto", "both", "failed with both exporters: dynamo: boom: nothing works; torchscript: boom"),
    ],
)
def test_export_failure_is_one_line_and_writes_nothing(
    model, exporter, failing, fragment, tmp_path, monkeypatch, private_tmp
):
    fake, _ = _failing(failing)
    monkeypatch.setattr(torch.onnx, "export", fake)
    out, fp32 = tmp_path / "q.onnx", tmp_path / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QcbNote)
        with pytest.raises(UnsupportedModelError) as info:
            qcb_onnx.export(model, CALIB[:1], CALIB, out, exporter=exporter, fp32_path=fp32, **FAST)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not fp32.exists() and not list(private_tmp.glob("qcb-export-*"))
    assert model.training  # restored after a failure too


def test_conversion_failure_names_the_export_not_a_temp_file(model, tmp_path, private_tmp):
    """A model the pipeline refuses (a weight beyond 1e8) fails after the export: the message names the
    exported model, not a temporary path that no longer exists, and nothing is written."""
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = 1e9
    out, fp32 = tmp_path / "q.onnx", tmp_path / "fp32.onnx"
    with pytest.raises(InvalidWeightsError) as info:
        qcb_onnx.export(model, CALIB[:1], CALIB, out, exporter="torchscript", fp32_path=fp32, **FAST)
    assert str(info.value).startswith("the torchscript-exported SmallCNN: initializer ")
    assert str(private_tmp) not in str(info.value)
    assert not out.exists() and not fp32.exists() and not list(private_tmp.glob("qcb-export-*"))
    with pytest.raises(CalibrationDataError):  # calibration that does not fit the model: the same
        qcb_onnx.export(build("smallcnn", width=4, in_channels=1), CALIB[:1], CALIB[:, :, :4], out, **FAST)
    assert not out.exists() and not list(private_tmp.glob("qcb-export-*"))


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        ({"exporter": "onnx"}, UsageError, "unknown exporter 'onnx'; choose one of auto, dynamo, torchscript"),
        ({"w_bits": 9}, UsageError, "--w-bits"),
        ({"example_inputs": "x"}, UsageError, "example input 0 is a str"),
        ({"input_names": ["a", "b"]}, UsageError, "2 input names for 1 example inputs"),
        ({"path": "missing-folder/q.onnx"}, OutputError, "output folder does not exist"),
        ({"fp32_path": "q.onnx"}, UsageError, "is the quantized output's path"),
    ],
)
def test_bad_arguments_fail_before_exporting(model, kwargs, error, fragment, tmp_path, monkeypatch):
    """Mistakes are one-line errors raised before torch is called (it would take seconds to minutes)."""
    calls = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1))
    monkeypatch.chdir(tmp_path)
    args = {"example_inputs": CALIB[:1], "path": "q.onnx", **kwargs}
    with pytest.raises(error, match=fragment.replace("(", r"\(")):
        qcb_onnx.export(model, args.pop("example_inputs"), CALIB, args.pop("path"), **args, **FAST)
    assert not calls and not (tmp_path / "q.onnx").exists()


def test_existing_output_needs_force(model, tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported before checking the output"))
    with pytest.raises(OutputExistsError, match="--force"):
        qcb_onnx.export(model, CALIB[:1], CALIB, out, exporter="torchscript", **FAST)
    assert out.read_bytes() == b"keep me"
    monkeypatch.setattr(torch.onnx, "export", REAL_EXPORT)
    result = qcb_onnx.export(
        model, CALIB[:1], CALIB, out, exporter="torchscript", force=True, dynamic_batch=False, **FAST
    )
    assert isinstance(result, export_module.Exported) and result.model.graph.input[0].name == "x"
    assert [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim] == [1, 1, 8, 8]
