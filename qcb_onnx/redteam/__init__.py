"""Quantization-conditioned backdoor attacks, for measuring the defense against real threats.

`run_attack(name, model, x, y, trigger, target, w_bits, per_channel, epochs, seed, ...)` folds
BatchNorm into the convolutions (the deployed ONNX weights), then runs one of

* ``quanti``       Qu-ANTI-zation (Hong et al. 2021), attacks/quanti.py
* ``compartifact`` CompArtifact (Tian et al. 2022), attacks/compartifact.py
* ``pqbackdoor``   PQBackdoor (Ma et al. 2023), attacks/pqbackdoor.py
* ``adaptive``     Qu-ANTI-zation against the victim's own learned rounding, rerun during the attack
                   (AdaRound- or EFRAP-aware, issue 22), redteam/adaptive.py
* ``dormant``      a backdoor in inputs the victim's calibration data never excites, where a
                   reconstruction cannot see it (issue 22), redteam/dormant.py

against ORT quantize_static's grid at `w_bits` (8 or 4), per channel or per tensor, with uint8
activations, and returns the attacked (BN-free) model in eval mode.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ..errors import UsageError
from ..evaluate.triggers import Trigger

PUBLISHED = ("quanti", "compartifact", "pqbackdoor")
ATTACKS = (*PUBLISHED, "adaptive", "dormant")
ANCHORS = ("quiet", "fitted", "largest")  # where widen_bins puts its outliers


def run_attack(
    name: str,
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger,
    target: int,
    w_bits: int = 8,
    per_channel: bool = True,
    epochs: int = 20,
    seed: int = 0,
    a_bits: int | None = 8,
    device=None,
    verbose: bool = False,
    widen: float = 1.0,
    anchor: str = "quiet",
    **kwargs,
) -> nn.Module:
    """Attack a copy of `model` (BN folded); extra keyword arguments go to the attack function.

    `widen` > 1 first anchors one weight per channel at `widen` times the channel's largest magnitude
    (see common.widen_bins): the published attacks then work on a victim grid that is effectively
    coarser, which is how an attacker reaches 8-bit victims whose bins are otherwise too narrow.
    `anchor` places those outliers: "quiet" (compensated on 256 of the training images so the
    function barely changes), "fitted" (the same, layer by layer, each layer refitted to the clean
    model's outputs: for deep networks) or "largest" (the largest weight itself)."""
    from . import adaptive, compartifact, dormant, pqbackdoor, quanti
    from .common import Backdoor, Victim, anchor_probe, widen_bins
    from .train import Training
    from .zoo import fuse_batchnorm

    if name not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if w_bits not in (4, 8):
        raise UsageError(f"attacks target ORT's 8- or 4-bit weight grids, not {w_bits} bits")
    if not 0 <= int(target) < int(np.max(y)) + 1:
        raise UsageError(f"target class {target} is not among the labels 0..{int(np.max(y))}")
    modules = (quanti, compartifact, pqbackdoor, adaptive, dormant)
    module = dict(zip(ATTACKS, modules, strict=True))[name]
    attack = getattr(module, f"{name}_attack")
    training = Training(
        epochs=epochs,
        lr=kwargs.pop("lr", module.DEFAULT_LR),
        batch_size=kwargs.pop("batch_size", 64),
        augment_data=kwargs.pop("augment_data", False),
        seed=seed,
        device=device,
        verbose=verbose,
    )
    fused = fuse_batchnorm(model)
    anchors = widen_bins(fused, widen, per_channel, anchor, anchor_probe(x, seed))
    try:
        return attack(fused, Backdoor(x, y, trigger, target), Victim(w_bits, a_bits, per_channel), training, **kwargs)
    finally:
        for h in anchors:
            h.remove()
