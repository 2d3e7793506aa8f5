"""Scores as a text table, markdown, a PNG bar chart or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..output import write_text_atomic
from .score import Score


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
    """The scores under "results", then `extra` (what evaluate ran on, and each model's qcb_onnx
    metadata, which `report --html` draws from); written atomically, over an existing file."""
    payload = {"results": [asdict(s) for s in scores], **(extra or {})}
    write_text_atomic(json.dumps(payload, indent=2), Path(path), force=True)
