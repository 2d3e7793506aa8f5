"""How user-facing messages quote what they name.  Model files, tensor names and exception texts are
attacker-controlled: every message stays one line and bounded, whatever they hold."""

from __future__ import annotations

LIMIT = 300


def one_line(exc: BaseException, limit: int = LIMIT) -> str:
    """An exception's text on one line (white space folded), at most `limit` characters."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text or type(exc).__name__


def quoted(name: object, limit: int = 80) -> str:
    """A name from the model, quoted on one line and shortened."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    text = str(name)
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)
