"""Turn a QDQ model back into a float one: the model ``--allow-requantize`` hands to the normalize stage.

* A ``DequantizeLinear`` of a constant integer tensor (per tensor, per axis, or in blocks: opset 21's
  ``block_size``) becomes a float initializer holding the dequantized values, computed as ONNX Runtime
  computes them, ``float32(x - zero_point) * scale`` in float32 (then cast to the scale's type): the
  float weights are exactly what the quantized model multiplies with.
* A ``QuantizeLinear -> DequantizeLinear`` pair becomes an ``Identity`` of the Q's input (the normalize
  stage removes it), or a ``Relu`` where the pair clamps at exactly 0 and its input may be negative:
  that is where ORT's ``quantize_static`` (and qcb-onnx) fold a Relu into the Q, so dropping the pair
  there would drop the model's activation function.  The pair's other clamp, the old calibrated range,
  is dropped on purpose: it is the old quantizer's, and clipping is a lever a backdoor can pull.

Everything else of quantization stays as it is: QOperator nodes (QLinearConv, MatMulNBits, ...), a
``DequantizeLinear`` of a computed tensor no Q produced, a Q whose integers something else reads.
`qcb_onnx.passes.dequantize` refuses a model that still holds one after this pass.
"""

from __future__ import annotations

__all__ = ["QDQ_DOMAINS", "DequantizePass"]

import logging

import numpy as np
import onnx_ir as ir

from . import _utils

logger = logging.getLogger(__name__)

#: Q/DQ live in the ONNX domain, and in ORT's contrib domain for types before opset 21 had them.
QDQ_DOMAINS = ("", "com.microsoft")

# the lowest integer of each quantized type: a pair whose zero point sits there clamps at exactly 0
_QMIN = {
    ir.DataType.UINT8: 0,
    ir.DataType.INT8: -128,
    ir.DataType.UINT16: 0,
    ir.DataType.INT16: -32768,
    ir.DataType.UINT4: 0,
    ir.DataType.INT4: -8,
}
_INTEGER_INPUTS = frozenset(_QMIN) | {ir.DataType.INT32}  # int32: biases, dequantized with in x w scales

# ops whose outputs are >= 0 whatever their input, and ops that keep their input's sign (a Relu
# after one of them on a tensor already >= 0 would change nothing: no Relu is restored there)
_NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp"})
_SIGN_KEEPING_OPS = frozenset(
    {
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Resize",
        "Split",
        "Slice",
        "Concat",
        "DepthToSpace",
        "SpaceToDepth",
    }
)


def _is(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in QDQ_DOMAINS


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.as_int()


def _along(values: np.ndarray, x_shape: tuple[int, ...], axis: int, block: int) -> np.ndarray | None:
    """A scale or zero point broadcast against `x_shape`: per tensor (one value), per axis (one per
    index along `axis`) or per block of `block` indices along it; None when its shape fits none."""
    if block > 0:
        if values.ndim != len(x_shape) or values.shape[axis] != -(-x_shape[axis] // block):
            return None
        if any(v != x for i, (v, x) in enumerate(zip(values.shape, x_shape, strict=True)) if i != axis):
            return None
        return np.take(np.repeat(values, block, axis=axis), np.arange(x_shape[axis]), axis=axis)
    if values.size == 1 and values.ndim <= 1:
        return values.reshape(())
    if values.ndim != 1 or values.shape[0] != x_shape[axis]:
        return None
    shape = [1] * len(x_shape)
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def dequantized_values(node: ir.Node) -> np.ndarray | None:
    """The float values a DequantizeLinear of constants outputs, in ORT's arithmetic; None when its
    input is not a constant integer tensor or its scale / zero point are not constants that fit it."""
    x, scale = _utils.const_array(node.inputs[0]), _utils.const_array(node.inputs[1])
    if x is None or scale is None or _utils.const_dtype(node.inputs[0]) not in _INTEGER_INPUTS:
        return None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = None if zp_value is None else _utils.const_array(zp_value)
    if (zp_value is not None and zp is None) or _utils.const_dtype(node.inputs[1]) not in _utils.FOLDABLE_DTYPES:
        return None
    axis, block = _int_attr(node, "axis", 1), _int_attr(node, "block_size", 0)
    if scale.size == 1 and scale.ndim <= 1 and block <= 0:
        axis = 0  # per tensor: the axis is not used (and may not exist: a scalar or 1-D x)
    elif not -x.ndim <= axis < x.ndim:
        return None
    axis %= max(x.ndim, 1)
    scale_b = _along(scale, x.shape, axis, block)
    zp_b = np.zeros((), np.int64) if zp is None else _along(zp, x.shape, axis, block)  # absent: 0
    if scale_b is None or zp_b is None:
        return None
    diff = x.astype(np.int64) - zp_b.astype(np.int64)
    values = diff.astype(np.float32) * scale_b.astype(np.float32)  # ORT: float(x - zp) * scale, in float32
    out_type = _int_attr(node, "output_dtype", 0)
    return values.astype(ir.DataType(out_type).numpy() if out_type else scale.dtype)


def _clamps_at_zero(q: ir.Node) -> bool:
    """Whether a QuantizeLinear maps everything below 0 to its lowest integer (its zero point is
    that integer): then its pair acts as a Relu on the way."""
    zp_value = q.inputs[2] if len(q.inputs) > 2 else None
    if zp_value is None:
        return True  # uint8, zero point 0
    zp, dtype = _utils.const_array(zp_value), _utils.const_dtype(zp_value)
    return zp is not None and dtype in _QMIN and bool(np.all(zp.astype(np.int64) == _QMIN[dtype]))


def _nonnegative(node: ir.Node, known: set[ir.Value]) -> bool:
    """Whether `node`'s outputs are >= 0, given the values already known to be (`known`)."""
    if node.domain != "":
        return False
    if node.op_type in _NONNEGATIVE_OPS:
        return True
    if node.op_type == "Clip" and len(node.inputs) > 1:
        low = _utils.const_array(node.inputs[1])
        return low is not None and low.size == 1 and bool(low.reshape(-1)[0] >= 0)
    data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
    return node.op_type in _SIGN_KEEPING_OPS and bool(data) and all(v in known for v in data)


class DequantizePass(ir.passes.InPlacePass):
    """DequantizeLinear of constants -> float initializers; Q -> DQ pairs -> Identity (or Relu where
    the pair clamps at 0); main graph only, nodes in topological order.  `constants` and `pairs` count
    what the last call changed."""

    constants = 0
    pairs = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.constants = self.pairs = 0
        known: set[ir.Value] = set()  # values known to be >= 0
        for node in list(graph):
            if _is(node, "DequantizeLinear") and len(node.inputs) >= 2 and node.inputs[0] is not None:
                q = node.inputs[0].producer()
                if q is not None and q.graph is graph and _is(q, "QuantizeLinear") and q.inputs[0] is not None:
                    known |= self._unpair(graph, node, q, known)
                elif (values := dequantized_values(node)) is not None:
                    self._to_initializer(graph, node, values)
            elif _nonnegative(node, known):
                known.update(node.outputs)
        if self.constants or self.pairs:
            logger.info("Dequantized %d constants, removed %d Q/DQ pairs", self.constants, self.pairs)
        return ir.passes.PassResult(model, modified=bool(self.constants or self.pairs))

    def _to_initializer(self, graph: ir.Graph, node: ir.Node, values: np.ndarray) -> None:
        out, source = node.outputs[0], node.inputs[0]
        dtype = ir.DataType.from_numpy(values.dtype)
        name = _utils.unique_name(graph, f"{out.name}_float")
        value = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(dtype))
        value.const_value = ir.Tensor(values, dtype=dtype, name=name)
        graph.register_initializer(value)
        was_output = out.is_graph_output()
        _utils.bypass_node(node, out, value)  # a graph output keeps its name
        original = (source.name or "").removesuffix("_quantized")  # ORT's and qcb-onnx's integer names
        if not was_output and original and original != source.name:
            value.name = _utils.unique_name(graph, original)
        self.constants += 1

    def _unpair(self, graph: ir.Graph, dq: ir.Node, q: ir.Node, known: set[ir.Value]) -> set[ir.Value]:
        x = q.inputs[0]
        relu = _clamps_at_zero(q) and x not in known and not x.is_graph_input() and _utils.const_dtype(x) is None
        new = ir.Node("", "Relu" if relu else "Identity", inputs=[x], name=f"{dq.name or x.name}_unquantized")
        ir.convenience.replace_nodes_and_values(graph, dq, [dq], [new], [dq.outputs[0]], [new.outputs[0]])
        self.pairs += 1
        return set(new.outputs) if relu or x in known else set()
