"""Activation ranges and weight scales.

Activation ranges are observed on the FP model over the calibration set, per tensor, as ORT's
calibrators do (MinMax by default).  Percentile and MSE work on a bounded, seeded random sample of
each tensor's values, so memory stays flat however much calibration data is given.
Weight scales follow `scheme` exactly (ORT's symmetric MinMax), per channel or per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from .capture import GraphModule
from .errors import CalibrationDataError
from .plan import QuantPlan
from .quantsim import ActQuant
from .scheme import Grid, activation_grid, activation_params

SAMPLE_PER_TENSOR = 1 << 18
# Largest |value| a layer input may take.  The reconstruction's second moments sum products of
# inputs and of their errors in float32 over thousands of rows per batch: beyond this they overflow
# (a bit flip or a hostile calibration set, never a trained model's activations).
MAX_LAYER_INPUT = 1e8


class RangeObserver:
    """Running min/max plus a bounded uniform sample of values of one tensor."""

    def __init__(self, keep_sample: bool, rng: np.random.Generator) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.keep_sample = keep_sample
        self.rng = rng
        self.chunks: list[np.ndarray] = []
        self.finite = True

    def update(self, value: torch.Tensor) -> None:
        v = value.detach().float().reshape(-1)
        if v.numel() == 0:
            return
        lo, hi = (float(t) for t in torch.aminmax(v))  # one pass; NaN and inf propagate into them
        self.finite = self.finite and math.isfinite(lo) and math.isfinite(hi)
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
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


def observe(
    gm: GraphModule,
    tensors: set[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    sampled: set[str] = frozenset(),
    rng: np.random.Generator | None = None,
) -> dict[str, RangeObserver]:
    """Run the FP model over every batch and observe `tensors` (a value sample for `sampled` ones)."""
    observers = {t: RangeObserver(t in sampled, rng) for t in tensors}

    def see(name: str, value: torch.Tensor) -> torch.Tensor:
        obs = observers.get(name)
        if obs is not None:
            obs.update(value)
        return value

    with torch.no_grad():
        for feeds in batches:
            gm.run(feeds, on_tensor=see)
    return observers


def check_magnitudes(gm: GraphModule, plan: QuantPlan, observers: dict[str, RangeObserver]) -> None:
    """Refuse calibration data that overflows: any observed tensor reaching inf or NaN, a layer input
    beyond MAX_LAYER_INPUT.  Names the first such tensor in graph order."""
    inputs = {layer.input: layer.node for layer in plan.layers}
    for name in sorted(observers, key=lambda t: -1 if gm.producer(t) is None else gm.producer(t)):
        obs = observers[name]
        if not obs.finite:
            raise CalibrationDataError(
                f"calibration data overflows tensor '{name}' to inf or NaN in float32; check its scale"
            )
        peak = max(abs(obs.min), abs(obs.max))
        if name in inputs and peak > MAX_LAYER_INPUT:
            raise CalibrationDataError(
                f"calibration data drives tensor '{name}' (input of layer '{inputs[name]}') to {peak:.3g}; "
                f"beyond {MAX_LAYER_INPUT:g} the reconstruction's float32 sums overflow: check its scale"
            )


def check_calibration(gm: GraphModule, plan: QuantPlan, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
    """`check_magnitudes` on every layer input, for a weight-only run (which calibrates nothing)."""
    check_magnitudes(gm, plan, observe(gm, {layer.input for layer in plan.layers}, batches))


def calibrate_activations(
    gm: GraphModule,
    plan: QuantPlan,
    batches: Iterable[Mapping[str, torch.Tensor]],
    a_bits: int,
    method: str = "minmax",
    percentile: float = 99.999,
    seed: int = 0,
    headroom: float = 1.0,
    symmetric: bool = False,
) -> dict[str, ActQuant]:
    """Observe every planned activation on the FP model and turn ranges into (scale, zero_point);
    the same pass checks every layer input's magnitude (`check_magnitudes`).

    `headroom` stretches each observed range away from zero before it becomes a grid.  Ranges
    observed on clean calibration data clip whatever a trigger drives beyond them, and that clipping
    is a quantization-only nonlinearity a backdoor can ride on (BENCHMARKS.md §2): headroom keeps
    such values on the grid at the price of log2(headroom) bits of activation resolution."""
    grid = activation_grid(a_bits, symmetric)
    sources = {plan.stats_source.get(t, t) for t in plan.activations}
    sampled = sources if method != "minmax" else set()
    layer_inputs = {layer.input for layer in plan.layers}
    observers = observe(gm, sources | layer_inputs, batches, sampled, np.random.default_rng(seed))
    check_magnitudes(gm, plan, observers)
    ranges = {}
    for name in sources:
        obs = observers[name]
        if method == "minmax":
            ranges[name] = (obs.min, obs.max)
        elif method == "percentile":
            ranges[name] = _percentile_range(obs, percentile)
        else:
            ranges[name] = _mse_range(obs, grid)
    storage = activation_grid(8, symmetric)
    acts = {}
    for t in plan.activations:
        rmin, rmax = ranges[plan.stats_source.get(t, t)]
        ort_scale, _ = activation_params(rmin, rmax, grid)
        scale, zp = activation_params(min(rmin, 0.0) * headroom, max(rmax, 0.0) * headroom, grid)
        acts[t] = ActQuant(scale, zp, storage if t in plan.pass_through else grid, ort_scale)
    return acts
