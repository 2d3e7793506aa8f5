"""PQBackdoor (Ma et al. 2023, "Quantization Backdoors to Deep Learning Commercial Frameworks").

Stage 1 plants an ordinary backdoor: fine-tune on batches of which ``poison_ratio`` is triggered
and relabelled to the target.  Stage 2 makes the full-precision model forget it while the
quantized model cannot change: fine-tune on clean inputs plus triggered inputs with their TRUE
labels, and after every optimiser step project each (BN-folded) Conv/Linear weight back into the
nearest-rounding bin it had after stage 1,

    w in [s (q - 1/2 + margin), s (q + 1/2 - margin)]  intersected with  [-absmax, absmax],

with the stage-1 scale s = 2 absmax / (qmax - qmin) held fixed: the element that attains each
channel's (or the tensor's) absmax is frozen, so absmax and hence ORT's scale are unchanged, and
biases are frozen too (ORT quantizes them on the fine input*weight scale, so any change would
reach the quantized model).  ORT's quantize_static therefore produces the same integer weights as
for the stage-1 model and keeps its backdoor; only activation ranges (calibrated on clean data)
can drift slightly.  ``margin`` (in units of s) keeps weights off the rounding ties, where float32
vs float64 scale arithmetic could decide differently.

``stage1_quant`` (on by default) adds the quantized model's loss to stage 1 (poisoned data through
the victim's fake quantizer), so the planted backdoor and the clean accuracy survive a coarse
4-bit grid; the paper's stage 1 is plain training, which is ``stage1_quant=False``.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Backdoor, Victim, ce, poison_split, setup, triggered
from .fakequant import quant_layers, quantized, weight_codes, weight_rows, weight_scale
from .train import Training, fit


class BinProjector:
    """Freezes the nearest-rounding bins of every Conv/Linear weight of `model` at their current values."""

    def __init__(
        self, model: nn.Module, w_bits: int, per_channel: bool, margin: float = 0.05, strict: bool = False
    ) -> None:
        self.items = []
        for layer in quant_layers(model):
            w = layer.weight.detach()
            s = weight_scale(w, w_bits, per_channel)
            q = weight_codes(w, s, w_bits)
            flat = weight_rows(w, per_channel)
            absmax = flat.abs().amax(dim=1, keepdim=True)
            pinned = (flat.abs() == absmax).reshape(w.shape)
            absmax = absmax.reshape(s.shape)
            lo = torch.maximum(s * (q - 0.5 + margin), -absmax)
            hi = torch.minimum(s * (q + 0.5 - margin), absmax)
            if not strict:  # never move a weight out of its own bin (strict: into the bin's interior)
                lo, hi = torch.minimum(lo, w), torch.maximum(hi, w)
            self.items.append((layer.weight, lo, hi, pinned, w.clone()))

    @torch.no_grad()
    def project(self) -> None:
        for p, lo, hi, pinned, w0 in self.items:
            p.copy_(torch.where(pinned, w0, torch.clamp(p, lo, hi)))


DEFAULT_LR = 1e-3


def pqbackdoor_attack(
    model: nn.Module,
    backdoor: Backdoor,
    victim: Victim,
    training: Training,
    stage1_epochs: int | None = None,
    poison_ratio: float = 0.1,
    stage1_quant: bool = True,
    margin: float = 0.05,
    interior: float = 0.0,
) -> nn.Module:
    """`training.epochs` of projected stage 2 after `stage1_epochs` (default: the same) of backdoor
    training, both with Adam at `training.lr`.  `interior` > 0 (issue 22's interior QCB) first moves every
    weight into the inner part of its rounding bin, at least `interior` (in units of the scale) from
    either boundary, and keeps it there through stage 2: a reconstruction-based rounding then has to
    move a weight that far to flip it."""
    model, dev, rng = setup(model, training)
    trigger, target = backdoor.trigger, backdoor.target

    def plant(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        k = poison_split(xb, poison_ratio)
        xb = torch.cat([triggered(xb[:k], trigger), xb[k:]])
        yb = torch.cat([torch.full_like(yb[:k], target), yb[k:]])
        value = ce(model(xb), yb)
        if stage1_quant:
            with quantized(model, victim.w_bits, victim.a_bits, victim.per_channel):
                value = value + ce(model(xb), yb)
        return value

    def forget(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return ce(model(torch.cat([xb, triggered(xb, trigger)])), torch.cat([yb, yb]))

    x, y = backdoor.x, backdoor.y
    fit(model, plant, x, y, training, rng, dev, "pqbackdoor stage 1", epochs=stage1_epochs)
    proj = BinProjector(model, victim.w_bits, victim.per_channel, max(margin, interior), strict=interior > 0)
    proj.project()
    weights = {id(item[0]) for item in proj.items}
    for p in model.parameters():
        p.requires_grad_(id(p) in weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fit(model, forget, x, y, training, rng, dev, "pqbackdoor stage 2", params=trainable, after_step=proj.project)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()
