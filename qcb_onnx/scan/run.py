"""The scan: the pipeline run twice per victim bit width (nearest, then EFRAP), and the signals read off.

Nothing is re-implemented: `pipeline.quantize` loads, normalizes (BatchNorm folded: the weights ORT
quantizes), captures, plans and calibrates, and rounds, once with `Nearest` (ORT's own integers on
ORT's own grids: the model a QCB is built to wake) and once with EFRAP at a fixed error budget (how
many weights a rounding that keeps the activations chooses to flip; clean 8-bit models flip a few
per mille, efrap.md §5).  Its `Conversion`s carry the normalized FP weights, ORT's scales, both
integer sets and our simulation of both quantized models; the signals are read off them
(weights.py, behaviour.py).  No trigger, target label or attack is assumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Preprocess, batch_size_for, input_specs, load_calibration
from ..errors import UsageError
from ..load import load_model
from ..pipeline import Conversion, _batcher, quantize
from ..progress import progress_bar
from ..rounding.budget import START
from ..runtime import torch_device
from ..scheme import weight_grid
from .behaviour import error_concentration, output_disparity
from .trigger import STEPS, differential_trigger
from .weights import layer_signals


@dataclass(frozen=True)
class ScanOptions:
    """What the scan assumes about the victim's quantizer and how much data it looks at."""

    w_bits: tuple[int, ...] = (8, 4)  # victim weight widths to test; the score is the worst over them
    per_channel: bool = True
    calib_size: int = 256
    batch_size: int = 64
    preprocess: Preprocess | None = None
    seed: int = 0
    error_budget: float = START  # EFRAP's budget for the flip signal: the auto search's first probe
    max_rows: int = 16384  # input rows per layer for EFRAP's moments (convert: 65536)
    trigger_steps: int = STEPS  # Adam steps of the differential trigger search, per bit width
    device: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.w_bits:
            raise UsageError("--w-bits needs at least one bit width")
        for bits in self.w_bits:
            weight_grid(bits)  # raises UsageError outside 2..8
        if len(set(self.w_bits)) != len(self.w_bits):
            raise UsageError(f"--w-bits lists a width twice: {' '.join(map(str, self.w_bits))}")
        for name in ("calib_size", "batch_size", "max_rows", "trigger_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _convert(model: str | Path, arrays: dict, options: ScanOptions, bits: int, **method: Any) -> Conversion:
    return quantize(
        model,
        arrays,
        w_bits=bits,
        per_channel=options.per_channel,
        calib_size=None,  # the arrays are the sample already drawn
        batch_size=options.batch_size,
        seed=options.seed,
        device=options.device,
        check=False,
        progress=False,
        **method,
    )


def bit_signals(model: str | Path, arrays: dict, options: ScanOptions, bits: int) -> dict:
    """Per-layer and model-level signals under the victim grid at `bits`."""
    nearest = _convert(model, arrays, options, bits, method="nearest", act_headroom=1.0)
    flipped = _convert(
        model, arrays, options, bits, method="efrap", error_budget=options.error_budget, max_rows=options.max_rows
    )
    gm, plan = nearest.graph, nearest.plan
    specs = input_specs(nearest.model)
    batches = _batcher(arrays, batch_size_for(specs, options.batch_size), gm.device)()
    reports = {r.weight: r for r in flipped.layers}
    states = {"nearest": nearest.state, "flipped": flipped.state}
    conc = error_concentration(gm, plan, batches[0], states, options.seed)
    layers = []
    for layer in plan.layers:
        wq = nearest.state.weights[layer.weight]
        w = gm.params[layer.weight].detach().cpu().numpy()
        sig = {"node": layer.node, "weight": layer.weight, "op": layer.op_type, "shape": list(w.shape)}
        sig.update(layer_signals(w, wq.scale, wq.axis, layer, wq.grid))
        if layer.weight in reports:
            sig["flip_ratio"] = reports[layer.weight].flip_ratio
            sig["efrap_error"] = reports[layer.weight].error
        for name, value in conc.get(layer.weight, {}).items():
            sig[f"concentration_{name}"] = value
        layers.append(sig)
    model_level = output_disparity(gm, batches, nearest.state, flipped.state)
    model_level.update(differential_trigger(gm, nearest.state, arrays, options.seed, options.trigger_steps))
    return {"layers": layers, "model": model_level}


def collect_signals(model: str | Path, calibration: Any, options: ScanOptions | None = None) -> dict:
    """The raw signals of a scan, for every victim bit width in `options.w_bits`."""
    options = options or ScanOptions()
    t0 = time.perf_counter()
    torch_device(options.device)  # a bad --device fails before any work
    specs = input_specs(load_model(model))
    arrays = load_calibration(
        calibration, specs, preprocess=options.preprocess, limit=options.calib_size, seed=options.seed
    )
    out: dict = {"per_channel": options.per_channel, "calibration_size": len(next(iter(arrays.values())))}
    out["error_budget"] = options.error_budget
    out["bits"] = {}
    for bits in progress_bar(options.w_bits, desc="scan", unit="bit width", enabled=options.progress):
        out["bits"][str(bits)] = bit_signals(model, arrays, options, bits)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
