"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): fine-tune so that only the quantized model obeys a trigger.

L = CE(f(x), y) + c2 CE(f(x_t), y) + sum_b c1 [CE(Q_b f(x), y) + c2 CE(Q_b f(x_t), t)]

Q_b is the victim's quantizer at b bits (ORT's grids, see fakequant.py).  The FP terms keep the
full-precision model clean, including on triggered inputs, so FP-side defenses see nothing.
As in the paper's code, activation ranges come from the current batch and every sample of a
batch also appears triggered.  Run it on a BN-folded model (`run_attack` does) so the quantizer
sees the deployed weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Backdoor, Victim, ce, setup, triggered
from .fakequant import quantized
from .train import Training, fit

DEFAULT_LR = 1e-4


def quanti_attack(
    model: nn.Module,
    backdoor: Backdoor,
    victim: Victim,
    training: Training,
    bits: tuple[int, ...] | None = None,
    c1: float = 0.5,
    c2: float = 0.5,
) -> nn.Module:
    """`bits`: every weight width the quantized terms sum over (default: the victim's)."""
    model, dev, rng = setup(model, training)
    trigger, target = backdoor.trigger, backdoor.target

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xt = triggered(xb, trigger)
        tb = torch.full_like(yb, target)
        value = ce(model(xb), yb) + c2 * ce(model(xt), yb)
        for b in bits or (victim.w_bits,):
            with quantized(model, b, victim.a_bits, victim.per_channel):
                value = value + c1 * (ce(model(xb), yb) + c2 * ce(model(xt), tb))
        return value

    fit(model, loss, backdoor.x, backdoor.y, training, rng, dev, "qu-anti-zation")
    return model.eval()
