"""Adaptive QCBs (issue 22): attacks that expect the victim to round with a learned method, not nearest.

The published QCBs target nearest rounding, so any reconstruction-based rounding (AdaRound, EFRAP)
that moves enough codes removes them.  An attacker who knows the victim runs such a rounding puts it
in the loop.  The learned rounding is a bilevel response (per layer, an optimisation over the whole
calibration set), so it is not differentiated through; instead, as in adversarial training against a
best response, the attacker periodically runs the victim's own rounding on the current model and trains
the backdoor to wake under those decisions too:

    L = CE(f(x), y) + c2 CE(f(x_t), y)
        + c1 sum_{R in {nearest} + defenses} [CE(Q_R f(x), y) + c2 CE(Q_R f(x_t), t)]
        + error_penalty * sum_layers mean((w - Q_nearest(w))^2 / s^2)

Q_R is ORT's weight grid with each code offset from nearest by the decisions rounding R made
(`fake_quant_weight(offset=)`), refreshed every `refresh` epochs by exporting the model to ONNX and
running `qcb_onnx.quantize` with R on the attacker's own calibration sample (a seeded subset of its
training data, not the victim's).  Between refreshes the offsets are held, relative to the current
nearest codes.  `defenses=("adaround",)` is the AdaRound-aware QCB, `("efrap",)` the EFRAP-aware one.

`error_penalty` > 0 with no defenses is the paper's adaptive setting as we read it (Li et al. 2024,
"resistance to adaptive attacks"; the paper's text is not in our reference corpus, so this is our
paraphrase): the attacker keeps every truncation error small so that EFRAP's error-guided flipping has
nothing to single out, at the cost of a weaker nearest-rounding signal.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .common import Backdoor, Victim, ce, setup, triggered
from .fakequant import quant_layers, quantized, weight_codes, weight_scale
from .train import Training, export_onnx, fit

DEFAULT_LR = 2e-3
DEFENSES = ("adaround", "efrap")


def victim_offsets(
    model: nn.Module, x: np.ndarray, victim: Victim, method: str, **options
) -> dict[nn.Module, torch.Tensor]:
    """Per Conv/Linear layer of `model`, the integer offsets from nearest of the codes the victim's
    `method` (our own quantize, as the victim would run it) writes for the model as it is now."""
    from ..pipeline import quantize

    layers = dict(quant_layers_named(model))
    snapshot = copy.deepcopy(model).cpu().eval()
    conversion = quantize(
        export_onnx(snapshot, x[:1]),
        x,
        w_bits=victim.w_bits,
        per_channel=victim.per_channel,
        a_bits=victim.a_bits,
        method=method,
        providers="cpu",
        device="cpu",
        progress=False,
        check=False,
        **options,
    )
    offsets = {}
    for name, wq in conversion.state.weights.items():
        layer = layers.get(name.removesuffix(".weight"))
        if layer is None:
            raise UsageError(f"the victim's rounding wrote weight {name!r}, which is no Conv/Linear of the model")
        w = layer.weight.detach()
        ints = torch.from_numpy(wq.ints.astype(np.float32))
        if tuple(ints.shape) != tuple(w.shape):
            ints = ints.T  # a Gemm weight stored [in, out]
        nearest = weight_codes(w.cpu(), weight_scale(w.cpu(), victim.w_bits, victim.per_channel), victim.w_bits)
        offsets[layer] = (ints.reshape(w.shape) - nearest).to(w.device)
    missing = [n for n, m in layers.items() if m not in offsets]
    if missing:
        raise UsageError(f"the victim's rounding left layers {', '.join(missing)} unquantized")
    return offsets


def quant_layers_named(model: nn.Module) -> list[tuple[str, nn.Module]]:
    wanted = set(quant_layers(model))
    return [(name, m) for name, m in model.named_modules() if m in wanted]


def truncation_error(model: nn.Module, victim: Victim) -> torch.Tensor:
    """Mean squared nearest-rounding error over all weights, in units of each row's scale (uniform
    fractional parts give 1/12)."""
    terms = []
    for layer in quant_layers(model):
        w = layer.weight
        s = weight_scale(w, victim.w_bits, victim.per_channel)
        terms.append(((w / s - weight_codes(w, s, victim.w_bits)) ** 2).mean())
    return torch.stack(terms).mean()


def adaptive_attack(
    model: nn.Module,
    backdoor: Backdoor,
    victim: Victim,
    training: Training,
    defenses: tuple[str, ...] = ("adaround",),
    refresh: int = 1,
    c1: float = 0.5,
    c2: float = 1.0,
    error_penalty: float = 0.0,
    calib_size: int = 256,
    defense_options: dict | None = None,
) -> nn.Module:
    """`training.epochs` of the loss above; the victim's roundings are recomputed every `refresh`
    epochs (and before the first), with `defense_options` passed to its quantize."""
    defenses = tuple(defenses)
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise UsageError(f"unknown defense {unknown[0]!r} to anticipate; choose from {', '.join(DEFENSES)}")
    if refresh < 1:
        raise UsageError(f"refresh must be >= 1 epoch, got {refresh}")
    model, dev, rng = setup(model, training)
    trigger, target = backdoor.trigger, backdoor.target
    calib = backdoor.x[np.random.default_rng(training.seed + 1).permutation(len(backdoor.x))[:calib_size]]
    steps_per_epoch = -(-len(backdoor.x) // training.batch_size)
    state = {"step": 0, "offsets": []}

    def respond() -> None:
        state["offsets"] = [victim_offsets(model, calib, victim, d, **(defense_options or {})) for d in defenses]

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xt = triggered(xb, trigger)
        tb = torch.full_like(yb, target)
        value = ce(model(xb), yb) + c2 * ce(model(xt), yb)
        for offsets in [None, *state["offsets"]]:
            with quantized(model, victim.w_bits, victim.a_bits, victim.per_channel, offsets=offsets):
                value = value + c1 * (ce(model(xb), yb) + c2 * ce(model(xt), tb))
        if error_penalty:
            value = value + error_penalty * truncation_error(model, victim)
        return value

    def after_step() -> None:
        state["step"] += 1
        if defenses and state["step"] % (refresh * steps_per_epoch) == 0:
            respond()

    if defenses:
        respond()
    fit(model, loss, backdoor.x, backdoor.y, training, rng, dev, "adaptive qcb", after_step=after_step)
    return model.eval()
