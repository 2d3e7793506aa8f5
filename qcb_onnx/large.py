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
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

LIMIT = 2_000_000_000  # onnx.checker.MAXIMUM_PROTOBUF: what onnx itself refuses to serialize
BIG_TENSOR = 1024  # elements; initializers this big leave the skeleton
ALIGN = 4096  # external-data offsets, page aligned so that ORT can memory-map them


def is_large(model: onnx.ModelProto) -> bool:
    """True when `model` cannot be serialized as one protobuf."""
    try:
        return model.ByteSize() > LIMIT
    except Exception:  # noqa: BLE001 - protobuf cannot even size it (EncodeError): far over the limit
        return True


def data_file(path: str | Path) -> Path:
    """Where `save` puts the external data of a large model written to `path`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def _raw(tensor: TensorProto) -> bytes:
    """The tensor's bytes as external data holds them (packed for 4-bit types, little-endian)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


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


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[TensorProto]]:
    """A copy of `model` without its large main-graph initializers, and those initializers (not copied)."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    big = []
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) >= BIG_TENSOR:
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
    onnx.checker.check_model(_as_inputs(*_skeleton(model)) if is_large(model) else model, full_check=full_check)


def convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx.version_converter.convert_version, for models of any size (weights are never rewritten)."""
    if not is_large(model):
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
        h.update(_raw(tensor))
    return h


def save(model: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Write `model` to `path`; a large model gets its large tensors in `data_file(path)`.

    Returns the files written, the model file last.  `model` itself is left unchanged (onnx.save
    with save_as_external_data would strip the weights out of the caller's proto)."""
    path = Path(path)
    if not is_large(model):
        onnx.save(model, path)
        return [path]
    skeleton, big = _skeleton(model)
    data = data_file(path)
    offset = 0
    with open(data, "wb") as f:
        for tensor in big:
            raw = _raw(tensor)
            f.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            f.write(raw)
            ref = TensorProto()
            ref.name, ref.data_type, ref.data_location = tensor.name, tensor.data_type, TensorProto.EXTERNAL
            ref.dims.extend(tensor.dims)
            ref.doc_string = tensor.doc_string
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
            skeleton.graph.initializer.append(ref)
            offset += len(raw)
    onnx.save(skeleton, path)
    return [data, path]


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto) -> Iterator[str]:
    """A path to `model` saved (with external data when large) in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="qcb_onnx_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save(model, path)
        yield path
