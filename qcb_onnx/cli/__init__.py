"""Command line: `python -m qcb_onnx convert|evaluate|attack ...`, one module per command.

User mistakes end as one line on stderr and a non-zero exit code (see errors.py); outputs are
written to a temporary file in the destination folder and renamed only after every check passed.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import QcbError
from ..redteam.cli import add_attack_parser, cmd_attack
from .convert import add_convert_parser, cmd_convert
from .evaluate import add_evaluate_parser, cmd_evaluate

EXIT_INTERRUPTED = 130
COMMANDS = {"convert": cmd_convert, "evaluate": cmd_evaluate, "attack": cmd_attack}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qcb_onnx", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"qcb-onnx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add_convert_parser(sub)
    add_evaluate_parser(sub)
    add_attack_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except QcbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = " (finished layers are saved: rerun with --resume)" if args.command == "convert" else ""
        print(f"error: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
