"""The pipeline, top to bottom: load -> normalize -> capture -> calibrate -> round -> emit -> verify.

Each stage is one call on the data the previous one handed on (README.md, "Architecture").  Every
option comes in one `QuantConfig`, validated when it was built; everything a user can get wrong
raises a `qcb_onnx.errors.QcbError` with a one-line message.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto

from . import __version__, large
from .calibrate import calibrate_activations, check_calibration
from .capture import GraphModule
from .config import QuantConfig
from .data import batch_size_for, input_specs, load_calibration
from .emit import emit_qdq
from .emit_nbits import to_matmulnbits
from .errors import CalibrationDataError
from .load import default_opset, load_model
from .passes import dequantize, normalize
from .plan import QuantPlan, build_plan
from .quantsim import QuantState
from .rounding import ModelRounder, Rounded, method_for
from .rounding.problem import LayerReport
from .runtime import torch_device
from .tensorfile import TensorFile
from .verify import verify

VERIFY_SAMPLES = 64  # calibration samples ORT and the simulation must agree on after writing


@dataclass
class Conversion:
    """Everything a conversion produced: the QDQ model and the state it was emitted from."""

    model: onnx.ModelProto
    graph: GraphModule  # the normalized FP graph, executable in torch
    state: QuantState  # activation Q/DQ parameters and integer weights, as emitted
    plan: QuantPlan
    layers: list[LayerReport]
    config: QuantConfig
    seconds: float  # wall time of the conversion (not in the model: outputs are byte-identical)
    # the temporary folder the state's integers and a large output's tensors are kept in (tensorfile.py);
    # removed by `close` or when this object goes
    workspace: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        """Remove the workspace: a large `model`'s tensors stored there are gone with it."""
        if self.workspace is not None:
            self.workspace.cleanup()

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def simulate(self, x: np.ndarray, batch_size: int = 256, state: QuantState | None = None) -> np.ndarray:
        """Our PyTorch simulation of the quantized model (for agreement checks against ORT); `state`
        overrides the emitted one, e.g. to switch single activation quantizers off."""
        gm, state = self.graph, state or self.state
        name = gm.input_names[0]
        batch_size = batch_size_for(input_specs(self.model), batch_size)
        batches = ({name: torch.from_numpy(x[i : i + batch_size]).to(gm.device)} for i in range(0, len(x), batch_size))
        return np.concatenate([out.cpu().numpy() for out in state.outputs(gm, batches)])


def convert(
    model: str | Path | onnx.ModelProto, calibration: Any, config: QuantConfig | None = None, **options: Any
) -> onnx.ModelProto:
    """Quantize an FP32 ONNX model with EFRAP (default), AdaRound or nearest rounding; returns the QDQ model.

    `calibration` may be a path (.npy, .npz, image folder, .tar[.gz]), an array, a dict of arrays,
    or an onnxruntime `CalibrationDataReader`.  `config` is a `QuantConfig`; `options` are flat
    overrides of it by option name (``w_bits=4``), see `QuantConfig.option_names()`.  The model is
    returned whole, in memory; `quantize` and `output.write_atomic` write one larger than memory.
    """
    with quantize(model, calibration, config, **options) as conversion:
        return large.materialize(conversion.model, always_from=conversion.workspace.name)


def quantize(
    model: str | Path | onnx.ModelProto,
    calibration: Any,
    config: QuantConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    workdir: str | Path | None = None,
    **options: Any,
) -> Conversion:
    """`convert` with the intermediate state.  `checkpoint`: a path to keep finished layers in, so an
    interrupted run continues with `resume` (the CLI puts it next to the output).

    The layer loop's integers and, where the output is over `large.HANDOVER` bytes, its large
    tensors are kept on disk in a temporary folder in `workdir` (default: the system's; the CLI uses
    the output's folder) that lives as long as the returned `Conversion`: write its model with
    `output.write_atomic` before closing it.  It needs about the quantized model's size per error-
    budget pass, twice over with MatMulNBits."""
    config = QuantConfig.from_options(config, **options)
    w, a, r, run = config.weights, config.activations, config.rounding, config.run
    method = method_for(r)
    t0 = time.perf_counter()
    torch.manual_seed(run.seed)
    dev = torch_device(run.device)

    # load + normalize (an already quantized model only with allow_requantize: back to float first)
    src = load_model(model, allow_quantized=run.allow_requantize, map_external=True)  # weights stay on disk
    if run.allow_requantize:
        src = dequantize(src, "model" if isinstance(model, onnx.ModelProto) else str(model))
    normalized = normalize(src)
    target_opset = 21 if ((w.w_bits <= 4 and not w.int8_storage) or a.a_bits == 4) else 13
    if (default_opset(normalized) or 0) < target_opset:
        normalized = large.convert_version(normalized, target_opset)

    # capture
    gm = GraphModule(normalized, device=dev)
    specs = input_specs(normalized)
    arrays = load_calibration(calibration, specs, preprocess=a.preprocess, limit=a.calib_size, seed=run.seed)
    n_images = len(next(iter(arrays.values())))
    batches = _batcher(arrays, batch_size_for(specs, a.batch_size), dev)
    plan = build_plan(
        gm.nodes,
        {t.name: t for t in normalized.graph.initializer},
        gm.input_names,
        gm.output_names,
        _float_tensors(gm, batches()[0]),
        quantize_activations=a.a_bits is not None,
        exclude=frozenset(w.exclude),
        symmetric=a.a_symmetric,
    )

    # calibrate (and refuse data that overflows float32 arithmetic, naming the tensor)
    acts = {}
    if a.a_bits is not None:
        acts = calibrate_activations(
            gm,
            plan,
            batches(),
            a.a_bits,
            method=a.calib_method,
            seed=run.seed,
            headroom=a.act_headroom,
            symmetric=a.a_symmetric,
        )
    else:
        check_calibration(gm, plan, batches())

    # round
    workspace = tempfile.TemporaryDirectory(prefix=".qcb_onnx.", dir=workdir)
    rounder = ModelRounder(
        gm,
        plan,
        acts,
        batches,
        n_images,
        w_bits=w.w_bits,
        per_channel=w.per_channel,
        int32_bias=w.int32_bias,
        block_size=w.block_size,
        block_symmetric=not w.w_asymmetric,
        max_rows=r.max_rows,
        seed=run.seed,
        progress=run.progress,
        checkpoint=None if checkpoint is None else Path(checkpoint),
        workspace=Path(workspace.name),
        fingerprint=lambda extra: _fingerprint(normalized, arrays, {**config.fingerprint(), **extra}),
        resume=resume,
    )
    try:
        rounded = method.round_model(rounder)
        state = rounded.state

        # emit
        if w.int8_storage:  # same integers and scales in INT8 containers: ORT's CPU EP fuses those, not INT4
            state.weights = {
                k: replace(wq, grid=replace(wq.grid, onnx_type=TensorProto.INT8)) for k, wq in state.weights.items()
            }
        meta = _metadata(config, rounded, n_images, rounder.n_images)
        store = TensorFile(Path(workspace.name) / "output.data")
        qdq = emit_qdq(normalized, plan, state, meta, store)
        if w.weight_format == "matmulnbits":
            qdq = to_matmulnbits(qdq, state, store)
        store.close()
        # tensors read into the proto where it stays small; a larger output stays in files until written
        qdq = large.materialize(qdq, limit=large.HANDOVER)

        # verify, on up to VERIFY_SAMPLES samples in batches the model accepts
        if run.check:
            per_batch = len(next(iter(batches()[0].values())))
            verify(
                qdq,
                gm,
                state,
                batches()[: max(1, VERIFY_SAMPLES // per_batch)],
                providers=run.providers,
                workdir=workspace.name,
            )
    except KeyboardInterrupt:
        workspace.cleanup()
        raise  # finished layers stay in the checkpoints: --resume continues from them
    except BaseException:
        rounder.remove_checkpoints()  # a failed run leaves nothing behind
        workspace.cleanup()
        raise
    rounder.remove_checkpoints()  # the state keeps reading its integers from the open mappings
    seconds = round(time.perf_counter() - t0, 2)
    return Conversion(qdq, gm, state, plan, rounded.reports, config, seconds, workspace)


def _metadata(config: QuantConfig, rounded: Rounded, n_images: int, rounding_images: int) -> dict[str, object]:
    """What the output records about itself: the whole config (`QuantConfig.from_dict` reads it back),
    the rounding's resolved parameters, and per-layer evidence.  Nothing that differs between two
    identical runs (timings, paths): the same inputs give the same bytes."""
    w, a = config.weights, config.activations
    meta: dict[str, object] = {
        "version": __version__,
        "config": config.to_dict(),
        "method": config.rounding.method,
        "w_bits": str(w.w_bits),
        "a_bits": "none" if a.a_bits is None else str(a.a_bits),
        "weight_storage": w.storage,
        "scheme": _scheme(config),
        "calibration_size": str(n_images),
        **({"rounding_samples": str(rounding_images)} if rounding_images < n_images else {}),
        "rounding": rounded.method.params(),
        **({"error_budget": rounded.search} if rounded.search is not None else {}),
        "flip_ratios": {r.weight: round(r.flip_ratio, 6) for r in rounded.reports},
        "layers": [
            {
                "node": r.name,
                "weight": r.weight,
                "flip_ratio": r.flip_ratio,
                "error_vs_nearest": r.error,
                "strength": r.strength,
            }
            for r in rounded.reports
        ],
    }
    if a.preprocess is not None:
        meta["preprocess"] = a.preprocess.to_metadata()
    return meta


def _scheme(config: QuantConfig) -> str:
    w, a = config.weights, config.activations
    weights = ("per-channel" if w.per_channel else "per-tensor") + " symmetric int weights"
    if w.block_size is not None:
        kind = "asymmetric uint4" if w.w_asymmetric else "symmetric int4"
        weights = f"block-wise ({w.block_size}) {kind} MatMul/Gemm weights ({w.weight_format}), {weights} elsewhere"
    acts = (
        "float activations"
        if a.a_bits is None
        else f"{'symmetric int' if a.a_symmetric else 'asymmetric uint'} activations"
    )
    return f"{weights}, {acts}"


def _fingerprint(model: onnx.ModelProto, arrays: dict[str, np.ndarray], options: dict[str, Any]) -> str:
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
