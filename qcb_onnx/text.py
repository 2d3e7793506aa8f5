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


def first_line(exc: BaseException, limit: int = LIMIT) -> str:
    """The first non-empty line of an exception's text, bounded: for libraries (torch's exporters)
    whose messages run to pages of hints after the one line that says what went wrong."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return one_line(Exception(lines[0]) if lines else exc, limit)


def listing(labels: dict[str, list[str]], most: int = 5) -> str:
    """``Kind (node a)``, ``Kind (nodes a, b and 3 more)`` for each kind, comma-separated: how a
    message names the nodes of each op type it refuses, at most `most` names per type."""
    parts = []
    for kind, names in labels.items():
        shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
        parts.append(f"{kind} ({'node' if len(names) == 1 else 'nodes'} {shown})")
    return ", ".join(parts)
