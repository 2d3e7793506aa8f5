"""Execute an ONNX graph with PyTorch ops.

Why this exists: the quantization passes need four things ONNX Runtime cannot give them --
replace weight initializers by fake-quantized tensors, fake-quantize every activation the moment
it is produced, run only the prefix of a model that a layer-wise pass needs, and back-propagate
through the whole computation.  So this module re-implements the supported ONNX ops with
autograd-friendly ``torch`` functions that match ONNX Runtime's CPU results up to float32 rounding.

Conventions (chosen so that one fake-quantization scheme fits every model):

* every floating tensor is float32: float16 / bfloat16 / float64 initializers, constants and feeds
  are converted, and ``Cast`` to any floating type produces float32;
* integer tensors (shapes, indices) keep an integer dtype (uint16/32/64 become int64); inputs that
  ONNX treats as constants (shapes, axes, pads, starts, ...) are read with ``.tolist()``.

Only the default ONNX domain is supported, at opsets 11 and later (tested for 11..21).  Every node
is validated in :class:`GraphModule`'s constructor so that an unsupported model fails before any
calibration work starts, with one line naming everything that is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from qcb_onnx import large
from qcb_onnx.errors import (
    CalibrationDataError,
    InvalidGraphError,
    ModelFileError,
    QcbError,
    UnsupportedModelError,
    UsageError,
)
from qcb_onnx.load import graph_order
from qcb_onnx.text import listing, one_line

__all__ = ["GraphModule", "UnsupportedOps", "MIN_OPSET", "SUPPORTED_OPS"]

Tensor = torch.Tensor
MIN_OPSET = 11
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MAX_NAMES_PER_OP = 5
_SUBGRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


class UnsupportedOps(UnsupportedModelError):
    """The graph uses op types or attribute values that :class:`GraphModule` does not implement."""


@dataclass(frozen=True)
class OpContext:
    """What an op function needs besides its inputs and attributes."""

    opset: int
    num_outputs: int


OpFn = Callable[[list["Tensor | None"], dict[str, Any], OpContext], list[Tensor]]
Validator = Callable[[dict[str, Any], OpContext], "str | None"]

_OPS: dict[str, OpFn] = {}
_VALIDATORS: dict[str, Validator] = {}
# Ops whose later outputs (MaxPool indices, BatchNormalization training statistics) we do not
# compute; a model that consumes them is rejected up front.
_MAX_OUTPUTS = {"MaxPool": 1, "BatchNormalization": 1}


def _registrar(table: dict[str, Any], *op_types: str) -> Callable[[Any], Any]:
    def register(fn: Any) -> Any:
        for op_type in op_types:
            table[op_type] = fn
        return fn

    return register


def _op(*op_types: str) -> Callable[[OpFn], OpFn]:
    """Register an op implementation under one or more ONNX op types."""
    return _registrar(_OPS, *op_types)


def _validator(*op_types: str) -> Callable[[Validator], Validator]:
    """Register an up-front attribute check; it returns a short problem description or None."""
    return _registrar(_VALIDATORS, *op_types)


# --------------------------------------------------------------------------------------------
# dtype and tensor conversion
# --------------------------------------------------------------------------------------------

_ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float32,
    TensorProto.DOUBLE: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT16: torch.int64,
    TensorProto.UINT32: torch.int64,
    TensorProto.UINT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}


def _array_to_tensor(array: np.ndarray, device: torch.device, what: str) -> Tensor:
    """Convert a numpy array to a torch tensor following the module's dtype conventions."""
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    elif array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.int64)
    elif array.dtype.kind not in "biu":
        raise UnsupportedModelError(f"{what} has unsupported dtype {array.dtype}")
    return torch.from_numpy(np.array(array, copy=True)).to(device)


def _tensor_proto_to_torch(proto: TensorProto, device: torch.device, what: str) -> Tensor:
    if large.mapped(proto):  # left in its file (large.py): float32 stays mapped, read as nodes touch it
        array = large.to_array(proto)
        if array.dtype == np.float32 and device.type == "cpu":
            return torch.from_numpy(array)
        return _array_to_tensor(array, device, what)
    if uses_external_data(proto) and not proto.raw_data:
        raise ModelFileError(f"{what} stores its data externally and it was not loaded")
    return _array_to_tensor(numpy_helper.to_array(proto), device, what)


class _Overridden(Mapping[str, Tensor]):
    """Initializers with some replaced, each replacement converted (and its shape checked) when a node
    reads it: overrides may be computed on access (QuantState.params), so none is gathered whole."""

    def __init__(self, params: dict[str, Tensor], overrides: Mapping[str, Tensor], device: torch.device) -> None:
        self.params, self.overrides, self.device = params, overrides, device

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.overrides:
            return self.params[name]
        value = _as_float32(torch.as_tensor(self.overrides[name])).to(self.device)
        if value.shape != self.params[name].shape:
            raise UsageError(
                f"params override '{name}' has shape {tuple(value.shape)}, expected {tuple(self.params[name].shape)}"
            )
        return value

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __iter__(self):
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def _as_float32(t: Tensor) -> Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


# --------------------------------------------------------------------------------------------
# small helpers shared by op implementations
# --------------------------------------------------------------------------------------------


def _ints(t: Tensor | None) -> list[int] | None:
    """Read a constant-like integer input (shape, axes, pads, ...) as a Python list."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _arg(inputs: list[Tensor | None], index: int) -> Tensor | None:
    """The optional input at ``index`` (None if absent or given as the empty name)."""
    return inputs[index] if index < len(inputs) else None


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes_from(inputs: list[Tensor | None], index: int, attrs: dict[str, Any]) -> list[int] | None:
    """Axes given as an input (newer opsets) or as the ``axes`` attribute (older opsets)."""
    given = _arg(inputs, index)
    return _ints(given) if given is not None else attrs.get("axes")


def _torch_pads(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX [b1..bn] / [e1..en] pads to F.pad's order (last dim first, begin then end)."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        out += [int(b), int(e)]
    return out


def _explicit_pads(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    attrs: dict[str, Any],
) -> tuple[list[int], list[int]]:
    """Resolve ``pads`` / ``auto_pad`` to explicit (begins, ends) per spatial dim."""
    n = len(spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        pads = list(attrs.get("pads", [0] * (2 * n)))
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        target = -(-size // s)
        total = max(0, (target - 1) * s + (k - 1) * d + 1 - size)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begins.append(begin)
        ends.append(total - begin)
    return begins, ends


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL_FNS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _conv_fn(spatial_dims: int, op_type: str) -> Callable[..., Tensor]:
    if spatial_dims not in _CONV_FNS:
        raise UnsupportedModelError(f"{op_type} over {spatial_dims} spatial dimensions is not supported")
    return _CONV_FNS[spatial_dims]


@_validator("Conv", "MaxPool", "AveragePool")
def _check_auto_pad(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        return f"auto_pad={auto_pad!r}"
    return None


# --------------------------------------------------------------------------------------------
# elementwise ops
# --------------------------------------------------------------------------------------------

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Not": torch.logical_not,
    "Softplus": F.softplus,
}


for _name, _fn in _UNARY.items():
    _OPS[_name] = lambda inputs, attrs, ctx, _f=_fn: [_f(inputs[0])]


def _divide(a: Tensor, b: Tensor) -> Tensor:
    # ONNX integer division truncates toward zero (C semantics), torch's "/" would go to float.
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _divide,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
}

for _name, _fn in _BINARY.items():
    _OPS[_name] = lambda inputs, attrs, ctx, _f=_fn: [_f(inputs[0], inputs[1])]

_VARIADIC: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Max": torch.maximum,
    "Min": torch.minimum,
    "Sum": torch.add,
}

for _name, _fn in _VARIADIC.items():
    _OPS[_name] = lambda inputs, attrs, ctx, _f=_fn: [reduce(_f, inputs)]


@_op("Mean")
def _mean(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [reduce(torch.add, inputs) / len(inputs)]


@_op("Pow")
def _pow(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    base, exponent = inputs[0], inputs[1]
    return [torch.pow(base, exponent).to(base.dtype)]  # ONNX: result has the base's type


@_op("Where")
def _where(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


@_op("LeakyRelu")
def _leaky_relu(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))]


@_op("PRelu")
def _prelu(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x, slope = inputs[0], inputs[1]
    return [torch.where(x < 0, x * slope, x)]


@_op("Elu")
def _elu(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [F.elu(inputs[0], attrs.get("alpha", 1.0))]


@_op("Clip")
def _clip(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    # opset >= 11: min/max are optional inputs; before that they were attributes.
    x = inputs[0]
    low, high = _arg(inputs, 1), _arg(inputs, 2)
    if low is None and "min" in attrs:
        low = torch.tensor(attrs["min"], dtype=x.dtype, device=x.device)
    if high is None and "max" in attrs:
        high = torch.tensor(attrs["max"], dtype=x.dtype, device=x.device)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return [x]


@_op("HardSigmoid")
def _hard_sigmoid(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    return [torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)]


@_op("HardSwish")
def _hard_swish(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    return [x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)]


@_op("Gelu")
def _gelu(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


@_validator("Gelu")
def _check_gelu(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    approximate = attrs.get("approximate", "none")
    return None if approximate in ("none", "tanh") else f"approximate={approximate!r}"


@_op("Identity", "Dropout")
def _identity(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    # Dropout at inference is the identity; its optional mask output is all True.
    x = inputs[0]
    if ctx.num_outputs > 1:
        return [x, torch.ones_like(x, dtype=torch.bool)]
    return [x]


# --------------------------------------------------------------------------------------------
# linear algebra, convolution, normalization
# --------------------------------------------------------------------------------------------


@_op("MatMul")
def _matmul(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [torch.matmul(inputs[0], inputs[1])]


@_op("Gemm")
def _gemm(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    a, b, c = inputs[0], inputs[1], _arg(inputs, 2)
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = alpha * y
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return [y]


@_op("Conv")
def _conv(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x, w, b = inputs[0], inputs[1], _arg(inputs, 2)
    n = x.dim() - 2
    conv = _conv_fn(n, "Conv")
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    begins, ends = _explicit_pads(x.shape[2:], w.shape[2:], strides, dilations, attrs)
    padding: list[int] | int = begins
    if begins != ends:  # torch convs only pad symmetrically
        x = F.pad(x, _torch_pads(begins, ends))
        padding = 0
    return [conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=attrs.get("group", 1))]


@_op("BatchNormalization")
def _batch_norm(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    # Written out (not F.batch_norm) so gradients reach mean/var overrides too.
    x, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    factor = scale / torch.sqrt(var + attrs.get("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) * factor.reshape(shape) + bias.reshape(shape)]


@_validator("BatchNormalization")
def _check_batch_norm(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    return "training_mode=1" if attrs.get("training_mode", 0) else None


@_op("LayerNormalization")
def _layer_norm(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x, scale, bias = inputs[0], inputs[1], _arg(inputs, 2)
    dims = tuple(range(_axis(attrs.get("axis", -1), x.dim()), x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    inv_std = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + attrs.get("epsilon", 1e-5))
    y = centered * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------


def _pool_geometry(x: Tensor, attrs: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Kernel, strides, dilations and the explicit (begins, ends) pads for a pooling op.

    ``ends`` includes the extra right padding that ceil_mode needs, so the caller can run a
    floor-mode torch pool.  Like ONNX Runtime (and torch), a ceil-mode window that would start in
    the end padding is dropped.
    """
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    spatial = list(x.shape[2:])
    begins, ends = _explicit_pads(spatial, kernel, strides, dilations, attrs)
    if attrs.get("ceil_mode", 0):
        for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations, strict=True)):
            span, reach = size + begins[i] + ends[i], (k - 1) * d + 1
            out = -(-(span - reach) // s) + 1
            if (out - 1) * s >= size + begins[i]:
                out -= 1
            ends[i] += max(0, (out - 1) * s + reach - span)
    return kernel, strides, dilations, begins, ends


@_op("MaxPool")
def _max_pool(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(x, attrs)
    if len(kernel) not in _MAX_POOL_FNS:
        raise UnsupportedModelError(f"MaxPool over {len(kernel)} spatial dimensions is not supported")
    if any(begins) or any(ends):
        x = F.pad(x, _torch_pads(begins, ends), value=-math.inf)
    return [_MAX_POOL_FNS[len(kernel)](x, kernel, strides, 0, dilations)]


@_op("AveragePool")
def _average_pool(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    # Window sums via a depthwise all-ones convolution (supports dilations, unlike avg_pool),
    # divided by a count computed the same way from a mask of the cells ONNX counts.
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(x, attrs)
    n = len(kernel)
    conv = _conv_fn(n, "AveragePool")
    channels = x.shape[1]
    ones = torch.ones((channels, 1, *kernel), dtype=x.dtype, device=x.device)
    sums = conv(F.pad(x, _torch_pads(begins, ends)), ones, stride=strides, dilation=dilations, groups=channels)
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if attrs.get("count_include_pad", 0):
        declared_begins, declared_ends = _explicit_pads(x.shape[2:], kernel, strides, dilations, attrs)
        mask = F.pad(mask, _torch_pads(declared_begins, declared_ends), value=1.0)
        extra = [e - d for e, d in zip(ends, declared_ends, strict=True)]
        mask = F.pad(mask, _torch_pads([0] * n, extra))
    else:
        mask = F.pad(mask, _torch_pads(begins, ends))
    counts = conv(mask, ones[:1], stride=strides, dilation=dilations)
    return [sums / counts]


@_op("GlobalAveragePool")
def _global_average_pool(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@_op("GlobalMaxPool")
def _global_max_pool(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


# --------------------------------------------------------------------------------------------
# reductions and softmax
# --------------------------------------------------------------------------------------------


def _reduce(inputs: list[Tensor | None], attrs: dict[str, Any], fn: Callable[..., Tensor]) -> Tensor:
    x = inputs[0]
    axes = _axes_from(inputs, 1, attrs)
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = tuple(_axis(a, x.dim()) for a in axes)
    if not dims:  # scalar input
        return x
    return fn(x, dim=dims, keepdim=bool(attrs.get("keepdims", 1))).to(x.dtype)


_OPS["ReduceMean"] = lambda inputs, attrs, ctx: [_reduce(inputs, attrs, torch.mean)]
_OPS["ReduceSum"] = lambda inputs, attrs, ctx: [_reduce(inputs, attrs, torch.sum)]
_OPS["ReduceMax"] = lambda inputs, attrs, ctx: [_reduce(inputs, attrs, torch.amax)]
_OPS["ReduceMin"] = lambda inputs, attrs, ctx: [_reduce(inputs, attrs, torch.amin)]


def _softmax_like(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext, fn: Any) -> Tensor:
    x = inputs[0]
    if ctx.opset >= 13:
        return fn(x, dim=_axis(attrs.get("axis", -1), x.dim()))
    # Before opset 13 the input is flattened to 2D at `axis` (default 1) and normalized per row.
    axis = _axis(attrs.get("axis", 1), x.dim())
    rows = math.prod(x.shape[:axis])
    return fn(x.reshape(rows, -1), dim=1).reshape(x.shape)


_OPS["Softmax"] = lambda inputs, attrs, ctx: [_softmax_like(inputs, attrs, ctx, torch.softmax)]
_OPS["LogSoftmax"] = lambda inputs, attrs, ctx: [_softmax_like(inputs, attrs, ctx, torch.log_softmax)]


# --------------------------------------------------------------------------------------------
# shape manipulation
# --------------------------------------------------------------------------------------------


@_op("Flatten")
def _flatten(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@_op("Reshape")
def _reshape(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):  # 0 means "copy this dim from the input"
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@_op("Transpose")
def _transpose(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


@_op("Concat")
def _concat(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    tensors = [t for t in inputs if t is not None]
    return [torch.cat(tensors, dim=_axis(attrs["axis"], tensors[0].dim()))]


@_op("Split")
def _split(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    given = _arg(inputs, 1)
    sizes = _ints(given) if given is not None else attrs.get("split")
    if sizes is None:  # equal parts; with opset 18 num_outputs the last part may be smaller
        parts = attrs.get("num_outputs", ctx.num_outputs)
        chunk = -(-x.shape[axis] // parts)
        sizes = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    return list(torch.split(x, list(sizes), dim=axis))


@_op("Slice")
def _slice(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(_arg(inputs, 3)) or list(range(len(starts)))
    steps = _ints(_arg(inputs, 4)) or [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        axis = _axis(axis, x.dim())
        size = x.shape[axis]
        if step == 0:
            raise ModelFileError("Slice step must not be 0")
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index = [slice(None)] * axis + [slice(start, end, step)]
            x = x[tuple(index)]
        else:  # torch slicing has no negative steps: gather the indices instead
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            x = x.index_select(axis, torch.arange(start, end, step, device=x.device))
    return [x]


@_op("Squeeze")
def _squeeze(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    axes = _axes_from(inputs, 1, attrs)
    rank = x.dim()
    drop = {i for i, s in enumerate(x.shape) if s == 1} if axes is None else {_axis(a, rank) for a in axes}
    return [x.reshape([s for i, s in enumerate(x.shape) if i not in drop])]


@_op("Unsqueeze")
def _unsqueeze(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    axes = _axes_from(inputs, 1, attrs) or []
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        shape.insert(a, 1)
    return [x.reshape(shape)]


@_op("Expand")
def _expand(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    return [x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(inputs[1]))))]


@_op("Tile")
def _tile(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [inputs[0].repeat(*_ints(inputs[1]))]


def _pad_indices(size: int, begin: int, end: int, mode: str) -> np.ndarray:
    """Source indices along one axis for reflect / edge / wrap padding (negative pads crop)."""
    index = np.arange(-begin, size + end)
    if mode == "edge":
        return np.clip(index, 0, size - 1)
    if mode == "wrap":
        return np.mod(index, size)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


@_op("Pad")
def _pad(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    rank = x.dim()
    mode = attrs.get("mode", "constant")
    pads_input = _arg(inputs, 1)
    if pads_input is not None:  # opset >= 11
        pads = _ints(pads_input)
        value_input = _arg(inputs, 2)
        value = value_input.reshape(-1)[0].item() if value_input is not None and value_input.numel() else 0
        axes = _ints(_arg(inputs, 3)) or list(range(rank))
    else:
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[_axis(axis, rank)] = pads[i]
        ends[_axis(axis, rank)] = pads[i + len(axes)]
    if mode == "constant":
        value = value if x.is_floating_point() else int(value)
        return [F.pad(x, _torch_pads(begins, ends), value=value)]
    for axis in range(rank):
        if begins[axis] or ends[axis]:
            index = _pad_indices(x.shape[axis], begins[axis], ends[axis], mode)
            x = x.index_select(axis, torch.as_tensor(index, dtype=torch.long, device=x.device))
    return [x]


@_validator("Pad")
def _check_pad(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    mode = attrs.get("mode", "constant")
    return None if mode in ("constant", "reflect", "edge", "wrap") else f"mode={mode!r}"


@_op("Gather")
def _gather(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    data, indices = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return [picked.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])]


@_op("Shape")
def _shape(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    dims = list(x.shape)[attrs.get("start", 0) : attrs.get("end")]
    return [torch.tensor(dims, dtype=torch.int64, device=x.device)]


@_op("Size")
def _size(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    return [torch.tensor(x.numel(), dtype=torch.int64, device=x.device)]


@_op("Cast")
def _cast(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [inputs[0].to(_ONNX_TO_TORCH[attrs["to"]])]


@_validator("Cast")
def _check_cast(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    to = attrs.get("to")
    if to in _ONNX_TO_TORCH:
        return None
    name = TensorProto.DataType.Name(to) if to in TensorProto.DataType.values() else str(to)
    return f"to={name}"


@_op("Constant")
def _constant(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    return [attrs["value"]]  # converted once in GraphModule.__init__ (see _constant_value)


def _constant_value(attrs: dict[str, Any], device: torch.device) -> Tensor:
    if isinstance(attrs.get("value"), Tensor):
        return attrs["value"]
    if "value_float" in attrs:
        return torch.tensor(attrs["value_float"], dtype=torch.float32, device=device)
    if "value_floats" in attrs:
        return torch.tensor(attrs["value_floats"], dtype=torch.float32, device=device)
    if "value_int" in attrs:
        return torch.tensor(attrs["value_int"], dtype=torch.int64, device=device)
    return torch.tensor(attrs["value_ints"], dtype=torch.int64, device=device)


@_validator("Constant")
def _check_constant(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    # "value" must have decoded to a tensor (a sparse_value / value_string(s) has not).
    if isinstance(attrs.get("value"), Tensor):
        return None
    if any(key in attrs for key in ("value_float", "value_floats", "value_int", "value_ints")):
        return None
    return "attributes " + ",".join(sorted(attrs)) if attrs else "no value"


@_op("ConstantOfShape")
def _constant_of_shape(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    shape = inputs[0]
    value = attrs.get("value")
    if value is None:
        return [torch.zeros(_ints(shape), dtype=torch.float32, device=shape.device)]
    return [torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype, device=shape.device)]


@_op("Range")
def _range(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------

_COORDINATE_MODES = (
    "half_pixel",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "half_pixel_symmetric",
)
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _source_coordinates(n_in: int, n_out: int, scale: np.float32, mode: str) -> np.ndarray:
    """Input coordinate of every output position along one axis, in float32 like ORT."""
    x = np.arange(n_out, dtype=np.float32)
    half = np.float32(0.5)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if n_out > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.zeros_like(x)
    # half_pixel_symmetric
    adjustment = np.float32(n_out) / (scale * np.float32(n_in))
    offset = np.float32(n_in) / np.float32(2) * (np.float32(1) - adjustment)
    return offset + (x + half) / scale - half


def _nearest_index(coords: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(coords)
    if mode == "ceil":
        return np.ceil(coords)
    if mode == "round_prefer_floor":
        return np.ceil(coords - np.float32(0.5))
    return np.floor(coords + np.float32(0.5))  # round_prefer_ceil


@_op("Resize")
def _resize(inputs: list[Tensor | None], attrs: dict[str, Any], ctx: OpContext) -> list[Tensor]:
    x = inputs[0]
    rank = x.dim()
    axes = [_axis(a, rank) for a in attrs.get("axes", range(rank))]
    in_sizes = [x.shape[a] for a in axes]
    scales_t, sizes_t = _arg(inputs, 2), _arg(inputs, 3)
    if sizes_t is not None and sizes_t.numel():
        out_sizes = _ints(sizes_t)
        scales = [np.float32(o) / np.float32(i) for o, i in zip(out_sizes, in_sizes, strict=True)]
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            scale = min(scales) if policy == "not_larger" else max(scales)
            scales = [scale] * len(axes)
            out_sizes = [int(np.floor(np.float32(i) * scale + np.float32(0.5))) for i in in_sizes]
    elif scales_t is not None and scales_t.numel():
        scales = [np.float32(s) for s in scales_t.reshape(-1).tolist()]
        out_sizes = [int(np.floor(np.float32(i) * s)) for i, s in zip(in_sizes, scales, strict=True)]
    else:
        raise ModelFileError("Resize needs either scales or sizes")

    mode = attrs.get("mode", "nearest")
    coordinate_mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    for axis, n_in, n_out, scale in zip(axes, in_sizes, out_sizes, scales, strict=True):
        if n_in == n_out and scale == 1:
            continue
        coords = _source_coordinates(n_in, n_out, scale, coordinate_mode)
        if mode == "nearest":
            index = np.clip(_nearest_index(coords, attrs.get("nearest_mode", "round_prefer_floor")), 0, n_in - 1)
            x = x.index_select(axis, torch.as_tensor(index.astype(np.int64), device=x.device))
            continue
        coords = np.clip(coords, 0, n_in - 1)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        shape = [1] * rank
        shape[axis] = n_out
        w_high = torch.as_tensor(coords - low, dtype=x.dtype, device=x.device).reshape(shape)
        x_low = x.index_select(axis, torch.as_tensor(low, device=x.device))
        x_high = x.index_select(axis, torch.as_tensor(high, device=x.device))
        x = x_low * (1 - w_high) + x_high * w_high
    return [x]


@_validator("Resize")
def _check_resize(attrs: dict[str, Any], ctx: OpContext) -> str | None:
    mode = attrs.get("mode", "nearest")
    problems = []
    if mode not in ("nearest", "linear"):
        problems.append(f"mode={mode!r}")
    coordinate_mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    if coordinate_mode not in _COORDINATE_MODES:
        problems.append(f"coordinate_transformation_mode={coordinate_mode!r}")
    nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest_mode not in _NEAREST_MODES:
        problems.append(f"nearest_mode={nearest_mode!r}")
    if mode == "linear" and attrs.get("antialias", 0):
        problems.append("antialias=1")
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        problems.append(f"keep_aspect_ratio_policy={policy!r}")
    return ", ".join(problems) or None


SUPPORTED_OPS: frozenset[str] = frozenset(_OPS)


# --------------------------------------------------------------------------------------------
# graph structure
# --------------------------------------------------------------------------------------------


def _label(node: onnx.NodeProto, index: int) -> str:
    """How error messages name a node: its name, or its position and op type when unnamed."""
    return f"'{node.name}'" if node.name else f"#{index} ({node.op_type})"


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ModelFileError("model does not import the default ONNX opset")
    opset = max(versions)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"model uses ONNX opset {opset}; qcb-onnx needs opset {MIN_OPSET} or later "
            "(convert it with onnx.version_converter)"
        )
    return opset


def _format_unsupported(ops: dict[str, list[str]], attrs: list[str]) -> str:
    parts = []
    if ops:
        parts.append("unsupported op types: " + listing(ops, _MAX_NAMES_PER_OP))
    if attrs:
        parts.append("unsupported attributes: " + ", ".join(attrs))
    return "; ".join(parts).replace("\n", " ")


@dataclass(frozen=True)
class _Step:
    """A validated node, ready to run."""

    fn: OpFn
    attrs: dict[str, Any]
    ctx: OpContext
    release: tuple[str, ...]  # tensors whose last consumer is this node


# --------------------------------------------------------------------------------------------
# the executor
# --------------------------------------------------------------------------------------------


@dataclass
class Frontier:
    """A paused run of the graph on one batch: the live tensors once ``nodes[:next]`` have run."""

    env: dict[str, Tensor]
    next: int = 0


class GraphModule:
    """An ONNX graph executed with torch ops: hookable, overridable, differentiable.

    Attributes:
        nodes: the graph's nodes in topological order.
        params: every initializer by name (floating ones as float32), on ``device``.
        input_names: graph inputs that are not initializers (what ``run`` needs as feeds).
        output_names: graph outputs.
        opset: the model's default-domain opset.
    """

    def __init__(self, model: onnx.ModelProto, device: str | torch.device = "cpu") -> None:
        """Load and validate ``model``; raise before any work if something is unsupported.

        Raises:
            ModelFileError: the graph is structurally broken (cycle, undefined tensor, ...).
            UnsupportedModelError: op types, attribute values or opsets we do not implement; the
                message lists every offending node on one line.
        """
        self.device = torch.device(device)
        graph = model.graph
        self.opset = _default_opset(model)
        if len(graph.sparse_initializer):
            raise UnsupportedModelError("sparse initializers are not supported")
        self.params: dict[str, Tensor] = {
            t.name: _tensor_proto_to_torch(t, self.device, f"initializer '{t.name}'") for t in graph.initializer
        }
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in self.params]
        self._inputs = frozenset(self.input_names)
        self.output_names: list[str] = [o.name for o in graph.output]
        order = graph_order(graph)  # raises InvalidGraphError (a ModelFileError) on a broken graph
        self.nodes: list[onnx.NodeProto] = list(graph.node) if order is None else [graph.node[i] for i in order]
        self._producer: dict[str, int] = {name: i for i, node in enumerate(self.nodes) for name in node.output if name}
        self._steps = self._compile(graph)

    def producer(self, tensor: str) -> int | None:
        """Index in :attr:`nodes` of the node producing ``tensor``; None for inputs and initializers.

        Raises KeyError for a name the graph does not define, so typos do not pass silently.
        """
        if tensor in self._producer:
            return self._producer[tensor]
        if tensor in self.params or tensor in self._inputs:
            return None
        raise KeyError(tensor)

    def run(
        self,
        feeds: Mapping[str, Tensor],
        *,
        params: Mapping[str, Tensor] | None = None,
        on_tensor: Callable[[str, Tensor], Tensor] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Execute the graph and return ``{name: tensor}`` for ``outputs``.

        Args:
            feeds: values for graph inputs (torch tensors or numpy arrays; floating ones are
                converted to float32 and everything is moved to ``device``).
            params: replacements for initializers by name (e.g. fake-quantized weights); gradients
                flow back to them.  The others come from :attr:`params`.
            on_tensor: called as ``on_tensor(name, value)`` for every graph input and every node
                output (also integer ones such as shapes, but not initializers or Constant
                outputs) right when it is produced; what it returns replaces the tensor for all
                consumers and in the result.
            outputs: tensor names to return (default: the graph outputs).  Nodes run in
                topological order and execution stops once every requested tensor exists; later
                nodes are never executed.
        """
        frontier = Frontier(self._input_values(feeds, on_tensor))
        return self._advance(frontier, params, on_tensor, list(self.output_names if outputs is None else outputs))

    def start(self, feeds: Mapping[str, Tensor], on_tensor: Callable[[str, Tensor], Tensor] | None = None) -> Frontier:
        """A run paused before its first node; continue it with :meth:`resume`."""
        return Frontier(self._input_values(feeds, on_tensor))

    def resume(
        self,
        frontier: Frontier,
        outputs: Sequence[str],
        *,
        params: Mapping[str, Tensor] | None = None,
        on_tensor: Callable[[str, Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Continue a paused run until ``outputs`` exist, pause it there again, return them.

        Layer-by-layer quantization asks for layer after layer's input; resuming runs every node
        once per batch over the whole loop instead of re-running the prefix for each layer.  Only
        valid while what the nodes already run read is unchanged: ``params`` may differ between
        calls only for nodes not yet run (the next layers' weights), ``on_tensor`` not at all.
        """
        return self._advance(frontier, params, on_tensor, list(outputs))

    def _advance(
        self,
        frontier: Frontier,
        params: Mapping[str, Tensor] | None,
        on_tensor: Callable[[str, Tensor], Tensor] | None,
        wanted: list[str],
    ) -> dict[str, Tensor]:
        for name in wanted:
            if name not in self._producer and name not in self.params and name not in self._inputs:
                raise UsageError(f"unknown tensor '{name}' requested from the graph")
        values = self._parameter_values(params)
        env = frontier.env
        keep = set(wanted)
        stop = max((self._producer.get(name, -1) for name in wanted), default=-1)
        for i in range(frontier.next, stop + 1):
            node, step = self.nodes[i], self._steps[i]
            args = [self._lookup(name, env, values) if name else None for name in node.input]
            try:
                results = step.fn(args, step.attrs, step.ctx)
            except QcbError:
                raise
            except Exception as exc:  # noqa: BLE001 - inputs a validated node cannot take: a broken graph
                raise InvalidGraphError(f"node {_label(node, i)} ({node.op_type}) cannot run: {one_line(exc)}") from exc
            for name, value in zip(node.output, results, strict=False):
                if not name:
                    continue
                if on_tensor is not None and node.op_type != "Constant":
                    value = on_tensor(name, value)
                env[name] = value
            for name in step.release:
                if name not in keep:
                    env.pop(name, None)
        frontier.next = max(frontier.next, stop + 1)
        return {name: self._lookup(name, env, values) for name in wanted}

    # ---- internals ---------------------------------------------------------------------------

    def _compile(self, graph: onnx.GraphProto) -> list[_Step]:
        """Validate every node and precompute what running it needs."""
        unsupported_ops: dict[str, list[str]] = {}
        unsupported_attrs: list[str] = []
        consumed = {name for node in self.nodes for name in node.input} | set(self.output_names)
        last_use: dict[str, int] = {name: i for name, i in self._producer.items()}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                if name in last_use or name in self._inputs:
                    last_use[name] = i
        release: dict[int, list[str]] = {}
        for name, i in last_use.items():
            release.setdefault(i, []).append(name)

        steps: list[_Step] = []
        for i, node in enumerate(self.nodes):
            label = _label(node, i)
            op_type = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
            has_subgraph = any(a.type in _SUBGRAPH_TYPES for a in node.attribute)
            if op_type not in _OPS or has_subgraph:
                unsupported_ops.setdefault(op_type, []).append(label)
                continue
            ctx = OpContext(opset=self.opset, num_outputs=len(node.output))
            try:
                attrs = self._decode_attributes(node, label)
            except UnsupportedModelError as exc:  # e.g. a string-typed tensor attribute
                unsupported_attrs.append(f"{op_type} (node {label}: {exc})")
                continue
            problem = _VALIDATORS[op_type](attrs, ctx) if op_type in _VALIDATORS else None
            extra = [n for n in node.output[_MAX_OUTPUTS.get(op_type, len(node.output)) :] if n in consumed]
            if extra:
                problem = ", ".join(filter(None, [problem, "outputs " + ", ".join(f"'{n}'" for n in extra)]))
            if problem:
                unsupported_attrs.append(f"{op_type} (node {label}: {problem})")
                continue
            if op_type == "Constant":
                attrs = {"value": _constant_value(attrs, self.device)}
            steps.append(_Step(_OPS[op_type], attrs, ctx, tuple(release.get(i, ()))))
        if unsupported_ops or unsupported_attrs:
            raise UnsupportedOps(_format_unsupported(unsupported_ops, unsupported_attrs))
        return steps

    def _decode_attributes(self, node: onnx.NodeProto, label: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        for attribute in node.attribute:
            value = helper.get_attribute_value(attribute)
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8") for v in value]
            elif isinstance(value, TensorProto):
                value = _tensor_proto_to_torch(value, self.device, f"attribute '{attribute.name}' of node {label}")
            attrs[attribute.name] = value
        return attrs

    def _parameter_values(self, overrides: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
        if not overrides:
            return self.params
        unknown = next((name for name in overrides if name not in self.params), None)
        if unknown is not None:
            raise UsageError(f"params override '{unknown}' is not an initializer of the graph")
        return _Overridden(self.params, overrides, self.device)

    def _input_values(
        self, feeds: Mapping[str, Tensor], on_tensor: Callable[[str, Tensor], Tensor] | None
    ) -> dict[str, Tensor]:
        unknown = sorted(set(feeds) - self._inputs)
        if unknown:
            raise UsageError(f"feeds name unknown graph inputs {unknown}; the graph inputs are {self.input_names}")
        env: dict[str, Tensor] = {}
        for name in self.input_names:
            if name not in feeds:
                continue
            value = feeds[name]
            if not isinstance(value, Tensor):
                value = _array_to_tensor(np.asarray(value), self.device, f"feed '{name}'")
            value = _as_float32(value).to(self.device)
            env[name] = on_tensor(name, value) if on_tensor is not None else value
        return env

    def _lookup(self, name: str, env: dict[str, Tensor], values: dict[str, Tensor]) -> Tensor:
        if name in env:
            return env[name]
        if name in values:
            return values[name]
        if name in self._inputs:
            raise CalibrationDataError(f"no value fed for graph input '{name}'")
        raise RuntimeError(f"tensor '{name}' was released before its last use")  # a bug here
