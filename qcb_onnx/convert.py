"""The pipeline, top to bottom: load -> normalize -> capture -> calibrate -> round -> emit -> verify."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto

from . import __version__, budget, large
from .calibrate import CALIB_METHODS, calibrate_activations
from .capture import GraphModule
from .data import Preprocess, input_specs, load_calibration
from .emit import emit_qdq
from .errors import CalibrationDataError, UsageError
from .load import default_opset, load_model
from .passes import normalize
from .plan import QuantPlan, build_plan
from .quantsim import QuantState
from .rounding import METHODS, RoundingConfig
from .runtime import torch_device
from .verify import verify
from .weights import Checkpoint, LayerReport, round_layers

DEFAULT_ITERS = 1000
OFFICIAL_ITERS = 10000  # the official code's steps per layer, the default of method "efrap-official"
DEFAULT_MAX_ROWS = 1 << 16
DEFAULT_BATCH = 64


@dataclass
class Conversion:
    """Everything a conversion produced: the QDQ model and the state it was emitted from."""

    model: onnx.ModelProto
    graph: GraphModule  # the normalized FP graph, executable in torch
    state: QuantState  # activation Q/DQ parameters and integer weights, as emitted
    plan: QuantPlan
    layers: list[LayerReport]

    def simulate(self, x: np.ndarray, batch_size: int = 256, state: QuantState | None = None) -> np.ndarray:
        """Our PyTorch simulation of the quantized model (for agreement checks against ORT); `state`
        overrides the emitted one, e.g. to switch single activation quantizers off."""
        gm, state = self.graph, state or self.state
        name = gm.input_names[0]
        batches = ({name: torch.from_numpy(x[i : i + batch_size]).to(gm.device)} for i in range(0, len(x), batch_size))
        return np.concatenate([out.cpu().numpy() for out in state.outputs(gm, batches)])


def convert(model: str | Path | onnx.ModelProto, calibration: Any, **options: Any) -> onnx.ModelProto:
    """Quantize an FP32 ONNX model with EFRAP (default), AdaRound or nearest rounding; returns the QDQ model.

    `calibration` may be a path (.npy, .npz, image folder, .tar[.gz]), an array, a dict of arrays,
    or an onnxruntime `CalibrationDataReader`.  Options are those of `quantize`.  Everything a user
    can get wrong raises a `qcb_onnx.errors.QcbError` with a one-line message.
    """
    return quantize(model, calibration, **options).model


def quantize(
    model: str | Path | onnx.ModelProto,
    calibration: Any,
    *,
    method: str = "efrap",
    w_bits: int = 8,
    a_bits: int | None = 8,
    per_channel: bool = True,
    int8_storage: bool = False,
    calib_method: str = "minmax",
    act_headroom: float | None = None,
    calib_size: int | None = 1024,
    iters: int | None = None,
    lr: float | None = None,
    strength: float | None = None,
    error_budget: float | None = None,
    reg_weight: float = 3.0,
    beta: float | None = None,
    guide: str = "element",
    max_rows: int = DEFAULT_MAX_ROWS,
    batch_size: int = DEFAULT_BATCH,
    preprocess: Preprocess | str | None = None,
    seed: int = 0,
    device: str = "auto",
    providers: str | list[str] = "auto",
    progress: bool = False,
    check: bool = True,
    checkpoint: str | Path | None = None,
    resume: bool = True,
) -> Conversion:
    """The whole pipeline; `convert` is this without the intermediate state."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if calib_method not in CALIB_METHODS:
        raise UsageError(f"unknown calibration method {calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
    if act_headroom is None:
        act_headroom = default_headroom(a_bits)
    if not 1.0 <= act_headroom < math.inf:
        raise UsageError(f"--act-headroom must be a finite number >= 1 (1: ORT's ranges), got {act_headroom}")
    if error_budget is not None and not 0.0 <= error_budget < math.inf:
        raise UsageError(f"--error-budget must be a finite number >= 0 (or auto), got {error_budget}")
    if iters is None:
        iters = OFFICIAL_ITERS if method == "efrap-official" else DEFAULT_ITERS
    if iters < 1 or batch_size < 1 or max_rows < 1:
        raise UsageError("--iters, --batch-size and --max-rows must be positive")
    if isinstance(preprocess, str):
        preprocess = Preprocess.parse(preprocess)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dev = torch_device(device)

    # load + normalize
    src = load_model(model)
    target_opset = 21 if ((w_bits <= 4 and not int8_storage) or a_bits == 4) else 13
    normalized = normalize(src)
    if (default_opset(normalized) or 0) < target_opset:
        normalized = large.convert_version(normalized, target_opset)

    # capture
    gm = GraphModule(normalized, device=dev)
    specs = input_specs(normalized)
    arrays = load_calibration(calibration, specs, preprocess=preprocess, limit=calib_size, seed=seed)
    n_images = len(next(iter(arrays.values())))
    batches = _batcher(arrays, batch_size, dev)
    float_tensors = _float_tensors(gm, batches()[0])
    init = {t.name: t for t in normalized.graph.initializer}
    plan = build_plan(
        gm.nodes,
        init,
        gm.input_names,
        gm.output_names,
        float_tensors,
        quantize_activations=a_bits is not None,
    )

    # calibrate
    state = QuantState()
    if a_bits is not None:
        state.acts = calibrate_activations(
            gm, plan, batches(), a_bits, method=calib_method, seed=seed, headroom=act_headroom
        )

    # round
    config = RoundingConfig(
        method=method,
        iters=iters,
        lr=lr,
        strength=strength,
        error_budget=budget.START if error_budget is None else error_budget,
        reg_weight=reg_weight,
        beta=beta,
        guide=guide,
    )
    run_id = [__version__, w_bits, a_bits, per_channel, calib_method, act_headroom, max_rows, batch_size, seed]
    ckpts: list[Checkpoint] = []

    def round_with(cfg: RoundingConfig, tag: str = "") -> tuple[QuantState, list[LayerReport]]:
        probe = QuantState(acts=state.acts)
        if checkpoint is not None:
            path = Path(checkpoint)
            path = path.with_name(f"{path.stem}{tag}{path.suffix}")  # one file per budget tried
            ckpts.append(Checkpoint(path, _fingerprint(normalized, arrays, [*run_id, asdict(cfg)]), resume))
        reports = round_layers(
            gm, plan, probe, batches, n_images, cfg, w_bits, per_channel, max_rows, seed, progress,
            ckpts[-1] if checkpoint is not None else None,
        )  # fmt: skip
        return probe, reports

    search: dict[str, object] = {"mode": "fixed", "chosen": config.error_budget}  # EFRAP's per-layer budget
    auto = method == "efrap" and strength is None and error_budget is None
    labels = budget.fp32_labels(gm, batches()) if auto else None  # None: not a classifier's output
    if labels is not None:

        def round_at(b: float) -> tuple[QuantState, list[LayerReport]]:
            cfg = replace(config, strength=0.0) if b == 0.0 else replace(config, error_budget=b)
            return round_with(cfg, f".b{b:g}")

        (state, reports), probes = budget.choose_budget(
            round_at, lambda r: budget.top1_agreement(gm, r[0], batches(), labels)
        )
        config = replace(config, error_budget=probes[-1].budget)  # the last budget tried is the one chosen
        search = {
            "mode": "auto",
            "chosen": config.error_budget,
            "probes": [{"budget": p.budget, "agreement": round(p.agreement, 2)} for p in probes],
        }
    else:
        if auto:
            search["mode"] = "fixed: the first output is not (batch, classes), so no agreement to measure"
        state, reports = round_with(config)

    # emit
    if int8_storage:  # same integers and scales in INT8 containers: ORT's CPU EP fuses those, not INT4
        state.weights = {
            k: replace(wq, grid=replace(wq.grid, onnx_type=TensorProto.INT8)) for k, wq in state.weights.items()
        }
    metadata = {
        "version": __version__,
        "method": method,
        "w_bits": str(w_bits),
        "weight_storage": "int8" if (int8_storage or w_bits > 4) else "int4",
        "a_bits": "none" if a_bits is None else str(a_bits),
        "scheme": ("per-channel" if per_channel else "per-tensor")
        + " symmetric int weights, asymmetric uint activations",
        "calibration_method": calib_method,
        "act_headroom": str(act_headroom),
        "calibration_size": str(n_images),
        "seed": str(seed),
        "rounding": {k: v for k, v in asdict(config).items()},
        **({"error_budget": search} if method == "efrap" and strength is None else {}),
        "flip_ratios": {r.weight: round(r.flip_ratio, 6) for r in reports},
        "layers": [
            {
                "node": r.name,
                "weight": r.weight,
                "flip_ratio": r.flip_ratio,
                "error_vs_nearest": r.error,
                "strength": r.strength,
            }
            for r in reports
        ],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if preprocess is not None:
        metadata["preprocess"] = preprocess.to_metadata()
    qdq = emit_qdq(normalized, plan, state, metadata)

    # verify
    if check:
        verify(qdq, gm, state, batches()[0], providers=providers)
    for ckpt in ckpts:
        ckpt.remove()
    return Conversion(qdq, gm, state, plan, reports)


def default_headroom(a_bits: int | None) -> float:
    """2 at 8-bit activations, 1 below.  Calibrated ranges clip what a trigger drives past them, and a
    QCB can ride that clipping where weight rounding cannot reach it (BENCHMARKS.md §2: EFRAP left 12 %
    ASR on two ResNet-18 models through one clipped tensor).  One of 8 activation bits buys a 2x margin
    at no measurable CDA cost on 27 QCB models; at 4 bits the same margin costs 12-40 CDA points."""
    return 2.0 if a_bits is not None and a_bits >= 8 else 1.0


def _fingerprint(model: onnx.ModelProto, arrays: dict[str, np.ndarray], options: list) -> str:
    """What a resumable run depends on: the model, the calibration samples and every option."""
    h = large.fingerprint(model)
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _batcher(arrays: dict[str, np.ndarray], batch_size: int, dev: torch.device):
    n = len(next(iter(arrays.values())))
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    cached = [{k: v[i : i + batch_size].to(dev) for k, v in tensors.items()} for i in range(0, n, batch_size)]
    if not cached:
        raise CalibrationDataError("calibration data is empty")
    return lambda: cached


def _float_tensors(gm: GraphModule, feeds: dict[str, torch.Tensor]) -> set[str]:
    found: set[str] = set()

    def see(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.is_floating_point():
            found.add(name)
        return value

    with torch.no_grad():
        gm.run(feeds, on_tensor=see)
    return found
