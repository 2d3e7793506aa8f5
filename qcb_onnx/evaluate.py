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

from . import large
from .data import Preprocess
from .errors import UsageError
from .load import default_opset
from .runtime import session
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
    asr, asr_all, n_trig = float("nan"), float("nan"), 0
    if trigger is not None and target is not None:
        hit = predict(model, trigger.apply(x, preprocess), providers) == target
        keep = y != target
        n_trig = int(keep.sum())
        asr = float(hit[keep].mean() * 100) if n_trig else float("nan")
        asr_all = float(hit.mean() * 100)
    return Score(name, round(cda, 2), round(asr, 2), len(y), n_trig, round(asr_all, 2))


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
        model = large.convert_version(model, 21)
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        src, dst = Path(tmp) / "fp.onnx", Path(tmp) / "q.onnx"
        large.save(model, src)
        quantize_static(
            str(src),
            str(dst),
            _ArrayReader(_input_name(model), calib),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if a_bits == 8 else QuantType.QUInt4,
            weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
            use_external_data_format=large.is_large(model),
        )
        return onnx.load(dst)  # external data (if any) is read here, before the folder goes


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
    """ASR counts non-target test inputs; 'ASR all' counts every triggered input, target class included."""
    width = max(len(s.model) for s in scores)
    head = f"{'model':<{width}}  {'CDA %':>7}  {'ASR %':>7}  {'ASR all %':>9}"
    lines = [head, f"{'-' * width}  {'-' * 7}  {'-' * 7}  {'-' * 9}"]
    lines += [f"{s.model:<{width}}  {s.cda:>7.2f}  {s.asr:>7.2f}  {s.asr_all:>9.2f}" for s in scores]
    return "\n".join(lines)


def format_markdown(scores: list[Score]) -> str:
    lines = ["| model | CDA % | ASR % (non-target) | ASR % (all) |", "|---|---:|---:|---:|"]
    lines += [f"| {s.model} | {s.cda:.2f} | {s.asr:.2f} | {s.asr_all:.2f} |" for s in scores]
    return "\n".join(lines)


def plot(scores: list[Score], path: str | Path, title: str = "") -> None:
    """Grouped bars of CDA and ASR per model variant, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'qcb-onnx[plot]'") from None
    idx = np.arange(len(scores))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(scores) + 1), 3.6), dpi=120)
    for offset, key, label, color in [(-0.2, "cda", "CDA %", "#3b7dd8"), (0.2, "asr", "ASR %", "#d8543b")]:
        values = [getattr(s, key) for s in scores]
        bars = ax.bar(idx + offset, values, 0.4, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(idx, [s.model for s in scores], rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 120)
    ax.set_ylabel("%")
    ax.set_title(title or "clean accuracy and attack success, measured in ONNX Runtime", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(scores: list[Score], path: str | Path, extra: dict | None = None) -> None:
    payload = {"results": [asdict(s) for s in scores], **(extra or {})}
    Path(path).write_text(json.dumps(payload, indent=2))
