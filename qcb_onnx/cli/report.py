"""`python -m qcb_onnx report RESULT.json --html OUT.html`: one self-contained page from an evaluate result.

RESULT.json is what `evaluate --json` writes; the page shows CDA/ASR per model (table and chart), each
qcb-onnx model's per-layer flip ratios and reconstruction errors, and the config it was converted
with.  It needs no model files, so a result can be reported on where the models are not.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError
from ..output import check_output, write_text_atomic


def add_report_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("report", help="a self-contained HTML page from an evaluate --json result")
    r.add_argument("result", help="the JSON file `evaluate --json` wrote")
    r.add_argument("--html", required=True, help="write the page here")
    r.add_argument("--force", action="store_true", default=False, help="overwrite --html if it exists")
    return r


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluate.htmlreport import load_result, render

    out, source = Path(args.html), Path(args.result)
    if out.exists() and source.exists() and os.path.samefile(out, source):
        raise UsageError(f"--html {out} is the result file itself; write the page elsewhere")
    check_output(out, args.force)  # before reading: a bad destination is reported first, as convert does
    result = load_result(source)
    write_text_atomic(render(result), out, args.force)
    print(f"wrote {out}: {len(result.scores)} models, {sum(len(q.layers) for q in result.qcb)} qcb-onnx layers")
    return 0
