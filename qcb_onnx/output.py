"""Writing results: the output file appears only complete, and never over an existing one unasked."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from . import large
from .errors import OutputExistsError, UsageError


def write_atomic(model: onnx.ModelProto, out: Path, force: bool) -> list[Path]:
    """Save into a temporary folder beside `out`, then rename into place: a crash or Ctrl-C at any
    point leaves the old files or the new ones, never half of one.

    A model over 2 GB is written as `out` + `out.data` (external data); the data file is renamed
    first, so a model file that exists always has its data.  Returns the files written."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"output folder does not exist: {out.parent}")
    targets = [out, large.data_file(out)] if large.is_large(model) else [out]
    for target in targets:
        if target.exists() and not force:
            raise OutputExistsError(f"output {target} exists; pass --force to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        written = large.save(model, tmp / out.name)
        for path in written:  # the model file comes last
            os.replace(path, out.parent / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out.parent / p.name for p in written]
