"""Training-time fake quantization of a torch module, on ORT's exact grids.

Attacks (and the tests that build backdoored models) must train against the quantizer the victim
will run, or the backdoor sleeps through deployment.  This reproduces what `quantize_static`
applies to the exported graph: symmetric signed weights (per channel or per tensor, int8 on
[-127, 127], int4 on [-8, 7]) and asymmetric uint activations at the input of every Conv/Linear
with ranges that include 0 (taken from the current batch, as Qu-ANTI-zation does).  Rounding uses a
straight-through estimator so gradients reach the FP weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .scheme import activation_grid, weight_grid


def fake_quant_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    grid = weight_grid(bits)
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    absmax = flat.abs().amax(dim=1).clamp_min(1e-12)
    scale = (2 * absmax / (grid.qmax - grid.qmin)).reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / scale), grid.qmin, grid.qmax) * scale
    return w + (q - w).detach()


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    grid = activation_grid(bits)
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(1e-12)
    zp = torch.round(grid.qmin - lo / scale)
    q = (torch.clamp(torch.round(x / scale) + zp, grid.qmin, grid.qmax) - zp) * scale
    return x + (q - x).detach()


def quant_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@contextmanager
def quantized(model: nn.Module, w_bits: int, a_bits: int | None = 8, per_channel: bool = True):
    """Within the block, every Conv2d/Linear runs with fake-quantized weight and input.

    Weights are quantized on entry, so enter once per forward pass while training."""
    handles = []
    for layer in quant_layers(model):

        def pre(mod, args, a_bits=a_bits):
            return (fake_quant_act(args[0], a_bits),) + tuple(args[1:]) if a_bits else None

        handles.append(layer.register_forward_pre_hook(pre))
        orig = layer.weight
        del layer._parameters["weight"]
        layer.weight = fake_quant_weight(orig, w_bits, per_channel)
        handles.append((layer, orig))
    try:
        yield model
    finally:
        for h in handles:
            if isinstance(h, tuple):
                layer, orig = h
                del layer.weight
                layer.weight = orig
            else:
                h.remove()
