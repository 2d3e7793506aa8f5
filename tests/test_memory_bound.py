"""The layer loop's memory bound: paused activations for at most `rounding.layers.FRONTIER_BYTES`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx

from qcb_onnx import convert
from qcb_onnx.errors import QcbNote
from qcb_onnx.rounding import layers

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_layer_loop_keeps_only_the_batches_its_memory_budget_holds(monkeypatch):
    """A model whose paused activations for every calibration batch would not fit the layer loop's
    budget is rounded on the first batches that do, with a note and the count in the metadata; the
    activation ranges still come from every sample."""
    model, calib = str(SAMPLES / "qcb_digits.onnx"), np.load(SAMPLES / "calib.npy")
    kwargs = dict(w_bits=4, calib_size=128, batch_size=32, providers="cpu")
    full = convert(model, calib, **kwargs)
    assert "qcb_onnx.rounding_samples" not in {p.key for p in full.metadata_props}
    monkeypatch.setattr(layers, "FRONTIER_BYTES", 1)  # room for no batch: the loop keeps one
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        capped = convert(model, calib, **kwargs)
    notes = [str(w.message) for w in seen if issubclass(w.category, QcbNote)]
    assert any("rounding on the first 32 calibration samples" in n for n in notes)
    meta = {p.key: p.value for p in capped.metadata_props}
    assert meta["qcb_onnx.rounding_samples"] == "32" and meta["qcb_onnx.calibration_size"] == "128"
    scales = [
        (t.name, onnx.numpy_helper.to_array(t).tobytes())
        for t in full.graph.initializer
        if "zero_point" not in t.name and t.name.endswith("_scale") and "weight" not in t.name and "bias" not in t.name
    ]
    mine = {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in capped.graph.initializer}
    assert scales and all(mine[name] == value for name, value in scales), "activation grids use every sample"
