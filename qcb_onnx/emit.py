"""Write the QDQ ONNX model: integer weights + DequantizeLinear, Q/DQ pairs on activations.

Names and placement follow onnxruntime's `quantize_static` (``<w>_quantized``, ``<t>_scale``,
graph outputs keep their names on the final DequantizeLinear) so that tools and people who know
ORT's output can read ours, and ORT's CPU EP fuses DQ->Conv->Q into QLinearConv.
The integers written are exactly those in `QuantState`: nothing is re-rounded here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import blockwise, large
from .plan import QuantPlan
from .quantsim import QuantState
from .tensorfile import TensorFile

METADATA_PREFIX = "qcb_onnx."


def initializer(
    name: str, values: np.ndarray, onnx_type: int | None = None, store: TensorFile | None = None
) -> TensorProto:
    """An initializer of ONNX type `onnx_type` (default: the array's); a large one appended to `store`
    where one is given, so that the output of a model larger than memory is built without holding its
    weights (tensorfile.py)."""
    values = np.asarray(values)
    if onnx_type is None:
        onnx_type = helper.np_dtype_to_tensor_dtype(values.dtype)
    if store is not None and values.size >= large.BIG_TENSOR:
        return store.tensor(name, values, onnx_type)
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):  # ONNX packs the flat tensor as MatMulNBits does
        tensor = TensorProto(name=name, data_type=onnx_type, dims=list(values.shape))
        tensor.raw_data = blockwise.pack_nibbles(values.reshape(-1)).tobytes()
        return tensor
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(onnx_type), copy=False), name)


def _dequantized(
    name: str,
    ints: np.ndarray,
    onnx_type: int,
    scale: np.ndarray,
    params: str,
    axis: int | None,
    inits: list[TensorProto],
    nodes: list[onnx.NodeProto],
    block_size: int | None = None,
    zero_point: np.ndarray | None = None,
    store: TensorFile | None = None,
) -> str:
    """Integers of initializer `name` (zero points 0 unless given) and their DequantizeLinear, in
    ORT's naming (`<name>_quantized`, `<params>_scale`, `<params>_zero_point`); `block_size`: a
    block-wise DequantizeLinear along `axis` (opset 21).  Returns the DQ output's name."""
    zp = np.zeros(scale.shape, dtype=np.int32) if zero_point is None else zero_point
    inits += [
        initializer(f"{name}_quantized", ints, onnx_type, store),
        initializer(f"{params}_scale", scale, TensorProto.FLOAT, store),
        initializer(f"{params}_zero_point", zp, onnx_type, store),
    ]
    attrs = {} if axis is None else {"axis": axis}
    if block_size is not None:
        attrs["block_size"] = block_size
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{name}_quantized", f"{params}_scale", f"{params}_zero_point"],
            [f"{name}_DequantizeLinear_Output"],
            name=f"{name}_DequantizeLinear",
            **attrs,
        )
    )
    return f"{name}_DequantizeLinear_Output"


def emit_qdq(
    model: onnx.ModelProto,
    plan: QuantPlan,
    state: QuantState,
    metadata: Mapping[str, object],
    store: TensorFile | None = None,
) -> onnx.ModelProto:
    """Return a new model; `model` must be the normalized model the plan and state were built on.
    `store`: where large initializers go instead of into the proto (their TensorProtos reference it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)
    del graph.node[:]
    del graph.value_info[:]
    new_inits: list[TensorProto] = []
    head: list[onnx.NodeProto] = []  # weight DQs and graph-input Q/DQs

    # --- weights and biases
    replaced: dict[str, str] = {}
    for name, wq in state.weights.items():
        per_channel = wq.axis is not None
        scale = wq.scale if per_channel else wq.scale.reshape(())
        replaced[name] = _dequantized(
            name,
            wq.ints,
            wq.grid.onnx_type,
            scale,
            name,
            wq.axis,
            new_inits,
            head,
            wq.block_size,
            wq.zero_point,
            store,
        )
    for name, bq in state.biases.items():
        replaced[name] = _dequantized(
            name, bq.ints, TensorProto.INT32, bq.scale, f"{name}_quantized", 0, new_inits, head, store=store
        )
    graph_outputs = {o.name for o in graph.output}
    keep = [  # a quantized initializer that is also a graph output keeps its float values for that output
        numpy_helper.from_array(state.float_biases[t.name], t.name) if t.name in state.float_biases else t
        for t in graph.initializer
        if t.name not in replaced or t.name in graph_outputs
    ]
    del graph.initializer[:]
    graph.initializer.extend(keep)

    # --- activations
    relu_aliases = dict(plan.removed_relus)  # relu output -> the layer output that now carries its Q/DQ
    qdq_after: dict[str, list[onnx.NodeProto]] = {}
    renamed_outputs: dict[str, str] = {}
    param_names: dict[tuple[str, int], str] = {}
    for tensor in plan.activations:
        if tensor in relu_aliases:
            continue
        aq = state.acts[tensor]
        source = plan.stats_source.get(tensor, tensor)
        key = (source, aq.grid.onnx_type)
        base = param_names.get(key)
        if base is None:
            taken = any(k[0] == source for k in param_names)
            base = param_names[key] = f"{source}_storage{aq.grid.bits}" if taken else source
            new_inits += [
                numpy_helper.from_array(np.array(aq.scale, dtype=np.float32), f"{base}_scale"),
                initializer(f"{base}_zero_point", np.array(aq.zero_point), aq.grid.onnx_type),
            ]
        visible = next((u for u, s in relu_aliases.items() if s == tensor), tensor)
        src = tensor
        if visible in graph_outputs:
            src = f"{visible}_QuantizeLinear_Input"
            renamed_outputs[tensor] = src
            dq_out = visible
        else:
            dq_out = f"{tensor}_DequantizeLinear_Output"
        replaced[tensor] = dq_out
        if visible != tensor:
            replaced[visible] = dq_out
        q_out = f"{tensor}_QuantizeLinear_Output"
        qdq_after[tensor] = [
            helper.make_node(
                "QuantizeLinear",
                [src, f"{base}_scale", f"{base}_zero_point"],
                [q_out],
                name=f"{tensor}_QuantizeLinear",
            ),
            helper.make_node(
                "DequantizeLinear",
                [q_out, f"{base}_scale", f"{base}_zero_point"],
                [dq_out],
                name=f"{tensor}_DequantizeLinear",
            ),
        ]
    graph.initializer.extend(new_inits)

    def rewire(node: onnx.NodeProto) -> onnx.NodeProto:
        # an Identity that passes a value through to a graph output (normalize puts one between an input
        # and an output that are the same value) returns it unquantized, as the FP model does
        passthrough = node.op_type == "Identity" and node.output[0] in graph_outputs
        for i, name in enumerate(node.input):
            if name in replaced and not passthrough:
                node.input[i] = replaced[name]
        for i, name in enumerate(node.output):
            if name in renamed_outputs:
                node.output[i] = renamed_outputs[name]
        return node

    ordered = list(head)
    for inp in graph.input:
        ordered += qdq_after.get(inp.name, [])
    for node in nodes:
        if node.op_type in ("Relu", "Clip") and node.output[0] in relu_aliases:
            continue
        produced = list(node.output)
        ordered.append(rewire(node))
        for name in produced:
            ordered += qdq_after.get(name, [])
    graph.node.extend(ordered)
    used = {i for n in graph.node for i in n.input}
    needed = used | graph_outputs | {i.name for i in graph.input}
    live = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live)
    # the lowest IR version the opsets allow: ORT releases lag behind onnx's newest IR version
    with contextlib.suppress(ValueError):  # a domain onnx does not know: keep the model's own
        out.ir_version = min(out.ir_version, helper.find_min_ir_version_for(list(out.opset_import)))
    for key, value in metadata.items():
        entry = out.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    return out


def read_weight_ints(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """The integer weight a model holds for an original weight name, in the weight's layout: a QDQ
    initializer (ours or ORT's naming) as stored, or a MatMulNBits B unpacked (emit_nbits.py)."""
    for t in model.graph.initializer:
        if t.name == f"{weight}_quantized":
            return large.to_array(t).astype(np.int32)
    from .emit_nbits import read_nbits_ints

    return read_nbits_ints(model, weight)
