"""One layer's rounding problem in canonical form, and how a decision set is scored.

Shared by the solvers (efrap.py, adaround.py, official.py) so that every method's error and flip
count mean the same thing: errors are relative to nearest rounding's, flips count changed integers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..scheme import Grid
from .moments import Moments


@dataclass
class LayerProblem:
    """A layer in canonical form: rows are output channels (the per-channel axis)."""

    weight: torch.Tensor  # (out, d) FP weight, float64
    scale: torch.Tensor  # (out, 1) float64
    floor: torch.Tensor  # (out, d) floor(w/s), float64
    nearest_up: torch.Tensor  # (out, d) 0/1, what nearest rounding picks above floor
    grid: Grid
    groups: int
    moments: Moments | None
    # per-element integer bounds (out, d) where they differ (block-wise zero points: [-zp, 15 - zp]);
    # None: the grid's [qmin, qmax] everywhere
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    block_size: int | None = None  # columns per scale block (block-wise int4); None: one scale per row

    def bounds(self, dtype: torch.dtype | None = None) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The integer bounds `torch.clamp` takes: the grid's, or the per-element ones in `dtype`."""
        if self.lower is None or self.upper is None:
            return self.grid.qmin, self.grid.qmax
        return self.lower.to(dtype or self.lower.dtype), self.upper.to(dtype or self.upper.dtype)

    def clamp(self, q: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds(q.dtype)
        return torch.clamp(q, lo, hi)


@dataclass
class LayerReport:
    """A layer's evidence in the metadata and the checkpoint: how far the rounding left nearest's."""

    name: str
    weight: str
    shape: tuple[int, ...]
    flip_ratio: float
    error: float
    strength: float


@dataclass
class LayerResult:
    up: np.ndarray  # (out, d) uint8 decisions
    flip_ratio: float
    error: float  # reconstruction error of the chosen rounding, relative to nearest
    strength: float


def reconstruction_error(problem: LayerProblem, w_q: torch.Tensor) -> torch.Tensor:
    """E||W~ x~ - W x||^2 from the moments (summed over output channels), exact."""
    m = problem.moments
    g = problem.groups
    delta = (w_q - problem.weight).reshape(g, -1, w_q.shape[-1]).to(m.A.dtype)
    return ((delta @ m.A) * delta).sum() + 2 * (delta * m.Q).sum() + m.const


def nearest_error(problem: LayerProblem) -> float:
    """Nearest rounding's reconstruction error: the unit every method's error is reported in."""
    return max(float(reconstruction_error(problem, hard_weight(problem, problem.nearest_up))), 1e-30)


def hard_weight(problem: LayerProblem, up: torch.Tensor) -> torch.Tensor:
    return problem.clamp(problem.floor + up) * problem.scale


def layer_result(problem: LayerProblem, up: torch.Tensor, err: float, strength: float) -> LayerResult:
    # count changed integers: a decision clamped at the grid edge changes nothing
    q = problem.clamp(problem.floor + up)
    flips = (q != problem.clamp(problem.floor + problem.nearest_up)).double().mean().item()
    return LayerResult(up.to(torch.uint8).cpu().numpy(), flips, err, strength)
