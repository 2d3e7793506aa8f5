"""The scan's cheap verdict from what a conversion already computed, for convert's summary line.

`convert` has the normalized FP weights' grids (the output's ``<w>_scale`` initializers, ORT's exact
scales), so the weight signals (fractional parts, truncation errors, scale anchors) cost one load and
normalize of the FP model and no model run.  The behavioural signals need model runs and are left
out: this is the full scan's score restricted to `score.CHEAP`, against the same clean reference and
threshold, at the one bit width and granularity converted.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper

from .. import large
from ..load import load_model
from ..passes import normalize
from ..plan import find_layers
from ..scheme import weight_grid
from .reference import load_reference, scheme_name
from .report import judge
from .score import CHEAP, bit_features
from .weights import layer_signals


def _dq_axes(qdq: onnx.ModelProto) -> dict[str, int | None]:
    """Per quantized weight (its integer initializer's name), the DequantizeLinear axis (None: per tensor)."""
    axes: dict[str, int | None] = {}
    for node in qdq.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axes[node.input[0]] = attrs.get("axis", 1) if len(node.input) > 1 else None
    return axes


def _blockwise(node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMulNBits" or (
        node.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in node.attribute)
    )


def convert_signals(fp_model: str | Path, qdq: onnx.ModelProto, w_bits: int) -> list[dict]:
    """Weight signals of every layer `convert` quantized, from the FP source and its output."""
    normalized = normalize(load_model(fp_model, map_external=True))
    inits = {t.name: t for t in normalized.graph.initializer}
    out_inits = {t.name: t for t in qdq.graph.initializer}
    axes = _dq_axes(qdq)
    grid = weight_grid(w_bits)
    layers = []
    for layer in find_layers(list(normalized.graph.node), inits):
        scale = out_inits.get(f"{layer.weight}_scale")
        if scale is None or f"{layer.weight}_quantized" not in out_inits:
            continue  # excluded from quantization
        s = numpy_helper.to_array(scale).astype("float32").reshape(-1)
        w = large.to_array(inits[layer.weight]).astype("float32")
        axis = axes.get(f"{layer.weight}_quantized") if s.size > 1 else None
        layers.append(layer_signals(w, s, axis, layer, grid))
    return layers


def convert_verdict(fp_model: str | Path, qdq: onnx.ModelProto, w_bits: int, per_channel: bool) -> str:
    """convert's one summary line on the scan's cheap signals (or why there is none)."""
    if any(_blockwise(node) for node in qdq.graph.node):
        return "scan (cheap signals): no clean reference for block-wise int4 weights (it holds per-channel CNNs)"
    reference = load_reference()
    section = reference.get(scheme_name(per_channel))
    layers = convert_signals(fp_model, qdq, w_bits)
    features = {f"{k}@w{w_bits}": v for k, v in bit_features(layers, {}, per_channel).items()}
    if not isinstance(section, dict) or not any(k in section["features"] for k in features):
        return f"scan (cheap signals): no clean reference for {w_bits}-bit {scheme_name(per_channel)} weights"
    judged = judge(features, section, CHEAP)
    top = f", top signal {judged['top']}" if judged["top"] else ""
    return (
        f"scan (cheap signals, no model run): {judged['verdict']} (score {judged['score']:.2f}, threshold "
        f"{section['threshold']:.2f}{top}); `python -m qcb_onnx scan` runs every signal"
    )
