"""Writing results: the output file appears only complete, never over an existing one unasked, and
a location that cannot take it is refused before any work is done."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from . import large
from .errors import OutputError, OutputExistsError, UsageError
from .text import one_line


def check_output(out: Path, force: bool, source: str | Path | None = None) -> None:
    """Refuse, before a conversion starts, an output that could not be written at its end: a missing
    folder, a folder no file can be created in (permissions, read-only file system), a directory
    in the output's place, an existing file without `force`, or the input model itself."""
    out = Path(out)
    folder = out.parent
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if out.is_dir():
        raise OutputError(f"output {out} is a directory")
    if source is not None and out.exists() and Path(source).exists() and os.path.samefile(out, source):
        raise UsageError(f"--out {out} is the input model; write the quantized model elsewhere")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} exists; pass --force to overwrite it")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write into the output folder {folder}: {one_line(exc)}") from None
    os.close(fd)
    os.unlink(probe)


def write_atomic(model: onnx.ModelProto, out: Path, force: bool) -> list[Path]:
    """Save into a temporary folder beside `out`, then rename into place: a crash or Ctrl-C at any
    point leaves the old files or the new ones, never half of one.

    A large model (over 2 GB, or holding tensors still in files: a conversion's output over
    `large.HANDOVER`) is written as `out` + `out.data` (external data); the data file is renamed
    first, so a model file that exists always has its data.  Returns the files written.  Any OS
    error on the way is an `OutputError` (exit 11), with the temporary folder removed."""
    out = Path(out)
    check_output(out, force)
    targets = [out, large.data_file(out)] if large.is_large(model) else [out]
    for target in targets[1:]:
        if target.exists() and not force:
            raise OutputExistsError(f"output {target} exists; pass --force to overwrite it")
    with _staging(out) as tmp:
        written = large.save(model, tmp / out.name)
        for path in written:  # the model file comes last
            os.replace(path, out.parent / path.name)
    return [out.parent / p.name for p in written]


def write_text_atomic(text: str, out: Path, force: bool) -> Path:
    """A text output (a report, a JSON result) written like a model: checked, staged beside `out` and
    renamed into place, so a failure never leaves half a page where a reader would open it."""
    out = Path(out)
    check_output(out, force)
    with _staging(out) as tmp:
        (tmp / out.name).write_text(text, encoding="utf-8")
        os.replace(tmp / out.name, out)
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` (same file system: the final rename is atomic), removed on the
    way out whatever happens; any OS error inside is an `OutputError` (exit 11)."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        yield tmp
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {one_line(exc)}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
