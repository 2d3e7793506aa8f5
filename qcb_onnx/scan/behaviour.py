"""Behavioural signals on calibration data: how the FP model and its nearest-rounded version (the
integers ORT's quantize_static writes) differ, and in how few neurons.

A QCB's payload sleeps on clean inputs, so these are indirect: an attacker who trained the FP and the
nearest model apart (Qu-ANTI-zation, CompArtifact) or moved the FP model away from a fixed nearest
model (PQBackdoor) leaves a nearest-rounding error that is larger, or lives in fewer output channels,
than the same grid leaves on a model trained without it in mind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..capture import GraphModule
from ..plan import QuantPlan
from ..quantsim import QuantState
from ..rounding.layers import canonical
from ..rounding.moments import sampled_rows

TOP_SHARE = 0.05  # the "few neurons": the top 5 % of a layer's output channels by error energy
ROWS = 4096  # input rows (conv patches) sampled per layer for the per-channel error


def _first_output(gm: GraphModule, batches: Sequence[dict[str, torch.Tensor]], state: QuantState | None) -> np.ndarray:
    if state is None:
        with torch.no_grad():
            outs = [gm.run(b)[gm.output_names[0]] for b in batches]
    else:
        outs = list(state.outputs(gm, batches))
    return np.concatenate([o.detach().cpu().double().numpy().reshape(len(o), -1) for o in outs])


def output_disparity(
    gm: GraphModule, batches: Sequence[dict[str, torch.Tensor]], nearest: QuantState
) -> dict[str, float]:
    """Top-1 disagreement (%) and relative logit shift of nearest against FP.  The shift is
    mean ||z_q - z_fp|| over mean ||z_fp - mean z_fp||: scale-free."""
    fp = _first_output(gm, batches, None)
    near = _first_output(gm, batches, nearest)
    # a near-constant output (a dead network) must not turn rounding noise into a huge relative shift
    spread = max(float(np.linalg.norm(fp - fp.mean(0), axis=1).mean()), 1e-3 * float(np.sqrt(np.mean(fp**2))), 1e-12)

    def shift(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b, axis=1).mean() / spread)

    out = {"logit_shift_nearest": shift(near, fp)}
    if fp.shape[1] >= 2:  # a classifier: top-1 decisions to compare
        out["disagree_nearest"] = float(np.mean(near.argmax(1) != fp.argmax(1)) * 100)
    return out


def layer_inputs(
    gm: GraphModule, plan: QuantPlan, batches: Sequence[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Every quantized layer's FP input on the given batches, concatenated along the batch."""
    wanted = {layer.input for layer in plan.layers}
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, value: torch.Tensor) -> torch.Tensor:
        if name in wanted:
            seen.setdefault(name, []).append(value.detach())
        return value

    with torch.no_grad():
        for feeds in batches:
            gm.run(feeds, on_tensor=keep)
    return {name: torch.cat(values) for name, values in seen.items()}


def error_concentration(
    gm: GraphModule,
    plan: QuantPlan,
    batches: Sequence[dict[str, torch.Tensor]],
    states: dict[str, QuantState],
    seed: int,
) -> dict[str, dict[str, float]]:
    """Per layer and state: how concentrated the layer's output error E[((W_q - W) x)^2] is, per output
    channel, on FP inputs x from `batches`: the share of the error energy in the top `TOP_SHARE` of
    channels, over that share (1 = evenly spread, 1 / TOP_SHARE = all in those channels)."""
    inputs = layer_inputs(gm, plan, batches)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for layer in plan.layers:
        x = inputs.get(layer.input)
        if x is None:
            continue
        w = gm.params[layer.weight].detach().cpu().numpy().astype(np.float32)
        node = gm.nodes[layer.index]
        rows = sampled_rows(node, tuple(w.shape), [x.float()], ROWS, gen)[0].double().cpu()
        g = layer.groups
        wc = canonical(w, layer).astype(np.float64)
        rows = rows.reshape(len(rows), g, -1)  # (n, g, d)
        k = max(1, int(np.ceil(TOP_SHARE * wc.shape[0])))
        result = {}
        for name, state in states.items():
            wq = state.weights.get(layer.weight)
            if wq is None:
                continue
            d = torch.from_numpy(canonical(wq.dequantized(), layer).astype(np.float64) - wc)
            err = torch.einsum("ngd,god->ngo", rows, d.reshape(g, -1, d.shape[-1])).reshape(len(rows), -1)
            energy = err.pow(2).mean(0).numpy()
            total = float(energy.sum())
            top = float(np.sort(energy)[-k:].sum())
            result[name] = top / total / (k / len(energy)) if total > 0 else 1.0
        out[layer.weight] = result
    return out
