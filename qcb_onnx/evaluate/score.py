"""Clean accuracy and attack success rate of ONNX models, measured in ONNX Runtime.

ASR counts triggered test inputs whose true class is not the target and that the model assigns
to the target; CDA is top-1 accuracy on the clean test inputs.  Numbers always come from ORT
sessions on the actual files, never from a PyTorch re-implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..data import Preprocess
from ..runtime import session
from .triggers import Trigger


@dataclass
class Score:
    model: str
    cda: float  # % clean accuracy
    asr: float  # % triggered non-target inputs classified as target (the standard ASR)
    n_clean: int
    n_triggered: int
    asr_all: float = float("nan")  # % of all triggered inputs, target class included, classified as target


def predict(model: onnx.ModelProto | str, x: np.ndarray, providers="auto", batch_size: int = 256) -> np.ndarray:
    sess = session(model if isinstance(model, onnx.ModelProto) else str(model), providers)
    name, batch = sess.get_inputs()[0].name, sess.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch > 0:  # a static batch dimension (dynamo exports: 1)
        batch_size = batch
    out = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out).reshape(len(x), -1).argmax(1)


def score(
    name: str,
    model: onnx.ModelProto | str,
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger | None,
    target: int | None,
    preprocess: Preprocess | None = None,
    providers="auto",
) -> Score:
    clean = predict(model, x, providers)
    cda = float((clean == y).mean() * 100)
    asr, asr_all, n_trig = float("nan"), float("nan"), 0
    if trigger is not None and target is not None:
        hit = predict(model, trigger.apply(x, preprocess), providers) == target
        keep = y != target
        n_trig = int(keep.sum())
        asr = float(hit[keep].mean() * 100) if n_trig else float("nan")
        asr_all = float(hit.mean() * 100)
    return Score(name, round(cda, 2), round(asr, 2), len(y), n_trig, round(asr_all, 2))


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
