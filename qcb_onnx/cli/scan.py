"""`python -m qcb_onnx scan MODEL --calib CALIB [--w-bits 8 4] [--per-tensor|--per-channel] [--json F] [--html F]`.

Prints the verdict (clean / suspicious) with its score and exits 0 either way: a verdict is a result,
not an error.  `--fail-on-suspicious` makes a suspicious verdict exit `EXIT_SUSPICIOUS` (10) for
pipelines that should stop there.  Errors keep their codes (errors.py); the JSON and HTML outputs are
checked before any work and written atomically, so a failed scan leaves neither behind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import DEVICES
from ..errors import EXIT_SUSPICIOUS, UsageError
from ..output import check_output, write_text_atomic


def add_scan_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "scan", help="look for a quantization-conditioned backdoor without its trigger: clean / suspicious"
    )
    s.add_argument("model", help="FP32 .onnx file")
    s.add_argument("--calib", required=True, help=".npy, .npz, image folder or .tar[.gz] (path[:split])")
    s.add_argument("--w-bits", type=int, nargs="+", default=[8, 4], help="victim weight bits to test (default 8 4)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=True, help="(default)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_false")
    s.add_argument("--calib-size", type=int, default=256, help="calibration samples drawn (seeded) (default 256)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--preprocess", default=None, help="for image data: size=HxW,scale=..,mean=a/b/c,std=a/b/c")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trigger-steps", type=int, default=60, help="steps of the differential trigger search")
    s.add_argument("--device", choices=DEVICES, default="auto", help="torch device")
    s.add_argument("--reference", default=None, help="clean reference JSON (default: the one shipped)")
    s.add_argument("--json", default=None, help="write the verdict, score and every signal here")
    s.add_argument("--html", default=None, help="write a self-contained HTML report with per-layer plots here")
    s.add_argument("--force", action="store_true", help="overwrite --json / --html")
    s.add_argument("--fail-on-suspicious", action="store_true", help=f"exit {EXIT_SUSPICIOUS} on a suspicious verdict")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    return s


def cmd_scan(args: argparse.Namespace) -> int:
    from ..data import Preprocess
    from ..scan import ScanOptions, load_reference, scan, summary_line
    from ..scan.html import render

    outputs = [Path(p) for p in (args.json, args.html) if p]
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise UsageError("--json and --html name the same file")
    for out in outputs:  # before any work: a scan must not end unwritable
        check_output(out, args.force, args.model)
    options = ScanOptions(
        w_bits=tuple(args.w_bits),
        per_channel=args.per_channel,
        calib_size=args.calib_size,
        batch_size=args.batch_size,
        preprocess=Preprocess.parse(args.preprocess) if args.preprocess else None,
        seed=args.seed,
        trigger_steps=args.trigger_steps,
        device=args.device,
        progress=not args.quiet,
    )
    report = scan(args.model, args.calib, options, load_reference(args.reference))
    if args.json:
        write_text_atomic(json.dumps(report, indent=1), Path(args.json), args.force)
    if args.html:
        write_text_atomic(render(report), Path(args.html), args.force)
    print(summary_line(report))
    return EXIT_SUSPICIOUS if args.fail_on_suspicious and report["verdict"] == "suspicious" else 0
