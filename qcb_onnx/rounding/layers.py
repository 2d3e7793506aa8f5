"""The layer loop: scale, gather what the method needs from the quantized prefix, solve, commit.

Layers are visited in graph order.  Before a layer is solved, every earlier layer already holds its
final integers and every activation its Q/DQ, so the layer learns to compensate for the error that
reaches it (EFRAP's activation preservation uses the quantized prefix's input).  Once its integers
are chosen, a layer whose method corrects biases (EFRAP, AdaRound) takes the mean of its output
error into its bias (moments.Moments.output_shift), so the next layer starts from the FP model's
mean; nearest keeps ORT's bias like its integers, and efrap-official stays the official reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, blockwise
from ..capture import GraphModule
from ..errors import QcbNote
from ..plan import Layer, QuantPlan
from ..progress import progress_bar
from ..quantsim import ActQuant, QuantState, WeightQuant, quantize_bias
from ..scheme import Grid, broadcast_scale, fit_bias_scale, scaled, weight_grid, weight_scales
from .checkpoint import Checkpoint
from .method import LayerContext, RoundingMethod
from .moments import collect_moments
from .problem import LayerProblem, LayerReport, hard_weight

# Paused activations the layer loop may hold: two runs (FP and quantized prefix) of the batches it
# keeps.  A CIFAR model's 1,024 images need a few hundred MB; ResNet-50's at 224x224 would need ~10 GB,
# so there the loop rounds on the first batches that fit (activation ranges still see every image).
FRONTIER_BYTES = 4 << 30


def kept_batches(gm: GraphModule, plan: QuantPlan, batches: Sequence[dict[str, torch.Tensor]], budget: int) -> int:
    """How many of `batches` fit `budget` bytes of paused activations, FP and quantized: the first
    batch is run to every layer input in turn and its largest live set measured on the way."""
    frontier, peak = gm.start(batches[0]), 0
    with torch.no_grad():
        for layer in plan.layers:
            gm.resume(frontier, [layer.input])
            live = sum(t.numel() * t.element_size() for t in frontier.env.values() if isinstance(t, torch.Tensor))
            peak = max(peak, live)
    return max(1, min(len(batches), budget // max(2 * peak, 1)))


def canonical(w: np.ndarray, layer: Layer) -> np.ndarray:
    """(out, d) view whose rows are the per-channel axis."""
    if layer.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if layer.axis == 0 else w.T


def from_canonical(c: np.ndarray, layer: Layer, shape: tuple[int, ...]) -> np.ndarray:
    if layer.op_type == "Conv":
        return c.reshape(shape)
    return c if layer.axis == 0 else c.T


def layer_scale(
    w: np.ndarray, layer: Layer, grid: Grid, per_channel: bool, gm: GraphModule, acts: dict[str, ActQuant]
) -> tuple[np.ndarray, int | None]:
    """ORT's weight scales, grown where ORT's int32 bias would not fit otherwise (scheme.fit_bias_scale),
    from ORT's input scale: the weight grid is ORT's whatever the activation headroom."""
    axis = layer.axis if per_channel else None
    scale = weight_scales(w, grid, axis)
    if layer.bias is not None and layer.input in acts:
        bias = gm.params[layer.bias].detach().cpu().numpy()
        scale = fit_bias_scale(scale, acts[layer.input].ort_scale, bias, grid)
    return scale, axis


def layer_problem(
    w: np.ndarray, layer: Layer, grid: Grid, scale: np.ndarray, axis: int | None, device: torch.device
) -> LayerProblem:
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
    return problem


def block_problem(
    w: np.ndarray, layer: Layer, blocks: blockwise.Blocks, grid: Grid, device: torch.device
) -> LayerProblem:
    """A MatMul/Gemm weight on ORT's block-wise 4-bit grid (blockwise.py), canonical: the integers are
    u - zero_point, within [-zp, 15 - zp] per block; floor and nearest from MLAS's own quotient, so that
    nearest is ORT's integer.  An all-zero block (scale 0) keeps its only value, 0."""
    wc = canonical(w, layer).astype(np.float32)
    d = wc.shape[1]
    zp = blocks.expand(blocks.zero_point, d).astype(np.float64)
    scale = blocks.expand(blocks.scale, d).astype(np.float64)
    zero = scale == 0
    floor = np.where(zero, 0.0, np.floor(blockwise.quotient(wc, blocks)))
    nearest = blockwise.nearest_unsigned(wc, blocks) - zp
    nearest_up = np.clip(nearest - floor, 0, 1)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)

    return LayerProblem(
        weight=t(wc),
        scale=t(np.where(zero, 1.0, scale)),
        floor=t(floor),
        nearest_up=t(nearest_up),
        grid=grid,
        groups=1,
        moments=None,
        lower=t(np.where(zero, 0.0, -zp)),
        upper=t(np.where(zero, 0.0, blockwise.QMAX - zp)),
        block_size=blocks.block_size,
    )


def block_weight(ints_c: np.ndarray, layer: Layer, shape: tuple[int, ...], blocks: blockwise.Blocks) -> WeightQuant:
    """Canonical signed integers as the file stores them: signed INT4 (symmetric, zero point 8 implied,
    as ORT's QDQ output) or UINT4 u with its zero points (asymmetric), in DequantizeLinear's layout."""
    axis = 1 - layer.axis  # the input axis of a 2-D MatMul / Gemm weight
    zp = None if blocks.symmetric else from_canonical(blocks.zero_point, layer, ()).astype(np.int32)
    stored = ints_c if blocks.symmetric else ints_c + blocks.expand(blocks.zero_point, ints_c.shape[1])
    scale = from_canonical(blocks.scale, layer, ()).astype(np.float32)
    grid = weight_grid(4) if blocks.symmetric else blockwise.UNSIGNED_GRID
    return WeightQuant(from_canonical(stored, layer, shape).astype(np.int32), scale, axis, grid, blocks.block_size, zp)


class ModelRounder:
    """The layer loop bound to one model, its calibrated activations and its calibration batches.

    `run(method)` rounds every layer once; a model-level method (the error-budget search) calls it
    several times.  Each run keeps its finished layers in its own checkpoint file (checkpoint.py;
    the state holds them memory-mapped from there): at the `checkpoint` path with the run's `tag`,
    so a killed run resumes where it stopped with the same integers (each layer's randomness is
    seeded by the seed and the layer's position, not by what ran before), or in `workspace`, a
    folder that goes with the conversion, where no resumable run was asked for."""

    def __init__(
        self,
        gm: GraphModule,
        plan: QuantPlan,
        acts: dict[str, ActQuant],
        batches: Callable[[], Sequence[dict[str, torch.Tensor]]],
        n_images: int,
        *,
        w_bits: int,
        per_channel: bool,
        max_rows: int,
        int32_bias: bool = True,
        block_size: int | None = None,
        block_symmetric: bool = True,
        seed: int,
        progress: bool = False,
        checkpoint: Path | None = None,
        workspace: Path | None = None,
        fingerprint: Callable[[dict[str, Any]], str] | None = None,
        resume: bool = True,
    ) -> None:
        self.gm, self.plan, self.acts, self.batches, self.n_images = gm, plan, acts, batches, n_images
        self._kept: int | None = None
        self.grid = weight_grid(w_bits)
        self.per_channel, self.max_rows, self.seed, self.progress = per_channel, max_rows, seed, progress
        self.int32_bias = int32_bias
        self.block_size, self.block_symmetric = block_size, block_symmetric
        self.checkpoint, self.fingerprint, self.resume = checkpoint, fingerprint, resume
        if checkpoint is None and workspace is None:
            raise ValueError("the layer loop keeps its integers in a checkpoint or a workspace folder")
        self.workspace = workspace
        self.checkpoints: list[Checkpoint] = []  # every file written, removed once the output is verified
        # FP32's and the quantized model's top-1 decisions on the last run's batches, read off its paused
        # runs (`Prefix.decisions`): the error-budget search's agreement at no extra forward pass
        self.decisions: Decisions | None = None

    def _checkpoint_for(self, method: RoundingMethod, tag: str) -> Checkpoint:
        if self.checkpoint is None:
            self.checkpoints.append(Checkpoint(self.workspace / f"layers{tag}", "", resume=False))
            return self.checkpoints[-1]
        path = self.checkpoint.with_name(f"{self.checkpoint.stem}{tag}{self.checkpoint.suffix}")
        key = self.fingerprint({"version": __version__, "method": method.params()}) if self.fingerprint else ""
        self.checkpoints.append(Checkpoint(path, key, self.resume))
        return self.checkpoints[-1]

    def data_batches(self) -> Sequence[dict[str, torch.Tensor]]:
        """The calibration batches the layer loop runs its prefixes on: all of them, or the first ones
        whose paused activations fit FRONTIER_BYTES (`kept_batches`, decided once, with a note)."""
        batches = self.batches()
        if self._kept is None:
            self._kept = kept_batches(self.gm, self.plan, batches, FRONTIER_BYTES)
            if self._kept < len(batches):
                self.n_images = sum(len(next(iter(b.values()))) for b in batches[: self._kept])
                warnings.warn(
                    QcbNote(
                        f"rounding on the first {self.n_images} calibration samples: their activations at every "
                        f"layer fill the {FRONTIER_BYTES / 2**30:g} GiB the layer loop may hold (activation "
                        "ranges are calibrated on all of them)"
                    ),
                    stacklevel=2,
                )
        return batches[: self._kept]

    def _problem(self, w: np.ndarray, layer: Layer) -> tuple[LayerProblem, Callable[[np.ndarray | None], WeightQuant]]:
        """The layer's rounding problem, and how canonical integers become its WeightQuant (None: a
        placeholder whose integers a checkpoint fills in)."""
        grid, gm = self.grid, self.gm
        if self.block_size is not None and layer.op_type in blockwise.BLOCK_OPS:
            blocks = blockwise.block_params(canonical(w, layer), self.block_size, self.block_symmetric)

            def as_blocks(ints_c: np.ndarray | None) -> WeightQuant:
                ints_c = np.zeros(canonical(w, layer).shape) if ints_c is None else ints_c
                return block_weight(ints_c.astype(np.int32), layer, w.shape, blocks)

            return block_problem(w, layer, blocks, grid, gm.device), as_blocks
        scale, axis = layer_scale(w, layer, grid, self.per_channel, gm, self.acts if self.int32_bias else {})

        def as_channels(ints_c: np.ndarray | None) -> WeightQuant:
            ints = np.zeros(w.shape, np.int32) if ints_c is None else from_canonical(ints_c, layer, w.shape)
            return WeightQuant(ints.astype(np.int32), scale, axis, grid)

        return layer_problem(w, layer, grid, scale, axis, gm.device), as_channels

    def remove_checkpoints(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.remove()

    def run(self, method: RoundingMethod, tag: str = "") -> tuple[QuantState, list[LayerReport]]:
        """Quantize every layer's weight with `method`, in order; the state and per-layer evidence."""
        gm = self.gm
        state = QuantState(acts=self.acts)
        checkpoint = self._checkpoint_for(method, tag)
        prefix = Prefix(gm, self.data_batches() if method.data != "none" else [])
        reports = []
        done = checkpoint.load()
        bar = progress_bar(self.plan.layers, desc=method.label(), unit="layer", enabled=self.progress)
        for layer in bar:
            bar.set_postfix_str(layer.node or layer.weight)
            w = gm.params[layer.weight].detach().cpu().numpy().astype(np.float32)
            problem, weight_quant = self._problem(w, layer)
            if layer.weight in done:
                ints, report, shift = done[layer.weight]
                wq = weight_quant(None)
                wq.ints = ints
                _commit(state, gm, layer, wq, shift, self.int32_bias)
                reports.append(report)
                continue
            ctx = LayerContext(gm, self.plan, layer, tuple(w.shape), self.seed + layer.index)
            if method.data == "moments":
                inputs = prefix.inputs(layer.input, state)
                problem.moments = collect_moments(
                    gm, layer, w.shape, problem.weight, inputs, self.max_rows, self.n_images, self.seed
                )
            elif method.data == "samples":
                ctx.samples = prefix.inputs(layer.input, state)
            result = method.solve(problem, ctx)
            up = torch.from_numpy(result.up).to(problem.weight)
            wq = weight_quant(problem.clamp(problem.floor + up).cpu().numpy())
            shift = None
            if method.corrects_bias and layer.bias is not None:
                shift = problem.moments.output_shift(hard_weight(problem, up) - problem.weight).cpu().numpy()
            reports.append(
                LayerReport(layer.node, layer.weight, tuple(w.shape), result.flip_ratio, result.error, result.strength)
            )
            wq.ints = checkpoint.add(layer.weight, wq.ints, reports[-1], shift)  # held from the file from now on
            _commit(state, gm, layer, wq, shift, self.int32_bias)
        self.decisions = prefix.decisions(state) if prefix.batches else None
        return state, reports


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

    def decisions(self, state: QuantState) -> Decisions | None:
        """Both runs finished to the first output with every layer committed: the FP and quantized
        top-1 decision of every sample (every position of a (batch, tokens, vocabulary) output), or
        None where the output is not a decision.  Exactly `state.outputs` on these batches: a finished
        layer loop's quantized prefix is the whole quantized model."""
        gm, name = self.gm, self.gm.output_names[0]
        params, hook = state.params(gm.device), state.hook()
        if self.quantized is None:
            self.quantized = [gm.start(b, on_tensor=hook) for b in self.batches]
        fp, quantized = [], []
        with torch.no_grad():
            for f, q in zip(self.fp, self.quantized, strict=True):
                out = gm.resume(f, [name])[name]
                if out.dim() not in (2, 3) or out.shape[-1] < 2 or not out.is_floating_point():
                    return None
                fp.append(out.argmax(-1).reshape(-1))
                quantized.append(gm.resume(q, [name], params=params, on_tensor=hook)[name].argmax(-1).reshape(-1))
        return Decisions(fp, quantized)


@dataclass
class Decisions:
    fp: list[torch.Tensor]  # per batch, flattened top-1 classes
    quantized: list[torch.Tensor]

    def agreement(self) -> float:
        """% of samples (or token positions) on which the quantized model picks FP32's class."""
        same = sum(int((q == f).sum()) for f, q in zip(self.fp, self.quantized, strict=True))
        return 100.0 * same / max(sum(len(f) for f in self.fp), 1)


def _commit(
    state: QuantState, gm: GraphModule, layer: Layer, wq: WeightQuant, shift: np.ndarray | None, int32_bias: bool
) -> None:
    """Make a layer's integers and its bias, less the mean output error `shift` where one was
    measured, part of the quantized prefix: as int32 when the layer's input is quantized (ORT's
    QDQ bias) unless `int32_bias` is off, else as a corrected FP32 bias."""
    state.weights[layer.weight] = wq
    if layer.bias is None:
        return
    bias = gm.params[layer.bias].detach().cpu().numpy().astype(np.float32)
    if shift is not None:
        bias = (bias.astype(np.float64) - shift).astype(np.float32)
    if int32_bias and layer.input in state.acts:
        state.biases[layer.bias] = quantize_bias(bias, state.acts[layer.input].scale, wq)
    elif shift is not None:
        state.float_biases[layer.bias] = bias
