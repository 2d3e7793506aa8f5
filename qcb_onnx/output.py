"""Writing results: the output file appears only complete, and never over an existing one unasked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import OutputExistsError, UsageError


def write_atomic(model: onnx.ModelProto, out: Path, force: bool) -> None:
    """Save to a temporary file in the destination folder, then rename: a crash or Ctrl-C at any
    point leaves either the old file or the new one, never half of one."""
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise UsageError(f"output folder does not exist: {out.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
