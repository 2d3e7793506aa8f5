"""AdaRound (Nagel et al. 2020): Adam on soft rounding variables over the layer's reconstruction loss.

The loss is the quadratic form of moments.py, so a step costs O(out * in * rank), independent of the
number of calibration images.  A rectified sigmoid h(V) relaxes each decision u in {0, 1}; the
regulariser 1 - |2h - 1|^beta, annealed from beta 20 to 2 after a warm-up, drives h to 0 or 1.
What EFRAP adds over this (a pull towards the flipped nearest decisions) is in efrap.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import RoundingOptions
from .method import LayerContext, RoundingMethod
from .problem import LayerProblem, LayerResult, hard_weight, layer_result, nearest_error, reconstruction_error

DEFAULT_ITERS = 1000
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's defaults)
WARMUP = 0.2  # fraction of steps without the regulariser


def learning_rate(lr: float | None, iters: int) -> float:
    """An explicit `lr`, else the official 1e-3 over 10,000 steps spread over `iters` steps."""
    return lr if lr is not None else 1e-3 * 10000 / max(iters, 1)


@dataclass(frozen=True)
class AdaRound(RoundingMethod):
    name: ClassVar[str] = "adaround"
    corrects_bias: ClassVar[bool] = True

    iters: int = DEFAULT_ITERS
    lr: float | None = None
    reg_weight: float = 3.0  # relative to nearest rounding's error
    beta: float | None = None  # None: annealed 20 -> 2 after warmup

    @classmethod
    def from_options(cls, options: RoundingOptions) -> AdaRound:
        iters = DEFAULT_ITERS if options.iters is None else options.iters
        return cls(iters, options.lr, options.reg_weight, options.beta)

    def params(self) -> dict:
        lr = learning_rate(self.lr, self.iters)
        return {"method": self.name, "iters": self.iters, "lr": lr, "reg_weight": self.reg_weight, "beta": self.beta}

    def solve(self, problem: LayerProblem, ctx: LayerContext) -> LayerResult:
        """Hard decisions and their error relative to nearest (so flip ratio and error compare across methods)."""
        base = nearest_error(problem)
        up, err = adaround(problem, self, base, ctx.seed)
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


def adaround(problem: LayerProblem, config: AdaRound, base: float, seed: int) -> tuple[torch.Tensor, float]:
    """Adam on the soft rounding variables; returns hard decisions and their error relative to nearest."""
    torch.manual_seed(seed)
    zeta, gamma = ZETA, GAMMA
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
    opt = torch.optim.Adam([v], lr=learning_rate(config.lr, config.iters))
    qmin, qmax = problem.bounds(dtype)
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


def _beta(config: AdaRound, step: int) -> float | None:
    start = int(WARMUP * config.iters)
    if step < start:
        return None
    if config.beta is not None:
        return config.beta
    t = (step - start) / max(config.iters - start, 1)
    return 2 + 0.5 * (20 - 2) * (1 + math.cos(t * math.pi))
