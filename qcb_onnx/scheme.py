"""Quantization grids and scales, computed exactly the way onnxruntime.quantization does.

EFRAP decides, per weight, between the two integers that bracket w/s.  That choice only means
"not nearest" if s and the integer grid are the ones the victim's quantizer would use, so this
module reproduces ORT's ``compute_scale_zp``/``quantize_nparray`` arithmetic bit for bit
(float64 range, float32 scale, numpy half-to-even rounding), including ORT's two grids:
symmetric int8 restricts to [-127, 127] while int4 uses the full [-8, 7].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .errors import UsageError

FLOAT32_TINY = np.finfo(np.float32).tiny


@dataclass(frozen=True)
class Grid:
    """An integer grid [qmin, qmax] stored in an ONNX integer type."""

    bits: int
    qmin: int
    qmax: int
    onnx_type: int
    signed: bool

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.signed else np.uint8)


def weight_grid(bits: int) -> Grid:
    """Signed symmetric weight grid: ORT's [-127, 127] for int8 (and restricted 5..7 bits), its full
    [-8, 7] for int4 (and full 2..3 bits, stored as INT4)."""
    if not 2 <= bits <= 8:
        raise UsageError(f"--w-bits must be between 2 and 8, got {bits}")
    if bits >= 5:
        q = 2 ** (bits - 1) - 1
        return Grid(bits, -q, q, TensorProto.INT8, True)
    return Grid(bits, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, TensorProto.INT4, True)


def activation_grid(bits: int, symmetric: bool = False) -> Grid:
    """Unsigned asymmetric activation grid, ORT's QUInt8 / QUInt4; or, `symmetric`, the signed int8 one
    with zero point 0 that TensorRT requires (ORT's QInt8 with ActivationSymmetric).  The grid is what
    QuantizeLinear saturates to, [-128, 127]; the scale is ORT's symmetric one, absmax / 127."""
    if symmetric:
        if bits != 8:
            raise UsageError(f"--a-symmetric needs 8-bit activations, got --a-bits {bits}")
        return Grid(8, -128, 127, TensorProto.INT8, True)
    if bits == 8:
        return Grid(8, 0, 255, TensorProto.UINT8, False)
    if bits == 4:
        return Grid(4, 0, 15, TensorProto.UINT4, False)
    raise UsageError(f"--a-bits must be 8, 4 or none, got {bits}")


def symmetric_scale(absmax: np.ndarray, grid: Grid) -> np.ndarray:
    """ORT's symmetric scale: float64 (2*absmax)/(qmax-qmin), cast to float32; 1.0 where the range is 0."""
    absmax = np.asarray(absmax, dtype=np.float32)
    scale = (2.0 * absmax.astype(np.float64)) / float(grid.qmax - grid.qmin)
    scale = np.where(scale < FLOAT32_TINY, 1.0, scale)
    return scale.astype(np.float32)


def weight_scales(weight: np.ndarray, grid: Grid, axis: int | None) -> np.ndarray:
    """Per-channel (axis given) or per-tensor symmetric scales, shape (C,) or (1,)."""
    w = np.asarray(weight, dtype=np.float32)
    flat = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    rmin = np.minimum(flat.min(axis=1), 0.0)
    rmax = np.maximum(flat.max(axis=1), 0.0)
    return symmetric_scale(np.maximum(np.abs(rmin), np.abs(rmax)), grid)


def fit_bias_scale(scale: np.ndarray, input_scale: float, bias: np.ndarray, grid: Grid) -> np.ndarray:
    """ORT's int32-bias adjustment of int8 weight scales (quantize_static's default since 1.20, off with
    ``QDQDisableWeightAdjustForInt32Bias``): where input_scale * weight_scale is too small for the bias to
    fit int32, that weight scale grows to the smallest one that fits.  A layer with a large bias behind a
    narrow input (a classifier after a ReLU) would otherwise saturate its bias; ORT computes this before
    it rounds the weight, so nearest has to as well to give ORT's integers.  Only int8 grids, as ORT."""
    if grid.onnx_type != TensorProto.INT8:
        return scale
    qrange = np.float64(np.iinfo(np.int32).max) - np.float64(np.iinfo(np.int32).min + 1)
    b = np.asarray(bias, dtype=np.float32)
    if scale.size == 1:  # in float64, as ORT
        absmax = max(abs(min(np.float64(b.min()), 0.0)), abs(max(np.float64(b.max()), 0.0)))
        smallest = np.full(1, 1.0001 * 2.0 * absmax / qrange)
    else:  # ORT's per-channel bound is float32 until the division
        smallest = (np.float32(1.0001) * (np.float32(2.0) * np.abs(b))).astype(np.float64) / qrange
    candidate = np.float64(np.float32(input_scale)) * scale.astype(np.float64)
    small = (candidate < smallest) & (candidate > 0.0)
    if not small.any():
        return scale
    fitted = scale.copy()
    fitted[small] = (scale.astype(np.float64)[small] * (smallest[small] / candidate[small])).astype(np.float32)
    return fitted


def broadcast_scale(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a (C,) scale so it broadcasts against a weight of rank ndim along axis."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def scaled(weight: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """w / s in float32, the exact quotient ORT rounds."""
    w = np.asarray(weight, dtype=np.float32)
    return w / broadcast_scale(scale, w.ndim, axis)


def nearest_ints(weight: np.ndarray, scale: np.ndarray, axis: int | None, grid: Grid) -> np.ndarray:
    """Standard round-to-nearest-even then clip: what quantize_static writes."""
    return np.clip(np.round(scaled(weight, scale, axis)), grid.qmin, grid.qmax).astype(np.int32)


def activation_params(rmin: float, rmax: float, grid: Grid) -> tuple[np.float32, int]:
    """ORT's (scale, zero_point) for a calibrated range, the range widened to include 0: asymmetric on an
    unsigned grid, symmetric on a signed one (ORT's symmetric int8 range [-127, 127], zero point 0)."""
    rmin64 = min(float(np.float32(rmin)), 0.0)
    rmax64 = max(float(np.float32(rmax)), 0.0)
    if grid.signed:
        absmax = max(-rmin64, rmax64)
        scale = 2.0 * absmax / float(2 * grid.qmax)
        return (np.float32(1.0), 0) if scale < FLOAT32_TINY else (np.float32(scale), 0)
    scale = (rmax64 - rmin64) / float(grid.qmax - grid.qmin)
    if scale < FLOAT32_TINY:
        return np.float32(1.0), 0
    zero_point = int(np.round(grid.qmin - rmin64 / scale))
    return np.float32(scale), int(np.clip(zero_point, grid.qmin, grid.qmax))
