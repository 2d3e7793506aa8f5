"""The layer loop: scale, capture moments from the quantized prefix, choose the rounding, commit.

Layers are visited in graph order.  Before a layer is optimised, every earlier layer already holds
its final integers and every activation its Q/DQ, so the layer learns to compensate for the error
that reaches it (EFRAP's activation preservation uses the quantized prefix's input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .capture import GraphModule
from .moments import collect_moments
from .plan import Layer, QuantPlan
from .quantsim import QuantState, WeightQuant, quantize_bias
from .rounding import LayerProblem, LayerResult, RoundingConfig, solve
from .scheme import Grid, broadcast_scale, scaled, weight_grid, weight_scales


@dataclass
class LayerReport:
    name: str
    weight: str
    shape: tuple[int, ...]
    flip_ratio: float
    error: float
    strength: float


def canonical(w: np.ndarray, layer: Layer) -> np.ndarray:
    """(out, d) view whose rows are the per-channel axis."""
    if layer.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if layer.axis == 0 else w.T


def from_canonical(c: np.ndarray, layer: Layer, shape: tuple[int, ...]) -> np.ndarray:
    if layer.op_type == "Conv":
        return c.reshape(shape)
    return c if layer.axis == 0 else c.T


def layer_problem(
    w: np.ndarray, layer: Layer, grid: Grid, per_channel: bool, device: torch.device
) -> tuple[LayerProblem, np.ndarray, int | None]:
    axis = layer.axis if per_channel else None
    scale = weight_scales(w, grid, axis)
    quotient = scaled(w, scale, axis)
    floor = np.floor(quotient)
    nearest = np.clip(np.round(quotient), grid.qmin, grid.qmax)
    nearest_up = np.clip(nearest - floor, 0, 1)
    full_scale = np.broadcast_to(broadcast_scale(scale, w.ndim, axis), w.shape)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(canonical(a, layer), dtype=np.float64)).to(device)

    problem = LayerProblem(
        weight=t(w),
        scale=t(full_scale)[:, :1],
        floor=t(floor),
        nearest_up=t(nearest_up),
        grid=grid,
        groups=layer.groups,
        moments=None,
    )
    return problem, scale, axis


def round_layers(
    gm: GraphModule,
    plan: QuantPlan,
    state: QuantState,
    batches: Callable[[], Sequence[dict[str, torch.Tensor]]],
    n_images: int,
    config: RoundingConfig,
    w_bits: int,
    per_channel: bool,
    max_rows: int,
    seed: int,
    progress: bool,
) -> list[LayerReport]:
    """Quantize every layer's weight into `state`, in order; returns per-layer evidence."""
    grid = weight_grid(w_bits)
    reports = []
    bar = tqdm(plan.layers, desc=f"{config.method} rounding", unit="layer", disable=not progress)
    for layer in bar:
        bar.set_postfix_str(layer.node or layer.weight)
        w = gm.params[layer.weight].detach().cpu().numpy().astype(np.float32)
        if layer.op_type == "Gemm" and layer.axis == 1 and w.ndim != 2:
            raise AssertionError("Gemm weight must be 2-D")
        problem, scale, axis = layer_problem(w, layer, grid, per_channel, gm.device)
        if config.method != "nearest":
            problem.moments = collect_moments(
                gm,
                layer,
                w.shape,
                problem.weight,
                batches(),
                state.params(gm.device),
                state.hook(),
                max_rows,
                n_images,
                seed,
            )
        result: LayerResult = solve(problem, config, seed=seed + layer.index)
        ints_c = np.clip(canonical(np.floor(scaled(w, scale, axis)), layer) + result.up, grid.qmin, grid.qmax)
        ints = from_canonical(ints_c, layer, w.shape).astype(np.int32)
        wq = WeightQuant(ints, scale, axis, grid)
        state.weights[layer.weight] = wq
        if layer.bias is not None and layer.input in state.acts:
            bias = gm.params[layer.bias].detach().cpu().numpy().astype(np.float32)
            state.biases[layer.bias] = quantize_bias(bias, state.acts[layer.input].scale, wq, layer)
        reports.append(
            LayerReport(layer.node, layer.weight, tuple(w.shape), result.flip_ratio, result.error, result.strength)
        )
    return reports
