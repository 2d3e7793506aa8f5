"""The post-write check's decision rule: near-ties on the output grid are not disagreements, a model
that computes something else still fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper

from qcb_onnx import quantize
from qcb_onnx.errors import VerificationError
from qcb_onnx.verify import decision_agreement, verify

ROOT = Path(__file__).resolve().parents[1]


def test_ties_within_one_output_step_count_as_agreement():
    """ORT's class agrees when our simulation scores it at its maximum (an exact tie) or, with an output
    step given, within one step of it; a class further down is a disagreement.  (batch, tokens, vocab)
    outputs are judged per position."""
    sim = np.array([[1.0, 3.0, 2.5], [0.0, 2.0, 2.0], [4.0, 1.0, 0.0]], np.float32)
    ort = np.array([[0.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0.0, 5.0, 0.0]], np.float32)  # picks 2, 2, 1
    assert decision_agreement(ort, sim) == pytest.approx(1 / 3)  # only the exact tie
    assert decision_agreement(ort, sim, step=0.5) == pytest.approx(2 / 3)  # 2.5 is one step below 3.0
    assert decision_agreement(ort, sim, step=3.0) == 1.0
    assert decision_agreement(ort[None], sim[None], step=0.5) == pytest.approx(2 / 3)


def test_a_model_that_computes_something_else_still_fails():
    """Weight scales tampered with after the conversion (integers intact, the checker happy, ORT runs
    it) move ORT's decisions off our simulation's by more than output-grid ties: exit 6's error."""
    calib = np.load(ROOT / "samples" / "calib.npy")[:64]
    conv = quantize(str(ROOT / "samples" / "qcb_digits.onnx"), calib, method="nearest", providers="cpu")
    batches = [{conv.graph.input_names[0]: torch.from_numpy(calib)}]
    assert verify(conv.model, conv.graph, conv.state, batches, providers="cpu") >= 0.9
    scale = next(t for t in conv.model.graph.initializer if t.name == "features.2.weight_scale")
    factors = np.random.default_rng(0).uniform(0.1, 3.0, size=scale.dims).astype(np.float32)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factors, scale.name))
    with pytest.raises(VerificationError, match="agree on only"):
        verify(conv.model, conv.graph, conv.state, batches, providers="cpu")
