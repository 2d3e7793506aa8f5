"""CIFAR-10 as arrays: decode ``../shared/data/cifar10-jpeg.tar.gz`` once, cache uint8 arrays.

    x, y = load_cifar10("train")               # float32 (N, 3, 32, 32) in [0, 1], int64 (N,)
    x, y = load_cifar10("test", limit=2000)    # seeded subset, kept in source order

Models of the red-team zoo take these [0, 1] pixels directly (no mean/std normalisation), so a
trigger spec applies to the model input as is and no ``qcb_onnx.preprocess`` is needed.  The first
call decodes the JPEG archive through `qcb_onnx.data.load_labelled` (about 20 s per 60,000 images)
and writes ``cifar10-<split>.npz`` under the cache folder (default ``~/.cache/qcb_onnx``, or
``$QCB_ONNX_CACHE``), outside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CalibrationDataError, UsageError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: qcb_onnx/redteam/cifar.py
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_cache_dir() -> Path:
    return Path(os.environ.get("QCB_ONNX_CACHE", Path.home() / ".cache" / "qcb_onnx"))


def load_cifar10(
    split: str,
    limit: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    archive: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 `split` ('train' or 'test') as float32 (N, 3, 32, 32) in [0, 1] and int64 labels.

    `limit` keeps that many samples drawn with ``default_rng(seed)`` without replacement (in source
    order).  Raises `CalibrationDataError` when the archive is missing and nothing is cached."""
    if split not in ("train", "test"):
        raise UsageError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise UsageError(f"limit must be a positive integer, got {limit!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npz = cache / f"cifar10-{split}.npz"
    if npz.is_file():
        with np.load(npz) as f:
            x8, y = f["x"], f["y"]
    else:
        x8, y = _decode(split, Path(archive) if archive is not None else ARCHIVE)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_suffix(".tmp.npz")
        np.savez(tmp, x=x8, y=y)
        tmp.replace(npz)
    if limit is not None and limit < len(y):
        keep = np.sort(np.random.default_rng(seed).choice(len(y), int(limit), replace=False))
        x8, y = x8[keep], y[keep]
    return x8.astype(np.float32) / 255.0, y.astype(np.int64)


def _decode(split: str, archive: Path) -> tuple[np.ndarray, np.ndarray]:
    from ..data import InputSpec, load_labelled

    if not archive.is_file():
        raise CalibrationDataError(
            f"CIFAR-10 archive not found: {archive} (expected ../shared/data/cifar10-jpeg.tar.gz beside the repo)"
        )
    spec = InputSpec("input", (None, 3, 32, 32))
    arrays, y = load_labelled(f"{archive}:{split}", [spec])
    x = arrays["input"]
    x8 = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return x8, y.astype(np.int64)
