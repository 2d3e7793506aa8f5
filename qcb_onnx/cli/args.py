"""Argument types the subcommands share."""

from __future__ import annotations

import argparse


def number_or(word: str, kind: type[int] | type[float]):
    """An argparse type: a number of `kind`, or `word` (case-insensitive) meaning None."""

    def parse(text: str) -> int | float | None:
        if text.lower() == word:
            return None
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} or {word!r}, got {text!r}") from None

    return parse


bits_or_none = number_or("none", int)
