"""What a rounding method is to the layer loop: a class that solves one layer and says what it needs.

Each quantized weight becomes floor(w/s) + u with u in {0, 1}; a method picks every u of one layer.
The layer loop (layers.py) owns the order of layers, the quantized prefix, checkpoints and the bias;
a method owns its defaults, its solver, and two facts the loop acts on:

* `data`: what the loop gathers from the calibration batches before `solve` ("none"; "moments",
  the second moments of the reconstruction loss, moments.py; or "samples", the raw (FP input,
  quantized-prefix input) pairs, for a method that runs its own data-driven optimisation);
* `corrects_bias`: whether the layer's bias then absorbs the mean output error of the chosen
  integers (moments.Moments.output_shift); nearest keeps ORT's bias with ORT's integers.

`round_model` is the model-level hook: one pass of the layer loop by default; the error-budget
search (budget.py) wraps EFRAP and runs several.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..plan import Layer, QuantPlan
from ..quantsim import QuantState
from .problem import LayerProblem, LayerReport, LayerResult

if TYPE_CHECKING:
    from ..capture import GraphModule
    from .layers import ModelRounder


@dataclass
class LayerContext:
    """What a method may read about the layer it solves, beyond its `LayerProblem`."""

    gm: GraphModule
    plan: QuantPlan
    layer: Layer
    weight_shape: tuple[int, ...]
    seed: int  # the run's seed plus the layer's position: a layer's randomness does not depend on order
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None  # data == "samples" only


@dataclass
class Rounded:
    """A whole model's rounding: the state to emit, per-layer evidence, the per-layer method that
    produced it (its `params()` go into the metadata) and, for EFRAP, how its error budget was set."""

    state: QuantState
    reports: list[LayerReport]
    method: RoundingMethod
    search: dict[str, Any] | None = field(default=None)


class RoundingMethod:
    name: ClassVar[str]
    data: ClassVar[str] = "moments"
    corrects_bias: ClassVar[bool] = False

    def solve(self, problem: LayerProblem, ctx: LayerContext) -> LayerResult:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The resolved parameters, for the metadata and the checkpoint fingerprint."""
        return {"method": self.name}

    def label(self) -> str:
        """The progress bar's label."""
        return f"{self.name} rounding"

    def round_model(self, rounder: ModelRounder) -> Rounded:
        state, reports = rounder.run(self)
        return Rounded(state, reports, self)
