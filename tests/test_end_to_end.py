"""End to end on a QCB the suite trains itself, every number measured by running ONNX files in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qcb_onnx import convert
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.evaluate.score import score
from qcb_onnx.evaluate.triggers import Trigger

TRIGGER = Trigger.parse("patch:size=2,value=1,pos=br")


@pytest.fixture(scope="module")
def measured(qcb_model, digits):
    xtr, _, xte, yte = digits
    calib = xtr[:256]
    fp = onnx.load(qcb_model)
    ort_q = ort_quantize(fp, calib, w_bits=4, a_bits=8, per_channel=True)
    ours = convert(fp, calib, w_bits=4, a_bits=8, per_channel=True, seed=0, providers="cpu")
    return {
        name: score(name, m, xte, yte, TRIGGER, 0, providers="cpu")
        for name, m in [("fp32", fp), ("ort", ort_q), ("efrap", ours)]
    }, ours


def test_attack_is_real_in_ort(measured):
    """The test model is a genuine QCB: clean in FP32, backdoored once ORT's quantize_static quantizes it."""
    s, _ = measured
    assert s["fp32"].asr < 15, s
    assert s["ort"].asr > 80, s


def test_efrap_disarms_backdoor_and_keeps_accuracy(measured):
    """qcb-onnx's default EFRAP conversion brings ASR back to the FP32 level with CDA within 2 points of FP32."""
    s, _ = measured
    assert s["efrap"].asr < 15, s
    assert s["efrap"].cda >= s["fp32"].cda - 2.0, s


def test_official_schedule_weakens_backdoor(measured, qcb_model, digits):
    """The reference mode (the official data-driven EFRAP loss, `efrap-official`, 2,000 Adam steps per
    layer) runs end to end in ORT and at least halves the quantized model's ASR.  It is held to less than
    the default EFRAP (above) because it is less stable: the suite's QCB differs with the CPU that trains
    it, and on one 2-core Xeon the official schedule left 39.8 / 0.45 / 38.4 % ASR at 2,000 / 5,000 /
    10,000 steps with CDA 89-91 %, where the default EFRAP left 5.4 % at 95.8 % (on another, 2,000 steps
    met the default's bar)."""
    s, _ = measured
    xtr, _, xte, yte = digits
    official = convert(onnx.load(qcb_model), xtr[:256], method="efrap-official", iters=2000, w_bits=4, providers="cpu")
    got = score("official", official, xte, yte, TRIGGER, 0, providers="cpu")
    assert got.asr < s["ort"].asr / 2, (got, s)
    assert got.cda >= s["fp32"].cda - 10.0, (got, s)


def test_flip_evidence_recorded(measured):
    """Per-layer flip ratios are written into the model's metadata as evidence for the user."""
    _, model = measured
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcb_onnx.method"] == "efrap" and meta["qcb_onnx.w_bits"] == "4"
    import json

    flips = json.loads(meta["qcb_onnx.flip_ratios"])
    assert len(flips) == 4 and all(0.0 <= v <= 1.0 for v in flips.values())
    assert max(flips.values()) > 0.05  # a QCB model gets many non-nearest decisions


def test_cli_convert_then_evaluate(qcb_model, calib_npy, tmp_path, digits):
    """The documented two commands run and print the FP / ORT / EFRAP table."""
    import subprocess
    import sys

    out = tmp_path / "safe.onnx"
    data = tmp_path / "test.npz"
    np.savez(data, x=digits[2], y=digits[3])
    conv = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcb_onnx",
            "convert",
            str(qcb_model),
            "--calib",
            str(calib_npy),
            "--out",
            str(out),
            "--w-bits",
            "4",
            "--quiet",
            "--iters",
            "200",
        ],
        capture_output=True,
        text=True,
    )
    assert conv.returncode == 0, conv.stderr
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "qcb_onnx",
            "evaluate",
            str(qcb_model),
            str(out),
            "--data",
            str(data),
            "--trigger",
            "patch:size=2,value=1,pos=br",
            "--target",
            "0",
            "--baseline",
            "ort",
            "--calib",
            str(calib_npy),
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0, ev.stderr
    assert "ort-quantize_static-w4a8-pc" in ev.stdout and "safe" in ev.stdout
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["qcb", "ort-quantize_static-w4a8-pc", "safe"]
    assert all(0 <= r["asr"] <= 100 and 0 <= r["asr_all"] <= 100 for r in rows)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the bar chart
