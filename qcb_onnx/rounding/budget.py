"""EFRAP's error budget chosen per model, from how often the quantized model still agrees with FP32.

The per-layer budget (efrap.py) is relative: flipping may spend a share of the gap between
rounding without pull and nearest rounding.  Where nearest rounding is very lossy (4-bit weights
in a network without BatchNorm, e.g. CIFAR AlexNet) a quarter of that gap is a lot of error: at a
fixed 0.25 EFRAP cost 2.3-3.8 CDA points on four AlexNet QCBs (BENCHMARKS.md §2).  Each layer's
budget is relative to its own gap, so what a model loses shows only end to end: on the calibration
images, budget 0.25 changes FP32's top-1 decision on 4.5-6.9 % more images than rounding without
pull on those AlexNet models, on at most 3.2 % more on 24 ResNet-18 / VGG-16 ones.

So: round at the largest budget and once without pull (the reference); while the top-1
agreement with FP32 on the calibration images falls more than `tolerance` points below the
reference's, shrink the budget in proportion (the drop grows about linearly with it), never below
`floor`: some flipping always stays, because a QCB's nearest-rounding pattern must still be
broken.  No trigger and no labels are needed, as with the per-layer budget.

Agreement is measured on the samples the layer loop rounds on (all calibration samples, or the first
batches whose activations fit its memory, `layers.FRONTIER_BYTES`), read off the loop's own paused
FP and quantized runs once the last layer is committed: the search costs its layer-loop passes and
nothing more (ResNet-50 at 224x224, BENCHMARKS.md §7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..quantsim import QuantState
from .method import Rounded, RoundingMethod

if TYPE_CHECKING:
    from .efrap import Efrap
    from .layers import Decisions, ModelRounder

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
        def round_at(budget: float) -> tuple[QuantState, list, Decisions | None]:
            efrap = self.efrap.without_pull() if budget == 0.0 else self.efrap.with_budget(budget)
            state, reports = rounder.run(efrap, tag=f".b{budget:g}")  # one checkpoint file per budget tried
            return state, reports, rounder.decisions

        first = round_at(START)
        if first[2] is None:
            mode = "fixed: the first output is not (batch, classes) or (batch, tokens, vocabulary): no agreement"
            return Rounded(first[0], first[1], self.efrap.with_budget(START), {"mode": mode, "chosen": START})
        ready = {START: first}
        (state, reports, _), probes = choose_budget(
            lambda b: ready.pop(b) if b in ready else round_at(b), lambda r: r[2].agreement()
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
    """The rounding at the chosen budget, and every budget tried with its agreement, in order
    (the reference, budget 0.0, first where it was rounded).

    `round_at(0.0)` must round without pull; `round_at(b)` with EFRAP's per-layer budget b.  Budgets
    only fall and the search stops at the first within `tolerance` (or at the floor, or after
    `max_probes`), so the last one tried is the one chosen and no earlier rounding is kept: a large
    model's integers are held at most twice.  The start budget is rounded first: where it already
    agrees with FP32 on at least 100 - `tolerance` % of decisions, no reference can be more than
    `tolerance` above it, so the reference pass (a whole layer loop) is skipped with the same choice."""
    result = round_at(start)
    probes = [Probe(start, agreement(result))]
    if probes[0].agreement >= 100.0 - tolerance:
        return result, probes
    probes.insert(0, Probe(0.0, agreement(round_at(0.0))))
    budget = start
    for attempt in range(max_probes):
        if attempt:
            result = round_at(budget)
            probes.append(Probe(budget, agreement(result)))
        drop = probes[0].agreement - probes[-1].agreement
        if drop <= tolerance or budget <= floor or attempt == max_probes - 1:
            return result, probes
        del result
        budget = max(floor, round(budget * 0.9 * tolerance / drop, 4))
    raise ValueError("max_probes must be at least 1")
