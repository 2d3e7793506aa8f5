"""Progress bars, one convention: tqdm on stderr when the caller asks for it, nothing otherwise.

The CLI asks (unless --quiet); the Python API, tests and library callers do not, so output stays
clean in scripts and logs.  A disabled bar is still a tqdm object: callers use one code path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str = "it",
    enabled: bool,
    total: int | None = None,
    leave: bool = True,
) -> Any:
    """A tqdm bar over `iterable` (or of `total` steps, updated by hand), shown only when `enabled`."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
