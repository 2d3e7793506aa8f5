"""Arrays kept on disk instead of in memory: a file a conversion appends tensors to once and reads
back memory-mapped.

A model larger than memory streams through the layer loop (large.py), but what the loop produces
(every layer's integers) and what the output is built from (packed int4 weights, block scales) grow
with the model.  Appended here, each becomes a read-only mapping of the file: page cache the OS may
drop and read again, not memory the process holds.  A TensorProto pointing here is a *mapped* tensor
(`large.mapped`: an absolute location), which large.py checks, saves and hands to ONNX Runtime in
chunks, never as one copy in memory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from . import blockwise, large

ALIGN = 64  # offsets aligned for any dtype's memory mapping


class TensorFile:
    """An append-only file of raw little-endian arrays at `path`, kept at `size` bytes on opening (0:
    a new file; more: the part an index already points into, what was written after it dropped)."""

    def __init__(self, path: str | Path, size: int = 0) -> None:
        self.path = Path(path).resolve()
        self._file = open(self.path, "r+b" if size and self.path.exists() else "w+b")  # noqa: SIM115
        self._file.truncate(size)
        self._file.seek(size)
        self.size = size

    def append(self, data: bytes | np.ndarray) -> int:
        """Write `data` at the next aligned offset; returns that offset."""
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1) if isinstance(data, np.ndarray) else data
        pad = -self.size % ALIGN
        offset = self.size + pad
        self._file.write(b"\0" * pad)
        self._file.write(memoryview(raw))
        self._file.flush()  # a mapping reads the file, not this object's buffer
        self.size = offset + len(raw)
        return offset

    def array(self, offset: int, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.ndarray:
        """The array stored at `offset`, read-only and memory-mapped (pages read when touched)."""
        dtype = np.dtype(dtype).newbyteorder("<")
        if int(np.prod(shape)) == 0:
            return np.empty(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))

    def keep(self, values: np.ndarray) -> np.ndarray:
        """`values` appended, returned as their read-only mapping (same dtype and shape)."""
        values = np.asarray(values)
        return self.array(self.append(values), values.dtype, values.shape)

    def tensor(self, name: str, values: np.ndarray, data_type: int | None = None) -> TensorProto:
        """An initializer `name` holding `values` as ONNX type `data_type` (default: the array's), its
        bytes appended here and referenced by absolute location.  INT4 / UINT4 are packed two to a byte,
        the flat tensor's order, as ONNX stores them."""
        values = np.asarray(values)
        if data_type is None:
            data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
        if data_type in (TensorProto.INT4, TensorProto.UINT4):
            raw = blockwise.pack_nibbles(values.reshape(-1))
        else:
            raw = values.astype(helper.tensor_dtype_to_np_dtype(data_type), copy=False)
        offset = self.append(raw)
        return large.external_ref(name, data_type, values.shape, str(self.path), offset, raw.nbytes)

    def close(self) -> None:
        self._file.close()


def remove(path: str | Path) -> None:
    """Delete a tensor file (its mappings stay readable where the OS allows, as Linux does)."""
    with contextlib.suppress(OSError):  # gone already, or (Windows) still mapped: a temporary folder's anyway
        os.unlink(path)
