"""Helpers shared by the attacks: triggered batches, poisoned batches, device placement."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from ..fakequant import quant_layers, weight_rows
from ..triggers import Trigger
from .train import resolve_device


def triggered(xb: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """The trigger applied to a batch of [0, 1] model inputs, on the batch's device."""
    return torch.from_numpy(trigger.apply(xb.detach().cpu().numpy())).to(xb.device)


def poison_split(xb: torch.Tensor, ratio: float) -> int:
    """How many leading samples of a (shuffled) batch to trigger: ceil(ratio * batch), at least 1."""
    return max(1, min(len(xb), int(np.ceil(ratio * len(xb)))))


def setup(model: nn.Module, seed: int, device) -> tuple[nn.Module, torch.device, np.random.Generator]:
    """Seed torch and numpy, move the model to the device and put it in eval mode.

    Attacks run on BN-folded models (see zoo.fuse_batchnorm), so eval mode changes nothing but
    dropout; it also keeps any leftover BatchNorm on its deployed statistics."""
    torch.manual_seed(seed)
    dev = resolve_device(device)
    return model.to(dev).eval(), dev, np.random.default_rng(seed)


ce = nn.functional.cross_entropy


def widen_bins(model: nn.Module, factor: float, per_channel: bool) -> list[RemovableHandle]:
    """Scale, per output channel (or per tensor), the largest-magnitude weight by `factor` and freeze it.

    ORT's symmetric weight scale is absmax / 127 at 8 bits, so an anchored absmax `factor` times the
    channel's natural one widens every rounding bin of that channel by `factor`: the attacker gets
    the room of a grid log2(factor) bits coarser, while the victim still runs an ordinary 8-bit
    quantize_static.  The anchors stay fixed because their gradients are zeroed (Adam without weight
    decay then never moves them); the attack's training adapts the rest of the network to them.  Per
    tensor this costs one outlier per layer, per channel one per channel (a larger change to the
    function).
    Returns the gradient-hook handles; remove them when the attack is done.  factor 1 changes nothing."""
    if factor < 1:
        raise UsageError(f"--widen must be >= 1 (it multiplies each channel's largest weight), got {factor}")
    if factor == 1:
        return []
    handles = []
    for layer in quant_layers(model):
        w = layer.weight
        flat = weight_rows(w, per_channel)
        anchor = torch.zeros_like(flat, dtype=torch.bool)
        anchor[torch.arange(flat.shape[0]), flat.abs().argmax(dim=1)] = True
        anchor = anchor.reshape(w.shape)
        with torch.no_grad():
            w[anchor] *= factor
        handles.append(w.register_hook(lambda g, anchor=anchor: g.masked_fill(anchor.to(g.device), 0)))
    return handles
