"""Fold a following Add/Mul of a per-output-channel constant into a Conv.

Like ONNX Runtime's ``ConvAddFusion`` / ``ConvMulFusion`` (applied by ``quant_pre_process``)::

    Mul(Conv(x, W, b), c) -> Conv(x, W * c, b * c)
    Add(Conv(x, W, b), c) -> Conv(x, W, b + c)

``c`` must be a float constant that broadcasts against the Conv output without changing its
shape and varies at most along the channel axis: a scalar, or a shape such as ``(C, 1, 1)``,
``(1, C, 1, 1)`` or ``(1, 1, 1)``. The Conv output must feed only this Add/Mul, the Conv weight
(and bias, if any) must be constants. The arithmetic is done in float64 and cast back.
"""

from __future__ import annotations

__all__ = ["FoldConvAddMulPass"]

import logging

import numpy as np
import onnx_ir as ir

from . import _utils

logger = logging.getLogger(__name__)


def _per_channel(c: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as a (channels,) float64 vector if it is a per-output-channel constant, else None."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,))


def _try_fold(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Add", "Mul"):
        return False
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return False
    for conv_index in (0, 1):
        x = node.inputs[conv_index]
        other = node.inputs[1 - conv_index]
        conv = x.producer()
        if (
            conv is None
            or conv.graph is not node.graph
            or conv.domain not in ("", "ai.onnx")
            or conv.op_type != "Conv"
            or len(conv.inputs) < 2
            or not _utils.single_consumer(x, node)
        ):
            continue
        c = _utils.const_array(other)
        w_value = conv.inputs[1]
        weight = _utils.const_array(w_value)
        w_dtype = _utils.const_dtype(w_value)
        if c is None or weight is None or w_dtype not in _utils.FOLDABLE_DTYPES or weight.ndim < 3:
            continue
        if _utils.const_dtype(other) != w_dtype:
            continue
        vec = _per_channel(c, weight.ndim, weight.shape[0])
        if vec is None:
            continue
        b_value = conv.inputs[2] if len(conv.inputs) > 2 else None
        if b_value is not None:
            bias = _utils.const_array(b_value)
            b_dtype = _utils.const_dtype(b_value)
            if bias is None or b_dtype not in _utils.FOLDABLE_DTYPES or bias.size != weight.shape[0]:
                continue
            bias = bias.astype(np.float64).reshape(-1)
        else:
            bias, b_dtype = None, w_dtype

        base = w_value.name or "weight"
        if node.op_type == "Mul":
            scale = vec.reshape((-1,) + (1,) * (weight.ndim - 1))
            new_weight = weight.astype(np.float64) * scale
            _utils.set_const_input(conv, 1, _utils.cast_back(new_weight, w_dtype), f"{base}_mulfolded")
            if bias is not None:
                _utils.set_const_input(conv, 2, _utils.cast_back(bias * vec, b_dtype), f"{base}_bias_mulfolded")
        else:
            new_bias = vec if bias is None else bias + vec
            _utils.set_const_input(conv, 2, _utils.cast_back(new_bias, b_dtype), f"{base}_bias_addfolded")
        _utils.bypass_node(node, node.outputs[0], x)
        logger.debug("Folded %s %s into %s", node.op_type, node.name, conv.name)
        return True
    return False


class FoldConvAddMulPass(ir.passes.InPlacePass):
    """Fold per-channel constant Add/Mul that follow a Conv into its weight and bias.

    Only the main graph is processed.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _utils.fold_each_node(model, _try_fold, "Add/Mul node(s) into Conv", logger)
