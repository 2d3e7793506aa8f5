"""EFRAP (Li et al., CVPR 2024), solved by sequential rounding with error feedback, one pass per strength.

A quantization-conditioned backdoor lives in the nearest-rounding pattern, so EFRAP adds to the
activation-preservation loss an error-guided pull of every decision towards the *flipped* nearest
one, strongest where the truncation error |e| is largest.

Adam on soft rounding variables (the official schedule, official.py; AdaRound, adaround.py) pays a
step's cost thousands of times per layer, and a strength search multiplies that again: minutes to
hours for a 512-channel 3x3 conv on a laptop CPU.  The objective is a
quadratic form in the rounding perturbation D = W~ - W (moments.py) plus a pull towards the flipped
nearest decisions, so it can be minimised the way GPTQ/OBQ minimise theirs: complete the square,

    E(D) = (D - D*) A (D - D*)' + c',   D* = -Q A^-1   (the continuous optimum: W corrected for the
                                                         quantized prefix's input error),

then round one input column at a time towards the target W + D*, restricted to {floor, floor + 1}
of the FP weight (EFRAP's decision space), and spread each column's rounding error over the columns
not yet rounded through the upper Cholesky factor U of A^-1.  Choosing a column's value costs
s^2 (q - t)^2 / U_jj^2 of reconstruction error (the OBS error increase); the flip pull subtracts
`strength * guide * base` from the flipped choice, `guide` the official element-wise |e| normalised
to sum 1 and `base` nearest rounding's error (at strength 1, flipping every decision is worth as
much as nearest rounding's whole error).  One pass costs O(out * in^2 / 2) plus an O(in^3)
factorisation shared by all strengths: a whole strength search for the largest full-width
ResNet-18 layer takes a few seconds on a 2-core CPU (BENCHMARKS.md §5).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from ..config import RoundingOptions
from .budget import START, AutoBudget
from .method import LayerContext, Rounded, RoundingMethod
from .problem import LayerProblem, LayerResult, hard_weight, layer_result, nearest_error

BLOCK = 128  # columns per lazy update (GPTQ): the inner loop touches only the block


@dataclass(frozen=True)
class Efrap(RoundingMethod):
    name: ClassVar[str] = "efrap"
    corrects_bias: ClassVar[bool] = True

    strength: float | None = None  # flip coefficient; None: per-layer search within error_budget
    error_budget: float = START  # share of the error gap (no pull -> nearest) that flipping may spend
    guide: str = "auto"  # flip_guide's kind: auto, element (official code), neuron (paper) or block

    @classmethod
    def from_options(cls, options: RoundingOptions) -> Efrap | AutoBudget:
        """A fixed strength or budget as given; neither given: the per-model budget search wraps it."""
        budget = START if options.error_budget is None else options.error_budget
        efrap = cls(options.strength, budget, options.guide)
        return AutoBudget(efrap) if options.strength is None and options.error_budget is None else efrap

    def with_budget(self, budget: float) -> Efrap:
        return replace(self, error_budget=budget)

    def without_pull(self) -> Efrap:
        return replace(self, strength=0.0)

    def params(self) -> dict:
        return {"method": self.name, "strength": self.strength, "error_budget": self.error_budget, "guide": self.guide}

    def label(self) -> str:
        """Which of the budget search's passes is running, when it is one."""
        if self.strength is not None:
            return "efrap rounding, no pull (reference)" if self.strength == 0 else "efrap rounding"
        return f"efrap rounding, budget {self.error_budget:g}"

    def solve(self, problem: LayerProblem, ctx: LayerContext) -> LayerResult:
        base = nearest_error(problem)
        solved = solve_efrap(problem, self.strength, self.error_budget, self.guide, base, ctx.seed)
        return layer_result(problem, *solved)

    def round_model(self, rounder) -> Rounded:
        rounded = super().round_model(rounder)
        if self.strength is None:  # a fixed per-layer budget, recorded like the search's choice
            rounded.search = {"mode": "fixed", "chosen": self.error_budget}
        return rounded


def prepare(problem: LayerProblem, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target (g, o, d) in integer units, U (g, d, d) and each group's column order, once per layer."""
    m = problem.moments
    g = problem.groups
    out, d = problem.weight.shape
    A = m.A.double()
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    order = torch.argsort(diag, dim=-1, descending=True)  # largest input energy first (GPTQ's act-order)
    A = _columns(_columns(A, order).transpose(1, 2), order)
    chol = _damped_cholesky(A, diag.mean(-1).clamp_min(1e-12), damp)
    U = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    w = _columns(problem.weight.reshape(g, out // g, d), order)
    d_star = -torch.cholesky_solve(_columns(m.Q.double(), order).transpose(1, 2), chol).transpose(1, 2)  # -Q A^-1
    target = (w + d_star) / problem.scale[:, :1].reshape(g, out // g, 1)  # in units of the row's first scale
    return target, U, order


def _damped_cholesky(A: torch.Tensor, scale: torch.Tensor, damp: float) -> torch.Tensor:
    """Cholesky factor of A + damp * mean(diag A) * I (dead inputs, zero rows of A, stay solvable).
    Rounding error can leave a second-moment matrix slightly indefinite: then damp 10x harder, up
    to a ridge a thousand times the mean input energy, where any finite symmetric A is definite."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    while True:
        chol, info = torch.linalg.cholesky_ex(A + (damp * scale)[:, None, None] * eye)
        if not bool(info.any()) or damp >= 1e3:
            break
        damp *= 10
    if bool(info.any()) or not bool(torch.isfinite(chol).all()):
        raise ValueError("the layer's second-moment matrix is not finite")
    return chol


def _columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (g, rows, d) with each group's columns in its own order (g, d)."""
    return torch.take_along_dim(x, order[:, None, :], dim=2)


def round_pass(
    problem: LayerProblem,
    prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bonus: torch.Tensor | None,
) -> torch.Tensor:
    """One left-to-right pass; `bonus` (out, d) in error units favours the flipped decision.

    Between lo and hi = lo + 1, s^2 (t - hi)^2 / u^2 - s^2 (t - lo)^2 / u^2 < b_hi - b_lo reduces to
    t > (lo + hi) / 2 - (b_hi - b_lo) u^2 / (2 s^2): a threshold known before the pass, so the inner
    loop only compares, picks and feeds the error forward."""
    target, U, order = prepared
    g, o, d = target.shape
    t = target.clone()
    lo = _columns(problem.clamp(problem.floor).reshape(g, o, d), order)
    hi = _columns(problem.clamp(problem.floor + 1).reshape(g, o, d), order)
    threshold = (lo + hi) / 2
    diag = torch.diagonal(U, dim1=-2, dim2=-1)  # (g, d)
    # block-wise scales: column j's scale over the row's first, the unit t is kept in (None: one scale a row)
    rel = None
    if problem.scale.shape[1] > 1:
        rel = _columns((problem.scale / problem.scale[:, :1]).reshape(g, o, d), order)
    if bonus is not None:
        sign = 1.0 - 2.0 * problem.nearest_up  # +1 where the flipped decision is hi, -1 where lo
        s2 = problem.scale.pow(2)
        s2 = s2.reshape(g, o, 1) if rel is None else _columns(s2.reshape(g, o, d), order)
        shift = _columns((sign * bonus).reshape(g, o, d), order) / (2 * s2)
        threshold = threshold - shift * diag.pow(2)[:, None, :]
    inv_diag = 1.0 / diag
    up = torch.empty_like(t, dtype=torch.bool)
    for start in range(0, d, BLOCK):
        end = min(start + BLOCK, d)
        err = torch.empty(g, o, end - start, dtype=t.dtype, device=t.device)
        for j in range(start, end):
            tj = t[:, :, j]
            if rel is None:
                pick = tj > threshold[:, :, j]
                q = torch.where(pick, hi[:, :, j], lo[:, :, j])
            else:
                pick = tj / rel[:, :, j] > threshold[:, :, j]
                q = torch.where(pick, hi[:, :, j], lo[:, :, j]) * rel[:, :, j]
            up[:, :, j] = pick
            e = (tj - q) * inv_diag[:, j, None]
            err[:, :, j - start] = e
            if j + 1 < end:
                t[:, :, j + 1 : end] -= e.unsqueeze(-1) * U[:, j, None, j + 1 : end]
        if end < d:
            t[:, :, end:] -= err @ U[:, start:end, end:]
    result = torch.empty_like(up).scatter_(2, order[:, None, :].expand_as(up), up)
    return result.reshape(problem.weight.shape).to(problem.weight.dtype)


# an input column with less second moment than this share of its group's mean is one the calibration data
# (barely) never excites: any rounding of its weights costs under this share of a typical input's error, so
# the data does not choose it (how 1e-3 was chosen against 1e-9: BENCHMARKS.md §12)
UNSEEN = 1e-3


def unobserved(problem: LayerProblem) -> torch.Tensor | None:
    """(out, d) mask of the weights whose input is (about) zero on every calibration image, or None.

    A reconstruction cannot see these: any rounding of them costs nothing on the calibration data, so
    the data does not choose it.  An attacker who knows the rule does (redteam/dormant.py): nearest
    (and AdaRound, whose regulariser returns to nearest where no gradient reaches) keeps codes the
    attacker placed; EFRAP's free flips give the flipped codes, which the attacker can place too."""
    m = problem.moments
    if m is None:
        return None
    diag = torch.diagonal(m.A, dim1=-2, dim2=-1)  # (g, d)
    dead = diag <= UNSEEN * diag.mean(-1, keepdim=True).clamp_min(1e-300)
    if not bool(dead.any()):
        return None
    return dead.repeat_interleave(problem.weight.shape[0] // problem.groups, dim=0)


def diffuse_unobserved(problem: LayerProblem, dead: torch.Tensor, seed: int) -> torch.Tensor:
    """(out, d) decisions for the unobserved weights (`dead`; 0 elsewhere), by error diffusion along each
    row in a random column order from a random starting carry.  The carry stays in [-1/2, 1/2), so each
    row's codes over its unseen inputs sum to the FP32 weights' sum rounded up or down, up with
    probability its fraction (unbiased: rounding it to nearest would let the attacker choose the
    direction through that fraction); a trigger that wakes those inputs together moves an output by less
    than one code, in no direction the attacker can set, whatever rounding they planned for.  The order
    must be unknown too (one who knows it can interleave never-firing inputs that soak up the carry),
    so it is drawn from the run's seed and a digest of the layer's calibration statistics: the same
    inputs give the same integers, and nobody without the calibration set can predict them."""
    frac = (problem.weight / problem.scale - problem.floor).clamp(0.0, 1.0)
    energy = torch.diagonal(problem.moments.A, dim1=-2, dim2=-1).double().cpu().numpy()
    digest = hashlib.sha256(np.int64(seed).tobytes() + energy.tobytes()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    out, d = dead.shape
    order = torch.randperm(d, generator=gen).tolist()
    up = torch.zeros_like(frac)
    # a random starting carry: each row's sum is then rounded up with probability its fraction (unbiased),
    # not to nearest, whose direction the attacker would set through the fraction of the sum
    carry = (torch.rand(out, generator=gen, dtype=torch.float64) - 0.5).to(frac.dtype).to(frac.device)
    for j in order:
        rows = dead[:, j]
        if bool(rows.any()):
            pick = ((frac[:, j] + carry) >= 0.5).to(frac.dtype)
            up[:, j] = torch.where(rows, pick, up[:, j])
            carry = torch.where(rows, carry + frac[:, j] - pick, carry)
    return up


def flip_guide(err: torch.Tensor, kind: str, block_size: int | None = None) -> torch.Tensor:
    """Each decision's share of the flip pull, from the truncation errors |e| (out, d) in scale units.

    "element": |e| itself (the official code); "neuron": the row's norm ||e_i|| (the paper); "block":
    the norm over the weights that share one scale (a block-wise int4 block, else the row), so the pull
    is spent where a block's rounding is least certain as a whole; "auto" (the default): "block" on
    block-wise layers, where it cost the least perplexity at the same defense on our language models,
    "element" elsewhere, as measured on the CNN zoo (BENCHMARKS.md §11, §2).  Normalised to sum to 1."""
    if kind == "auto":
        kind = "element" if block_size is None else "block"
    if kind == "neuron" or (kind == "block" and block_size is None):
        err = err.norm(dim=1, keepdim=True).expand_as(err)
    elif kind == "block":
        out, d = err.shape
        n = -(-d // block_size)
        padded = torch.nn.functional.pad(err, (0, n * block_size - d)).reshape(out, n, block_size)
        err = padded.norm(dim=2).repeat_interleave(block_size, dim=1)[:, :d]
    return err / err.sum().clamp_min(1e-12)


def solve_efrap(
    problem: LayerProblem, strength: float | None, error_budget: float, guide_kind: str, base: float, seed: int = 0
) -> tuple[torch.Tensor, float, float]:
    """Hard decisions, their error relative to nearest and the strength used.

    With no fixed `strength`, the pass without pull anchors the budget E0 + error_budget * (1 - E0)
    between its error E0 and nearest's (1), and a bisection over log2 strength in [-10, 8] finds the
    strongest pull whose decisions stay within it: as far from nearest as clean reconstruction allows,
    with no trigger and no knowledge of the attack (docs/efrap.md §5).  Weights whose input the
    calibration data never excites are rounded by `diffuse_unobserved`, at every strength."""
    prepared = prepare(problem)
    m, g = problem.moments, problem.groups
    A, Q = m.A.float(), m.Q.float()
    frac = (problem.weight / problem.scale - problem.floor).clamp(0.0, 1.0)
    guide = flip_guide((frac - problem.nearest_up).abs(), guide_kind, problem.block_size)

    dead = unobserved(problem)
    diffused = None if dead is None else diffuse_unobserved(problem, dead, seed)  # the same at every strength

    def run(s: float) -> tuple[torch.Tensor, float]:
        up = round_pass(problem, prepared, None if s <= 0 else s * base * guide)
        if dead is not None:
            up = torch.where(dead, diffused.to(up.dtype), up)
        delta = (hard_weight(problem, up) - problem.weight).reshape(g, -1, up.shape[-1]).float()
        err = float(((delta @ A) * delta).double().sum() + 2 * (delta * Q).double().sum()) + m.const
        return up, err / base

    if strength is not None:
        return (*run(strength), strength)
    best = (*run(0.0), 0.0)
    budget = min(best[1], 1.0) + error_budget * max(1.0 - best[1], 0.0)
    lo, hi = -10.0, 8.0
    up, err = run(2.0**hi)
    if err <= budget:
        return up, err, 2.0**hi
    for _ in range(6):
        mid = (lo + hi) / 2
        up, err = run(2.0**mid)
        if err <= budget:
            best, lo = (up, err, 2.0**mid), mid
        else:
            hi = mid
    return best
