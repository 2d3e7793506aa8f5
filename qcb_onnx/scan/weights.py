"""Weight-only signals of one layer under one victim grid: where the FP weights sit in their rounding bins.

A QCB lives in the gap between W and its nearest-rounded grid value s * round(W / s): the attacker
needs that gap large and coordinated where the backdoor is.  PQBackdoor's projected stage 2 pushes
weights against their bin edges (|e| -> 0.5 - margin, Ma et al. 2023); Qu-ANTI-zation and
CompArtifact train the FP and the quantized model apart, which shows as truncation errors larger
than chance, concentrated in some output channels (EFRAP's observation, Li et al. 2024 §3).  In a
clean model trained without the victim's grid in mind the fractional part of W / s is close to
uniform, so e = W / s - round(W / s) is uniform on [-1/2, 1/2]: |e| uniform on [0, 1/2], E[e^2] = 1/12.
Every signal here is measured against that null, so it needs no clean model of the same architecture;
the scanner's reference (score.py) then absorbs what real clean models deviate from it.

An attacker who needs wider bins inflates the scale instead (this project's bin widening,
redteam/common.py: one anchor weight per channel at K times the natural absmax); that shows as the
largest |w| of a channel far above the second largest (`anchor_ratio`, BENCHMARKS.md §1's audit).
"""

from __future__ import annotations

import numpy as np

from ..plan import Layer
from ..rounding.layers import canonical
from ..scheme import Grid, scaled

HIST_BINS = 20  # bins of |e| over [0, 1/2] kept for the report
BOUNDARY = 0.4  # |e| above it: within 0.1 of a rounding boundary (uniform null: 20 % of weights)
E2_MEAN, E2_VAR = 1 / 12, 1 / 80 - 1 / 144  # mean and variance of e^2 for e uniform on [-1/2, 1/2]
NEURON_Z = 4.0  # an output channel whose mean e^2 is this many null standard errors high is an outlier


def _anchor_ratios(rows: np.ndarray) -> tuple[float, float]:
    """(median over channels of largest / second-largest |w|, the same over the whole tensor)."""
    mags = np.abs(rows)
    if mags.shape[1] < 2:
        return 1.0, 1.0
    top = np.partition(mags, mags.shape[1] - 2, axis=1)[:, -2:]
    per_channel = float(np.median(top[:, 1] / np.maximum(top[:, 0], 1e-30)))
    flat = np.partition(mags.ravel(), mags.size - 2)[-2:]
    return per_channel, float(flat[1] / max(flat[0], 1e-30))


def layer_signals(w: np.ndarray, scale: np.ndarray, axis: int | None, layer: Layer, grid: Grid) -> dict:
    """Fractional-part and truncation-error statistics of one weight under ORT's grid (`scale`, `axis`).

    Weights that are exactly 0 or lie beyond the grid (clipped, no rounding choice) are left out:
    a pruned model's zeros would otherwise read as a pile at the bin centre."""
    q = scaled(w, scale, axis).astype(np.float64)
    e = q - np.round(q)
    valid = (w != 0) & (q >= grid.qmin - 0.5) & (q <= grid.qmax + 0.5)
    rows_e, rows_ok = canonical(e, layer), canonical(valid, layer)
    a = np.abs(e[valid])
    n = int(a.size)
    hist = np.histogram(a, bins=HIST_BINS, range=(0.0, 0.5))[0].astype(np.float64)
    density = hist / max(n, 1) * HIST_BINS  # 1.0 everywhere under the uniform null
    cdf = np.concatenate([[0.0], np.cumsum(np.histogram(a, bins=100, range=(0.0, 0.5))[0]) / max(n, 1)])
    ks = float(np.max(np.abs(cdf - np.linspace(0.0, 1.0, 101))))
    counts = rows_ok.sum(axis=1)
    e2 = np.where(rows_ok, rows_e**2, 0.0).sum(axis=1) / np.maximum(counts, 1)
    z = (e2 - E2_MEAN) / np.sqrt(E2_VAR / np.maximum(counts, 1))
    z = z[counts > 0]
    per_channel, per_tensor = _anchor_ratios(canonical(w, layer))
    return {
        "n": n,
        "frac_hist": [round(float(v), 4) for v in density],
        "boundary_excess": float(np.mean(a > BOUNDARY) / (1 - 2 * BOUNDARY)) if n else 1.0,
        "ks": ks,
        "err_rms": float(np.sqrt(np.mean(a**2) / E2_MEAN)) if n else 1.0,
        "neuron_z_max": float(z.max()) if z.size else 0.0,
        "neuron_outliers": float(np.mean(z > NEURON_Z)) if z.size else 0.0,
        "anchor_ratio_channel": per_channel,
        "anchor_ratio_tensor": per_tensor,
    }
