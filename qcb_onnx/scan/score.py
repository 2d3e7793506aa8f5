"""From raw per-layer signals to model features, robust z-scores against clean models, and the verdict.

Each model feature (one number per signal and victim bit width, `model_features`) is compared with
the same feature on clean models: z = (x - median) / scale, the scale 1.4826 x the median absolute
deviation, never below the feature's resolution floor (`FEATURES`: what a measurement on a few
hundred calibration images or a handful of layers cannot resolve; without it a feature on which the
clean models happen to agree would turn any difference into a huge z).  Features whose attacked
direction follows from the mechanism count one-sided (only "more than clean" is suspicious); the
behavioural ones, where an attacker could as well make the quantized model too good as too bad,
count both ways.  The model's score is its largest z over the `SCORED` features: "its most abnormal
signal lies this many clean spreads away from clean models".  The two-sided behavioural features
(disagreement and logit shift of nearest against FP32, and of nearest against EFRAP), the error
concentration and the trigger search's raw divergence (`trigger`; `trigger_target`, what makes that
divergence a backdoor, is scored: trigger.py) are reported but not scored: among clean models alone
they vary with the architecture more than anything else (leave-one-out, a clean SmallCNN sat 13
clean spreads from clean AlexNets in nearest-vs-EFRAP disagreement; the concentration spans a factor
2.3 over eight clean models; a fragile clean AlexNet's raw divergence sat 9 spreads out; README
"Scanning"), so a threshold on them would flag clean architectures it was not fitted on.  The verdict is
"suspicious" when the score exceeds the threshold, fitted on clean models only (`fit_reference`,
`fit_threshold`); no trigger, target or attacked model is involved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Feature:
    description: str
    two_sided: bool  # True: deviation either way is suspicious
    floor: float  # smallest spread the reference may use, in the feature's units


FEATURES: dict[str, Feature] = {
    "boundary": Feature("weights within 0.1 of a rounding boundary, over the uniform null's 20 %", False, 0.02),
    "ks": Feature("Kolmogorov-Smirnov distance of |e| from uniform on [0, 1/2]", False, 0.005),
    "err_rms": Feature("RMS truncation error over the uniform null's sqrt(1/12)", False, 0.01),
    "neuron_outliers": Feature("share of output channels whose mean e^2 is > 4 null SE high", False, 0.005),
    "anchor": Feature("log2 of the largest max/second |w| ratio over layers (scale anchors)", False, 0.1),
    "concentration": Feature("log2 of nearest's output-error share in the top 5 % channels, layer mean", False, 0.05),
    "trigger": Feature("FP32 vs nearest total variation gained by the best universal 7 %-area stamp", False, 0.02),
    "trigger_target": Feature("stamped images nearest sends to one class, beyond FP32 and unstamped", False, 0.05),
    "disagree_nearest": Feature("% of calibration images where nearest's top-1 differs from FP32's", True, 0.5),
    "logit_shift_nearest": Feature("log10 of nearest's relative logit shift from FP32", True, 0.05),
}
CHEAP = ("boundary", "ks", "err_rms", "neuron_outliers", "anchor")  # no model run needed
SCORED = (*CHEAP, "trigger_target")


def _weighted(layers: Sequence[dict], key: str) -> float:
    n = np.array([max(layer["n"], 1) for layer in layers], dtype=np.float64)
    return float(np.sum(n * np.array([layer[key] for layer in layers])) / n.sum())


def bit_features(layers: Sequence[dict], model: dict, per_channel: bool) -> dict[str, float]:
    """The model features of one victim bit width from its per-layer signals and model-level ones."""
    if not layers:
        return {}
    out = {k: _weighted(layers, k) for k in ("boundary_excess", "ks", "err_rms", "neuron_outliers")}
    out["boundary"] = out.pop("boundary_excess")
    ratio = "anchor_ratio_channel" if per_channel else "anchor_ratio_tensor"
    out["anchor"] = math.log2(max(max(layer[ratio] for layer in layers), 1.0))
    conc = [layer["concentration_nearest"] for layer in layers if "concentration_nearest" in layer]
    if conc:
        out["concentration"] = float(np.mean(np.log2(conc)))
    if "disagree_nearest" in model:
        out["disagree_nearest"] = model["disagree_nearest"]
    if "trigger_tv" in model:
        out["trigger"] = model["trigger_tv"] - model["clean_tv"]
        out["trigger_target"] = model["target_share"] - max(model["target_share_fp"], model["target_share_clean"])
    if "logit_shift_nearest" in model:
        out["logit_shift_nearest"] = math.log10(max(model["logit_shift_nearest"], 1e-6))
    return out


def model_features(signals: dict) -> dict[str, float]:
    """Every feature of a scan's raw signals, keyed ``name@w<bits>``."""
    out = {}
    for bits, sig in signals["bits"].items():
        for name, value in bit_features(sig["layers"], sig.get("model", {}), signals["per_channel"]).items():
            out[f"{name}@w{bits}"] = value
    return out


def _base(key: str) -> str:
    return key.split("@")[0]


def fit_reference(clean: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and robust spread of every feature over clean models' feature dicts."""
    clean = list(clean)
    keys = sorted({k for f in clean for k in f if _base(k) in FEATURES})
    ref = {}
    for key in keys:
        values = np.array([f[key] for f in clean if key in f], dtype=np.float64)
        med = float(np.median(values))
        mad = float(np.median(np.abs(values - med))) * 1.4826
        ref[key] = {"median": med, "scale": max(mad, FEATURES[_base(key)].floor), "n": int(values.size)}
    return ref


def z_scores(features: dict[str, float], reference: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each feature's z against the reference; one-sided ones clipped at 0 from below."""
    out = {}
    for key, value in features.items():
        ref = reference.get(key)
        if ref is None:
            continue
        z = (value - ref["median"]) / ref["scale"]
        out[key] = abs(z) if FEATURES[_base(key)].two_sided else max(z, 0.0)
    return out


def combined(z: dict[str, float], only: Sequence[str] = SCORED) -> tuple[float, str | None]:
    """The score (largest z over the features named in `only`) and the feature it came from."""
    items = [(v, k) for k, v in z.items() if _base(k) in only]
    if not items:
        return 0.0, None
    value, key = max(items)
    return float(value), key


def loo_scores(clean: Sequence[dict[str, float]], only: Sequence[str] = SCORED) -> list[float]:
    """Each clean model's score against the reference fitted on the other clean models."""
    return [combined(z_scores(f, fit_reference(clean[:i] + clean[i + 1 :])), only)[0] for i, f in enumerate(clean)]


def fit_threshold(clean: Sequence[dict[str, float]], margin: float = 1.25, minimum: float = 3.0) -> float:
    """The verdict threshold from clean models alone: `margin` x the largest leave-one-out clean score
    (a clean model never seen in the fit is flagged only if it is that much stranger than any clean model
    was against the others), at least `minimum` clean spreads."""
    scores = loo_scores(list(clean))
    return round(max(minimum, margin * max(scores, default=0.0)), 3)
