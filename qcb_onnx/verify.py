"""Post-write checks: the model is valid ONNX, runs in ONNX Runtime, holds exactly our integers,
and ORT computes what our PyTorch simulation computes."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from . import large
from .capture import GraphModule
from .emit import read_weight_ints
from .errors import VerificationError
from .quantsim import QuantState
from .runtime import session
from .text import one_line


def verify(
    qdq: onnx.ModelProto,
    gm: GraphModule,
    state: QuantState,
    batches: list[dict[str, torch.Tensor]],
    providers: str | list[str] = "auto",
    min_agreement: float = 0.9,
    workdir: str | None = None,
) -> float:
    """Raise VerificationError on any failed check; return top-1 agreement ORT vs simulation over
    `batches` (each of a size the model accepts: a static batch dimension is honoured).  A large
    model reaches ORT as files in a temporary folder in `workdir`."""
    try:
        large.check_model(qdq, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"written model fails the ONNX checker: {one_line(exc)}") from None
    for name, wq in state.weights.items():
        if not np.array_equal(read_weight_ints(qdq, name), wq.ints):
            raise VerificationError(f"integer weights of '{name}' differ from the rounding decisions")
    try:
        sess = session(qdq, providers, workdir=workdir)
        ort_out = np.concatenate([sess.run(None, {k: v.cpu().numpy() for k, v in b.items()})[0] for b in batches])
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"ONNX Runtime cannot run the written model: {one_line(exc)}") from None
    sim = np.concatenate([out.cpu().numpy() for out in state.outputs(gm, batches)])
    if ort_out.shape != sim.shape:
        raise VerificationError(f"ORT output shape {ort_out.shape} differs from simulation {sim.shape}")
    if ort_out.ndim < 2 or ort_out.shape[-1] < 2:
        return 1.0
    out_q = state.acts.get(gm.output_names[0])
    agree = decision_agreement(ort_out, sim, 0.0 if out_q is None else float(out_q.scale))
    if agree < min_agreement:
        raise VerificationError(f"ORT and the PyTorch simulation agree on only {agree:.1%} of top-1 predictions")
    return agree


def decision_agreement(ort_out: np.ndarray, sim: np.ndarray, step: float = 0.0) -> float:
    """Share of top-1 decisions (rows of the last axis) on which ORT picks a class our simulation scores
    within `step` of its maximum.

    `step` is the output's quantization step where the output itself is Q/DQ'd: ORT's fused kernels
    requantize from int32 accumulators where we dequantize first, so the two can land one step apart
    at a rounding tie, and a decision that close is a tie either runtime may break (frequent where the
    logits hardly depend on the input, e.g. random weights; BENCHMARKS.md §7).  Exact ties always count."""
    o, s = ort_out.reshape(-1, ort_out.shape[-1]), sim.reshape(-1, sim.shape[-1])
    picked = s[np.arange(len(s)), o.argmax(1)]
    return float((picked >= s.max(1) - step * (1 + 1e-5)).mean())
