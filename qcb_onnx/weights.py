"""The layer loop: scale, capture moments from the quantized prefix, choose the rounding, commit.

Layers are visited in graph order.  Before a layer is optimised, every earlier layer already holds
its final integers and every activation its Q/DQ, so the layer learns to compensate for the error
that reaches it (EFRAP's activation preservation uses the quantized prefix's input).  Once its
integers are chosen, an EFRAP or AdaRound layer with a bias takes the mean of its output error into
the bias (moments.Moments.output_shift), so the next layer starts from the FP model's mean; nearest
keeps ORT's bias like its integers, and efrap-official stays the official code's reference.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .capture import GraphModule
from .moments import collect_moments
from .official import fused_activation, solve_official
from .plan import Layer, QuantPlan
from .problem import LayerProblem, hard_weight
from .quantsim import QuantState, WeightQuant, quantize_bias
from .rounding import RoundingConfig, solve
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
    checkpoint: Checkpoint | None = None,
) -> list[LayerReport]:
    """Quantize every layer's weight into `state`, in order; returns per-layer evidence.

    With a `checkpoint`, layers it already holds are taken from it and every finished layer is
    saved to it, so a killed run resumes where it stopped with the same integers (each layer's
    randomness is seeded by the seed and the layer's position, not by what ran before)."""
    grid = weight_grid(w_bits)
    prefix = Prefix(gm, batches())
    reports = []
    done = checkpoint.load() if checkpoint else {}
    bar = tqdm(plan.layers, desc=_describe(config), unit="layer", disable=not progress)
    for layer in bar:
        bar.set_postfix_str(layer.node or layer.weight)
        w = gm.params[layer.weight].detach().cpu().numpy().astype(np.float32)
        problem, scale, axis = layer_problem(w, layer, grid, per_channel, gm.device)
        if layer.weight in done:
            ints, report, shift = done[layer.weight]
            _commit(state, gm, layer, WeightQuant(ints, scale, axis, grid), shift)
            reports.append(report)
            continue
        if config.method == "efrap-official":
            inputs = prefix.inputs(layer.input, state)
            act = fused_activation(gm, layer, plan.removed_relus)
            result = solve_official(problem, gm, layer, w.shape, act, inputs, config, seed + layer.index)
        else:
            if config.method != "nearest":
                inputs = prefix.inputs(layer.input, state)
                problem.moments = collect_moments(gm, layer, w.shape, problem.weight, inputs, max_rows, n_images, seed)
            result = solve(problem, config, seed=seed + layer.index)
        ints_c = np.clip(problem.floor.cpu().numpy() + result.up, grid.qmin, grid.qmax)
        ints = from_canonical(ints_c, layer, w.shape).astype(np.int32)
        shift = None
        if problem.moments is not None and layer.bias is not None:
            up = torch.from_numpy(result.up).to(problem.weight)
            shift = problem.moments.output_shift(hard_weight(problem, up) - problem.weight).cpu().numpy()
        _commit(state, gm, layer, WeightQuant(ints, scale, axis, grid), shift)
        reports.append(
            LayerReport(layer.node, layer.weight, tuple(w.shape), result.flip_ratio, result.error, result.strength)
        )
        if checkpoint:
            done[layer.weight] = (ints, reports[-1], shift)
            checkpoint.save(done)
    return reports


def _describe(config: RoundingConfig) -> str:
    """The progress bar's label: which of the budget search's passes is running, when it is one."""
    if config.method != "efrap":
        return f"{config.method} rounding"
    if config.strength is not None:
        return "efrap rounding, no pull (reference)" if config.strength == 0 else "efrap rounding"
    return f"efrap rounding, budget {config.error_budget:g}"


class Prefix:
    """The calibration batches run up to the current layer, through the FP model and through the
    quantized prefix, paused there (`capture.Frontier`).  Each layer resumes where the previous one
    stopped: the layer loop runs every node once per batch and pass, not once per layer, so its
    cost grows linearly with depth.  Valid because a layer's integers only change nodes not yet run.
    """

    def __init__(self, gm: GraphModule, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        self.gm = gm
        self.batches = batches
        self.fp = [gm.start(b) for b in batches]
        self.quantized: list | None = None  # started with the activation hook, on first use

    def inputs(self, tensor: str, state: QuantState) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(FP, quantized-prefix) values of `tensor`, batch by batch."""
        gm, params, hook = self.gm, state.params(self.gm.device), state.hook()
        if self.quantized is None:
            self.quantized = [gm.start(b, on_tensor=hook) for b in self.batches]
        with torch.no_grad():
            for fp, q in zip(self.fp, self.quantized, strict=True):
                x_fp = gm.resume(fp, [tensor])[tensor]
                yield x_fp, gm.resume(q, [tensor], params=params, on_tensor=hook)[tensor]


def _commit(state: QuantState, gm: GraphModule, layer: Layer, wq: WeightQuant, shift: np.ndarray | None = None) -> None:
    """Make a layer's integers and its bias, less the mean output error `shift` where one was
    measured, part of the quantized prefix: as int32 when the layer's input is quantized (ORT's
    QDQ bias), else as a corrected FP32 bias."""
    state.weights[layer.weight] = wq
    if layer.bias is None:
        return
    bias = gm.params[layer.bias].detach().cpu().numpy().astype(np.float32)
    if shift is not None:
        bias = (bias.astype(np.float64) - shift).astype(np.float32)
    if layer.input in state.acts:
        state.biases[layer.bias] = quantize_bias(bias, state.acts[layer.input].scale, wq)
    elif shift is not None:
        state.float_biases[layer.bias] = bias


class Checkpoint:
    """Per-layer decisions in an .npz (no pickle), valid only for the run `fingerprint` identifies."""

    def __init__(self, path: str | Path, fingerprint: str, resume: bool = True) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.resume = resume

    def load(self) -> dict[str, tuple[np.ndarray, LayerReport, np.ndarray | None]]:
        if not self.resume or not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["fingerprint"]) != self.fingerprint:
                    return {}  # a different model, data or option set: start afresh
                meta = json.loads(str(z["reports"]))
                return {
                    m["weight"]: (
                        z[f"ints/{m['weight']}"],
                        LayerReport(**{**m, "shape": tuple(m["shape"])}),
                        z[f"shift/{m['weight']}"] if f"shift/{m['weight']}" in z.files else None,
                    )
                    for m in meta
                }
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
            return {}  # unreadable (e.g. killed mid-write before the rename): start afresh

    def save(self, done: dict[str, tuple[np.ndarray, LayerReport, np.ndarray | None]]) -> None:
        arrays = {f"ints/{name}": ints for name, (ints, _, _) in done.items()}
        arrays.update({f"shift/{name}": shift for name, (_, _, shift) in done.items() if shift is not None})
        reports = json.dumps([asdict(r) for _, r, _ in done.values()])
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(self.fingerprint), reports=np.array(reports), **arrays)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
