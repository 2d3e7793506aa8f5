"""Clean accuracy and attack success rate of ONNX models, measured in ONNX Runtime.

ASR counts triggered test inputs whose true class is not the target and that the model assigns
to the target; CDA is top-1 accuracy on the clean test inputs.  Numbers always come from ORT
sessions on the actual files, never from a PyTorch re-implementation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from .data import Preprocess
from .errors import UsageError
from .load import default_opset
from .runtime import session
from .triggers import Trigger


@dataclass
class Score:
    model: str
    cda: float  # % clean accuracy
    asr: float  # % triggered non-target inputs classified as target
    n_clean: int
    n_triggered: int


def predict(model: onnx.ModelProto | str, x: np.ndarray, providers="auto", batch_size: int = 256) -> np.ndarray:
    sess = session(model if isinstance(model, onnx.ModelProto) else str(model), providers)
    name = sess.get_inputs()[0].name
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
    asr, n_trig = float("nan"), 0
    if trigger is not None and target is not None:
        keep = y != target
        xt = trigger.apply(x[keep], preprocess)
        n_trig = int(keep.sum())
        asr = float((predict(model, xt, providers) == target).mean() * 100) if n_trig else float("nan")
    return Score(name, round(cda, 2), round(asr, 2), len(y), n_trig)


class _ArrayReader(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, batch_size: int = 64) -> None:
        self.items = iter([{name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self):
        return next(self.items, None)


def ort_quantize(
    model: onnx.ModelProto, calib: np.ndarray, w_bits: int, a_bits: int | None, per_channel: bool
) -> onnx.ModelProto:
    """The standard path: onnxruntime.quantization.quantize_static (QDQ, MinMax) with the same scheme."""
    if w_bits not in (4, 8):
        raise UsageError(f"ORT's quantize_static supports 4- and 8-bit weights, not {w_bits}")
    if a_bits not in (4, 8):
        raise UsageError("ORT's quantize_static always quantizes activations: give --a-bits 8 or 4")
    if (w_bits == 4 or a_bits == 4) and (default_opset(model) or 0) < 21:
        model = onnx.version_converter.convert_version(model, 21)
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        src, dst = Path(tmp) / "fp.onnx", Path(tmp) / "q.onnx"
        onnx.save(model, src)
        quantize_static(
            str(src),
            str(dst),
            _ArrayReader(_input_name(model), calib),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if a_bits == 8 else QuantType.QUInt4,
            weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
        )
        return onnx.load(dst)


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static logs 'consider pre-processing' warnings on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def format_table(scores: list[Score]) -> str:
    width = max(len(s.model) for s in scores)
    lines = [f"{'model':<{width}}  {'CDA %':>7}  {'ASR %':>7}", f"{'-' * width}  {'-' * 7}  {'-' * 7}"]
    lines += [f"{s.model:<{width}}  {s.cda:>7.2f}  {s.asr:>7.2f}" for s in scores]
    return "\n".join(lines)


def format_markdown(scores: list[Score]) -> str:
    lines = ["| model | CDA % | ASR % |", "|---|---:|---:|"]
    lines += [f"| {s.model} | {s.cda:.2f} | {s.asr:.2f} |" for s in scores]
    return "\n".join(lines)


def write_json(scores: list[Score], path: str | Path, extra: dict | None = None) -> None:
    payload = {"results": [asdict(s) for s in scores], **(extra or {})}
    Path(path).write_text(json.dumps(payload, indent=2))
