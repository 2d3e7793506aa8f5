"""Rounding decisions for one layer: which method solves it, and AdaRound's Adam solver.

Each quantized weight is floor(w/s) + u with u in {0, 1}.  Nearest picks u by |w/s - q|;
AdaRound (Nagel et al. 2020) learns u to preserve the layer's output; EFRAP (Li et al., CVPR 2024)
adds an error-guided pull of every u towards the *flipped* nearest decision, because a
quantization-conditioned backdoor lives in the nearest pattern.  EFRAP is solved in one pass per
strength by sequential rounding with error feedback (sequential.py); the official schedule, hours
of Adam per model, is kept as the reference (official.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .problem import LayerProblem, LayerResult, hard_weight, layer_result, reconstruction_error
from .sequential import solve_efrap

METHODS = ("efrap", "adaround", "nearest", "efrap-official")


@dataclass(frozen=True)
class RoundingConfig:
    method: str = "efrap"
    # EFRAP (sequential.py)
    strength: float | None = None  # flip coefficient; None: per-layer search within error_budget
    error_budget: float = 0.25  # share of the error gap (no pull -> nearest) that flipping may spend
    guide: str = "element"  # element-wise |e| (official code) or neuron-wise ||e_i|| (paper)
    # Adam: AdaRound (here) and efrap-official (official.py)
    iters: int = 1000
    lr: float | None = None  # None: 1e-3 * 10000 / iters (the official step budget spread over fewer steps)
    reg_weight: float = 3.0  # AdaRound's rounding regulariser weight, relative to nearest rounding's error
    beta: float | None = None  # None: annealed 20 -> 2 after warmup
    zeta: float = 1.1
    gamma: float = -0.1
    warmup: float = 0.2  # fraction of steps without the regulariser
    anneal: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1e-3 * 10000 / max(self.iters, 1)


def solve(problem: LayerProblem, config: RoundingConfig, seed: int = 0) -> LayerResult:
    """One layer's decisions; every method's error is relative to nearest rounding's, so the per-layer
    evidence written into the model (flip ratio, error) compares across methods and layers."""
    nearest = problem.nearest_up
    if config.method == "nearest":
        return LayerResult(nearest.to(torch.uint8).cpu().numpy(), 0.0, 1.0, 0.0)
    base = max(float(reconstruction_error(problem, hard_weight(problem, nearest))), 1e-30)
    if config.method == "efrap":
        return layer_result(problem, *solve_efrap(problem, config.strength, config.error_budget, config.guide, base))
    up, err = adaround(problem, config, base, seed)
    return layer_result(problem, up, err, 0.0)


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


def adaround(problem: LayerProblem, config: RoundingConfig, base: float, seed: int) -> tuple[torch.Tensor, float]:
    """Adam on the soft rounding variables; returns hard decisions and their error relative to nearest."""
    torch.manual_seed(seed)
    zeta, gamma = config.zeta, config.gamma
    objective = Objective.build(problem)
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
    opt = torch.optim.Adam([v], lr=config.learning_rate)
    qmin, qmax = problem.grid.qmin, problem.grid.qmax
    n = v.numel()
    for step in range(config.iters):
        h = torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)
        wq = (torch.clamp(floor + h, qmin, qmax) * scale).reshape(g, out // g, d)
        loss = objective(wq - w) / base
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
    if config.anneal:
        start = int(config.warmup * config.iters)
        if step < start:
            return None
        if config.beta is not None:
            return config.beta
        t = (step - start) / max(config.iters - start, 1)
        return 2 + 0.5 * (20 - 2) * (1 + math.cos(t * math.pi))
    return 2.0 if config.beta is None else config.beta
