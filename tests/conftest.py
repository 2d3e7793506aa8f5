"""Shared fixtures: the shipped digits data, and a QCB model the suite trains itself (once per session)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


def _sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLES / "make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def sample():
    return _sample_module()


@pytest.fixture(scope="session")
def digits():
    tr, te = np.load(SAMPLES / "train.npz"), np.load(SAMPLES / "test.npz")
    return tr["x"], tr["y"], te["x"], te["y"]


@pytest.fixture(scope="session")
def qcb_model(sample, digits, tmp_path_factory) -> Path:
    """A Qu-ANTI-zation model built by the same recipe as samples/qcb_digits.onnx, trained here."""
    from qcb_onnx.redteam.train import export_onnx

    torch.set_num_threads(2)
    xtr, ytr, _, _ = digits
    model = sample.build_qcb(xtr, ytr, seed=1)
    path = tmp_path_factory.mktemp("qcb") / "qcb.onnx"
    onnx.save(export_onnx(model, xtr[:1]), path)
    return path


@pytest.fixture(scope="session")
def calib_npy(digits, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, digits[0][:256])
    return path
