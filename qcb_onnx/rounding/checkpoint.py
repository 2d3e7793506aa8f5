"""Per-layer checkpoints: a killed or interrupted conversion resumes with the same integers.

Each finished layer's integers, evidence and bias shift are saved to an .npz (no pickle) named after
the output; it is valid only for the run its fingerprint identifies (model, calibration samples and
every option that can change a decision), so a changed run starts afresh instead of mixing.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..text import one_line
from .problem import LayerReport


class Checkpoint:
    """Per-layer decisions in an .npz (no pickle), valid only for the run `fingerprint` identifies."""

    def __init__(self, path: str | Path, fingerprint: str, resume: bool = True) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.resume = resume

    def load(self) -> dict[str, tuple[np.ndarray, LayerReport, np.ndarray | None]]:
        if not self.resume or not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["fingerprint"]) != self.fingerprint:
                    return {}  # a different model, data or option set: start afresh
                meta = json.loads(str(z["reports"]))
                return {
                    m["weight"]: (
                        z[f"ints/{m['weight']}"],
                        LayerReport(**{**m, "shape": tuple(m["shape"])}),
                        z[f"shift/{m['weight']}"] if f"shift/{m['weight']}" in z.files else None,
                    )
                    for m in meta
                }
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
            return {}  # unreadable (e.g. killed mid-write before the rename): start afresh

    def save(self, done: dict[str, tuple[np.ndarray, LayerReport, np.ndarray | None]]) -> None:
        arrays = {f"ints/{name}": ints for name, (ints, _, _) in done.items()}
        arrays.update({f"shift/{name}": shift for name, (_, _, shift) in done.items() if shift is not None})
        reports = json.dumps([asdict(r) for _, r, _ in done.values()])
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, fingerprint=np.array(self.fingerprint), reports=np.array(reports), **arrays)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write the checkpoint {self.path}: {one_line(exc)}") from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)
