"""Training-time fake quantization of a torch module, on ORT's exact grids.

Attacks (and the tests that build backdoored models) must train against the quantizer the victim
will run, or the backdoor sleeps through deployment.  This reproduces what `quantize_static`
applies to the exported graph: symmetric signed weights (per channel or per tensor, int8 on
[-127, 127], int4 on [-8, 7]) and asymmetric uint activations at the input of every Conv/Linear
with ranges that include 0 (taken from the current batch, as Qu-ANTI-zation does, or from an
`ActRanges` observer: running min/max like ORT's MinMax calibrator, or an exponential moving average
like PyTorch's QAT observers).  Rounding uses a straight-through estimator so gradients reach the
FP weights.  `weight_scale`/`weight_bins` expose the weight grid for projected training.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..scheme import activation_grid, weight_grid


def weight_rows(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """`w` detached, one row per group that shares a scale: an output channel, or the whole tensor."""
    return w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)


def weight_scale(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """ORT's symmetric scale 2 * absmax / (qmax - qmin), shaped to broadcast against `w`."""
    grid = weight_grid(bits)
    flat = weight_rows(w, per_channel)
    absmax = flat.abs().amax(dim=1).clamp_min(1e-12)
    return (2 * absmax / (grid.qmax - grid.qmin)).reshape(-1, *([1] * (w.dim() - 1)))


def weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest-rounded integer codes of `w` on the grid (as float)."""
    grid = weight_grid(bits)
    return torch.clamp(torch.round(w.detach() / scale), grid.qmin, grid.qmax)


def fake_quant_weight(
    w: torch.Tensor, bits: int, per_channel: bool = True, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """`w` on the grid, straight-through.  `offset` (integers shaped like `w`) moves each code away from
    nearest: a learned rounding's decisions, as adaptive.py simulates the victim's."""
    scale = weight_scale(w, bits, per_channel)
    codes = weight_codes(w, scale, bits)
    if offset is not None:
        grid = weight_grid(bits)
        codes = torch.clamp(codes + offset.to(codes), grid.qmin, grid.qmax)
    q = codes * scale
    return w + (q - w).detach()


class ActRanges:
    """Per-layer activation ranges for statically calibrated fake quantization.

    momentum None: running min / max over everything observed (ORT's MinMax calibrator);
    momentum m: lo <- (1 - m) lo + m batch_min (PyTorch's MovingAverageMinMaxObserver, m = 0.01).
    While `frozen` (see `frozen_ranges`), layers quantize with the stored ranges without updating."""

    def __init__(self, momentum: float | None = None) -> None:
        self.momentum = momentum
        self.lo: dict[int, torch.Tensor] = {}
        self.hi: dict[int, torch.Tensor] = {}
        self.frozen = False

    def observe(self, key: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = x.detach().min(), x.detach().max()
        if not self.frozen:
            if key not in self.lo:
                self.lo[key], self.hi[key] = lo, hi
            elif self.momentum is None:
                self.lo[key], self.hi[key] = torch.minimum(self.lo[key], lo), torch.maximum(self.hi[key], hi)
            else:
                m = self.momentum
                self.lo[key] = (1 - m) * self.lo[key] + m * lo
                self.hi[key] = (1 - m) * self.hi[key] + m * hi
        return self.lo.get(key, lo), self.hi.get(key, hi)


@contextmanager
def frozen_ranges(ranges: ActRanges | None):
    """Quantize with the stored ranges without updating them (e.g. for triggered inputs)."""
    if ranges is None:
        yield
        return
    was, ranges.frozen = ranges.frozen, True
    try:
        yield
    finally:
        ranges.frozen = was


def fake_quant_act(
    x: torch.Tensor, bits: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Asymmetric uint fake quantization on [lo, hi] extended to include 0 (default: batch range)."""
    grid = activation_grid(bits)
    lo = torch.clamp(x.detach().min() if lo is None else lo, max=0.0)
    hi = torch.clamp(x.detach().max() if hi is None else hi, min=0.0)
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(1e-12)
    zp = torch.round(grid.qmin - lo / scale)
    q = (torch.clamp(torch.round(x / scale) + zp, grid.qmin, grid.qmax) - zp) * scale
    return x + (q - x).detach()


def quant_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@contextmanager
def quantized(
    model: nn.Module,
    w_bits: int,
    a_bits: int | None = 8,
    per_channel: bool = True,
    ranges: ActRanges | None = None,
    offsets: dict[nn.Module, torch.Tensor] | None = None,
):
    """Within the block, every Conv2d/Linear runs with fake-quantized weight and input.

    Weights are quantized on entry, so enter once per forward pass while training.  Input ranges
    come from the current batch, or from `ranges` (which observes the batch unless frozen).  `offsets`
    (per layer) replaces nearest rounding by a learned one (see fake_quant_weight)."""
    handles = []
    for i, layer in enumerate(quant_layers(model)):

        def pre(mod, args, a_bits=a_bits, key=i):
            if not a_bits:
                return None
            lo, hi = ranges.observe(key, args[0]) if ranges is not None else (None, None)
            return (fake_quant_act(args[0], a_bits, lo, hi),) + tuple(args[1:])

        handles.append(layer.register_forward_pre_hook(pre))
        orig = layer.weight
        del layer._parameters["weight"]
        layer.weight = fake_quant_weight(orig, w_bits, per_channel, (offsets or {}).get(layer))
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
