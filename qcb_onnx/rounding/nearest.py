"""Nearest rounding: ORT's own integers (round half to even, then clip), the baseline a QCB targets."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..config import RoundingOptions
from .method import LayerContext, RoundingMethod
from .problem import LayerProblem, LayerResult


class Nearest(RoundingMethod):
    name: ClassVar[str] = "nearest"
    data: ClassVar[str] = "none"

    @classmethod
    def from_options(cls, options: RoundingOptions) -> Nearest:
        return cls()

    def solve(self, problem: LayerProblem, ctx: LayerContext) -> LayerResult:
        return LayerResult(problem.nearest_up.to(torch.uint8).cpu().numpy(), 0.0, 1.0, 0.0)
