"""Scan an FP32 ONNX model for a quantization-conditioned backdoor without knowing its trigger.

    report = qcb_onnx.scan.scan("model.onnx", "calib.npy")          # w_bits (8, 4), per channel
    report["verdict"], report["score"]                                # "clean" / "suspicious", float

A QCB is planted in the gap between the FP weights and their nearest-rounded integers under the
victim's grid, so the scan quantizes the model the way ORT would (nearest), per victim bit width, and
measures (modules):

* weights.py: where the weights sit in their rounding bins (fractional parts against the uniform
  null, truncation-error norms per output channel, scale anchors);
* behaviour.py: FP32 vs nearest on the calibration data (top-1 disagreement, logit shift) and how
  concentrated nearest rounding's output error is in few channels;
* trigger.py: the differential trigger search (a small universal stamp only the nearest model obeys);
* run.py: the pipeline run and the signals collected per bit width;
* score.py: each model feature as a robust z against clean models, the score = the largest z;
* reference.py / reference.json: the clean reference and threshold, fitted on clean models only;
* report.py (JSON), html.py (the HTML page), quick.py (convert's one-line verdict from what a
  conversion already computed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .reference import load_reference, section_for
from .report import build_report, summary_line
from .run import ScanOptions, collect_signals


def scan(
    model: str | Path, calibration: Any, options: ScanOptions | None = None, reference: dict | None = None
) -> dict:
    """Scan `model` on `calibration` (any source `convert` takes); the report dict (report.build_report).
    `reference` defaults to the shipped clean reference; its section for the granularity is checked
    before any work."""
    options = options or ScanOptions()
    reference = reference if reference is not None else load_reference()
    section_for(reference, options.per_channel)
    return build_report(str(model), collect_signals(model, calibration, options), reference)


__all__ = ["ScanOptions", "collect_signals", "load_reference", "scan", "summary_line"]
