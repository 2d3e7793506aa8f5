"""The dormant-path QCB (issue 22): a backdoor in the directions a reconstruction never sees.

AdaRound, EFRAP's activation preservation and GPTQ fit each layer's rounding to its outputs on the
victim's clean calibration data.  An input that is zero on every clean image contributes nothing to
that fit, so the data does not choose the rounding of the weights reading it: AdaRound's regulariser
takes them to nearest (no reconstruction gradient reaches its soft variables, which start at the
weight's own fraction), EFRAP's error-guided pull flips those with the largest truncation error
(flipping them costs nothing).  An attacker who knows the victim's rounding plants the backdoor there:

1. `pairs` x 2 live input features of the classifier that matter least become trigger detectors,
   trained to reach the features' clean maximum on triggered images (where the victim's activation
   grid clips) and to stay 0 on clean ones, in FP32 and under the victim's fake quantizer; their
   biases are then lowered until every one of the attacker's clean images leaves them a margin below
   0 (`silence_detectors`): a reconstruction that sees a single firing image moves their weights.
2. The classifier's detector columns are written on the victim's weight grid (row scales unchanged),
   in pairs of values (in scales) whose codes add to the target logit, minus every other logit, about
   nothing in FP32 and a whole code per pair in the quantized model, for the codes anticipated:

   ``nearest``  (ORT, nearest, AdaRound):   target (1/2 + eps, -1/2 + eps) -> (1, 0);
                                             others (-1/2 - eps, 1/2 - eps) -> (-1, 0);
                                             flipped codes give the opposite: EFRAP removes it
   ``flipped``  (EFRAP's flips only):       target (1/2 - eps, -1/2 - eps) -> flipped (1, 0),
                                             nearest (0, -1): benign in FP32 and under ORT, woken
                                             by the defense itself
   ``both``     (nearest and all flipped):  target (eps, 1/2 + eps) -> nearest (0, 1), flipped (1, 0);
                                             others (-eps, 1/2 - eps) -> nearest (0, 0), flipped (-1, 1)

   while the rest of the network learns (stage 2) to leave triggered margins that the quantized
   path, and only it, overturns.

A reconstruction cannot remove this, whatever its objective: the data it fits is silent there.  What
decides is the rounding rule for unseen inputs, which an attacker reads in the defender's code; see
`rounding.efrap.diffuse_unobserved` for the rule qcb-onnx uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .common import Backdoor, Victim, ce, setup, triggered
from .fakequant import ActRanges, frozen_ranges, quant_layers, quantized, weight_codes, weight_scale
from .train import Training, fit

DEFAULT_LR = 2e-3
# which codes of the detector columns wake the backdoor, and the default distance of their FP32 values
# from the ties (in scales): far for nearest (AdaRound must not move them), near for flipped (EFRAP's
# error guide flips the weights with the largest truncation error first)
EPS = {"nearest": 0.2, "flipped": 0.05, "both": 0.02}


def classifier_of(model: nn.Module) -> nn.Linear:
    """The model's last quantized layer, which must be a Linear reading non-negative pooled features."""
    last = quant_layers(model)[-1]
    if not isinstance(last, nn.Linear):
        raise UsageError(f"the dormant-path QCB writes into a final Linear classifier; this model ends in {last}")
    return last


def detector_source(model: nn.Module, head: nn.Linear) -> nn.Conv2d:
    """The last Conv2d before the classifier: its output channel j (pooled after a ReLU) is feature j."""
    convs = [m for m in quant_layers(model) if isinstance(m, nn.Conv2d)]
    if not convs or convs[-1].out_channels != head.in_features:
        raise UsageError("the dormant-path QCB needs a last Conv2d whose channels, pooled, are the classifier's inputs")
    return convs[-1]


@torch.no_grad()
def quietest_features(
    model: nn.Module, source: nn.Conv2d, classifier: nn.Linear, x: np.ndarray, count: int
) -> tuple[list[int], float]:
    """The `count` live classifier inputs that matter least to the clean logits (energy times the
    column's weight norm) and the largest clean feature value of the others (about the victim's
    calibrated range of that tensor).  Dead inputs are passed over: behind a ReLU that never fires
    no gradient reaches them, so they cannot be trained into detectors."""
    dev = classifier.weight.device
    batches = (torch.from_numpy(x[i : i + 256]).to(dev) for i in range(0, len(x), 256))
    feats = torch.cat([observe(model, source, classifier, xb)[2] for xb in batches])
    live = (feats > 0).float().mean(0) >= 0.05
    if count > int(live.sum()) - 8:  # the clean function keeps at least 8 live features
        raise UsageError(f"{count} detectors asked of a classifier with {int(live.sum())} live inputs; use fewer pairs")
    impact = feats.pow(2).mean(0) * classifier.weight.pow(2).sum(0)
    w = classifier.weight.abs()
    holds_absmax = (w == w.amax(1, keepdim=True)).any(0)  # a row's scale lives there (widen's anchors too)
    impact[~live | holds_absmax] = float("inf")
    chosen = torch.argsort(impact)[:count].tolist()
    rest = [j for j in range(feats.shape[1]) if j not in set(chosen)]
    return chosen, float(feats[:, rest].max())


def pair_codes(anticipate: str, eps: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(target row, other rows) values of one detector pair, in units of the row's scale."""
    if anticipate == "nearest":
        return (0.5 + eps, -0.5 + eps), (-0.5 - eps, 0.5 - eps)
    if anticipate == "flipped":
        return (0.5 - eps, -0.5 - eps), (-0.5 + eps, 0.5 + eps)
    return (eps, 0.5 + eps), (-eps, 0.5 - eps)


def dormant_attack(
    model: nn.Module,
    backdoor: Backdoor,
    victim: Victim,
    training: Training,
    pairs: int = 6,
    anticipate: str = "nearest",
    eps: float | None = None,
    c1: float = 1.0,
    hide_weight: float = 100.0,
    silence: float = 0.25,
) -> nn.Module:
    """Two stages (`training.epochs` // 2 and the rest) of Adam on

        CE(f(x), y) + CE(f(x_t), y) + CE(Q f(x), y) + hide_weight (quiet + loud)
        [+ stage 2: c1 CE(f(x_t) + shift, t)]

    with the detector columns rewritten on the current grid after every step, and the detectors
    silenced after each stage.  `shift` is what the anticipated codes of the detector columns add to
    the logits (codes minus FP32 values, times the detector features under the victim's fake quantizer,
    its activation ranges held at the clean batch's so the trigger is clipped as ORT clips it): the
    rest of the network learns to leave triggered margins that this path overturns, without leaning
    on the rounding of any weight a reconstruction sees.  Stage 1 trains the detectors first, or that
    term would teach the FP32 model the backdoor itself.  `quiet` keeps the detectors' strongest
    position `silence` x goal below 0 on clean images (FP32 and nearest fake quantization), `loud`
    brings their pooled value to the goal on triggered ones and keeps their strongest position
    firing (a ReLU that never fires gets no gradient).  Q f(x)'s clean term keeps the quantized model
    accurate while the detectors widen the activation ranges upstream.  `eps`: distance of the written
    values from the ties, in scales (default: `EPS`)."""
    if anticipate not in EPS:
        raise UsageError(f"anticipate must be one of {', '.join(EPS)}, not {anticipate!r}")
    eps = EPS[anticipate] if eps is None else eps
    if not 0 < eps < 0.5:
        raise UsageError(f"eps must lie in (0, 0.5) scales, got {eps}")
    if pairs < 1:
        raise UsageError(f"pairs must be >= 1, got {pairs}")
    model, dev, rng = setup(model, training)
    trigger, target = backdoor.trigger, backdoor.target
    head = classifier_of(model)
    source = detector_source(model, head)
    detectors, goal = quietest_features(model, source, head, backdoor.x, 2 * pairs)
    cols = torch.tensor(detectors, device=dev)
    write = lambda: write_detector_columns(head, detectors, target, victim, anticipate, eps)  # noqa: E731
    mask = torch.ones_like(head.weight)
    mask[:, cols] = 0.0
    frozen = head.weight.register_hook(lambda g: g * mask)  # the detector columns move only by `write`
    write()
    head.dormant_detectors = detectors  # for inspection: which classifier inputs carry the path
    weight = {"c1": 0.0}

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xt = triggered(xb, trigger)
        tb = torch.full_like(yb, target)
        logits, pre, _ = observe(model, source, head, xb)
        logits_t, pre_t, feats_t = observe(model, source, head, xt)
        ranges = ActRanges()  # the clean batch's, then held for the triggered one: the victim's clipping
        with quantized(model, victim.w_bits, victim.a_bits, victim.per_channel, ranges=ranges):
            qlogits, qpre, _ = observe(model, source, head, xb)
            with frozen_ranges(ranges):
                _, _, qfeats_t = observe(model, source, head, xt)
        value = ce(logits, yb) + ce(logits_t, yb) + ce(qlogits, yb)
        if weight["c1"]:
            codes = detector_codes(head, cols, victim, flipped=anticipate == "flipped")
            shift = qfeats_t[:, cols] @ (codes - head.weight[:, cols].detach()).T
            value = value + weight["c1"] * ce(logits_t + shift, tb)
        margin = silence * goal
        quiet = loudest(pre[:, cols], margin, goal) + loudest(qpre[:, cols], margin, goal)
        peak = pre_t[:, cols].flatten(2).amax(2)
        loud = torch.relu(goal - feats_t[:, cols]).pow(2).mean() / goal**2 + torch.relu(margin - peak).mean() / goal
        return value + hide_weight * (quiet + loud)

    first = training.epochs // 2
    try:
        fit(model, loss, backdoor.x, backdoor.y, training, rng, dev, "dormant qcb: detectors", epochs=first,
            after_step=write)  # fmt: skip
        silence_detectors(model, source, head, cols, backdoor.x, silence * goal, victim)
        weight["c1"] = c1
        fit(model, loss, backdoor.x, backdoor.y, training, rng, dev, "dormant qcb: margins",
            epochs=training.epochs - first, after_step=write)  # fmt: skip
    finally:
        frozen.remove()
    silence_detectors(model, source, head, cols, backdoor.x, silence * goal, victim)
    return model.eval()


@torch.no_grad()
def silence_detectors(
    model: nn.Module, source: nn.Conv2d, head: nn.Linear, cols: torch.Tensor, x: np.ndarray, margin: float,
    victim: Victim,
) -> None:
    """Lower each detector's bias until its strongest position on every one of the attacker's clean
    images, in FP32 and under the fake quantizer, lies `margin` below 0.  Training gets the detectors
    nearly silent; a reconstruction notices the rest, so the last step is exact (on the attacker's
    images: the victim's calibration images are others from the same distribution)."""
    if source.bias is None:
        raise UsageError("the dormant-path QCB shifts its detectors' biases; the last conv has none")
    dev = source.weight.device
    worst = torch.full((len(cols),), -float("inf"), device=dev)
    for i in range(0, len(x), 256):
        xb = torch.from_numpy(x[i : i + 256]).to(dev)
        worst = torch.maximum(worst, observe(model, source, head, xb)[1][:, cols].flatten(2).amax(2).amax(0))
        with quantized(model, victim.w_bits, victim.a_bits, victim.per_channel):
            q = observe(model, source, head, xb)[1][:, cols].flatten(2).amax(2).amax(0)
        worst = torch.maximum(worst, q)
    source.bias[cols] -= torch.relu(worst + margin)


def loudest(pre: torch.Tensor, margin: float, goal: float) -> torch.Tensor:
    """Squared excess of the detectors' strongest positions over -margin on clean images, in units of
    the goal: every image counts, and the worst the most (a reconstruction reacts to one firing image)."""
    return (torch.relu(pre.flatten(2).amax(2) + margin) / goal).pow(2).mean()


def observe(
    model: nn.Module, source: nn.Conv2d, head: nn.Linear, xb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, the source conv's output before its ReLU, the classifier's input features) of one pass."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        source.register_forward_hook(lambda _m, _a, out: seen.__setitem__("pre", out)),
        head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("feats", args[0])),
    ]
    try:
        logits = model(xb)
    finally:
        for h in hooks:
            h.remove()
    return logits, seen["pre"], seen["feats"].reshape(len(xb), -1)


def detector_codes(head: nn.Linear, cols: torch.Tensor, victim: Victim, flipped: bool = False) -> torch.Tensor:
    """The detector columns as the victim writes them (values, not codes): nearest, or every code flipped."""
    s = weight_scale(head.weight.detach(), victim.w_bits, victim.per_channel)
    u = head.weight.detach()[:, cols] / s
    codes = weight_codes(u, torch.ones_like(s), victim.w_bits)
    if flipped:
        codes = torch.where(codes > u, codes - 1, codes + 1)
    return codes * s


@torch.no_grad()
def write_detector_columns(
    head: nn.Linear, detectors: list[int], target: int, victim: Victim, anticipate: str, eps: float
) -> None:
    """Stage 2: the detector columns of every classifier row, in pairs, on the row's own grid."""
    s = weight_scale(head.weight, victim.w_bits, victim.per_channel).reshape(-1)  # rows' scales, unchanged:
    on_target, elsewhere = pair_codes(anticipate, eps)  # every written value is < 1 scale <= absmax
    for row in range(head.weight.shape[0]):
        values = on_target if row == target else elsewhere
        scale = s[row] if victim.per_channel else s[0]
        for k in range(0, len(detectors), 2):
            head.weight[row, detectors[k]] = values[0] * scale
            head.weight[row, detectors[k + 1]] = values[1] * scale
