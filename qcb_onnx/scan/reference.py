"""The clean reference the verdict is measured against: feature medians, spreads and the threshold,
fitted on clean models only and shipped in the package (reference.json, with the command that fitted it).

One reference per weight granularity ("per-channel", "per-tensor"): fractional parts and outlier channels mean
different things under one scale per channel and one per tensor.  `fit` rebuilds it from clean
models' raw signals (benchmarks/scan_zoo.py fit); a user with clean models of their own can fit one
and pass it with ``scan --reference FILE``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import UsageError
from ..text import one_line
from .score import fit_reference, fit_threshold, model_features

SCHEMES = ("per-channel", "per-tensor")


def scheme_name(per_channel: bool) -> str:
    return "per-channel" if per_channel else "per-tensor"


def load_reference(path: str | Path | None = None) -> dict:
    """The shipped reference, or the one at `path` (an operator's file: a bad one is a UsageError)."""
    try:
        if path is None:
            text = resources.files(__package__).joinpath("reference.json").read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        ref = json.loads(text)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the scan reference {path or 'reference.json'}: {one_line(exc)}") from None
    if not isinstance(ref, dict) or not any(isinstance(ref.get(s), dict) for s in SCHEMES):
        raise UsageError(f"scan reference {path or 'reference.json'} has no {' or '.join(SCHEMES)} section")
    for scheme in SCHEMES:
        section = ref.get(scheme)
        if isinstance(section, dict) and not (
            isinstance(section.get("features"), dict) and isinstance(section.get("threshold"), (int, float))
        ):
            raise UsageError(f"scan reference section {scheme!r} needs 'features' and a numeric 'threshold'")
    return ref


def section_for(reference: dict, per_channel: bool) -> dict:
    """The reference section of a weight granularity; UsageError when it was never fitted."""
    section = reference.get(scheme_name(per_channel))
    if not isinstance(section, dict):
        raise UsageError(f"the scan reference has no {scheme_name(per_channel)} section; fit one (scan_zoo.py fit)")
    return section


def fit(clean_signals: Sequence[dict], names: Sequence[str], command: str) -> dict:
    """A reference section from clean models' raw signals (all of one granularity)."""
    features = [model_features(s) for s in clean_signals]
    return {
        "features": fit_reference(features),
        "threshold": fit_threshold(features),
        "fitted_on": list(names),
        "command": command,
    }
