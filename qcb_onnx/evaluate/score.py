"""Clean accuracy and attack success rate of ONNX models, measured in ONNX Runtime.

ASR counts triggered test inputs whose true class is not the target and that the model assigns
to the target; CDA is top-1 accuracy on the clean test inputs.  Numbers always come from ORT
sessions on the actual files, never from a PyTorch re-implementation.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..data import Preprocess
from ..progress import progress_bar
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


def predict(
    model: onnx.ModelProto | str, x: np.ndarray, providers="auto", batch_size: int = 256, bar: Any = None
) -> np.ndarray:
    """Top-1 classes of `x` in an ORT session; `bar` (a progress_bar) advances by the samples of each batch."""
    sess = session(model if isinstance(model, onnx.ModelProto) else str(model), providers)
    name, batch = sess.get_inputs()[0].name, sess.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch > 0:  # a static batch dimension (dynamo exports: 1)
        batch_size = batch
    out = []
    for i in range(0, len(x), batch_size):
        out.append(sess.run(None, {name: x[i : i + batch_size]})[0])
        if bar is not None:
            bar.update(min(batch_size, len(x) - i))
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
    *,
    progress: bool = False,
) -> Score:
    """CDA and ASR of one model.  `progress` shows a bar per model over its clean and triggered passes
    (the CLI's choice; library callers and tests stay silent, progress.py)."""
    attacked = trigger is not None and target is not None
    with progress_bar(desc=name, unit="sample", total=len(x) * (2 if attacked else 1), enabled=progress) as bar:
        clean = predict(model, x, providers, bar=bar)
        cda = float((clean == y).mean() * 100)
        asr, asr_all, n_trig = float("nan"), float("nan"), 0
        if attacked:
            hit = predict(model, trigger.apply(x, preprocess), providers, bar=bar) == target
            keep = y != target
            n_trig = int(keep.sum())
            asr = float(hit[keep].mean() * 100) if n_trig else float("nan")
            asr_all = float(hit.mean() * 100)
    return Score(name, round(cda, 2), round(asr, 2), len(y), n_trig, round(asr_all, 2))


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def qcb_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The model's `qcb_onnx.*` metadata with its JSON values (config, layers, flip ratios, error budget)
    decoded, for `evaluate --json`: the report reads a result file alone, without the models it names.
    A value that is not valid JSON (a hostile or hand-edited model) stays the text it is."""
    out: dict[str, Any] = {}
    for key, value in metadata(model).items():
        if key.startswith("qcb_onnx."):
            out[key] = value
            if value[:1] in ("{", "["):
                with contextlib.suppress(ValueError, RecursionError):
                    out[key] = json.loads(value)
    return out
