"""Command line: `python -m qcb_onnx convert|evaluate|report|info|attack ...`, one module per command.

User mistakes end as one line on stderr and a non-zero exit code (see errors.py); outputs are
written to a temporary file in the destination folder and renamed only after every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings

from .. import __version__
from ..errors import QcbError, QcbNote
from ..redteam.cli import add_attack_parser, cmd_attack
from .convert import add_convert_parser, cmd_convert
from .evaluate import add_evaluate_parser, cmd_evaluate
from .info import add_info_parser, cmd_info
from .report import add_report_parser, cmd_report
from .scan import add_scan_parser, cmd_scan

EXIT_INTERRUPTED = 130
COMMANDS = {
    "convert": cmd_convert,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "info": cmd_info,
    "scan": cmd_scan,
    "attack": cmd_attack,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qcb_onnx", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"qcb-onnx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    parsers = (
        add_convert_parser,
        add_evaluate_parser,
        add_report_parser,
        add_info_parser,
        add_scan_parser,
        add_attack_parser,
    )
    for command in (add(sub) for add in parsers):
        command.add_argument(
            "--verbose", action="store_true", default=False, help="show library logging and warnings on stderr"
        )
    return p


@contextlib.contextmanager
def _stderr_policy(verbose: bool):
    """Without --verbose, stderr carries our own lines only: an error, notes (`QcbNote` warnings, one
    line each) and progress bars.  Third-party logging and warnings (onnx_ir, onnxscript, torch) stay
    behind --verbose: a library logging a traceback before our one-line error would break it."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, QcbNote):
            print(f"note: {message}", file=sys.stderr)
        elif verbose:
            print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always" if verbose else "default")
        warnings.showwarning = show
        if not verbose:
            logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            if not verbose:
                logging.disable(logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _stderr_policy(args.verbose):
            return COMMANDS[args.command](args)
    except QcbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = " (finished layers are saved: rerun with --resume)" if args.command == "convert" else ""
        print(f"error: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
