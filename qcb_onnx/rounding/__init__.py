"""The round stage: which integer each weight gets.  The one place a rounding method is chosen.

`method_for(options)` looks the method up in `METHODS` (one class each, owning its defaults and
what it needs from the data, method.py); EFRAP with neither a strength nor a budget given comes
back wrapped in the per-model error-budget search (budget.py).  `ModelRounder` (layers.py) is the
layer loop the method runs on; `method.round_model(rounder)` returns the model's `Rounded`.

Modules: problem (one layer in canonical form, scoring), moments (second moments of the
reconstruction loss), efrap / adaround / nearest / official (the methods), budget (the search),
layers (the loop and the quantized prefix), checkpoint (resumable runs).
"""

from __future__ import annotations

from ..config import RoundingOptions
from .adaround import AdaRound
from .budget import AutoBudget
from .efrap import Efrap
from .layers import ModelRounder
from .method import LayerContext, Rounded, RoundingMethod
from .nearest import Nearest
from .official import EfrapOfficial

METHODS: dict[str, type] = {cls.name: cls for cls in (Efrap, AdaRound, Nearest, EfrapOfficial)}


def method_for(options: RoundingOptions) -> RoundingMethod:
    """The method `options` names, built from them (config.METHODS lists the same names)."""
    return METHODS[options.method].from_options(options)


__all__ = [
    "METHODS",
    "AdaRound",
    "AutoBudget",
    "Efrap",
    "EfrapOfficial",
    "LayerContext",
    "ModelRounder",
    "Nearest",
    "Rounded",
    "RoundingMethod",
    "method_for",
]
