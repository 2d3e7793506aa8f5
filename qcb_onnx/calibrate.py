"""Activation ranges and weight scales.

Activation ranges are observed on the FP model over the calibration set, per tensor, as ORT's
calibrators do (MinMax by default).  Percentile and MSE work on a bounded, seeded random sample of
each tensor's values, so memory stays flat however much calibration data is given.
Weight scales follow `scheme` exactly (ORT's symmetric MinMax), per channel or per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .capture import GraphModule
from .plan import QuantPlan
from .quantsim import ActQuant
from .scheme import Grid, activation_grid, activation_params

SAMPLE_PER_TENSOR = 1 << 18


class RangeObserver:
    """Running min/max plus a bounded uniform sample of values of one tensor."""

    def __init__(self, keep_sample: bool, rng: np.random.Generator) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.keep_sample = keep_sample
        self.rng = rng
        self.chunks: list[np.ndarray] = []

    def update(self, value: torch.Tensor) -> None:
        v = value.detach().float().reshape(-1)
        if v.numel() == 0:
            return
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        if self.keep_sample:
            arr = v.cpu().numpy()
            # keep at most SAMPLE_PER_TENSOR values overall, subsampled evenly per batch
            take = min(arr.size, max(1, SAMPLE_PER_TENSOR // 16))
            self.chunks.append(self.rng.choice(arr, size=take, replace=False) if take < arr.size else arr.copy())
            if sum(c.size for c in self.chunks) > 2 * SAMPLE_PER_TENSOR:
                merged = np.concatenate(self.chunks)
                self.chunks = [self.rng.choice(merged, size=SAMPLE_PER_TENSOR, replace=False)]

    def sample(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(1, np.float32)


def _percentile_range(obs: RangeObserver, percentile: float) -> tuple[float, float]:
    values = obs.sample()
    lo, hi = np.percentile(values, [100.0 - percentile, percentile])
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def _mse_range(obs: RangeObserver, grid: Grid, steps: int = 64) -> tuple[float, float]:
    """Shrink [min, max] towards 0 and keep the range with the least quantization MSE on the sample."""
    values = torch.from_numpy(obs.sample().astype(np.float32))
    lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
    best, best_err = (lo, hi), np.inf
    for frac in np.linspace(1.0, 0.2, steps):
        rmin, rmax = lo * frac, hi * frac
        scale, zp = activation_params(rmin, rmax, grid)
        q = torch.clamp(torch.round(values / float(scale)) + zp, grid.qmin, grid.qmax)
        err = float(((q - zp) * float(scale) - values).pow(2).mean())
        if err < best_err:
            best, best_err = (rmin, rmax), err
    return best


def calibrate_activations(
    gm: GraphModule,
    plan: QuantPlan,
    batches: Iterable[Mapping[str, torch.Tensor]],
    a_bits: int,
    method: str = "minmax",
    percentile: float = 99.999,
    seed: int = 0,
    headroom: float = 1.0,
) -> dict[str, ActQuant]:
    """Observe every planned activation on the FP model and turn ranges into (scale, zero_point).

    `headroom` stretches each observed range away from zero before it becomes a grid.  Ranges
    observed on clean calibration data clip whatever a trigger drives beyond them, and that clipping
    is a quantization-only nonlinearity a backdoor can ride on (BENCHMARKS.md §2): headroom keeps
    such values on the grid at the price of log2(headroom) bits of activation resolution."""
    grid = activation_grid(a_bits)
    sources = {plan.stats_source.get(t, t) for t in plan.activations}
    rng = np.random.default_rng(seed)
    observers = {t: RangeObserver(method != "minmax", rng) for t in sources}

    def observe(name: str, value: torch.Tensor) -> torch.Tensor:
        obs = observers.get(name)
        if obs is not None:
            obs.update(value)
        return value

    with torch.no_grad():
        for feeds in batches:
            gm.run(feeds, on_tensor=observe)
    ranges = {}
    for name, obs in observers.items():
        if method == "minmax":
            ranges[name] = (obs.min, obs.max)
        elif method == "percentile":
            ranges[name] = _percentile_range(obs, percentile)
        else:
            ranges[name] = _mse_range(obs, grid)
    storage = activation_grid(8)
    acts = {}
    for t in plan.activations:
        rmin, rmax = ranges[plan.stats_source.get(t, t)]
        rmin, rmax = min(rmin, 0.0) * headroom, max(rmax, 0.0) * headroom
        scale, zp = activation_params(rmin, rmax, grid)
        acts[t] = ActQuant(scale, zp, storage if t in plan.pass_through else grid)
    return acts
