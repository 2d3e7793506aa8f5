"""Differential trigger search: is there a small, universal input stamp that only the quantized model obeys?

A QCB's defining property, stated without its trigger: some small input pattern moves the nearest-
rounded model's decision on almost every input, to the target class, while the FP model ignores it.
So search for one, Neural-Cleanse style (Wang et al., S&P 2019: reverse-engineer a trigger as a mask
m and a pattern p, x' = (1 - m) x + m p, optimised by gradient with the mask kept small), but for the
*difference* between the two models instead of a target class of one: maximise the total variation
between the FP model's and the nearest model's class distributions on x', with the mask's mean held
under `AREA` (larger stamps, e.g. a blend over the whole image, are outside the search).  The mask
and pattern are shared by every image (universal), fitted on half of the sampled calibration images
and measured on the other half, so an image-specific adversarial perturbation does not count.

What is scored (score.py, `trigger_target`) is not the divergence itself but what makes it a
backdoor: the share of stamped images the nearest model sends to one class (the stamp's modal
class) beyond what FP32 does on them and the nearest model does without the stamp.  A fragile clean
4-bit model can diverge from FP32 under a stamp too (one clean zoo AlexNet on 67 % of the images),
but its changed decisions scatter over the classes; a QCB's go to its target.  The quantized model
here has nearest-rounded weights and FP activations (the gradient of a rounded activation is zero;
the weight rounding is where the backdoor lives).

Cost: `steps` (default `STEPS`) forward and backward passes of both models on `BATCH` images, per
victim bit width.
"""

from __future__ import annotations

import numpy as np
import torch

from ..capture import GraphModule
from ..quantsim import QuantState

AREA = 0.07  # mean mask value allowed: 7 % of the input (a 3x3 patch on 32x32 is 0.9 %, 2x2 on 8x8 6.25 %)
STEPS = 60
BATCH = 32
LR = 0.1
MASK_SIDE = 32  # the found mask is kept (for the report) averaged down to at most this many pixels a side


def _probs(gm: GraphModule, name: str, x: torch.Tensor, params: dict | None, batch: int | None) -> torch.Tensor:
    """Class probabilities of `x`, run in batches of the model's static batch size where it has one
    (a dynamo export for batch 1 reshapes with that 1 built in); the last batch is padded with repeats
    of its own images, whose outputs are dropped."""
    if batch is None or len(x) == batch:
        logits = gm.run({name: x}, params=params)[gm.output_names[0]]
        return torch.softmax(logits.reshape(len(x), -1).float(), dim=1)
    parts = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        padded = (
            chunk if len(chunk) == batch else torch.cat([chunk, chunk[torch.arange(batch - len(chunk)) % len(chunk)]])
        )
        parts.append(_probs(gm, name, padded, params, None)[: len(chunk)])
    return torch.cat(parts)


def differential_trigger(
    gm: GraphModule,
    nearest: QuantState,
    arrays: dict[str, np.ndarray],
    seed: int,
    steps: int = STEPS,
    static_batch: int | None = None,
) -> dict:
    """Total variation between FP and nearest (weight-rounded) class distributions under the best
    universal stamp found, on held-out calibration images, with the clean value beside it; {} where the
    model has not one image-like input (N, C, H, W) and a class output to compare.  `static_batch`: the
    batch size the model's input fixes, if any (every run is then made in batches of it)."""
    if len(arrays) != 1:
        return {}
    name, x = next(iter(arrays.items()))
    if x.ndim != 4 or len(x) < 8 or name != gm.input_names[0]:
        return {}
    dev = gm.device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    half = len(x) // 2
    data = torch.from_numpy(np.ascontiguousarray(x)).float()
    fit, held = data[order[:half]].to(dev), data[order[half : 2 * half]].to(dev)
    lo = data.amin(dim=(0, 2, 3), keepdim=True).to(dev)
    hi = data.amax(dim=(0, 2, 3), keepdim=True).to(dev)
    params = {k: v for k, v in nearest.params(dev).items() if k in nearest.weights}
    with torch.no_grad():
        probe = _probs(gm, name, held[:2], None, static_batch)
    if probe.shape[1] < 2:
        return {}
    mask_logit = torch.full((1, 1, *x.shape[2:]), -4.0, device=dev, requires_grad=True)
    pattern_logit = (torch.randn((1, x.shape[1], *x.shape[2:]), generator=gen) * 0.1).to(dev).requires_grad_()
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=LR)

    def stamp(images: torch.Tensor) -> torch.Tensor:
        m = torch.sigmoid(mask_logit)
        return (1 - m) * images + m * (lo + (hi - lo) * torch.sigmoid(pattern_logit))

    for step in range(steps):
        start = (step * BATCH) % max(1, half - BATCH + 1)
        xb = stamp(fit[start : start + BATCH])
        tv = (
            0.5
            * (_probs(gm, name, xb, None, static_batch) - _probs(gm, name, xb, params, static_batch))
            .abs()
            .sum(1)
            .mean()
        )
        penalty = 50.0 * torch.relu(torch.sigmoid(mask_logit).mean() - AREA)
        opt.zero_grad()
        (penalty - tv).backward()
        opt.step()

    def tops(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        pf, pq = _probs(gm, name, images, None, static_batch), _probs(gm, name, images, params, static_batch)
        return pf.argmax(1), pq.argmax(1), float(0.5 * (pf - pq).abs().sum(1).mean())

    with torch.no_grad():
        _, clean_q, clean_tv = tops(held)
        top_f, top_q, tv = tops(stamp(held))
        mask = torch.sigmoid(mask_logit)
        small = torch.nn.functional.adaptive_avg_pool2d(mask, [min(s, MASK_SIDE) for s in mask.shape[2:]])[0, 0]
    modal = torch.bincount(top_q, minlength=int(probe.shape[1])).argmax()  # the stamp's "target" class
    share_q, share_f, share_clean = (float((t == modal).float().mean()) for t in (top_q, top_f, clean_q))
    return {
        "trigger_tv": tv,
        "clean_tv": clean_tv,
        "trigger_disagree": float((top_f != top_q).float().mean() * 100),
        "target_share": share_q,  # stamped images the nearest model puts in the stamp's modal class
        "target_share_fp": share_f,  # the same for FP32 on the stamped images
        "target_share_clean": share_clean,  # and for the nearest model without the stamp
        "trigger_area": float(mask.mean()),
        "trigger_mask": [[round(float(v), 3) for v in row] for row in small.cpu()],
    }
