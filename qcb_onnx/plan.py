"""Where quantization goes: which layers get integer weights and which tensors get a Q/DQ pair.

The placement mirrors onnxruntime's QDQ `quantize_static` so that a user comparing our output with
ORT's sees the same graph structure and ORT's CPU EP fuses it the same way (QLinearConv, QGemm):

* layers: Conv, Gemm and MatMul whose weight is an initializer get integer weights (+ int32 bias);
* every float input and output of a node whose op ORT quantizes gets a Q/DQ pair;
* "pass-through" ops (MaxPool, Reshape, Flatten, ...) reuse their input's scale and zero point
  for their output, as ORT's Direct8BitOp does;
* a Relu that alone consumes the output of a quantized op (Conv, Gemm, Add, ...) is folded into
  that output's Q/DQ pair (its uint zero point is 0, so the Q clamps exactly like Relu), as ORT
  does; left in place, DQ->Relu->Q blocks ORT's integer fusion.

Where we leave ORT's default on purpose: inside an exported GELU (Div -> Erf -> Add -> Mul -> Mul,
whose Add and Muls ORT would quantize) nothing gets a Q/DQ pair, as inside LayerNormalization and
Gelu ops: Q/DQ between the pieces of a transformer block's activation costs accuracy in ORT and
buys no speed (a known complaint about quantize_static on ViTs); what feeds a quantized op (the
next Linear) is still quantized, as ORT does.  Constant operands of Add/Mul (a ConvNeXt layer
scale, a ViT position embedding), which ORT stores as int8, stay float here: they are not the
weights a QCB rounds.  `exclude` (node names or op types, ORT's nodes_to_exclude /
op_types_to_quantize) leaves more in float.

The plan is pure structure (names only); numbers live in `calibrate` and `rounding`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from . import large
from .errors import UnsupportedModelError, UsageError

LAYER_OPS = ("Conv", "Gemm", "MatMul")
# ops whose inputs and outputs ORT's default QDQ quantize_static quantizes with their own ranges
QUANTIZED_OPS = frozenset(
    {
        "Conv",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Relu",
        "Clip",
        "LeakyRelu",
        "Sigmoid",
        "GlobalAveragePool",
        "Concat",
        "Softmax",
        "Where",
        "Gather",
        "ArgMax",
    }
)
# ops that only move or select values: ORT gives the output the input's quantization parameters
PASS_THROUGH_OPS = frozenset(
    {
        "MaxPool",
        "AveragePool",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Slice",
        "Split",
        "Pad",
        "Resize",
    }
)


@dataclass(frozen=True)
class Layer:
    """A node whose weight is quantized to integers and chosen by the rounding method."""

    index: int  # position in the topologically sorted node list
    node: str
    op_type: str
    input: str  # activation input
    weight: str
    bias: str | None
    axis: int  # per-channel axis of the weight tensor (ORT's choice)
    groups: int = 1


@dataclass
class QuantPlan:
    layers: list[Layer]
    activations: list[str]  # tensors that get a Q/DQ pair, in graph order
    stats_source: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose range it uses
    # output -> input of each Relu / Clip(0, max) folded into the Q of the op before it (`folds_into_q`)
    removed_relus: dict[str, str] = field(default_factory=dict)
    # outputs of MaxPool/Reshape/...: same scale and zero point as their input.  At 4 bits they are
    # stored as uint8 (still on the 4-bit grid): with uint4 on both sides ORT's optimizer drops the
    # Q/DQ pair and runs MaxPool on uint4, which its CPU EP rejects (as quantize_static's A4 output is).
    pass_through: set[str] = field(default_factory=set)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _excluded(node: onnx.NodeProto, exclude: frozenset[str]) -> bool:
    return node.name in exclude or node.op_type in exclude


def gelu_nodes(nodes: list[onnx.NodeProto]) -> set[int]:
    """Indices of the Add and Mul nodes of each exported GELU, x * 0.5 * (1 + erf(x / sqrt(2)))
    (Div -> Erf -> Add -> Mul -> Mul, the TorchScript exporter's form), found from its Erf."""
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers[name].append(i)
    found: set[int] = set()
    for node in nodes:
        if node.op_type != "Erf":
            continue
        adds = [i for i in consumers[node.output[0]] if nodes[i].op_type == "Add"]
        for a in adds:
            muls = [i for i in consumers[nodes[a].output[0]] if nodes[i].op_type == "Mul"]
            halves = [j for m in muls for j in consumers[nodes[m].output[0]] if nodes[j].op_type == "Mul"]
            if muls:
                found.update([a, *muls, *halves])
    return found


def find_layers(
    nodes: list[onnx.NodeProto], initializers: dict[str, onnx.TensorProto], exclude: frozenset[str] = frozenset()
) -> list[Layer]:
    layers = []
    for i, node in enumerate(nodes):
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if _excluded(node, exclude):
            continue
        w = initializers[node.input[1]]
        if w.data_type != onnx.TensorProto.FLOAT:
            raise UnsupportedModelError(
                f"weight '{w.name}' of {node.op_type} node '{node.name}' has data type "
                f"{onnx.TensorProto.DataType.Name(w.data_type)}; qcb-onnx quantizes float32 models only "
                "(an already-quantized model cannot be made safe: re-export it from its FP32 source)"
            )
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in initializers else None
        if node.op_type == "Conv":
            axis, groups = 0, int(_attr(node, "group", 1))
        elif node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                raise UnsupportedModelError(f"Gemm node '{node.name}' has transA=1, which is not supported")
            axis, groups = (0 if _attr(node, "transB", 0) else 1), 1
        else:
            if len(w.dims) != 2:
                raise UnsupportedModelError(
                    f"MatMul node '{node.name}' has a constant weight '{w.name}' of rank {len(w.dims)}; "
                    "only 2-D MatMul weights are supported"
                )
            axis, groups, bias = 1, 1, None
        layers.append(Layer(i, node.name, node.op_type, node.input[0], node.input[1], bias, axis, groups))
    return layers


def clip_bounds(node: onnx.NodeProto, constant: Callable[[str], float]) -> tuple[float | None, float | None]:
    """A Clip's (min, max), None where absent: inputs 1 and 2 from opset 11 on, read with `constant`
    (which raises KeyError for a bound computed at run time), attributes before."""
    bounds = []
    for i, attr in ((1, "min"), (2, "max")):
        name = node.input[i] if len(node.input) > i else ""
        if name:
            bounds.append(constant(name))
        else:
            found = [a.f for a in node.attribute if a.name == attr]
            bounds.append(found[0] if found else None)
    return bounds[0], bounds[1]


def folds_into_q(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """Relu, or a Clip whose lower bound is 0 (ReLU6): a uint Q calibrated on its output has zero point
    0 and saturates exactly where the activation clips, so the node adds nothing after the Q.  ORT
    folds these (its ClipQuantFusion throws on UINT4, so we must fold Clip ourselves at 4 bits)."""
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip":
        return False
    try:
        lo, hi = clip_bounds(node, lambda name: float(large.to_array(initializers[name]).reshape(-1)[0]))
    except KeyError:
        return False  # a bound computed at run time
    return lo == 0.0 and (hi is None or hi > 0.0)


def build_plan(
    nodes: list[onnx.NodeProto],
    initializers: dict[str, onnx.TensorProto],
    graph_inputs: list[str],
    graph_outputs: list[str],
    float_tensors: set[str],
    quantize_activations: bool,
    exclude: frozenset[str] = frozenset(),
    symmetric: bool = False,
) -> QuantPlan:
    """Decide the Q/DQ placement over a topologically sorted, normalized node list; nodes named in
    `exclude` (by name or op type) stay in float, weights and activations.  On a `symmetric`
    activation grid a Relu does not fold into the Q before it (zero point 0 is mid-grid, so the Q does
    not clip at 0): it keeps its own Q/DQ pairs, as ORT's quantizer does with ActivationSymmetric."""
    present = {n.name for n in nodes} | {n.op_type for n in nodes}
    unknown = sorted(e for e in exclude if e not in present and not onnx.defs.has(e))  # an op type may be absent
    if unknown:
        raise UsageError(f"--exclude {unknown[0]!r} is no node name of the (normalized) model and no ONNX op type")
    layers = find_layers(nodes, initializers, exclude)
    if not layers:
        raise UnsupportedModelError("model has no Conv, Gemm or MatMul with a constant float weight to quantize")
    plan = QuantPlan(layers, [])
    if not quantize_activations:
        return plan
    in_float = gelu_nodes(nodes) | {i for i, n in enumerate(nodes) if _excluded(n, exclude)}
    quantized_ids = {id(n) for i, n in enumerate(nodes) if n.op_type in QUANTIZED_OPS and i not in in_float}

    def quantized(node: onnx.NodeProto) -> bool:
        return id(node) in quantized_ids

    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            consumers[name].append(node)
    producers = {out: node for node in nodes for out in node.output}

    def is_activation(name: str) -> bool:
        return bool(name) and name not in initializers and name in float_tensors

    order: dict[str, int] = {}

    def mark(name: str) -> None:
        if is_activation(name) and name not in order:
            order[name] = len(order)

    for name in graph_inputs:
        if any(quantized(c) for c in consumers[name]):
            mark(name)
    for node in nodes:
        producer = producers.get(node.input[0])
        foldable = not symmetric and folds_into_q(node, initializers) and not _excluded(node, exclude)
        if foldable and producer is not None and quantized(producer) and producer.op_type != "Relu":
            src = node.input[0]
            if len(consumers[src]) == 1 and src not in graph_outputs:
                plan.removed_relus[node.output[0]] = src
                plan.stats_source[src] = node.output[0]
                plan.stats_source[node.output[0]] = node.output[0]
                mark(src)
                mark(node.output[0])
                continue
        if quantized(node):
            if node.op_type in ("Relu", "Clip") and len(consumers[node.input[0]]) == 1:
                plan.stats_source[node.input[0]] = node.output[0]  # ORT's adjust_tensor_ranges: the output's range
            for name in list(node.input) + list(node.output):
                if node.op_type in LAYER_OPS and name in node.input[1:]:
                    continue  # weights and biases are quantized as integers, not as activations
                mark(name)
        elif node.op_type in PASS_THROUGH_OPS and node.input[0] in order and not _excluded(node, exclude):
            for name in node.output:
                if is_activation(name):
                    mark(name)
                    plan.stats_source[name] = plan.stats_source.get(node.input[0], node.input[0])
                    plan.pass_through.add(name)
    plan.activations = sorted(order, key=order.get)
    return plan
