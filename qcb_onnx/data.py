"""Calibration and labelled evaluation data: loading, preprocessing and validation.

Sources accepted by `load_calibration` / `load_labelled`:

* a path to a ``.npy`` file (one array for a single-input model, samples first);
* a path to a ``.npz`` file (one array per input name; a single-input model also accepts a lone
  array under any name; labels live under ``labels`` or ``y``);
* a path to an ImageFolder directory (``root/<class>/<image>``) or a ``.tar`` / ``.tar.gz`` /
  ``.tgz`` archive of one, optionally with one top-level folder and split folders; a split is
  chosen with a ``:split`` suffix (``data.tar.gz:train``, ``images:test``);
* a numpy array, a mapping ``name -> array``, or a
  ``onnxruntime.quantization.CalibrationDataReader``-like object (``get_next() -> dict | None``).

Everything that is wrong with the data is reported as a one-line `CalibrationDataError` naming the
file, tensor and shape; misuse of the API (bad ``limit``, bad preprocess text) is a `UsageError`.
"""

from __future__ import annotations

import io
import math
import os
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import onnx

from qcb_onnx.errors import CalibrationDataError, QcbNote, UnsupportedModelError, UsageError
from qcb_onnx.text import one_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "InputSpec",
    "Preprocess",
    "batches",
    "input_specs",
    "load_calibration",
    "load_labelled",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_LABEL_KEYS = ("labels", "y")
_SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation", "calib", "calibration"})
_PROGRESS_MIN = 200


# --------------------------------------------------------------------------------------------------
# Model inputs


@dataclass(frozen=True)
class InputSpec:
    """What the model expects for one graph input."""

    name: str
    shape: tuple[int | None, ...]  # None for symbolic / unknown dims (usually the batch)
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs of `model` that are not initializers, with shape and numpy dtype."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedModelError(f"graph input '{value.name}' is not a tensor")
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
            raise UnsupportedModelError(f"graph input '{value.name}' has no element type")
        if not tensor_type.HasField("shape"):
            raise UnsupportedModelError(f"graph input '{value.name}' has no shape (unknown rank)")
        dims: list[int | None] = []
        for dim in tensor_type.shape.dim:
            dims.append(int(dim.dim_value) if dim.HasField("dim_value") else None)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs


def batch_size_for(specs: list[InputSpec], wanted: int) -> int:
    """`wanted`, or the batch dimension the model's inputs declare when it is static: a model exported
    for batch 1 (the dynamo exporter's default) may reshape with that 1 built in, so it only computes
    right on such batches."""
    static = {spec.shape[0] for spec in specs if spec.shape and spec.shape[0]}
    return static.pop() if len(static) == 1 else wanted


# --------------------------------------------------------------------------------------------------
# Preprocessing


def _fmt_float(value: float) -> str:
    return repr(float(value))


def _parse_float(key: str, text: str) -> float:
    text = text.strip()
    try:
        if text.count("/") == 1 and key == "scale":
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"bad preprocess value {key}={text!r}: not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"bad preprocess value {key}={text!r}: must be finite")
    return value


@dataclass(frozen=True)
class Preprocess:
    """How image files become model input: resize, scale, normalise, lay out."""

    size: tuple[int, int] | None = None  # (H, W), bilinear resize; None keeps the file size
    scale: float = 1 / 255  # pixel * scale
    mean: tuple[float, ...] = (0.0,)  # then (x - mean) / std per channel; length 1 broadcasts
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # or "NHWC"
    channels: int = 3  # 1 -> grayscale ('L'), 3 -> RGB

    _KEYS = ("size", "scale", "mean", "std", "layout", "channels")

    def __post_init__(self) -> None:
        size = self.size
        if size is not None:
            try:
                size = tuple(int(s) for s in size)
            except (TypeError, ValueError):
                raise UsageError(f"bad preprocess size {self.size!r}: expected (H, W)") from None
            if len(size) != 2 or min(size) < 1:
                raise UsageError(f"bad preprocess size {self.size!r}: expected two positive integers (H, W)")
        object.__setattr__(self, "size", size)
        try:
            scale = float(self.scale)
            mean = tuple(float(m) for m in np.atleast_1d(self.mean))
            std = tuple(float(s) for s in np.atleast_1d(self.std))
        except (TypeError, ValueError):
            raise UsageError("bad preprocess scale/mean/std: expected numbers") from None
        if not math.isfinite(scale) or scale == 0:
            raise UsageError(f"bad preprocess scale {self.scale!r}: must be finite and non-zero")
        layout = str(self.layout).upper()
        if layout not in ("NCHW", "NHWC"):
            raise UsageError(f"bad preprocess layout {self.layout!r}: expected NCHW or NHWC")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise UsageError(f"bad preprocess channels {self.channels!r}: expected 1 or 3")
        for key, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, int(self.channels)):
                raise UsageError(
                    f"bad preprocess {key} {'/'.join(map(_fmt_float, values))}: "
                    f"expected 1 or {self.channels} values for channels={self.channels}"
                )
            if not all(math.isfinite(v) for v in values):
                raise UsageError(f"bad preprocess {key}: values must be finite")
        if any(s <= 0 for s in std):
            raise UsageError(f"bad preprocess std {'/'.join(map(_fmt_float, std))}: values must be > 0")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "channels", int(self.channels))

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """Parse the CLI form ``size=32x32,scale=0.0039,mean=0.49/0.48/0.45,std=...,layout=NCHW,channels=3``.

        Keys may be given in any order and omitted (defaults apply); an unknown key, a repeated key
        or a bad value raises `UsageError` naming it.
        """
        kwargs: dict[str, Any] = {}
        for item in str(text).split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not sep:
                raise UsageError(f"bad preprocess option {item!r}: expected key=value")
            if key not in cls._KEYS:
                raise UsageError(f"unknown preprocess option {key!r} (expected one of: {', '.join(cls._KEYS)})")
            if key in kwargs:
                raise UsageError(f"preprocess option {key!r} given twice")
            if key == "size":
                if value.lower() in ("none", ""):
                    kwargs[key] = None
                    continue
                parts = value.lower().split("x")
                if len(parts) == 1:
                    parts = parts * 2
                try:
                    h, w = (int(p) for p in parts)
                except ValueError:
                    raise UsageError(f"bad preprocess value size={value!r}: expected HxW like 32x32") from None
                if h < 1 or w < 1:
                    raise UsageError(f"bad preprocess value size={value!r}: expected HxW like 32x32")
                kwargs[key] = (h, w)
            elif key == "scale":
                kwargs[key] = _parse_float(key, value)
            elif key in ("mean", "std"):
                if not value:
                    raise UsageError(f"bad preprocess value {key}={value!r}: expected numbers like 0.5/0.5/0.5")
                kwargs[key] = tuple(_parse_float(key, v) for v in value.split("/"))
            elif key == "layout":
                if value.upper() not in ("NCHW", "NHWC"):
                    raise UsageError(f"bad preprocess value layout={value!r}: expected NCHW or NHWC")
                kwargs[key] = value.upper()
            else:  # channels
                if value not in ("1", "3"):
                    raise UsageError(f"bad preprocess value channels={value!r}: expected 1 or 3")
                kwargs[key] = int(value)
        return cls(**kwargs)

    def to_metadata(self) -> str:
        """The `parse` text form of this object (round-trips exactly)."""
        parts = []
        if self.size is not None:
            parts.append(f"size={self.size[0]}x{self.size[1]}")
        parts.append(f"scale={_fmt_float(self.scale)}")
        parts.append("mean=" + "/".join(map(_fmt_float, self.mean)))
        parts.append("std=" + "/".join(map(_fmt_float, self.std)))
        parts.append(f"layout={self.layout}")
        parts.append(f"channels={self.channels}")
        return ",".join(parts)


def _default_preprocess(spec: InputSpec) -> Preprocess:
    """Preprocessing inferred from a rank-4 image input: layout, channels and static H, W."""
    shape = spec.shape
    if len(shape) == 4:
        if shape[1] in (1, 3):
            hw, layout, channels = shape[2:4], "NCHW", shape[1]
        elif shape[3] in (1, 3):
            hw, layout, channels = shape[1:3], "NHWC", shape[3]
        else:
            return Preprocess()
        size = (hw[0], hw[1]) if None not in hw and min(hw) > 0 else None
        return Preprocess(size=size, layout=layout, channels=channels)
    return Preprocess()


# --------------------------------------------------------------------------------------------------
# Helpers


def _fmt_shape(shape: Sequence[int]) -> str:
    inner = ", ".join(str(int(d)) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _fmt_expected(shape: Sequence[int | None]) -> str:
    dims = ["N"] + ["?" if d is None else str(d) for d in shape[1:]]
    inner = ", ".join(dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def _where(origin: str | None) -> str:
    return f" (source: {origin})" if origin else ""


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise UsageError(f"limit must be a positive integer or None, got {limit!r}")


def _select(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted sample indices to keep, or None for all of them."""
    if limit is None or limit >= n:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(limit), replace=False))


def _progress(total: int, desc: str):
    from tqdm import tqdm

    disable = total < _PROGRESS_MIN or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False)


# --------------------------------------------------------------------------------------------------
# Validation


class _Ctx:
    """Where the data came from, for messages."""

    def __init__(self, kind: str, origin: str | None, images: Preprocess | None = None):
        self.kind = kind  # "calibration" or "evaluation"
        self.origin = origin
        self.images = images

    def fail(self, message: str) -> CalibrationDataError:
        if self.origin and self.origin in message:
            return CalibrationDataError(message)
        return CalibrationDataError(message + _where(self.origin))


def _check_array(value: Any, spec: InputSpec, ctx: _Ctx) -> np.ndarray:
    """Dtype, rank and static-dimension checks for one input (before sample selection)."""
    try:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - arbitrary user objects
        raise ctx.fail(f"{ctx.kind} data for input '{spec.name}' is not an array: {one_line(exc)}") from None
    want_float = spec.dtype.kind == "f"
    if want_float and arr.dtype.kind != "f":
        raise ctx.fail(
            f"{ctx.kind} array for input '{spec.name}' has dtype {arr.dtype} but the model expects "
            f"{spec.dtype} (floating point data required)"
        )
    if not want_float and arr.dtype.kind not in "iub" + spec.dtype.kind:
        raise ctx.fail(
            f"{ctx.kind} array for input '{spec.name}' has dtype {arr.dtype} but the model expects {spec.dtype}"
        )
    bad_dims = arr.ndim != len(spec.shape) or any(
        want is not None and want != got for want, got in zip(spec.shape[1:], arr.shape[1:], strict=False)
    )
    if bad_dims or arr.ndim == 0:
        hint = ""
        if ctx.images is not None:
            hint = f"; images were decoded with preprocess '{ctx.images.to_metadata()}'"
        raise ctx.fail(
            f"{ctx.kind} array for input '{spec.name}' has shape {_fmt_shape(arr.shape)} "
            f"but the model expects {_fmt_expected(spec.shape)}{hint}"
        )
    return arr


def _check_labels(value: Any, key: str, ctx: _Ctx) -> np.ndarray:
    try:
        labels = np.asarray(value)
    except Exception as exc:  # noqa: BLE001
        raise ctx.fail(f"labels '{key}' are not an array: {one_line(exc)}") from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ctx.fail(f"labels '{key}' have shape {_fmt_shape(labels.shape)} but must be (N,)")
    if labels.dtype.kind not in "iu":
        raise ctx.fail(f"labels '{key}' have dtype {labels.dtype} but must be integers")
    if labels.size and labels.min() < 0:
        raise ctx.fail(f"labels '{key}' contain negative class indices (min {int(labels.min())})")
    return labels


def _finish(
    inputs: Mapping[str, Any],
    specs: Sequence[InputSpec],
    ctx: _Ctx,
    limit: int | None,
    seed: int,
    labels: tuple[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Validate, subsample and convert arrays already matched to `specs`."""
    checked = {spec.name: _check_array(inputs[spec.name], spec, ctx) for spec in specs}
    label_arr = _check_labels(labels[1], labels[0], ctx) if labels is not None else None
    counts = {name: int(arr.shape[0]) for name, arr in checked.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{k}' has {v}" for k, v in counts.items())
        raise ctx.fail(f"{ctx.kind} inputs have different sample counts: {detail}")
    n = next(iter(counts.values()))
    if label_arr is not None and label_arr.shape[0] != n:
        raise ctx.fail(f"{ctx.kind} data has {n} samples but {label_arr.shape[0]} labels ('{labels[0]}')")
    if n == 0:
        name = specs[0].name
        raise ctx.fail(f"{ctx.kind} data for input '{name}' is empty (0 samples)")
    index = _select(n, limit, seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = checked[spec.name]
        if index is not None:
            arr = arr[index]
        dtype = np.float32 if spec.dtype.kind == "f" else spec.dtype
        if isinstance(arr, np.memmap) or arr.base is not None and isinstance(arr.base, np.memmap):
            arr = np.array(arr, dtype=dtype, order="C")
        else:
            arr = np.ascontiguousarray(arr, dtype=dtype)
        if spec.dtype.kind == "f":
            bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ctx.fail(f"{ctx.kind} data for input '{spec.name}' contains {bad} NaN/Inf values")
        out[spec.name] = arr
    if label_arr is not None:
        if index is not None:
            label_arr = label_arr[index]
        label_arr = np.ascontiguousarray(label_arr, dtype=np.int64)
    return out, label_arr


def _match_inputs(
    keys: Sequence[str], specs: Sequence[InputSpec], labelled: bool, ctx: _Ctx
) -> tuple[dict[str, str], str | None]:
    """Map each input name to a key of the source, and pick the labels key."""
    input_names = {spec.name for spec in specs}
    label_key = next((k for k in _LABEL_KEYS if k in keys and k not in input_names), None)
    if labelled and label_key is None:
        raise ctx.fail(
            f"{ctx.kind} data has no labels: expected an integer array named 'labels' or 'y' "
            f"(found: {', '.join(keys) or 'nothing'})"
        )
    if len(specs) == 1 and specs[0].name not in keys:
        non_label = [k for k in keys if k not in _LABEL_KEYS or k in input_names]
        if len(non_label) == 1:
            key = non_label[0]
            if key != "x":  # 'x' is the documented name for a single input
                warnings.warn(
                    f"{ctx.kind} data has no array named '{specs[0].name}'; using its only array '{key}'",
                    QcbNote,
                    stacklevel=2,
                )
            return {specs[0].name: key}, label_key
        raise ctx.fail(
            f"{ctx.kind} data has no array for input '{specs[0].name}' and no single unambiguous array "
            f"(found: {', '.join(keys) or 'nothing'})"
        )
    missing = [spec.name for spec in specs if spec.name not in keys]
    if missing:
        raise ctx.fail(
            f"{ctx.kind} data has no array for input(s) {', '.join(repr(m) for m in missing)} "
            f"(found: {', '.join(keys) or 'nothing'})"
        )
    return {spec.name: spec.name for spec in specs}, label_key


def _from_mapping(
    mapping: Mapping[str, Any],
    specs: Sequence[InputSpec],
    ctx: _Ctx,
    labelled: bool,
    limit: int | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    keys = [str(k) for k in mapping]
    names, label_key = _match_inputs(keys, specs, labelled, ctx)
    inputs = {name: mapping[key] for name, key in names.items()}
    labels = (label_key, mapping[label_key]) if labelled and label_key is not None else None
    return _finish(inputs, specs, ctx, limit, seed, labels)


def _read_reader(reader: Any, ctx: _Ctx) -> dict[str, np.ndarray]:
    """Drain a CalibrationDataReader-like object, concatenating batches along axis 0."""
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    while True:
        try:
            batch = reader.get_next()
        except Exception as exc:  # noqa: BLE001 - user code
            raise ctx.fail(f"{ctx.kind} data reader failed in get_next(): {one_line(exc)}") from None
        if batch is None:
            break
        if not isinstance(batch, Mapping):
            raise ctx.fail(f"{ctx.kind} data reader returned {type(batch).__name__} instead of a dict or None")
        keys = sorted(str(k) for k in batch)
        if count and keys != sorted(parts):
            raise ctx.fail(
                f"{ctx.kind} data reader batch {count} has inputs {', '.join(keys)} "
                f"but earlier batches had {', '.join(sorted(parts))}"
            )
        for key, value in batch.items():
            arr = np.asarray(value)
            if arr.ndim == 0:
                raise ctx.fail(f"{ctx.kind} data reader batch {count} has a scalar for '{key}'")
            parts.setdefault(str(key), []).append(arr)
        count += 1
    if not count:
        raise ctx.fail(f"{ctx.kind} data reader returned no batches (0 samples)")
    out = {}
    for key, arrays in parts.items():
        try:
            out[key] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        except ValueError:
            shapes = ", ".join(_fmt_shape(a.shape) for a in arrays[:3])
            raise ctx.fail(f"{ctx.kind} data reader batches for '{key}' have incompatible shapes {shapes}") from None
    return out


# --------------------------------------------------------------------------------------------------
# Files


def _split_source(text: str) -> tuple[Path, tuple[str, ...] | None]:
    """``path`` or ``path:split`` -> (path, split parts)."""
    path = Path(text)
    if path.exists() or ":" not in text:
        return path, None
    base, _, split = text.rpartition(":")
    if not base or not Path(base).exists():
        return path, None
    parts = tuple(p for p in split.replace("\\", "/").split("/") if p and p != ".")
    if not parts or ".." in parts or split.startswith("/"):
        raise CalibrationDataError(f"bad split {split!r} in data source '{text}'")
    return Path(base), parts


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(_TAR_SUFFIXES)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "__MACOSX" in name.split("/"):
        return False
    return base.lower().endswith(IMAGE_EXTENSIONS)


def _check_npy_header(fileobj: Any, size: int, where: str, ctx: _Ctx) -> None:
    """Refuse an array whose header declares more data than the file holds, before numpy allocates it."""
    try:
        version = np.lib.format.read_magic(fileobj)
        shape, _, dtype = (
            np.lib.format.read_array_header_1_0(fileobj)
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0(fileobj)
        )
    except ValueError as exc:
        raise ctx.fail(f"cannot read {ctx.kind} data file '{where}': {one_line(exc)}") from None
    declared = math.prod(shape) * dtype.itemsize
    if declared > size:
        raise ctx.fail(
            f"{ctx.kind} data file '{where}' declares shape {tuple(shape)} ({declared} bytes) but holds {size} bytes"
        )


def _load_array_file(path: Path, ctx: _Ctx) -> dict[str, Any] | np.ndarray:
    """Read a .npy (memory-mapped) or all arrays of a .npz, refusing pickles and lying headers."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                _check_npy_header(f, path.stat().st_size, str(path), ctx)
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError:  # e.g. object arrays: reload without mmap for the real message
                return np.load(path, allow_pickle=False)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as member:
                        _check_npy_header(member, info.file_size, f"{path}:{info.filename}", ctx)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ctx.fail(f"cannot read {ctx.kind} data file '{path}': {one_line(exc)}") from None


@dataclass
class _ImageSet:
    names: list[str]  # display names, in sample order
    labels: list[int] | None
    classes: list[str]
    read: Any  # callable(indices) -> iterator of (index, name, bytes|path)
    close: Any = None  # callable releasing the source, or None


def _image_layout(
    relpaths: list[str], split: tuple[str, ...] | None, where: str, ctx: _Ctx
) -> tuple[list[str], list[str]]:
    """Resolve split / top-level folder; return (kept relpaths, their path relative to the class root)."""
    paths = sorted(relpaths)
    parts = [p.split("/") for p in paths]
    if split is not None:
        k = len(split)
        direct = [i for i, p in enumerate(parts) if tuple(p[:k]) == split and len(p) > k]
        if direct:
            return [paths[i] for i in direct], ["/".join(parts[i][k:]) for i in direct]
        nested = [i for i, p in enumerate(parts) if tuple(p[1 : k + 1]) == split and len(p) > k + 1]
        tops = sorted({parts[i][0] for i in nested})
        if len(tops) == 1:
            return [paths[i] for i in nested], ["/".join(parts[i][k + 1 :]) for i in nested]
        if len(tops) > 1:
            raise ctx.fail(f"split '{'/'.join(split)}' is ambiguous in {where}: found under {', '.join(tops)}")
        found = sorted({p[0] for p in parts if len(p) > 1})
        raise ctx.fail(
            f"no images under split folder '{'/'.join(split)}' in {where} "
            f"(top-level folders: {', '.join(found) or 'none'})"
        )
    rel = parts
    if len({p[0] for p in rel}) == 1 and all(len(p) >= 3 for p in rel):
        rel = [p[1:] for p in rel]  # one top-level folder around the ImageFolder
    firsts = {p[0] for p in rel}
    if all(len(p) >= 3 for p in rel) and firsts <= _SPLIT_NAMES:
        raise ctx.fail(
            f"{where} holds split folders ({', '.join(sorted(firsts))}); "
            f"choose one with a ':split' suffix, e.g. ':{sorted(firsts)[0]}'"
        )
    return paths, ["/".join(p) for p in rel]


def _classes(relative: list[str], labelled: bool, where: str, ctx: _Ctx) -> tuple[list[int] | None, list[str]]:
    if not labelled:
        return None, []
    loose = [r for r in relative if "/" not in r]
    if loose:
        raise ctx.fail(f"image '{loose[0]}' in {where} is not inside a class folder (expected root/<class>/<image>)")
    names = [r.split("/", 1)[0] for r in relative]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in names], classes


def _dir_images(root: Path, split: tuple[str, ...] | None, display: str, labelled: bool, ctx: _Ctx) -> _ImageSet:
    relpaths = []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for f in filenames:
            if not _is_image_name(prefix + f):
                continue
            if not Path(dirpath, f).resolve().is_relative_to(real_root):  # a link leaving the folder
                raise ctx.fail(f"image '{prefix + f}' in directory '{display}' links outside the folder; refused")
            relpaths.append(prefix + f)
    where = f"directory '{display}'"
    if not relpaths:
        raise ctx.fail(f"no images found in {where} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    kept, relative = _image_layout(relpaths, split, where, ctx)
    labels, classes = _classes(relative, labelled, where, ctx)

    def read(indices):
        for i in indices:
            yield i, str(root / kept[i]), root / kept[i]

    return _ImageSet([str(root / k) for k in kept], labels, classes, read)


def _safe_member_name(name: str, display: str, ctx: _Ctx) -> str:
    norm = name.replace("\\", "/")
    parts = norm.split("/")
    if norm.startswith("/") or (len(parts[0]) >= 2 and parts[0][1] == ":") or ".." in parts:
        raise ctx.fail(f"tar archive '{display}' has an unsafe member path {name!r}")
    return "/".join(p for p in parts if p and p != ".")


def _tar_images(path: Path, split: tuple[str, ...] | None, display: str, labelled: bool, ctx: _Ctx) -> _ImageSet:
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by the caller via _ImageSet.close
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ctx.fail(f"cannot read tar archive '{display}': {one_line(exc)}") from None
    try:
        return _tar_index(tar, path, split, display, labelled, ctx)
    except BaseException:
        tar.close()
        raise


def _tar_index(
    tar: tarfile.TarFile, path: Path, split: tuple[str, ...] | None, display: str, labelled: bool, ctx: _Ctx
) -> _ImageSet:
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ctx.fail(f"cannot read tar archive '{display}': {one_line(exc)}") from None
    by_name: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = _safe_member_name(member.name, display, ctx)
        if member.isreg() and _is_image_name(name):
            by_name[name] = member  # a later duplicate wins, as on extraction
    where = f"tar archive '{display}'"
    if not by_name:
        raise ctx.fail(f"no images found in {where} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    kept, relative = _image_layout(list(by_name), split, where, ctx)
    labels, classes = _classes(relative, labelled, where, ctx)

    def read(indices):
        # Read the selected members in archive order: one forward pass through a compressed stream.
        for i in sorted(indices, key=lambda j: by_name[kept[j]].offset_data):
            try:
                handle = tar.extractfile(by_name[kept[i]])
                data = handle.read() if handle is not None else b""
            except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
                raise ctx.fail(f"cannot read '{kept[i]}' from {where}: {one_line(exc)}") from None
            yield i, kept[i], data

    return _ImageSet(list(kept), labels, classes, read, tar.close)


def _decode_images(images: _ImageSet, indices: Sequence[int], pre: Preprocess, ctx: _Ctx) -> np.ndarray:
    """Decode the selected images into an (n, ...) float32 array laid out per `pre`."""
    from PIL import Image

    mode = "RGB" if pre.channels == 3 else "L"
    target = None if pre.size is None else (pre.size[1], pre.size[0])  # PIL wants (W, H)
    position = {int(i): k for k, i in enumerate(indices)}
    buf: np.ndarray | None = None
    first_name, first_size = "", (0, 0)
    with _progress(len(indices), "decoding images") as bar:
        for i, name, payload in images.read(indices):
            try:
                handle = Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
                with handle as img:
                    img = img.convert(mode)
                    if target is not None and img.size != target:
                        img = img.resize(target, Image.Resampling.BILINEAR)
                    pixels = np.asarray(img)
            except CalibrationDataError:
                raise
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                raise ctx.fail(f"cannot decode image '{name}': {one_line(exc)}") from None
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
            if buf is None:
                buf = np.empty((len(indices), *pixels.shape), dtype=pixels.dtype)
                first_name, first_size = name, pixels.shape[:2]
            elif pixels.shape != buf.shape[1:]:
                raise ctx.fail(
                    f"images differ in size: '{first_name}' is {first_size[1]}x{first_size[0]} but "
                    f"'{name}' is {pixels.shape[1]}x{pixels.shape[0]} (W x H); "
                    "set size=HxW in the preprocess options"
                )
            buf[position[int(i)]] = pixels
            bar.update(1)
    assert buf is not None
    out = buf.astype(np.float32)
    out *= np.float32(pre.scale)
    if any(m != 0.0 for m in pre.mean):
        out -= np.asarray(pre.mean, dtype=np.float32)
    if any(s != 1.0 for s in pre.std):
        out /= np.asarray(pre.std, dtype=np.float32)
    if pre.layout == "NCHW":
        out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    return out


def _from_images(
    images: _ImageSet,
    specs: Sequence[InputSpec],
    pre: Preprocess | None,
    ctx: _Ctx,
    labelled: bool,
    limit: int | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise ctx.fail(f"image data can only feed a single-input model, but the model has inputs {names}")
    spec = specs[0]
    pre = pre if pre is not None else _default_preprocess(spec)
    ctx.images = pre
    n = len(images.names)
    index = _select(n, limit, seed)
    indices = list(range(n)) if index is None else [int(i) for i in index]
    arr = _decode_images(images, indices, pre, ctx)
    labels = None
    if labelled:
        assert images.labels is not None
        labels = ("labels", np.asarray([images.labels[i] for i in indices], dtype=np.int64))
    return _finish({spec.name: arr}, specs, ctx, None, seed, labels)


def _from_path(
    source: str | os.PathLike,
    specs: Sequence[InputSpec],
    pre: Preprocess | None,
    kind: str,
    labelled: bool,
    limit: int | None,
    seed: int,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    display = os.fspath(source)
    path, split = _split_source(display)
    ctx = _Ctx(kind, display)
    if not path.exists():
        raise CalibrationDataError(f"{kind} data not found: '{display}'")
    if path.is_dir() or _is_tar(path):
        if path.is_dir():
            images = _dir_images(path, split, display, labelled, ctx)
        else:
            images = _tar_images(path, split, display, labelled, ctx)
        try:
            return _from_images(images, specs, pre, ctx, labelled, limit, seed)
        finally:
            if images.close is not None:
                images.close()
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ctx.fail(
            f"unsupported {kind} data file '{path.name}': expected .npy, .npz, .tar, .tar.gz, .tgz "
            f"or an ImageFolder directory"
        )
    if split is not None:
        raise ctx.fail(f"a ':split' suffix only applies to image folders and tar archives, not '{path.name}'")
    loaded = _load_array_file(path, ctx)
    if isinstance(loaded, np.ndarray):
        hints = (
            "a .npy file holds one array",
            "use an .npz",
            "a .npy holds inputs only; use an .npz with 'labels' or 'y'",
        )
        return _one_array(loaded, specs, ctx, labelled, limit, seed, *hints)
    return _from_mapping(loaded, specs, ctx, labelled, limit, seed)


def _one_array(
    value: Any,
    specs: list[InputSpec],
    ctx: _Ctx,
    labelled: bool,
    limit: int | None,
    seed: int,
    what: str,
    fix: str,
    labels_hint: str,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A bare array: the model's only input, and no labels."""
    if len(specs) != 1:
        names = ", ".join(spec.name for spec in specs)
        raise ctx.fail(f"{what} but the model has inputs {names}; {fix}")
    if labelled:
        raise ctx.fail(f"{ctx.kind} data has no labels: {labels_hint}")
    return _finish({specs[0].name: value}, specs, ctx, limit, seed)


def _load(
    source: Any,
    specs: Sequence[InputSpec],
    preprocess: Preprocess | None,
    limit: int | None,
    seed: int,
    labelled: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    kind = "evaluation" if labelled else "calibration"
    specs = list(specs)
    if not specs or not all(isinstance(s, InputSpec) for s in specs):
        raise UsageError("specs must be a non-empty list of InputSpec (see input_specs(model))")
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise UsageError(f"preprocess must be a Preprocess, got {type(preprocess).__name__}")
    _check_limit(limit)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, specs, preprocess, kind, labelled, limit, seed)
    ctx = _Ctx(kind, None)
    if isinstance(source, Mapping):
        return _from_mapping(source, specs, ctx, labelled, limit, seed)
    if callable(getattr(source, "get_next", None)):
        return _from_mapping(_read_reader(source, ctx), specs, ctx, labelled, limit, seed)
    if labelled and isinstance(source, tuple) and len(source) == 2:
        inputs, labels = source
        if not isinstance(inputs, Mapping):
            if len(specs) != 1:
                raise ctx.fail(f"{kind} data is a single array but the model has {len(specs)} inputs")
            inputs = {specs[0].name: inputs}
        names, _ = _match_inputs(list(inputs), specs, False, ctx)
        return _finish({n: inputs[k] for n, k in names.items()}, specs, ctx, limit, seed, ("labels", labels))
    if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        hints = (f"{kind} data is a single array", "pass a dict", "pass (inputs, labels) or a dict with 'labels'")
        return _one_array(source, specs, ctx, labelled, limit, seed, *hints)
    raise UsageError(
        f"unsupported {kind} data source of type {type(source).__name__}: expected a path, an array, "
        f"a dict of arrays or an object with get_next()"
    )


# --------------------------------------------------------------------------------------------------
# Public API


class LoadOptions(TypedDict, total=False):
    """Keyword options of `load_calibration` and `load_labelled`."""

    preprocess: Preprocess | None  # image files -> model input; None: inferred from the input shape
    limit: int | None  # keep at most this many samples (seeded)
    seed: int


def _load_options(options: dict[str, Any]) -> tuple[Preprocess | None, int | None, int]:
    unknown = sorted(set(options) - set(LoadOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return options.get("preprocess"), options.get("limit"), options.get("seed", 0)


def load_calibration(source: Any, specs: list[InputSpec], **options: Unpack[LoadOptions]) -> dict[str, np.ndarray]:
    """Load calibration inputs as ``{input name: float32 C-contiguous array (N, ...)}``.

    `source` is a .npy / .npz / ImageFolder directory / .tar(.gz) path (``path:split`` picks a split
    folder), a numpy array, a dict of arrays or a CalibrationDataReader-like object.  `limit` keeps
    at most that many samples, drawn with ``np.random.default_rng(seed)`` without replacement and
    kept in source order.  `preprocess` applies to images only; when None it is inferred from the
    input shape (layout, channels and static H x W).  Any problem raises `CalibrationDataError`.
    """
    arrays, _ = _load(source, specs, *_load_options(options), labelled=False)
    return arrays


def load_labelled(
    source: Any, specs: list[InputSpec], **options: Unpack[LoadOptions]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Load evaluation inputs and int64 labels of shape (N,).

    Image folders / tar archives label each image by the index of its class folder among the
    sorted class names; .npz files and dicts need an integer array named ``labels`` or ``y``; a
    ``(inputs, labels)`` tuple is accepted too.  Same validation and `limit` / `seed` as
    `load_calibration`.
    """
    arrays, labels = _load(source, specs, *_load_options(options), labelled=True)
    assert labels is not None
    return arrays, labels


def batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield contiguous slices of `batch_size` samples (the last one may be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not arrays:
        return
    counts = {name: int(arr.shape[0]) for name, arr in arrays.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{k}' has {v}" for k, v in counts.items())
        raise CalibrationDataError(f"inputs have different sample counts: {detail}")
    n = next(iter(counts.values()))
    for start in range(0, n, int(batch_size)):
        yield {name: arr[start : start + batch_size] for name, arr in arrays.items()}
