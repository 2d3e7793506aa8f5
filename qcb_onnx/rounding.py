"""Rounding decisions for one layer: nearest, AdaRound and EFRAP.

Each quantized weight is floor(w/s) + u with u in {0, 1}.  Nearest picks u by |w/s - q|;
AdaRound learns u to preserve the layer's output; EFRAP (Li et al., CVPR 2024) adds an
error-guided term that pulls every u towards the *flipped* nearest decision, weighted by the
truncation error, because a quantization-conditioned backdoor lives in the nearest pattern.

How hard to pull is the crux (see docs/efrap.md §5: one fixed coefficient disarms one attack and
wrecks another model).  We normalise the loss so that nearest rounding's reconstruction error is
1, and by default search, per layer, for the strongest flipping pull whose hard result still
reconstructs the clean calibration activations at least as well as nearest rounding does
(`error_budget`).  That criterion needs no trigger and no knowledge of the attack: a rounding
that is as faithful as nearest on clean data but as far from nearest as possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .moments import Moments
from .scheme import Grid

METHODS = ("efrap", "adaround", "nearest", "efrap-official")
STRENGTH_GRID = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)


@dataclass(frozen=True)
class RoundingConfig:
    method: str = "efrap"
    iters: int = 1000
    lr: float | None = None  # None: 1e-3 * 10000 / iters (the official step budget spread over fewer steps)
    strength: float | None = None  # EFRAP flip coefficient; None: per-layer search (auto)
    error_budget: float = 0.25  # auto: share of the gap AdaRound-error -> nearest-error flips may spend
    reg_weight: float = 3.0  # rounding regulariser weight, relative to nearest rounding's error
    beta: float | None = None  # None: EFRAP fixed 2, AdaRound annealed 20 -> 2
    zeta: float | None = None  # None: EFRAP 1.0, AdaRound 1.1
    gamma: float | None = None  # None: EFRAP 0.0, AdaRound -0.1
    guide: str = "element"  # element-wise |e| (official code) or neuron-wise ||e_i|| (paper)
    warmup: float = 0.2  # AdaRound: fraction of steps without the regulariser
    anneal: bool | None = None  # beta 20 -> 2 after warmup; None: AdaRound yes, EFRAP no (official)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1e-3 * 10000 / max(self.iters, 1)

    def soft_params(self) -> tuple[float, float]:
        if self.method == "adaround":
            return (1.1 if self.zeta is None else self.zeta), (-0.1 if self.gamma is None else self.gamma)
        return (1.0 if self.zeta is None else self.zeta), (0.0 if self.gamma is None else self.gamma)


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


def hard_weight(problem: LayerProblem, up: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(problem.floor + up, problem.grid.qmin, problem.grid.qmax)
    return q * problem.scale


def solve(problem: LayerProblem, config: RoundingConfig, seed: int = 0) -> LayerResult:
    nearest = problem.nearest_up
    if config.method == "nearest":
        return LayerResult(nearest.to(torch.uint8).cpu().numpy(), 0.0, 1.0, 0.0)
    base = float(reconstruction_error(problem, hard_weight(problem, nearest)))
    base = max(base, 1e-30)
    objective = Objective.build(problem)
    if config.method == "adaround":
        up, err = _optimise(problem, config, 0.0, base, seed, objective)
        return layer_result(problem, up, err, 0.0)
    if config.strength is not None:
        up, err = _optimise(problem, config, config.strength, base, seed, objective)
        return layer_result(problem, up, err, config.strength)
    # auto: the best reconstruction AdaRound finds (E0) anchors the budget between it and nearest (1.0)
    ada = replace(config, method="adaround", strength=0.0, beta=None, zeta=None, gamma=None)
    up0, err0 = _optimise(problem, ada, 0.0, base, seed, objective)
    budget = min(err0, 1.0) + config.error_budget * max(1.0 - err0, 0.0)
    best = (up0, err0, 0.0)
    lo, hi = 0, len(STRENGTH_GRID) - 1  # STRENGTH_GRID is descending: binary search for the strongest pull
    while lo <= hi:
        mid = (lo + hi) // 2
        up, err = _optimise(problem, config, STRENGTH_GRID[mid], base, seed, objective)
        if err <= budget:
            best = (up, err, STRENGTH_GRID[mid])
            hi = mid - 1
        else:
            lo = mid + 1
    return layer_result(problem, *best)


def layer_result(problem: LayerProblem, up: torch.Tensor, err: float, strength: float) -> LayerResult:
    g = problem.grid  # count changed integers: a decision clamped at the grid edge changes nothing
    q = torch.clamp(problem.floor + up, g.qmin, g.qmax)
    flips = (q != torch.clamp(problem.floor + problem.nearest_up, g.qmin, g.qmax)).double().mean().item()
    return LayerResult(up.to(torch.uint8).cpu().numpy(), flips, err, strength)


@dataclass
class Objective:
    """The reconstruction error as a function of the rounding perturbation D = W~ - W (see moments.py):

        E||W~ x~ - W x||^2 = ||D L||^2 + 2 <D, Q> + c,   L L' ~ A

    L keeps the leading eigen-directions of A holding all but `tol` of its trace, so a step costs
    O(out * in * rank) instead of O(out * in^2); the perturbation is small and spread over all
    directions, so the relative error of the truncation is about `tol`."""

    L: torch.Tensor  # (g, d, k)
    Q: torch.Tensor  # (g, out/g, d)
    const: float

    @classmethod
    def build(cls, problem: LayerProblem, tol: float = 1e-4, dtype=torch.float32) -> Objective:
        m = problem.moments
        evals, evecs = torch.linalg.eigh(m.A)  # ascending
        evals = evals.clamp_min(0.0).flip(-1)
        evecs = evecs.flip(-1)
        share = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-300)
        k = int((share < 1 - tol).sum(-1).max()) + 1
        L = evecs[..., :k] * evals[..., :k].sqrt().unsqueeze(-2)
        return cls(L.to(dtype), m.Q.to(dtype), m.const)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        return (delta @ self.L).pow(2).sum() + 2 * (delta * self.Q).sum() + self.const


def _optimise(
    problem: LayerProblem,
    config: RoundingConfig,
    strength: float,
    base: float,
    seed: int,
    objective: Objective | None = None,
) -> tuple[torch.Tensor, float]:
    """Adam on the soft rounding variables; returns hard decisions and their relative error."""
    torch.manual_seed(seed)
    zeta, gamma = config.soft_params()
    objective = objective or Objective.build(problem)
    dtype = torch.float32
    g = problem.groups
    out, d = problem.weight.shape
    w = problem.weight.to(dtype).reshape(g, out // g, d)
    scale = problem.scale.to(dtype)
    floor = problem.floor.to(dtype)
    frac = (problem.weight / problem.scale - problem.floor).clamp(0.0, 1.0)
    # init so that the soft weight equals the FP weight: h(V) = frac
    p = ((frac - gamma) / (zeta - gamma)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).to(dtype).requires_grad_(True)
    flipped = (1.0 - problem.nearest_up).to(dtype)
    err_elem = (frac - problem.nearest_up).abs()  # |e| in units of the scale
    if config.guide == "neuron":
        err_elem = err_elem.norm(dim=1, keepdim=True).expand_as(err_elem)
    guide = (err_elem / err_elem.sum().clamp_min(1e-12)).to(dtype)
    opt = torch.optim.Adam([v], lr=config.learning_rate)
    qmin, qmax = problem.grid.qmin, problem.grid.qmax
    n = v.numel()
    for step in range(config.iters):
        h = torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)
        wq = (torch.clamp(floor + h, qmin, qmax) * scale).reshape(g, out // g, d)
        loss = objective(wq - w) / base
        if strength > 0:
            bce = torch.nn.functional.binary_cross_entropy(h.clamp(1e-6, 1 - 1e-6), flipped, reduction="none")
            loss = loss + strength * (guide * bce).sum()
        beta = _beta(config, step)
        if beta is not None:
            loss = loss + config.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum() / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        soft = torch.sigmoid(v) * (zeta - gamma) + gamma
        up = (soft >= 0.5).double()
        err = float(reconstruction_error(problem, hard_weight(problem, up))) / base
    return up, err


def _beta(config: RoundingConfig, step: int) -> float | None:
    anneal = config.method == "adaround" if config.anneal is None else config.anneal
    if anneal:
        start = int(config.warmup * config.iters)
        if step < start:
            return None
        if config.beta is not None:
            return config.beta
        t = (step - start) / max(config.iters - start, 1)
        return 2 + 0.5 * (20 - 2) * (1 + math.cos(t * math.pi))
    return 2.0 if config.beta is None else config.beta
