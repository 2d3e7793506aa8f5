"""Fold an inference-mode BatchNormalization into the Conv / ConvTranspose / Gemm feeding it.

With ``s = gamma / sqrt(var + eps)`` (computed in float64, results cast back to the weight's
type)::

    W' = W * s            (per output channel)
    b' = (b - mean) * s + beta

This is ONNX Runtime's ``ConvBNFusion`` (which ``quant_pre_process`` applies), extended to
ConvTranspose and Gemm. A BatchNormalization is folded only when

* it runs in inference mode (no ``training_mode=1``, no used running-stat outputs),
* its input is output 0 of the Conv/ConvTranspose/Gemm and nothing else reads that output,
* the weight, the optional bias and the four BatchNormalization parameters are constants
  (initializers that are not graph inputs, or Constant outputs) of a float type and shape (C,).
"""

from __future__ import annotations

__all__ = ["FoldBatchNormPass"]

import logging

import numpy as np
import onnx_ir as ir

from . import _utils

logger = logging.getLogger(__name__)

_INBOUND_OPS = ("Conv", "ConvTranspose", "Gemm")


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return attr.as_float()


def _bn_is_inference(bn: ir.Node) -> bool:
    training = bn.attributes.get("training_mode")
    if training is not None and (training.is_ref() or training.as_int() != 0):
        return False
    spatial = bn.attributes.get("spatial")
    if spatial is not None and (spatial.is_ref() or spatial.as_int() != 1):
        return False
    is_test = bn.attributes.get("is_test")
    if is_test is not None and (is_test.is_ref() or is_test.as_int() == 0):
        return False
    # Extra outputs (running mean/var, saved stats) only exist in training mode.
    return all(not out.uses() and not out.is_graph_output() for out in bn.outputs[1:])


def _output_channels(inbound: ir.Node, weight: np.ndarray) -> int | None:
    if inbound.op_type == "Conv":
        return weight.shape[0] if weight.ndim >= 3 else None
    if inbound.op_type == "ConvTranspose":
        return _int_attr(inbound, "group", 1) * weight.shape[1] if weight.ndim >= 3 else None
    # Gemm: B is (K, N), or (N, K) with transB.
    if weight.ndim != 2:
        return None
    return weight.shape[0] if _int_attr(inbound, "transB", 0) else weight.shape[1]


def _scale_weight(inbound: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    if inbound.op_type == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    if inbound.op_type == "ConvTranspose":
        # Weight (C_in, M/group, k...); output channel m = g * (M/group) + j.
        group = _int_attr(inbound, "group", 1)
        c_in, m_per_group = weight.shape[0], weight.shape[1]
        if c_in % group:
            return None
        kernel = weight.shape[2:]
        w = weight.reshape((group, c_in // group, m_per_group, *kernel))
        s = scale.reshape((group, 1, m_per_group) + (1,) * len(kernel))
        return (w * s).reshape(weight.shape)
    axis = 0 if _int_attr(inbound, "transB", 0) else 1
    return weight * (scale[:, None] if axis == 0 else scale[None, :])


def _try_fold(bn: ir.Node) -> bool:
    if bn.domain not in ("", "ai.onnx") or bn.op_type != "BatchNormalization":
        return False
    if len(bn.inputs) != 5 or any(v is None for v in bn.inputs) or not _bn_is_inference(bn):
        return False
    x = bn.inputs[0]
    inbound = x.producer()
    if (
        inbound is None
        or inbound.graph is not bn.graph
        or inbound.domain not in ("", "ai.onnx")
        or inbound.op_type not in _INBOUND_OPS
        or inbound.outputs[0] is not x
        or not _utils.single_consumer(x, bn)
        or len(inbound.inputs) < 2
    ):
        return False
    w_value = inbound.inputs[1]
    weight = _utils.const_array(w_value)
    w_dtype = _utils.const_dtype(w_value)
    if weight is None or w_dtype not in _utils.FOLDABLE_DTYPES:
        return False
    params = [_utils.const_array(v) for v in bn.inputs[1:]]
    if any(p is None for p in params):
        return False
    channels = _output_channels(inbound, weight)
    if channels is None or any(p.size != channels for p in params):
        return False
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    eps = _float_attr(bn, "epsilon", 1e-5)

    b_value = inbound.inputs[2] if len(inbound.inputs) > 2 else None
    if b_value is not None:
        bias = _utils.const_array(b_value)
        if bias is None:
            return False
        bias = bias.astype(np.float64)
        b_dtype = _utils.const_dtype(b_value)
        if b_dtype not in _utils.FOLDABLE_DTYPES:
            return False
    else:
        bias = np.zeros(channels, dtype=np.float64)
        b_dtype = w_dtype
    if inbound.op_type == "Gemm":
        # Y = alpha*A'B' + beta*C: fold beta into the new bias and drop the attribute.
        bias = bias * _float_attr(inbound, "beta", 1.0)
        if bias.ndim <= 1:
            bias = np.broadcast_to(bias.reshape(-1), (channels,))
            row = slice(None)
        elif bias.shape[-1] not in (1, channels):
            return False
        else:
            row = (None, slice(None))
        new_bias = (bias - mean[row]) * (gamma / np.sqrt(var + eps))[row] + beta[row]
    else:
        if bias.size != channels:
            return False
        new_bias = (bias.reshape(-1) - mean) * (gamma / np.sqrt(var + eps)) + beta

    scale = gamma / np.sqrt(var + eps)
    new_weight = _scale_weight(inbound, weight.astype(np.float64), scale)
    if new_weight is None:
        return False

    base = w_value.name or "weight"
    _utils.set_const_input(inbound, 1, _utils.cast_back(new_weight, w_dtype), f"{base}_bnfolded")
    _utils.set_const_input(inbound, 2, _utils.cast_back(new_bias, b_dtype), f"{base}_bias_bnfolded")
    if inbound.op_type == "Gemm":
        inbound.attributes.pop("beta", None)
    _utils.bypass_node(bn, bn.outputs[0], x)
    logger.debug("Folded %s into %s", bn.name, inbound.name)
    return True


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference BatchNormalization nodes into the preceding Conv/ConvTranspose/Gemm.

    Only the main graph is processed.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return _utils.fold_each_node(model, _try_fold, "BatchNormalization node(s)", logger)
