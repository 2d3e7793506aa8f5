"""Per-layer checkpoints: a killed or interrupted conversion resumes with the same integers.

Each finished layer's integers and bias shift are appended to a tensor file (tensorfile.py) and its
evidence to a small JSON index beside it, rewritten atomically after every layer: a layer costs one
append, not a rewrite of every layer before it, and the state the loop holds is the file's memory
mapping, so the integers of a model larger than memory never all sit in memory.  A checkpoint is
valid only for the run its fingerprint identifies (model, calibration samples and every option that
can change a decision): a changed run starts afresh instead of mixing.

Without a resumable path the layer loop keeps the same file in the conversion's temporary workspace
(`resume=False`): the checkpoint is how the loop holds its integers either way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..tensorfile import TensorFile, remove
from ..text import one_line
from .problem import LayerReport

Done = dict[str, tuple[np.ndarray, LayerReport, np.ndarray | None]]  # weight -> ints, evidence, bias shift


class Checkpoint:
    """Per-layer decisions in `path` (raw arrays) and `path`.json (index), valid only for the run
    `fingerprint` identifies.  `load` opens it; `add` then appends one finished layer."""

    def __init__(self, path: str | Path, fingerprint: str, resume: bool = True) -> None:
        self.path = Path(path)
        self.index = self.path.with_name(self.path.name + ".json")
        self.fingerprint = fingerprint
        self.resume = resume
        self._layers: list[dict] = []
        self._file: TensorFile | None = None

    def load(self) -> Done:
        """The layers a previous run of this fingerprint finished (their integers memory-mapped), and
        the file opened to append the next ones after them; anything else starts afresh."""
        self._layers, size = self._read_index() if self.resume else ([], 0)
        if size > (self.path.stat().st_size if self.path.is_file() else 0):  # data shorter than its index
            self._layers, size = [], 0
        try:
            self._file = TensorFile(self.path, size)
        except OSError as exc:
            raise OutputError(f"cannot write the checkpoint {self.path}: {one_line(exc)}") from None
        return {
            m["report"]["weight"]: (self._array(m["ints"]), _report(m["report"]), self._array(m.get("shift")))
            for m in self._layers
        }

    def add(self, weight: str, ints: np.ndarray, report: LayerReport, shift: np.ndarray | None) -> np.ndarray:
        """Keep a finished layer; returns its integers as mapped from the file (the copy to hold on to)."""
        assert self._file is not None, "load() opens the checkpoint"
        try:
            entry = {"report": asdict(report), "ints": self._append(ints)}
            if shift is not None:
                entry["shift"] = self._append(shift)
            self._layers.append(entry)
            tmp = self.index.with_name(self.index.name + ".tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "layers": self._layers}))
            os.replace(tmp, self.index)
        except OSError as exc:
            raise OutputError(f"cannot write the checkpoint {self.path}: {one_line(exc)}") from None
        return self._array(entry["ints"])

    def remove(self) -> None:
        if self._file is not None:
            self._file.close()
        for path in (self.path, self.index, self.index.with_name(self.index.name + ".tmp")):
            remove(path)

    def _append(self, values: np.ndarray) -> list:
        values = np.asarray(values)
        return [self._file.append(values), values.dtype.str, list(values.shape)]

    def _array(self, ref: list | None) -> np.ndarray | None:
        if ref is None:
            return None
        offset, dtype, shape = ref
        return self._file.array(offset, dtype, tuple(shape))

    def _read_index(self) -> tuple[list[dict], int]:
        """The index's layers and the data bytes they cover, or nothing if unreadable or another run's."""
        try:
            index = json.loads(self.index.read_text())
            if index.get("fingerprint") != self.fingerprint:
                return [], 0  # a different model, data or option set: start afresh
            layers = index["layers"]
            ends = [
                off + int(np.dtype(dt).itemsize * np.prod(shape))
                for m in layers
                for off, dt, shape in [m["ints"], *([m["shift"]] if "shift" in m else [])]
            ]
            return layers, max(ends, default=0)
        except (OSError, ValueError, KeyError, TypeError):
            return [], 0  # missing or unreadable: start afresh


def _report(m: dict) -> LayerReport:
    return LayerReport(**{**m, "shape": tuple(m["shape"])})
