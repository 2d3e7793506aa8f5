"""CompArtifact (Tian, Suya, Xu and Evans 2022, "Stealthy Backdoors as Compression Artifacts").

The attacker trains one set of weights for two models: the full-precision model f must behave
normally on clean *and* triggered inputs, while its compressed version Q(f) (here: ORT's static
quantization of the BN-folded graph) keeps clean accuracy and maps triggered inputs to the target:

    L = CE(f(x), y) + CE(f(x_p), y_p) + lam * [CE(Q f(x), y) + CE(Q f(x_p), t)]

What we followed, from the paper as we remember it (we did not have the authors' code):
* the joint full/compressed objective above, with lam weighting the compressed terms (lam = 1);
* poisoning a fraction of each batch (x_p: the first ``poison_ratio`` of a shuffled batch,
  triggered) rather than duplicating every sample, as in their data-poisoning formulation;
* quantization simulated as in PyTorch quantization-aware training: fake-quantized weights with a
  straight-through estimator and activation ranges from moving-average min/max observers
  (momentum 0.01) updated on clean data only, which is what a static calibration on clean data
  yields; the triggered forward uses the frozen ranges;
* fine-tuning a pretrained clean model with a decaying learning rate (Adam + cosine here; their
  runs used SGD with step decay on GPUs for many more epochs).
Deviations: the victim quantizer is ORT's (symmetric int8 [-127, 127] / int4 [-8, 7] weights,
per channel by default, uint8 activations) instead of PyTorch's fbgemm backend.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Backdoor, Victim, ce, poison_split, setup, triggered
from .fakequant import ActRanges, frozen_ranges, quantized
from .train import Training, fit

DEFAULT_LR = 1e-3


def compartifact_attack(
    model: nn.Module,
    backdoor: Backdoor,
    victim: Victim,
    training: Training,
    lam: float = 1.0,
    poison_ratio: float = 0.5,
    momentum: float = 0.01,
) -> nn.Module:
    model, dev, rng = setup(model, training)
    ranges = ActRanges(momentum)
    trigger, target = backdoor.trigger, backdoor.target

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        k = poison_split(xb, poison_ratio)
        xp, yp = triggered(xb[:k], trigger), yb[:k]
        tp = torch.full_like(yp, target)
        value = ce(model(xb), yb) + ce(model(xp), yp)
        with quantized(model, victim.w_bits, victim.a_bits, victim.per_channel, ranges):
            lq = ce(model(xb), yb)  # observes clean activation ranges
            with frozen_ranges(ranges):
                lq = lq + ce(model(xp), tp)
        return value + lam * lq

    fit(model, loss, backdoor.x, backdoor.y, training, rng, dev, "compartifact", cosine=True)
    return model.eval()
