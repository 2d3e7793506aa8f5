"""Helpers shared by the attacks: triggered batches, poisoned batches, device placement."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

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
