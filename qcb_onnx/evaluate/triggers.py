"""Backdoor triggers, applied in image space ([0, 1] pixels, before mean/std normalisation).

A trigger is part of an attack's definition, so it is parsed from a short spec that can be
stored in a model's metadata and typed on a command line:
    patch:size=3,value=1,pos=br          solid square (BadNets); pos br|bl|tr|tl|center|<row>x<col>
    blend:file=pattern.npy,alpha=0.1     x' = (1 - alpha) x + alpha pattern
    mask:pattern=p.npy,mask=m.npy        x' = (1 - m) x + m p
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Preprocess
from ..errors import UsageError


@dataclass(frozen=True)
class Trigger:
    spec: str
    kind: str
    size: int = 3
    value: float = 1.0
    pos: str = "br"
    alpha: float = 0.1
    pattern: np.ndarray | None = None
    mask: np.ndarray | None = None

    @classmethod
    def parse(cls, spec: str) -> Trigger:
        kind, _, rest = spec.partition(":")
        opts = {}
        for item in filter(None, rest.split(",")):
            key, sep, val = item.partition("=")
            if not sep:
                raise UsageError(f"trigger option {item!r} in {spec!r} is not key=value")
            opts[key.strip()] = val.strip()
        try:
            if kind == "patch":
                allowed = {"size", "value", "pos"}
                _check_keys(opts, allowed, spec)
                return cls(
                    spec,
                    kind,
                    size=int(opts.get("size", 3)),
                    value=float(opts.get("value", 1.0)),
                    pos=opts.get("pos", "br"),
                )
            if kind == "blend":
                _check_keys(opts, {"file", "alpha"}, spec)
                return cls(spec, kind, alpha=float(opts.get("alpha", 0.1)), pattern=_load(opts, "file", spec))
            if kind == "mask":
                _check_keys(opts, {"pattern", "mask"}, spec)
                return cls(spec, kind, pattern=_load(opts, "pattern", spec), mask=_load(opts, "mask", spec))
        except ValueError as exc:
            raise UsageError(f"bad trigger spec {spec!r}: {exc}") from None
        raise UsageError(f"unknown trigger kind {kind!r} in {spec!r}; use patch, blend or mask")

    def apply(self, x: np.ndarray, preprocess: Preprocess | None = None) -> np.ndarray:
        """Return a triggered copy of a batch laid out as the model input (NCHW or NHWC)."""
        nhwc = preprocess is not None and preprocess.layout == "NHWC"
        img = np.moveaxis(x, -1, 1) if nhwc else x.copy()
        mean, std = _affine(preprocess, img.shape[1])
        pixels = img * std + mean
        if self.kind == "patch":
            h, w = pixels.shape[-2:]
            r, c = _position(self.pos, self.size, h, w)
            pixels[..., r : r + self.size, c : c + self.size] = self.value
        elif self.kind == "blend":
            pixels = (1 - self.alpha) * pixels + self.alpha * _fit(self.pattern, pixels.shape[1:])
        else:
            m = _fit(self.mask, pixels.shape[1:])
            pixels = (1 - m) * pixels + m * _fit(self.pattern, pixels.shape[1:])
        out = ((pixels - mean) / std).astype(np.float32)
        return np.moveaxis(out, 1, -1) if nhwc else out


def _check_keys(opts: dict, allowed: set, spec: str) -> None:
    unknown = set(opts) - allowed
    if unknown:
        raise UsageError(f"unknown trigger option(s) {', '.join(sorted(unknown))} in {spec!r}")


def _load(opts: dict, key: str, spec: str) -> np.ndarray:
    if key not in opts:
        raise UsageError(f"trigger {spec!r} needs {key}=<file.npy>")
    path = Path(opts[key])
    if not path.is_file():
        raise UsageError(f"trigger file not found: {path}")
    return np.load(path, allow_pickle=False).astype(np.float32)


def _fit(arr: np.ndarray, chw: tuple[int, ...]) -> np.ndarray:
    try:
        return np.broadcast_to(arr, chw)
    except ValueError:
        raise UsageError(f"trigger array of shape {arr.shape} does not fit images of shape {chw}") from None


def _affine(pre: Preprocess | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    if pre is None:
        return np.zeros((1, 1, 1, 1), np.float32), np.ones((1, 1, 1, 1), np.float32)
    mean = np.broadcast_to(np.asarray(pre.mean, np.float32), (channels,)).reshape(1, -1, 1, 1)
    std = np.broadcast_to(np.asarray(pre.std, np.float32), (channels,)).reshape(1, -1, 1, 1)
    return mean, std


def _position(pos: str, size: int, h: int, w: int) -> tuple[int, int]:
    table = {
        "br": (h - size, w - size),
        "bl": (h - size, 0),
        "tr": (0, w - size),
        "tl": (0, 0),
        "center": ((h - size) // 2, (w - size) // 2),
    }
    if pos in table:
        return table[pos]
    row, sep, col = pos.partition("x")
    if not sep:
        raise ValueError(f"position {pos!r} is not br/bl/tr/tl/center or <row>x<col>")
    return int(row), int(col)
