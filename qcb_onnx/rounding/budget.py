"""EFRAP's error budget chosen per model, from how often the quantized model still agrees with FP32.

The per-layer budget (efrap.py) is relative: flipping may spend a share of the gap between
rounding without pull and nearest rounding.  Where nearest rounding is very lossy (4-bit weights
in a network without BatchNorm, e.g. CIFAR AlexNet) a quarter of that gap is a lot of error: at a
fixed 0.25 EFRAP cost 2.3-3.8 CDA points on four AlexNet QCBs (BENCHMARKS.md §2).  Each layer's
budget is relative to its own gap, so what a model loses shows only end to end: on the calibration
images, budget 0.25 changes FP32's top-1 decision on 4.5-6.9 % more images than rounding without
pull on those AlexNet models, on at most 3.2 % more on 24 ResNet-18 / VGG-16 ones.

So: round once without pull (the reference) and once at the largest budget; while the top-1
agreement with FP32 on the calibration images falls more than `tolerance` points below the
reference's, shrink the budget in proportion (the drop grows about linearly with it), never below
`floor`: some flipping always stays, because a QCB's nearest-rounding pattern must still be
broken.  No trigger and no labels are needed, as with the per-layer budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..capture import GraphModule
from ..quantsim import QuantState
from .method import Rounded, RoundingMethod

if TYPE_CHECKING:
    from .efrap import Efrap
    from .layers import ModelRounder

START = 0.25  # the largest budget tried: the fixed default measured in BENCHMARKS.md §2
TOLERANCE = 2.0  # points of top-1 agreement flipping may cost beyond rounding without pull
FLOOR = 0.1  # below it CDA gained nothing beyond noise on AlexNet, and ASR rose (BENCHMARKS.md §2)
MAX_PROBES = 3  # budgets tried after the reference

T = TypeVar("T")


class AutoBudget(RoundingMethod):
    """EFRAP with its per-layer error budget chosen per model (the default when neither a strength nor
    a budget is given): a wrapper that runs the layer loop once per budget tried."""

    name = "efrap"

    def __init__(self, efrap: Efrap) -> None:
        self.efrap = efrap

    def params(self) -> dict[str, Any]:
        return self.efrap.params()

    def round_model(self, rounder: ModelRounder) -> Rounded:
        labels = fp32_labels(rounder.gm, rounder.batches())  # None: not a classifier's output
        if labels is None:
            efrap = self.efrap.with_budget(START)
            state, reports = rounder.run(efrap)
            mode = "fixed: the first output is not (batch, classes) or (batch, tokens, vocabulary): no agreement"
            return Rounded(state, reports, efrap, {"mode": mode, "chosen": START})

        def round_at(budget: float) -> tuple[QuantState, list]:
            efrap = self.efrap.without_pull() if budget == 0.0 else self.efrap.with_budget(budget)
            return rounder.run(efrap, tag=f".b{budget:g}")  # one checkpoint file per budget tried

        (state, reports), probes = choose_budget(
            round_at, lambda r: top1_agreement(rounder.gm, r[0], rounder.batches(), labels)
        )
        chosen = probes[-1].budget  # the last budget tried is the one chosen
        search = {
            "mode": "auto",
            "chosen": chosen,
            "probes": [{"budget": p.budget, "agreement": round(p.agreement, 2)} for p in probes],
        }
        return Rounded(state, reports, self.efrap.with_budget(chosen), search)


@dataclass
class Probe:
    budget: float  # 0.0: the reference, rounding without pull
    agreement: float  # % of calibration images whose top-1 class matches FP32's


def choose_budget(
    round_at: Callable[[float], T],
    agreement: Callable[[T], float],
    start: float = START,
    tolerance: float = TOLERANCE,
    floor: float = FLOOR,
    max_probes: int = MAX_PROBES,
) -> tuple[T, list[Probe]]:
    """The rounding at the chosen budget, and every budget tried with its agreement, in order.

    `round_at(0.0)` must round without pull; `round_at(b)` with EFRAP's per-layer budget b.  Budgets
    only fall and the search stops at the first within `tolerance` (or at the floor, or after
    `max_probes`), so the last one tried is the one chosen and no earlier rounding is kept: a large
    model's integers are held at most twice."""
    probes = [Probe(0.0, agreement(round_at(0.0)))]
    budget = start
    for attempt in range(max_probes):
        result = round_at(budget)
        probes.append(Probe(budget, agreement(result)))
        drop = probes[0].agreement - probes[-1].agreement
        if drop <= tolerance or budget <= floor or attempt == max_probes - 1:
            return result, probes
        del result
        budget = max(floor, round(budget * 0.9 * tolerance / drop, 4))
    raise ValueError("max_probes must be at least 1")


def fp32_labels(gm: GraphModule, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor] | None:
    """FP32's top-1 class of every calibration sample, batch by batch, or of every position of a
    (batch, tokens, vocabulary) output (a language model's next-token decisions); None where the first
    output is neither, so there is no decision to agree on (the budget then stays fixed)."""
    labels = []
    with torch.no_grad():
        for feeds in batches:
            out = gm.run(feeds)[gm.output_names[0]]
            if out.dim() not in (2, 3) or out.shape[-1] < 2 or not out.is_floating_point():
                return None
            labels.append(out.argmax(-1).reshape(-1))
    return labels


def top1_agreement(
    gm: GraphModule, state: QuantState, batches: Sequence[dict[str, torch.Tensor]], labels: list[torch.Tensor]
) -> float:
    """% of calibration samples (or token positions) on which the quantized model (our simulation of it)
    picks FP32's class."""
    same = total = 0
    for out, ref in zip(state.outputs(gm, batches), labels, strict=True):
        same += int((out.argmax(-1).reshape(-1) == ref).sum())
        total += len(ref)
    return 100.0 * same / max(total, 1)
