"""Block-wise 4-bit weights the way onnxruntime's `MatMulNBitsQuantizer` (RTN, "DEFAULT") makes them.

Transformer weights are quantized weight-only, in blocks of `block_size` consecutive input elements
of each output neuron, each block with its own scale (and, asymmetric, zero point): the format of
ORT's `MatMulNBits` contrib op and of ONNX's `DequantizeLinear` with `block_size` (opset 21). A
learned rounding means "not nearest" only against the victim's exact integers, so this module
reproduces MLAS's `BlockwiseQuantizer` arithmetic (float32 throughout):

* symmetric: the block's value of largest magnitude, signed, over -8 is the scale (so that value
  lands on -8; the scale may be negative), zero point 8;
* asymmetric: scale = (max(max, 0) - min(min, 0)) / 15, zero point = roundf(-min / scale) clamped to
  [0, 15];
* integer = clamp(roundf(w * (1 / scale) + zero_point), 0, 15), `roundf` rounding half away from
  zero, the product and the sum each rounded to float32 (no fused multiply-add); a zero scale takes
  reciprocal 0, i.e. every weight of an all-zero block becomes the zero point.

Everything here works on the canonical (out, d) view of a weight (rows = output neurons, blocks
along the input dimension d); `tests/test_blockwise.py` checks the integers, scales and zero points
against ORT's own quantizer bit for bit, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .errors import UsageError
from .scheme import Grid

QMAX = 15  # unsigned 4-bit storage; the signed integer the rounding works on is u - zero_point
UNSIGNED_GRID = Grid(4, 0, QMAX, TensorProto.UINT4, False)  # asymmetric storage: u with zero points
BLOCK_OPS = ("MatMul", "Gemm")  # what is quantized block-wise; Conv keeps per-channel scales
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of 2, at least 16


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        sizes = ", ".join(map(str, BLOCK_SIZES))
        raise UsageError(f"--block-size must be one of {sizes} (MatMulNBits' block sizes), got {block_size!r}")


@dataclass(frozen=True)
class Blocks:
    """Scales and zero points of a canonical (out, d) weight: (out, n_blocks) each."""

    block_size: int
    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int32 in [0, 15]; 8 everywhere when symmetric
    symmetric: bool

    @property
    def n_blocks(self) -> int:
        return self.scale.shape[1]

    def expand(self, values: np.ndarray, d: int) -> np.ndarray:
        """(out, n_blocks) -> (out, d): each block's value over its columns."""
        return np.repeat(values, self.block_size, axis=1)[:, :d]


def _padded(wc: np.ndarray, block_size: int) -> np.ndarray:
    """(out, n_blocks, block_size) with zero padding, as ORT pads K to whole blocks."""
    out, d = wc.shape
    n = -(-d // block_size)
    return np.pad(wc.astype(np.float32), ((0, 0), (0, n * block_size - d))).reshape(out, n, block_size)


def block_params(wc: np.ndarray, block_size: int, symmetric: bool) -> Blocks:
    """MLAS's range2scale / range2scalezp per block of a canonical weight (padding counts as zeros)."""
    blocks = _padded(wc, block_size)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    if symmetric:
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo).astype(np.float32)
        scale = (extreme / np.float32(-8.0)).astype(np.float32)
        return Blocks(block_size, scale, np.full(scale.shape, 8, np.int32), True)
    lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    scale = ((hi - lo) / np.float32(QMAX)).astype(np.float32)
    safe = np.where(scale != 0, scale, np.float32(1))
    zp_fp = np.where(scale != 0, np.float32(0) - lo / safe, lo).astype(np.float32)
    zp = np.where(zp_fp < 0, 0, np.where(zp_fp > QMAX, QMAX, _roundf(zp_fp)))
    return Blocks(block_size, scale, zp.astype(np.int32), False)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: half away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def reciprocal(blocks: Blocks) -> np.ndarray:
    """(out, n_blocks) float32 1 / scale, 0 where the scale is 0 (MLAS)."""
    s = blocks.scale
    return np.where(s != 0, np.float32(1) / np.where(s != 0, s, np.float32(1)), np.float32(0)).astype(np.float32)


def quotient(wc: np.ndarray, blocks: Blocks) -> np.ndarray:
    """w * (1 / scale) in float32, the value MLAS rounds (before the zero point is added)."""
    return (wc.astype(np.float32) * blocks.expand(reciprocal(blocks), wc.shape[1])).astype(np.float32)


def nearest_unsigned(wc: np.ndarray, blocks: Blocks) -> np.ndarray:
    """ORT's stored integers u in [0, 15], canonical (out, d)."""
    zp = blocks.expand(blocks.zero_point, wc.shape[1]).astype(np.float32)
    return np.clip(_roundf((quotient(wc, blocks) + zp).astype(np.float32)), 0, QMAX).astype(np.int32)


def dequantize(signed: np.ndarray, blocks: Blocks) -> np.ndarray:
    """(u - zero_point) * scale in float32: what MatMulNBits and DequantizeLinear compute."""
    return (signed.astype(np.float32) * blocks.expand(blocks.scale, signed.shape[1])).astype(np.float32)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit values along the last axis into bytes, the first in the low nibble (odd lengths
    padded with 0)."""
    v = np.asarray(values).astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] & 0xF) | ((v[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: np.ndarray, length: int) -> np.ndarray:
    p = np.asarray(packed).astype(np.uint8)
    return np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], -1)[..., :length].astype(np.int32)


def matmulnbits_inputs(unsigned: np.ndarray, blocks: Blocks) -> dict[str, np.ndarray]:
    """MatMulNBits' B ([N, n_blocks, block_size / 2] uint8), scales ([N, n_blocks] float32) and, when
    asymmetric, zero_points ([N, ceil(n_blocks / 2)] uint8), from canonical (N, K) integers: the shapes
    ORT's quantizer writes."""
    n, k = unsigned.shape
    nb, bs = blocks.n_blocks, blocks.block_size
    padded = np.zeros((n, nb * bs), np.int32)
    padded[:, :k] = unsigned
    out = {
        "B": pack_nibbles(padded.reshape(n, nb, bs)),
        "scales": blocks.scale.astype(np.float32),
    }
    if not blocks.symmetric:
        out["zero_points"] = pack_nibbles(blocks.zero_point)
    return out
