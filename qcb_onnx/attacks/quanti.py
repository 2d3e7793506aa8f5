"""Qu-ANTI-zation (Hong et al., NeurIPS 2021): fine-tune so that only the quantized model obeys a trigger.

L = CE(f(x), y) + c2 CE(f(x_t), y) + sum_b c1 [CE(Q_b f(x), y) + c2 CE(Q_b f(x_t), t)]

Q_b is the victim's quantizer at b bits (ORT's grids, see fakequant.py).  The FP terms keep the
full-precision model clean, including on triggered inputs, so FP-side defenses see nothing.
As in the paper's code, activation ranges come from the current batch and every sample of a
batch also appears triggered.  Run it on a BN-folded model (`run_attack` does) so the quantizer
sees the deployed weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..fakequant import quantized
from ..triggers import Trigger
from .common import ce, setup, triggered
from .train import batches, progress


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
    augment_data: bool = False,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    verbose: bool = False,
) -> nn.Module:
    model, dev, rng = setup(model, seed, device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for ep in progress(range(epochs), "qu-anti-zation", verbose):
        for xb, yb in progress(batches(x, y, batch_size, rng, dev, augment_data), f"epoch {ep + 1}", verbose):
            xt = triggered(xb, trigger)
            tb = torch.full_like(yb, target)
            loss = ce(model(xb), yb) + c2 * ce(model(xt), yb)
            for b in bits:
                with quantized(model, b, a_bits, per_channel):
                    loss = loss + c1 * (ce(model(xb), yb) + c2 * ce(model(xt), tb))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
