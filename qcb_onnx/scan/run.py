"""The scan: the pipeline's nearest rounding per victim bit width, and the signals read off.

Nothing is re-implemented: `pipeline.quantize` loads, normalizes (BatchNorm folded: the weights ORT
quantizes), captures, plans, calibrates and rounds with `Nearest` (ORT's own integers on ORT's own
grids: the model a QCB is built to wake).  Its `Conversion` carries the normalized FP weights, ORT's
scales, the integers and our simulation of the quantized model; the signals are read off it
(weights.py, behaviour.py, trigger.py).  No trigger, target label or attack is assumed.

An EFRAP run per bit width (how many weights a rounding that keeps the activations chooses to flip)
was a signal until the zoo measured it: AUC 0.45-0.49 alone, no better than chance, at two thirds of
the scan's time (BENCHMARKS.md "Scanning for QCBs"); it is gone.
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
        for name in ("calib_size", "batch_size", "trigger_steps"):
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
    gm, plan = nearest.graph, nearest.plan
    specs = input_specs(nearest.model)
    static = batch_size_for(specs, 0) or None  # the batch the model's input fixes, if any
    batches = _batcher(arrays, static or options.batch_size, gm.device)()
    # one batch of the wanted size, or as many of the model's fixed batches as make one up
    first = batches[: max(1, options.batch_size // len(next(iter(batches[0].values()))))]
    conc = error_concentration(gm, plan, first, {"nearest": nearest.state}, options.seed)
    layers = []
    for layer in plan.layers:
        wq = nearest.state.weights[layer.weight]
        w = gm.params[layer.weight].detach().cpu().numpy()
        sig = {"node": layer.node, "weight": layer.weight, "op": layer.op_type, "shape": list(w.shape)}
        sig.update(layer_signals(w, wq.scale, wq.axis, layer, wq.grid))
        for name, value in conc.get(layer.weight, {}).items():
            sig[f"concentration_{name}"] = value
        layers.append(sig)
    model_level = output_disparity(gm, batches, nearest.state)
    model_level.update(differential_trigger(gm, nearest.state, arrays, options.seed, options.trigger_steps, static))
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
    out["bits"] = {}
    for bits in progress_bar(options.w_bits, desc="scan", unit="bit width", enabled=options.progress):
        out["bits"][str(bits)] = bit_signals(model, arrays, options, bits)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
