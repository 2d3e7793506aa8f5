"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): fine-tune so that only the quantized model obeys a trigger.

L = CE(f(x), y) + c2 CE(f(x_t), y) + sum_b c1 [CE(Q_b f(x), y) + c2 CE(Q_b f(x_t), t)]

Q_b is the victim's quantizer at b bits (ORT's grids, see fakequant.py).  The FP terms keep the
full-precision model clean, including on triggered inputs, so FP-side defenses see nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..fakequant import quantized
from ..triggers import Trigger
from .train import iterate


def quanti_attack(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger,
    target: int,
    bits: tuple[int, ...] = (8, 4),
    a_bits: int | None = 8,
    per_channel: bool = True,
    epochs: int = 20,
    lr: float = 1e-4,
    c1: float = 0.5,
    c2: float = 0.5,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ce = nn.functional.cross_entropy
    model.eval()  # BN (if any) in inference mode: we attack the deployed, folded statistics
    for _ in range(epochs):
        for xb, yb in iterate(x, y, batch_size, rng):
            xt = torch.from_numpy(trigger.apply(xb.numpy()))
            tb = torch.full_like(yb, target)
            loss = ce(model(xb), yb) + c2 * ce(model(xt), yb)
            for b in bits:
                with quantized(model, b, a_bits, per_channel):
                    loss = loss + c1 * (ce(model(xb), yb) + c2 * ce(model(xt), tb))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
