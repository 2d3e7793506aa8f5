"""A killed conversion resumes from its per-layer checkpoint and ends with the same integers and biases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from qcb_onnx.emit import read_weight_ints
from qcb_onnx.pipeline import quantize
from qcb_onnx.rounding import Efrap


def _ints(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Integer weights and int32 biases (each bias holds its layer's correction, which resumes too)."""
    return {
        t.name: read_weight_ints(model, t.name[: -len("_quantized")])
        for t in model.graph.initializer
        if t.name.endswith(("weight_quantized", "bias_quantized"))
    }


def test_interrupted_run_resumes_with_identical_integers(qcb_model, digits, tmp_path, monkeypatch):
    """Interrupt the error-budget search in its second pass, two layers in; resume: only the layers
    not yet done are optimised, no checkpoint is left behind, and every integer equals the
    uninterrupted run's."""
    calib = digits[0][:128]
    options = dict(w_bits=2, iters=60, providers="cpu", seed=3)  # 2 bits: the search needs three passes
    real_solve = Efrap.solve
    calls = {"n": 0, "die_at": None}

    def counting_solve(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(Efrap, "solve", counting_solve)
    first = quantize(onnx.load(qcb_model), calib, **options).model
    reference = _ints(first)
    assert any(name.endswith("bias_quantized") for name in reference)
    search = json.loads({p.key: p.value for p in first.metadata_props}["qcb_onnx.error_budget"])
    layers, total = 4, calls["n"]
    assert len(search["probes"]) >= 2 and total == layers * len(search["probes"])  # a pass per budget tried

    ckpt = tmp_path / "run.resume"
    calls.update(n=0, die_at=layers + 3)  # two layers into the search's second pass
    with pytest.raises(KeyboardInterrupt):
        quantize(onnx.load(qcb_model), calib, checkpoint=ckpt, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run.b0.25.resume",
        "run.b0.25.resume.json",
        "run.b0.resume",
        "run.b0.resume.json",
    ]

    calls.update(n=0, die_at=None)
    resumed = quantize(onnx.load(qcb_model), calib, checkpoint=ckpt, **options)
    assert calls["n"] == total - (layers + 2)
    assert list(tmp_path.iterdir()) == []  # removed after success
    got = _ints(resumed.model)
    assert got.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


def test_checkpoint_of_another_run_is_ignored(qcb_model, digits, tmp_path):
    """A checkpoint written with other options (here another seed) is not reused."""
    calib = digits[0][:64]
    ckpt = tmp_path / "c.resume"
    from qcb_onnx.rounding.checkpoint import Checkpoint
    from qcb_onnx.rounding.problem import LayerReport

    other = Checkpoint(ckpt, "not-this-run")
    other.load()
    report = LayerReport("n", "features.0.weight", (16, 1, 3, 3), 0.0, 1.0, 0.0)
    other.add("features.0.weight", np.zeros((16, 1, 3, 3), np.int8), report, None)
    assert Checkpoint(ckpt, "not-this-run").load().keys() == {"features.0.weight"}  # it would resume its own run
    result = quantize(onnx.load(qcb_model), calib, w_bits=4, iters=20, providers="cpu", checkpoint=ckpt)
    assert np.abs(read_weight_ints(result.model, "features.0.weight")).sum() > 0


def test_sigkill_then_cli_resume(qcb_model, calib_npy, tmp_path):
    """`convert` killed with SIGKILL mid-run leaves no output; `--resume` finishes it with the same
    integers as an uninterrupted run."""
    base = [
        sys.executable,
        "-m",
        "qcb_onnx",
        "convert",
        str(qcb_model),
        "--calib",
        str(calib_npy),
        "--w-bits",
        "4",
        "--iters",
        "400",
        "--quiet",
        "--providers",
        "cpu",
    ]
    ref_out = tmp_path / "ref.onnx"
    subprocess.run([*base, "--out", str(ref_out)], check=True, capture_output=True)
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen([*base, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.onnx*.resume.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("conversion finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run([*base, "--out", str(out), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref, got = _ints(onnx.load(ref_out)), _ints(onnx.load(out))
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert not list(tmp_path.glob(".out.onnx*"))  # no checkpoint, no workspace
