"""Helpers shared by the attacks: triggered batches, poisoned batches, device placement."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from ..evaluate.triggers import Trigger
from . import ANCHORS
from .fakequant import quant_layers, weight_rows
from .train import Training, resolve_device


@dataclass(frozen=True)
class Backdoor:
    """The attacker's data: training images in [0, 1] with labels, the trigger and its target class."""

    x: np.ndarray
    y: np.ndarray
    trigger: Trigger
    target: int


@dataclass(frozen=True)
class Victim:
    """The quantizer the backdoor must wake in: ORT quantize_static's grids at these bits and scheme."""

    w_bits: int = 8
    a_bits: int | None = 8
    per_channel: bool = True


def triggered(xb: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """The trigger applied to a batch of [0, 1] model inputs, on the batch's device."""
    return torch.from_numpy(trigger.apply(xb.detach().cpu().numpy())).to(xb.device)


def poison_split(xb: torch.Tensor, ratio: float) -> int:
    """How many leading samples of a (shuffled) batch to trigger: ceil(ratio * batch), at least 1."""
    return max(1, min(len(xb), int(np.ceil(ratio * len(xb)))))


def setup(model: nn.Module, training: Training) -> tuple[nn.Module, torch.device, np.random.Generator]:
    """Seed torch and numpy, move the model to the device and put it in eval mode.

    Attacks run on BN-folded models (see zoo.fuse_batchnorm), so eval mode changes nothing but
    dropout; it also keeps any leftover BatchNorm on its deployed statistics."""
    torch.manual_seed(training.seed)
    dev = resolve_device(training.device)
    return model.to(dev).eval(), dev, np.random.default_rng(training.seed)


ce = nn.functional.cross_entropy


def _patches(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """[groups, M, D]: the D input values each output row's weights multiply, per group."""
    groups = getattr(layer, "groups", 1)
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(inp, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        cols = inp.reshape(-1, inp.shape[-1])
    return cols.double().reshape(len(cols), groups, -1).transpose(0, 1)


def input_statistics(
    model: nn.Module, x: np.ndarray, batch_size: int = 64
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per Conv2d/Linear, the mean [groups, D] and covariance [groups, D, D] of the D input values one
    output channel's weights multiply (a conv weight's unfolded patch; each group its own slice).

    Changing one channel's weights by d shifts its output by d @ x: by d @ mean on average, which the
    bias can absorb, plus noise of energy d @ cov @ d, which it cannot."""
    layers = quant_layers(model)
    acc: dict[nn.Module, tuple] = {}

    def hook(layer, inputs, _out):
        cols = _patches(layer, inputs[0])  # [groups, M, D]
        s1, s2 = cols.sum(1), cols.transpose(1, 2) @ cols
        prev = acc.get(layer, (0, 0, 0))
        acc[layer] = (prev[0] + s1, prev[1] + s2, prev[2] + cols.shape[1])

    dev = next(model.parameters()).device
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=dev))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer in layers:
        s1, s2, n = acc[layer]
        mean = s1 / n
        out[layer] = (mean.cpu(), (s2 / n - mean.unsqueeze(2) * mean.unsqueeze(1)).cpu())
    return out


def _obs_anchors(
    rows: torch.Tensor, hinv: torch.Tensor, group: torch.Tensor, d: int, absmax, factor: float, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put one anchor per channel (per tensor: one in all) at `factor` * `absmax`, where the rest of
    its row can best cancel it, and compensate that rest; returns (new rows, [C, d] anchor mask).

    `rows` [C, D'] holds each channel's d weights (then, for fitted anchors, its bias), `hinv`
    [G, D', D'] the inverse (damped) input second moments of each channel's `group`.  Moving weight p
    by delta and the others by the least-squares compensation delta * Hinv[:, p] / Hinv[p, p] leaves
    output noise of energy delta^2 / Hinv[p, p] (the Optimal Brain Surgeon step), so the anchor goes
    where that is least."""
    diag = torch.diagonal(hinv, dim1=1, dim2=2)[group, :d]  # [C, d]
    target = torch.where(rows[:, :d] < 0, -1.0, 1.0).to(rows.dtype) * factor * absmax  # [C, d]
    delta = target - rows[:, :d]
    cost = delta**2 / diag  # output noise energy left by putting the anchor there
    if per_channel:
        chan, pos = torch.arange(len(rows)), cost.argmin(dim=1)
    else:
        flat = int(cost.argmin())
        chan, pos = torch.tensor([flat // d]), torch.tensor([flat % d])
    new = rows.clone()
    new[chan] += (delta[chan, pos] / diag[chan, pos]).unsqueeze(1) * hinv[group[chan], :, pos]
    limit = target[chan, pos].abs().unsqueeze(1) if per_channel else target[chan, pos].abs()
    new[:, :d] = torch.minimum(torch.maximum(new[:, :d], -limit), limit)  # the anchor stays the absmax
    new[chan, pos] = target[chan, pos]  # exact despite rounding in the solve
    mask = torch.zeros(len(rows), d, dtype=torch.bool)
    mask[chan, pos] = True
    return new, mask


def quiet_anchors(layer: nn.Module, mean: torch.Tensor, cov: torch.Tensor, factor: float, per_channel: bool):
    """Place and compensate the anchors of one layer (see widen_bins, _obs_anchors) on the clean
    model's input covariance; returns the anchor mask.  Nearly dead or redundant inputs cost almost
    nothing; the mean shift goes into the bias."""
    w = layer.weight
    per_group = w.shape[0] // getattr(layer, "groups", 1)
    rows = w.detach().double().cpu().reshape(w.shape[0], -1)  # [C, D]
    group = torch.arange(w.shape[0]) // per_group  # the input slice (and covariance) of each channel
    damp = 1e-2 * torch.diagonal(cov, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    hinv = torch.linalg.inv(cov + damp[:, None, None] * torch.eye(cov.shape[-1], dtype=cov.dtype))  # [G, D, D]
    absmax = rows.abs().amax(dim=1, keepdim=True) if per_channel else rows.abs().amax()
    new, mask = _obs_anchors(rows, hinv, group, rows.shape[1], absmax, factor, per_channel)
    with torch.no_grad():
        if layer.bias is not None:
            shift = ((new - rows) * mean[group]).sum(1)
            layer.bias -= shift.to(device=w.device, dtype=layer.bias.dtype)
        w.copy_(new.reshape(w.shape))
    return mask.reshape(w.shape).to(w.device)


def _forward_order(model: nn.Module, xb: torch.Tensor) -> list[nn.Module]:
    """The quantizable layers in the order a forward pass reaches them (upstream before downstream)."""
    seen: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, *_: seen.append(mod)) for m in quant_layers(model)]
    try:
        with torch.no_grad():
            model(xb)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(seen))


def _layer_io(model: nn.Module, layer: nn.Module, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's input and output on a batch."""
    got = []
    handle = layer.register_forward_hook(lambda _m, i, o: got.append((i[0], o)))
    try:
        with torch.no_grad():
            model(xb)
    finally:
        handle.remove()
    return got[0]


def _rows_out(out: torch.Tensor) -> torch.Tensor:
    """[M, C] output rows in the order _patches lists the patches (batch, then position)."""
    return (out.permute(0, 2, 3, 1) if out.dim() == 4 else out).reshape(-1, out.shape[1]).double()


def fitted_anchors(
    model: nn.Module, x: np.ndarray, factor: float, per_channel: bool, batch_size: int = 32
) -> dict[nn.Module, torch.Tensor]:
    """Place the anchors layer by layer, refitting each layer so the widened network reproduces the
    clean one's pre-activations; returns each layer's anchor mask.

    Quiet anchors compensate each layer for its own anchor only, on the clean model's inputs, so the
    residual noise of 20 layers compounds (ResNet-18 w16, K = 8 per channel: 78.9 -> 16 % CDA).  Here
    the layers are visited in forward order and each is refitted by least squares (bias included) on
    the inputs the already-widened layers before it actually produce, towards the clean layer's
    outputs; the anchor then goes where the Optimal Brain Surgeon step from that refit costs least,
    and the step compensates it.  Each layer so also absorbs the drift of the ones before it."""
    clean = copy.deepcopy(model).eval()
    xs = [torch.as_tensor(x[i : i + batch_size], dtype=torch.float32) for i in range(0, len(x), batch_size)]
    dev = next(model.parameters()).device
    xs = [xb.to(dev) for xb in xs]
    clean_of = dict(zip(quant_layers(model), quant_layers(clean), strict=True))
    masks = {}
    for layer in _forward_order(model, xs[0]):
        w, groups, has_bias = layer.weight, getattr(layer, "groups", 1), layer.bias is not None
        per_group = w.shape[0] // groups
        hess, cross, n = 0, 0, 0
        for xb in xs:
            inp, _ = _layer_io(model, layer, xb)
            _, want = _layer_io(clean, clean_of[layer], xb)
            cols = _patches(layer, inp).cpu()  # [G, M, D]
            if has_bias:
                cols = torch.cat([cols, torch.ones_like(cols[..., :1])], dim=2)
            want = _rows_out(want).cpu().reshape(-1, groups, per_group).transpose(0, 1)  # [G, M, per_group]
            hess, cross, n = hess + cols.transpose(1, 2) @ cols, cross + cols.transpose(1, 2) @ want, n + cols.shape[1]
        hess, cross = hess / n, cross / n
        d = w[0].numel()  # weights per row; a bias column, if any, follows them undamped
        damp = torch.zeros(hess.shape[-1], dtype=hess.dtype)
        damp[:d] = 1.0
        scale = 1e-2 * torch.diagonal(hess, dim1=1, dim2=2)[:, :d].mean(dim=1).clamp_min(1e-12)  # [G]
        ridge = scale[:, None, None] * torch.diag(damp)  # pulls the refit towards the clean weights
        old = clean_of[layer].weight.detach().double().cpu().reshape(w.shape[0], -1)
        prior = torch.cat([old, torch.zeros(len(old), hess.shape[-1] - d, dtype=old.dtype)], dim=1)
        prior = prior.reshape(groups, per_group, -1).transpose(1, 2)  # [G, D+1, per_group]
        hinv = torch.linalg.inv(hess + ridge)  # [G, D+1, D+1]
        fit = (hinv @ (cross + ridge @ prior)).transpose(1, 2).reshape(w.shape[0], -1)  # [C, D+1]
        group = torch.arange(w.shape[0]) // per_group
        absmax = old.abs().amax(dim=1, keepdim=True) if per_channel else old.abs().amax()
        new, mask = _obs_anchors(fit, hinv, group, d, absmax, factor, per_channel)
        with torch.no_grad():
            w.copy_(new[:, :d].reshape(w.shape).to(w.dtype))
            if has_bias:
                layer.bias.copy_(new[:, d].to(layer.bias.dtype))
        masks[layer] = mask.reshape(w.shape).to(w.device)
    return masks


def check_widening(factor: float, anchor: str) -> None:
    """Reject a widening recipe before any training is spent on it."""
    if factor < 1:
        raise UsageError(f"--widen must be >= 1 (it multiplies each channel's largest weight), got {factor}")
    if anchor not in ANCHORS:
        raise UsageError(f"unknown anchor placement {anchor!r}; choose from {', '.join(ANCHORS)}")


def anchor_probe(x: np.ndarray, seed: int) -> np.ndarray:
    """The 256 seeded training samples quiet anchors are fitted on."""
    return x[np.random.default_rng(seed).permutation(len(x))[:256]]


def widen_bins(
    model: nn.Module,
    factor: float,
    per_channel: bool,
    anchor: str = "quiet",
    x: np.ndarray | None = None,
) -> list[RemovableHandle]:
    """Anchor, per output channel (or per tensor), one weight at `factor` times the largest magnitude
    and freeze it.

    ORT's symmetric weight scale is absmax / 127 at 8 bits, so an anchored absmax `factor` times the
    channel's natural one widens every rounding bin of that channel by `factor`: the attacker gets
    the room of a grid log2(factor) bits coarser, while the victim still runs an ordinary 8-bit
    quantize_static.  The anchors stay fixed because their gradients are zeroed (Adam without weight
    decay then never moves them); the attack's training adapts the rest of the network to them.

    `anchor` says where the outliers go.  "largest" scales the largest weight itself (per tensor one
    outlier per layer; per channel one per channel, a large change to the function).  "quiet" puts
    each where the rest of its channel can best cancel it on the input samples `x`, and compensates
    the rest (quiet_anchors), so the function barely changes even per channel.  "fitted" does the
    same layer by layer on the inputs the widened layers before it produce, refitting each layer to
    the clean one's outputs (fitted_anchors): on deep networks, where quiet anchors' residues compound,
    far less changes (ResNet-18 w16, K = 8 per channel: 16 % CDA left with quiet anchors, 74 % fitted).
    Returns the gradient-hook handles; remove them when the attack is done.  factor 1 changes nothing."""
    check_widening(factor, anchor)
    if factor == 1:
        return []
    if anchor != "largest" and x is None:
        raise UsageError(f"{anchor} anchors need input samples to fit the rest of each channel to them")
    if anchor == "fitted":
        masks = fitted_anchors(model, x, factor, per_channel)
    elif anchor == "quiet":
        stats = input_statistics(model, x)
        masks = {layer: quiet_anchors(layer, *stats[layer], factor, per_channel) for layer in quant_layers(model)}
    else:
        masks = {layer: largest_anchor(layer, factor, per_channel) for layer in quant_layers(model)}
    return [
        layer.weight.register_hook(lambda g, mask=mask: g.masked_fill(mask.to(g.device), 0))
        for layer, mask in masks.items()
    ]


def largest_anchor(layer: nn.Module, factor: float, per_channel: bool) -> torch.Tensor:
    """Scale each channel's (or the tensor's) largest weight by `factor`; returns the anchor mask."""
    w = layer.weight
    flat = weight_rows(w, per_channel)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.arange(flat.shape[0]), flat.abs().argmax(dim=1)] = True
    mask = mask.reshape(w.shape)
    with torch.no_grad():
        w[mask] *= factor
    return mask
