"""Load a model file we do not trust, with one-line errors instead of protobuf tracebacks.

`load_model` is the only way an untrusted model enters the pipeline.  Its checks are cheap (one
pass over the model, O(model size)) and run in this order, so that nothing is allocated or read
on the strength of a claim the model makes before that claim has been checked:

1. the file: exists, is a regular file, is not empty, fits protobuf's 2 GiB limit
   (`ModelFileError`, 3); it parses as an ONNX protobuf, else we say what it looks like instead
   (PNG, zip, pickle, ...);
2. the model: has nodes, imports a default-domain opset in ``MIN_OPSET..MAX_OPSET`` and is not
   already quantized (`UnsupportedModelError`, 2);
3. the graph: no tensor name defined twice, no input that nothing defines, no cycle
   (`InvalidGraphError`, 8); nodes that are not in topological order are sorted;
4. every tensor (initializers, sparse initializers, ``Constant`` / attribute tensors, in subgraphs
   and functions too): rank <= 64, no negative dim, at most 2**31 elements, a known data type
   (`InvalidWeightsError`, 9); data that matches the declared dims (`InvalidGraphError`, 8);
   no zero-sized weight of a Conv / ConvTranspose / Gemm / MatMul / BatchNormalization (9);
5. external data: the location is relative, has no ``..``, resolves (symlinks included) to a
   regular file inside the model's folder and holds exactly the declared bytes
   (`ExternalDataError`, 7) -- all of this is decided from ``stat`` alone; only then are the bytes
   read, by this module (never by ``onnx.load_external_data_for_model``);
6. the ONNX checker (`ModelFileError`, 3), run before external data is read, so that models over
   2 GB are checked from their path;
7. values: no NaN in any floating tensor, no +-Inf except in constants that only feed
   clamping / masking ops (``Clip``, ``Where``, ``Min``, ``Max``, comparisons) (9).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from . import large
from .errors import (
    ExternalDataError,
    InvalidGraphError,
    InvalidWeightsError,
    ModelFileError,
    UnsupportedModelError,
)
from .text import one_line, quoted

MIN_OPSET, MAX_OPSET = 11, 23
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# QOperator forms: integer kernels of the ONNX domain and ORT's contrib domain (quantize_static with
# QuantFormat.QOperator, dynamic quantization, MatMulNBits weight-only quantization)
QOPERATOR_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "MatMulNBits",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearWhere",
        "QLinearReduceMean",
        "QLinearConvTranspose",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "GatherBlockQuantized",
    }
)
QUANT_OPS = QDQ_OPS | QOPERATOR_OPS

MAX_ELEMENTS = 2**31  # per tensor; more is refused before any data is touched
MAX_RANK = 64  # numpy's limit
MAX_PROTOBUF_BYTES = 2**31 - 1  # protobuf cannot parse a larger message

# (op type, input index) slots holding weights that get quantized or folded into quantized weights
WEIGHT_SLOTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
}
# Largest |value| of a weight that becomes integers (a Conv, ConvTranspose, Gemm or MatMul input).
# Trained weights stay orders of magnitude below; past it, float32 scales and the reconstruction's
# sums overflow (a bit flip in an exponent gives 1e36).  Constants elsewhere (attention masks at
# float32's minimum) are not weights and are not bounded.
MAX_WEIGHT = 1e8
QUANTIZED_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ops where an infinite constant is meaningful (clamp bounds, masks); Inf anywhere else is refused
# readers of a constant that may hold +-Inf: clamps and comparisons, and an attention mask's plumbing (a
# causal mask of -inf added to the scores, sliced / expanded / reshaped to the sequence first)
INF_OK_OPS = frozenset(
    {"Clip", "Where", "Min", "Max", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"}
    | {"Add", "Slice", "Expand", "Reshape", "Unsqueeze"}
)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# data type -> (field holding non-raw data, values per element in that field, bytes per element in raw_data)
_STORAGE: dict[int, tuple[str, float, float]] = {
    TensorProto.FLOAT: ("float_data", 1, 4),
    TensorProto.DOUBLE: ("double_data", 1, 8),
    TensorProto.COMPLEX64: ("float_data", 2, 8),
    TensorProto.COMPLEX128: ("double_data", 2, 16),
    TensorProto.INT64: ("int64_data", 1, 8),
    TensorProto.UINT64: ("uint64_data", 1, 8),
    TensorProto.UINT32: ("uint64_data", 1, 4),
    TensorProto.INT32: ("int32_data", 1, 4),
    TensorProto.INT16: ("int32_data", 1, 2),
    TensorProto.UINT16: ("int32_data", 1, 2),
    TensorProto.INT8: ("int32_data", 1, 1),
    TensorProto.UINT8: ("int32_data", 1, 1),
    TensorProto.BOOL: ("int32_data", 1, 1),
    TensorProto.FLOAT16: ("int32_data", 1, 2),
    TensorProto.BFLOAT16: ("int32_data", 1, 2),
    TensorProto.FLOAT8E4M3FN: ("int32_data", 1, 1),
    TensorProto.FLOAT8E4M3FNUZ: ("int32_data", 1, 1),
    TensorProto.FLOAT8E5M2: ("int32_data", 1, 1),
    TensorProto.FLOAT8E5M2FNUZ: ("int32_data", 1, 1),
    TensorProto.INT4: ("int32_data", 0.5, 0.5),
    TensorProto.UINT4: ("int32_data", 0.5, 0.5),
    TensorProto.FLOAT4E2M1: ("int32_data", 0.5, 0.5),
}

# What a file that is not ONNX probably is, from its first bytes (only used after parsing failed).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive (PyTorch .pt/.pth checkpoints are zip archives)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x1f\x8b", "a gzip file"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"%PDF", "a PDF document"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
    (b"\x7fELF", "an ELF executable"),
    (b"\x80\x02", "a Python pickle"),
    (b"\x80\x03", "a Python pickle"),
    (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"),
)


def load_model(
    source: str | Path | onnx.ModelProto, allow_quantized: bool = False, map_external: bool = False
) -> onnx.ModelProto:
    """Parse and validate an untrusted FP32 ONNX model; every problem is a one-line `QcbError`.

    `allow_quantized` lets QDQ models through (for evaluation); conversion refuses them.
    `map_external`: external data stays in its (checked) files, located by absolute path, for
    `large.to_array` to map (the conversion streams weights; large.py says how); else it is read in.

    A path is parsed without its external data; external data is read (by this function) only
    after every location has been proven to stay inside the model's folder.  A `ModelProto`
    passed in memory must not reference external data (there is no folder to check it against).
    The argument is never modified; a copy is returned when nodes had to be sorted.
    """
    path: Path | None = None
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "model"
    else:
        path = Path(source)
        where = str(path)
        model = _parse_file(path)
    _check_model(model, where, allow_quantized)
    order = graph_order(model.graph, where)
    if order is not None:  # a DAG whose nodes are not in topological order: sort them (in a copy)
        if model is source:
            model = _copy(model)
        nodes = [onnx.NodeProto() for _ in order]
        for node, i in zip(nodes, order, strict=True):
            node.CopyFrom(model.graph.node[i])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    external = _check_tensors(model, where, None if path is None else path.parent)
    _run_checker(model, where, external)
    if external:
        assert path is not None and model is not source
        (_map_external_data if map_external else _read_external_data)(external, path.parent, where)
    _check_values(model, where)
    _check_weight_ranks(model.graph, where)
    if _invalid_strings(model):  # names the file spells in broken UTF-8: repaired, in a copy
        model = _copy(model) if model is source else model
        _invalid_strings(model, repair=True)
    return model


def _invalid_strings(message, repair: bool = False) -> bool:
    """Whether any string field of `message` or its sub-messages holds invalid UTF-8 (protobuf hands
    those out as bytes); with `repair`, each becomes its backslash-escaped text, the same bytes always
    the same text, so tensor names still connect.  ORT ignores the encoding; onnx_ir refuses it."""
    from google.protobuf.descriptor import FieldDescriptor

    found = False
    stack = [message]
    while stack:
        msg = stack.pop()
        for field, value in msg.ListFields():
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend(value if repeated else [value])
            elif field.type == FieldDescriptor.TYPE_STRING:
                values = list(value) if repeated else [value]
                if not any(isinstance(v, bytes) for v in values):
                    continue
                found = True
                if not repair:
                    return True
                fixed = [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v for v in values]
                if repeated:
                    del getattr(msg, field.name)[:]
                    getattr(msg, field.name).extend(fixed)
                else:
                    setattr(msg, field.name, fixed[0])
    return found


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


# --------------------------------------------------------------------------------------------------
# The file


def _parse_file(path: Path) -> onnx.ModelProto:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read model file {path}: {one_line(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelFileError(f"model path is not a file: {path}")
    if info.st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes), not an ONNX model")
    if info.st_size > MAX_PROTOBUF_BYTES:
        raise ModelFileError(
            f"{path} is {info.st_size} bytes, over protobuf's 2 GiB limit: not a valid ONNX file "
            "(models this large keep their weights in external data files)"
        )
    try:
        data = _read_regular(path, info.st_size)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {one_line(exc)}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for hostile bytes
        raise ModelFileError(f"{path} is not a valid ONNX model: {_what_is(data, exc)}") from None
    if not model.graph.node:
        hint = _sniff(data)
        what = f"it looks like {hint}" if hint else "the protobuf holds no graph"
        raise ModelFileError(f"{path} has an empty graph (not an ONNX model?): {what}")
    return model


def _read_regular(path: Path, size: int) -> bytes:
    """Read a file that must (still) be a regular file, without blocking on FIFOs or devices."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(size + 1)
    finally:
        os.close(fd)


def _sniff(data: bytes) -> str | None:
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return what
    if len(data) > 262 and data[257:262] == b"ustar":
        return "a tar archive"
    if data[:1] in (b"{", b"[") or data[:5].lower() in (b"<?xml", b"<html"):
        return "a text (JSON / XML / HTML) file"
    return None


def _what_is(data: bytes, exc: BaseException) -> str:
    hint = _sniff(data)
    if hint:
        return f"it looks like {hint}"
    return f"truncated or corrupt protobuf ({type(exc).__name__})"


# --------------------------------------------------------------------------------------------------
# The model and its graph


def _check_model(model: onnx.ModelProto, where: str, allow_quantized: bool = False) -> None:
    if not model.graph.node:
        raise ModelFileError(f"{where} has an empty graph (not an ONNX model?)")
    opset = default_opset(model)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{where} uses ONNX opset {opset}; supported opsets are {MIN_OPSET}..{MAX_OPSET} "
            "(onnx.version_converter.convert_version(model, 13) updates an older one)"
        )
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    if quantized and not allow_quantized:
        raise UnsupportedModelError(
            f"{where} is already quantized ({', '.join(quantized)} nodes): its rounding may itself be the backdoor "
            "(QuRA, NDSS 2026, plants one in the rounding decisions alone), and its values already sit on that "
            "grid (rounded to nearest again, they give back its integers); convert the original FP32 model, or pass "
            "--allow-requantize (allow_requantize=True) to dequantize this one and convert it anyway"
        )


def quantization_nodes(model: onnx.ModelProto, op_types: frozenset[str] = QUANT_OPS) -> dict[str, list[str]]:
    """op type -> the quoted names of its nodes, for every node of `op_types` in the model's graphs
    (subgraphs included): what a message about an already quantized model names."""
    found: dict[str, list[str]] = {}
    for node in _nodes_within(model.graph):
        if node.op_type in op_types:
            label = quoted(node.name) if node.name else f"writing {quoted(node.output[0] if node.output else '')}"
            found.setdefault(node.op_type, []).append(label)
    return dict(sorted(found.items()))


def graph_order(graph: onnx.GraphProto, where: str = "model") -> list[int] | None:
    """Names defined once, every input defined, no cycle.  Returns a topological order of the
    node indices when the given order is not one, else None."""
    inputs: set = set()
    for value in graph.input:
        if value.name in inputs:
            raise InvalidGraphError(f"{where}: graph input {quoted(value.name)} is declared twice")
        inputs.add(value.name)
    constants: set = set()
    for tensor in graph.initializer:
        if tensor.name in constants:
            raise InvalidGraphError(f"{where}: initializer {quoted(tensor.name)} is defined twice")
        constants.add(tensor.name)
    for sparse in graph.sparse_initializer:
        if sparse.values.name in constants:
            raise InvalidGraphError(f"{where}: initializer {quoted(sparse.values.name)} is defined twice")
        constants.add(sparse.values.name)
    available = inputs | constants  # IR < 4 lists initializers among the inputs too: allowed
    producer: dict = {}
    nodes = list(graph.node)
    for i, node in enumerate(nodes):
        for name in node.output:
            if not name:
                continue
            if name in producer:
                first = producer[name]
                raise InvalidGraphError(
                    f"{where}: tensor {quoted(name)} is produced twice, by node {_label(nodes[first], first)} "
                    f"and by node {_label(node, i)}"
                )
            if name in available:
                kind = "an initializer" if name in constants else "a graph input"
                raise InvalidGraphError(f"{where}: node {_label(node, i)} output {quoted(name)} redefines {kind}")
            producer[name] = i
    preds: list[set[int]] = []
    for i, node in enumerate(nodes):
        deps = set()
        for name in node.input:
            if not name or name in available:
                continue
            if name not in producer:
                raise InvalidGraphError(
                    f"{where}: node {_label(node, i)} reads tensor {quoted(name)} that nothing defines"
                )
            deps.add(producer[name])
        for name in _outer_names(node):  # subgraphs may read tensors of this graph
            if name in producer:
                deps.add(producer[name])
        preds.append(deps)
    for value in graph.output:
        if value.name not in producer and value.name not in available:
            raise InvalidGraphError(
                f"{where}: graph output {quoted(value.name)} is not defined by any node, input or initializer"
            )
    order = _topological_order(preds)
    if len(order) < len(nodes):
        stuck = set(range(len(nodes))) - set(order)
        i = _node_on_cycle(preds, stuck)
        raise InvalidGraphError(f"{where}: graph has a cycle through node {_label(nodes[i], i)}")
    return None if order == list(range(len(nodes))) else order


def _outer_names(node: onnx.NodeProto) -> set:
    """Names read by the subgraphs of `node` (a superset of its implicit outer-scope inputs)."""
    names: set = set()
    for sub in _nodes_within(*(g for a in node.attribute for g in (*([a.g] if a.HasField("g") else []), *a.graphs))):
        names.update(n for n in sub.input if n)
    return names


def _nodes_within(*graphs: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graphs` and of their subgraphs at any depth (iterative: no recursion on hostile nesting)."""
    stack = list(graphs)
    while stack:
        graph = stack.pop()
        for node in graph.node:
            yield node
            for a in node.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)


def _topological_order(preds: list[set[int]]) -> list[int]:
    """Kahn's algorithm, taking the lowest ready index first (keeps an already sorted graph as is)."""
    import heapq

    succs: list[list[int]] = [[] for _ in preds]
    missing = [len(p) for p in preds]
    for i, deps in enumerate(preds):
        for d in deps:
            succs[d].append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in succs[i]:
            missing[j] -= 1
            if missing[j] == 0:
                heapq.heappush(ready, j)
    return order


def _node_on_cycle(preds: list[set[int]], stuck: set[int]) -> int:
    """Walk back through unsorted predecessors until a node repeats; that node lies on a cycle."""
    i = min(stuck)
    seen: set[int] = set()
    while i not in seen:
        seen.add(i)
        i = min(p for p in preds[i] if p in stuck)
    return i


# --------------------------------------------------------------------------------------------------
# Tensors


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor, _, _ in _labelled_tensors(model):
        yield tensor


def _labelled_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str, tuple]]:
    """Every tensor of the model with a label for messages and what it feeds: initializers, sparse
    initializers and attribute tensors, in the main graph, its subgraphs and model-local functions
    (iterative: no recursion on hostile nesting).  The third item is ``(tensor name,)`` for
    initializers and ``(op type, node outputs)`` for attribute tensors."""
    stack: list[tuple[str, object]] = [("", model.graph)]
    stack.extend((f"function {quoted(f.name)}: ", f) for f in model.functions)
    while stack:
        prefix, owner = stack.pop()
        if isinstance(owner, onnx.GraphProto):
            for tensor in owner.initializer:
                yield tensor, f"{prefix}initializer {quoted(tensor.name)}", (tensor.name,)
            for sparse in owner.sparse_initializer:
                name = sparse.values.name
                yield sparse.values, f"{prefix}sparse initializer {quoted(name)}", (name,)
                yield sparse.indices, f"{prefix}indices of sparse initializer {quoted(name)}", ()
        for node in owner.node:
            first = node.output[0] if node.output else ""
            where = f"{prefix}attribute of {quoted(node.op_type)[1:-1]} node {quoted(node.name or first)}"
            feeds = (node.op_type, tuple(node.output))
            for attr in node.attribute:
                what = f"{where} ({quoted(attr.name)[1:-1]})"
                if attr.HasField("t"):
                    yield attr.t, what, feeds
                for tensor in attr.tensors:
                    yield tensor, what, feeds
                sparse_tensors = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                for sparse in [*sparse_tensors, *attr.sparse_tensors]:
                    yield sparse.values, what, feeds
                    yield sparse.indices, f"{what} indices", ()
                if attr.HasField("g"):
                    stack.append((f"{prefix}subgraph {quoted(attr.g.name)}: ", attr.g))
                stack.extend((f"{prefix}subgraph {quoted(g.name)}: ", g) for g in attr.graphs)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _element_count(tensor: onnx.TensorProto, label: str, where: str) -> int:
    dims = tensor.dims
    if len(dims) > MAX_RANK:
        raise InvalidWeightsError(f"{where}: {label} has rank {len(dims)} (more than {MAX_RANK} dims)")
    if any(d < 0 for d in dims):
        raise InvalidWeightsError(f"{where}: {label} has a negative dimension in dims {list(dims)}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise InvalidWeightsError(
            f"{where}: {label} declares dims {list(dims)} = {count} elements, more than 2**31; refused"
        )
    return count


def _expected_bytes(count: int, data_type: int) -> int | None:
    storage = _STORAGE.get(data_type)
    return None if storage is None else math.ceil(count * storage[2])


def _check_tensors(model: onnx.ModelProto, where: str, folder: Path | None) -> list[onnx.TensorProto]:
    """Dims, data types, data lengths, zero-sized weights and external-data locations (no values).
    Returns the tensors with external data, every one of them checked."""
    weights = _weight_names(model.graph)
    external = []
    base = None
    for tensor, label, _ in _labelled_tensors(model):
        count = _element_count(tensor, label, where)
        dt = tensor.data_type
        if dt == TensorProto.UNDEFINED or dt not in TensorProto.DataType.values():
            raise InvalidWeightsError(f"{where}: {label} has an unknown data type ({dt})")
        if count == 0 and label.startswith("initializer ") and tensor.name in weights:
            raise InvalidWeightsError(
                f"{where}: {label}, the {weights[tensor.name]}, has no elements (dims {list(tensor.dims)})"
            )
        if _is_external(tensor):
            if folder is None:
                raise ExternalDataError(
                    f"{where}: {label} stores its data in an external file; pass the model's path, "
                    "not an in-memory model, so that the location can be checked against its folder"
                )
            if base is None:
                base = _resolve(folder, where)
            _check_external(tensor, label, count, folder, base, where)
            external.append(tensor)
            continue
        _check_inline_length(tensor, label, count, where)
    return external


def _weight_names(graph: onnx.GraphProto) -> dict:
    """initializer name -> 'weight of Conv node ...' for the inputs that become quantized weights."""
    constants = {t.name for t in graph.initializer}
    found = {}
    for node in graph.node:
        for i in WEIGHT_SLOTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in constants:
                found.setdefault(node.input[i], f"input {i} of {node.op_type} node {quoted(node.name)}")
    return found


def _check_inline_length(tensor: onnx.TensorProto, label: str, count: int, where: str) -> None:
    dt = tensor.data_type
    dims = list(tensor.dims)
    if dt == TensorProto.STRING:
        held, unit = len(tensor.string_data), "strings"
        if held != count:
            raise InvalidGraphError(f"{where}: {label} declares dims {dims} ({count} elements) but holds {held} {unit}")
        return
    storage = _STORAGE.get(dt)
    if storage is None:
        return  # exotic type: left to the ONNX checker
    field, per_element, _ = storage
    if tensor.HasField("raw_data"):
        expected = _expected_bytes(count, dt)
        held = len(tensor.raw_data)
        if held != expected:
            raise InvalidGraphError(
                f"{where}: {label} declares dims {dims} ({count} elements, {expected} bytes) "
                f"but its raw data holds {held} bytes"
            )
        return
    expected = math.ceil(count * per_element)
    held = len(getattr(tensor, field))
    if held != expected:
        raise InvalidGraphError(
            f"{where}: {label} declares dims {dims} ({count} elements) but holds {held} values in {field}"
        )


def _resolve(path: Path, where: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ExternalDataError(f"{where}: cannot resolve {path}: {one_line(exc)}") from None


def _external_info(tensor: onnx.TensorProto, label: str, where: str) -> tuple[str, int, int | None]:
    entries: dict = {}
    for entry in tensor.external_data:
        entries[entry.key] = entry.value
    location = entries.get("location", "")
    if not isinstance(location, str) or not location:
        raise ExternalDataError(f"{where}: {label} is stored externally but has no (readable) location")

    def number(key: str) -> int | None:
        if key not in entries:
            return None
        try:
            value = int(entries[key])
        except (TypeError, ValueError):
            raise ExternalDataError(f"{where}: {label} has a bad external-data {key} {quoted(entries[key])}") from None
        if value < 0:
            raise ExternalDataError(f"{where}: {label} has a negative external-data {key} ({value})")
        return value

    return location, number("offset") or 0, number("length")


def _check_external(
    tensor: onnx.TensorProto, label: str, count: int, folder: Path, base: Path, where: str
) -> tuple[Path, int, int]:
    """Prove that the external data of `tensor` is a regular file inside `base` that holds exactly
    the declared bytes, from the location text and ``stat`` alone.  Returns (file, offset, nbytes)."""
    location, offset, length = _external_info(tensor, label, where)
    escape = f"{where}: {label} points to external data outside the model folder: {quoted(location)}"
    text = location.replace("\\", "/")
    if "\x00" in location or text.startswith("/") or (len(text) > 1 and text[1] == ":") or Path(location).is_absolute():
        raise ExternalDataError(escape + " (absolute path)")
    if ".." in text.split("/"):
        raise ExternalDataError(escape + " ('..' in the path)")
    target = _resolve(folder / location, where)
    if target == base or base not in target.parents:
        raise ExternalDataError(escape + f" (resolves to {target})")
    try:
        info = target.stat()
    except FileNotFoundError:
        raise ExternalDataError(f"{where}: external data file of {label} not found: {target}") from None
    except OSError as exc:
        raise ExternalDataError(f"{where}: cannot read external data of {label}: {one_line(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ExternalDataError(f"{where}: external data of {label} is not a regular file: {target}")
    if offset > info.st_size or (length is not None and offset + length > info.st_size):
        raise ExternalDataError(
            f"{where}: external data of {label} runs past the end of {target.name} "
            f"(offset {offset}, length {length}, file size {info.st_size})"
        )
    nbytes = info.st_size - offset if length is None else length
    expected = _expected_bytes(count, tensor.data_type)
    if tensor.data_type == TensorProto.STRING:
        raise InvalidGraphError(f"{where}: {label} is a string tensor stored externally, which ONNX does not allow")
    if expected is not None and nbytes != expected:
        raise InvalidGraphError(
            f"{where}: {label} declares dims {list(tensor.dims)} ({expected} bytes) "
            f"but its external data holds {nbytes} bytes"
        )
    return target, offset, nbytes


def _map_external_data(tensors: list[onnx.TensorProto], folder: Path, where: str) -> None:
    """Point each (already checked) external tensor at its file by absolute path, with its exact
    offset and length: what `large.mapped` recognises.  Nothing is read."""
    base = _resolve(folder, where)
    for tensor in tensors:
        label = f"tensor {quoted(tensor.name)}"
        target, offset, nbytes = _check_external(tensor, label, math.prod(tensor.dims), folder, base, where)
        del tensor.external_data[:]
        for key, value in (("location", str(target)), ("offset", str(offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _read_external_data(tensors: list[onnx.TensorProto], folder: Path, where: str) -> None:
    """Read the (already checked) external bytes into raw_data; each file is opened once."""
    base = _resolve(folder, where)
    plans: dict[Path, list[tuple[onnx.TensorProto, int, int, str]]] = {}
    for tensor in tensors:
        label = f"tensor {quoted(tensor.name)}"
        target, offset, nbytes = _check_external(tensor, label, math.prod(tensor.dims), folder, base, where)
        plans.setdefault(target, []).append((tensor, offset, nbytes, label))
    for target, items in plans.items():
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(target, flags)
        except OSError as exc:
            raise ExternalDataError(f"{where}: cannot open external data {target}: {one_line(exc)}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ExternalDataError(f"{where}: external data {target} is not a regular file")
            for tensor, offset, nbytes, label in items:
                data = os.pread(fd, nbytes, offset) if nbytes else b""
                if len(data) != nbytes:
                    raise ExternalDataError(f"{where}: external data of {label} in {target.name} is truncated")
                tensor.raw_data = data
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# The checker and the values


def _run_checker(model: onnx.ModelProto, where: str, external: list[onnx.TensorProto]) -> None:
    """The ONNX checker, in memory and before any external data is read: tensors with external
    data (already checked by `_check_tensors`) are replaced by empty placeholders in a copy, so the
    checker neither touches the files nor has to hold a model over 2 GB."""
    probe = model
    if external:
        probe = _copy(model)
        for tensor in _all_tensors(probe):
            if _is_external(tensor):
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                del tensor.dims[:]
                tensor.dims.append(0)
    try:
        onnx.checker.check_model(probe)
    except Exception as exc:  # noqa: BLE001 - ValidationError mostly, but hostile protos reach odd paths
        text = str(exc).strip()
        first = " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
        raise ModelFileError(f"{where} fails the ONNX checker: {first[:300]}") from None


def _consumers(graph: onnx.GraphProto) -> dict:
    """tensor name -> op types of the nodes reading it (main graph and its subgraphs)."""
    found: dict = {}
    for node in _nodes_within(graph):
        for name in node.input:
            found.setdefault(name, set()).add(node.op_type)
    return found


def _check_values(model: onnx.ModelProto, where: str) -> None:
    """No NaN in any floating tensor; +-Inf only in constants that feed clamping / masking ops; no
    weight of a quantized op beyond MAX_WEIGHT in magnitude."""
    consumers = _consumers(model.graph)
    for tensor, label, feeds in _labelled_tensors(model):
        if tensor.data_type not in _FLOAT_TYPES or math.prod(tensor.dims) == 0:
            continue
        try:
            values = large.to_array(tensor)
        except Exception as exc:  # noqa: BLE001 - lengths were checked; this is a last line of defence
            raise InvalidGraphError(f"{where}: {label} cannot be decoded: {one_line(exc)}") from None
        weight = len(feeds) == 1 and bool(consumers.get(feeds[0], set()) & QUANTIZED_WEIGHT_OPS)
        if large.mapped(tensor) and _clean_in_chunks(values, weight):
            continue  # a mapped tensor is checked a piece at a time; only a bad one is looked at whole
        if values.dtype.kind != "f" or values.dtype.itemsize < 4:
            values = values.astype(np.float32)
        finite = np.isfinite(values)
        if finite.all():
            if len(feeds) == 1 and consumers.get(feeds[0], set()) & QUANTIZED_WEIGHT_OPS:
                _check_magnitude(values, where, label)
            continue
        nan = np.isnan(values)
        if nan.any():
            first = tuple(int(i) for i in np.argwhere(nan)[0])
            raise InvalidWeightsError(
                f"{where}: {label} holds {int(nan.sum())} NaN value(s) (first at index {first}); weights must be finite"
            )
        if len(feeds) == 1:  # an initializer: who reads it
            readers = set(consumers.get(feeds[0], ()))
        elif len(feeds) == 2 and feeds[0] in ("Constant", "ConstantOfShape"):
            readers = {op for out in feeds[1] for op in consumers.get(out, ())}
        else:
            readers = {feeds[0]} if feeds else {"?"}
        bad = sorted(readers - INF_OK_OPS, key=repr)
        if bad:
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise InvalidWeightsError(
                f"{where}: {label} holds {int((~finite).sum())} infinite value(s) (first at index {first}) "
                f"and feeds {', '.join(quoted(b)[1:-1] for b in bad)}; weights must be finite"
            )


def _clean_in_chunks(values: np.ndarray, weight: bool, chunk: int = 1 << 24) -> bool:
    """All finite (and, for a quantized op's weight, within MAX_WEIGHT), read `chunk` values at a time."""
    flat = values.reshape(-1)
    for i in range(0, flat.size, chunk):
        piece = flat[i : i + chunk]
        if not np.isfinite(piece).all() or (weight and np.abs(piece).max() > MAX_WEIGHT):
            return False
    return True


def _check_magnitude(values: np.ndarray, where: str, label: str) -> None:
    peak = np.abs(values).max()
    if peak > MAX_WEIGHT:
        first = tuple(int(i) for i in np.unravel_index(int(np.abs(values).argmax()), values.shape))
        raise InvalidWeightsError(
            f"{where}: {label} holds {float(peak):.3g} (at index {first}); weights beyond {MAX_WEIGHT:g} in "
            "magnitude overflow float32 arithmetic"
        )


def _check_weight_ranks(graph: onnx.GraphProto, where: str) -> None:
    """A Conv's constant weight has rank 3..5, the rank of its data input (when known) and the
    kernel_shape it declares; a Gemm's is 2.  Anything else is a broken graph that the executor or
    ONNX Runtime would fail on deep inside."""
    constants = {t.name: tuple(t.dims) for t in graph.initializer}
    ranks = {name: len(dims) for name, dims in constants.items()}
    for value in (*graph.input, *graph.value_info):
        if value.type.tensor_type.HasField("shape"):
            ranks.setdefault(value.name, len(value.type.tensor_type.shape.dim))
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in constants:
            continue
        dims = constants[weight]
        rank, data = len(dims), ranks.get(node.input[0])
        conv_ok = 3 <= rank <= 5 and data in (None, rank)
        if not (rank == 2 if node.op_type == "Gemm" else conv_ok):
            got = f"rank {rank}" + ("" if data is None else f" on an input of rank {data}")
            raise InvalidGraphError(f"{where}: node {_label(node, i)} has a weight {quoted(weight)} of {got}")
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)
        if node.op_type != "Gemm" and kernel is not None and tuple(kernel) != dims[2:]:
            raise InvalidGraphError(
                f"{where}: node {_label(node, i)} declares kernel_shape {kernel} but its weight "
                f"{quoted(weight)} has kernel {list(dims[2:])}"
            )


# --------------------------------------------------------------------------------------------------
# Helpers


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _label(node: onnx.NodeProto, index: int) -> str:
    name = node.name if node.name else f"#{index}"
    return f"{quoted(name)} ({quoted(node.op_type)[1:-1]})"
