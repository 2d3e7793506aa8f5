"""Models over protobuf's 2 GB limit: checked, converted, run and written without serializing them whole.

A ``ModelProto`` may hold more than 2 GB in memory, but it cannot be serialized, and everything that
hands a model to C++ (the checker, the version converter, ONNX Runtime, ``onnx.save``) serializes it.
Every such call in qcb-onnx goes through this module.  Small models take the plain path; a model
over the limit is split into a *skeleton* (the graph, with its large initializers left out) and the
large tensors themselves, and each operation uses the skeleton in the way that operation allows:

* checker / version converter: the large initializers become graph inputs of the same type and
  shape (as onnx_ir does for shape inference), which is all these tools need from them;
* ONNX Runtime and writing: the large initializers become external data in one ``<name>.data``
  file next to the model (the ONNX convention for large models).

The limit is a module constant so that tests can lower it and run the large path on small models.

Weights can also stay on disk: `load_model(..., map_external=True)` leaves each external tensor
where it is, its location made absolute (after load.py has checked it), and `to_array` maps it
copy-on-write, so the conversion reads a weight's pages when a layer touches them and the OS may
drop them again: a model larger than memory streams through the layer loop.  Such *mapped* tensors
never reach C++ either (they leave the skeleton whatever their size); `save` copies their bytes in
chunks and `materialize` reads them in where the result still fits one protobuf.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LIMIT = 2_000_000_000  # onnx.checker.MAXIMUM_PROTOBUF: what onnx itself refuses to serialize
BIG_TENSOR = 1024  # elements; initializers this big leave the skeleton
ALIGN = 4096  # external-data offsets, page aligned so that ORT can memory-map them


CHUNK = 1 << 26  # bytes copied or hashed at a time from a mapped tensor's file
# A model bigger than this reaches C++ (checker, version converter, ORT) as a skeleton or from a file
# even under the limit: serializing it whole costs two more copies of it in memory.
HANDOVER = 256 << 20


def is_large(model: onnx.ModelProto) -> bool:
    """True when `model` cannot be handed over as one protobuf: over the limit, or holding mapped tensors."""
    if any(mapped(t) for t in model.graph.initializer):
        return True
    try:
        return model.ByteSize() > LIMIT
    except Exception:  # noqa: BLE001 - protobuf cannot even size it (EncodeError): far over the limit
        return True


def split(model: onnx.ModelProto) -> bool:
    """True when `model` goes to C++ without its large tensors inline: it cannot go whole (`is_large`),
    or a whole serialized copy would cost more memory than the skeleton path (over HANDOVER bytes)."""
    return is_large(model) or _inline_size(model) > HANDOVER


def mapped(tensor: TensorProto) -> tuple[str, int, int] | None:
    """(file, offset, length) of a tensor left in its external file by `load_model(map_external=True)`
    (an absolute location, which only that function writes); None for any other tensor."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not os.path.isabs(location):
        return None
    return location, int(entries.get("offset", 0)), int(entries.get("length", 0))


def to_array(tensor: TensorProto) -> np.ndarray:
    """`numpy_helper.to_array` that also reads mapped tensors: memory-mapped copy-on-write where the
    bytes are the array (pages read on first touch, droppable again), read whole otherwise."""
    where = mapped(tensor)
    if where is None:
        return numpy_helper.to_array(tensor)
    path, offset, length = where
    count = math.prod(tensor.dims)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if count and tensor.data_type in MAPPABLE and dtype.itemsize * count == length:
        return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="c", offset=offset, shape=tuple(tensor.dims))
    inline = TensorProto()
    _copy_fields(tensor, inline, skip="external_data")
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = b"".join(_chunks(tensor))
    return numpy_helper.to_array(inline)


MAPPABLE = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
        TensorProto.FLOAT16,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT16,
        TensorProto.UINT16,
        TensorProto.INT32,
        TensorProto.UINT32,
        TensorProto.INT64,
        TensorProto.UINT64,
        TensorProto.BOOL,
    }
)


def materialize(model: onnx.ModelProto, limit: int = LIMIT, always_from: str | Path | None = None) -> onnx.ModelProto:
    """`model` with its mapped tensors read into the proto where the result stays under `limit` bytes
    (a plain model a caller can `onnx.save`), else left mapped (write it with `save`, which streams
    them); those stored in the folder `always_from` (about to be removed) are read in whatever the size."""
    tensors = [t for t in model.graph.initializer if mapped(t)]
    if tensors and sum(mapped(t)[2] for t in tensors) + _inline_size(model) > limit:
        folder = None if always_from is None else os.path.realpath(always_from)
        tensors = [t for t in tensors if os.path.dirname(os.path.realpath(mapped(t)[0])) == folder]
    for tensor in tensors:
        data = b"".join(_chunks(tensor))
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # the bytes of a tensor that was built inline
        tensor.raw_data = data
    return model


def _inline_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001
        return LIMIT + 1


def data_file(path: str | Path) -> Path:
    """Where `save` puts the external data of a large model written to `path`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _chunks(tensor: TensorProto) -> Iterator[bytes]:
    """The tensor's bytes as external data holds them (packed for 4-bit types, little-endian), in
    pieces of at most CHUNK bytes for a mapped tensor."""
    where = mapped(tensor)
    if where is not None:
        path, offset, length = where
        with open(path, "rb") as f:
            f.seek(offset)
            while length > 0:
                piece = f.read(min(CHUNK, length))
                if not piece:
                    raise OSError(f"external data of tensor '{tensor.name}' in {path} is truncated")
                length -= len(piece)
                yield piece
    elif tensor.HasField("raw_data"):
        yield tensor.raw_data
    else:
        yield numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def copy_without_initializers(model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Copy every field of `model` into the empty `out` but its main graph's initializers."""
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[TensorProto]]:
    """A copy of `model` without its large main-graph initializers, and those initializers (not copied)."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    big = []
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) >= BIG_TENSOR or mapped(tensor):
            big.append(tensor)
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton, big


def _as_inputs(skeleton: onnx.ModelProto, big: list[TensorProto]) -> onnx.ModelProto:
    """The skeleton with each large initializer declared as a graph input of its type and shape."""
    declared = {i.name for i in skeleton.graph.input}
    for tensor in big:
        if tensor.name not in declared:
            skeleton.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return skeleton


def check_model(model: onnx.ModelProto, full_check: bool = True) -> None:
    """onnx.checker.check_model, for models of any size."""
    onnx.checker.check_model(_as_inputs(*_skeleton(model)) if split(model) else model, full_check=full_check)


def convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter.convert_version, for models of any size (weights are never rewritten)."""
    if not split(model):
        return onnx.version_converter.convert_version(model, opset)
    skeleton, big = _skeleton(model)
    names = {t.name for t in big}
    converted = onnx.version_converter.convert_version(_as_inputs(skeleton, big), opset)
    inputs = [i for i in converted.graph.input if i.name not in names]
    del converted.graph.input[:]
    converted.graph.input.extend(inputs)
    converted.graph.initializer.extend(big)
    return converted


def fingerprint(model: onnx.ModelProto) -> hashlib._Hash:
    """A sha256 over the model's deterministic serialization (skeleton + large tensors when large)."""
    if not is_large(model):
        return hashlib.sha256(model.SerializeToString(deterministic=True))
    skeleton, big = _skeleton(model)
    h = hashlib.sha256(skeleton.SerializeToString(deterministic=True))
    for tensor in big:  # one tensor may be over the limit by itself: hash its parts
        h.update(tensor.name.encode())
        h.update(repr((tensor.data_type, list(tensor.dims))).encode())
        for piece in _chunks(tensor):
            h.update(piece)
    return h


def save(model: onnx.ModelProto, path: str | Path, external: bool | None = None) -> list[Path]:
    """Write `model` to `path`; a large model (or any, with `external`) gets its large tensors in
    `data_file(path)`.

    Returns the files written, the model file last.  `model` itself is left unchanged (onnx.save
    with save_as_external_data would strip the weights out of the caller's proto)."""
    path = Path(path)
    if not (is_large(model) if external is None else external):
        onnx.save(model, path)
        return [path]
    skeleton, big = _skeleton(model)
    data = data_file(path)
    offset = 0
    with open(data, "wb") as f:
        for tensor in big:
            f.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            size = 0
            for piece in _chunks(tensor):
                f.write(piece)
                size += len(piece)
            ref = external_ref(tensor.name, tensor.data_type, tensor.dims, data.name, offset, size)
            ref.doc_string = tensor.doc_string
            skeleton.graph.initializer.append(ref)
            offset += size
    onnx.save(skeleton, path)
    return [data, path]


def external_ref(name: str, data_type: int, dims, location: str, offset: int, length: int) -> TensorProto:
    """An initializer whose bytes are `length` bytes at `offset` in the file `location` (ONNX external data)."""
    ref = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value
    return ref


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto, folder: str | Path | None = None) -> Iterator[str]:
    """A path to `model` saved (with external data when `split`) in a temporary folder in `folder`
    (default: the system's)."""
    with tempfile.TemporaryDirectory(prefix="qcb_onnx_", dir=folder) as tmp:
        path = os.path.join(tmp, "model.onnx")
        save(model, path, external=split(model))
        yield path
