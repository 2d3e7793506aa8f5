"""Command line: `python -m qcb_onnx convert|evaluate ...`.

User mistakes end as one line on stderr and a non-zero exit code (see errors.py); outputs are
written to a temporary file in the destination folder and renamed only after every check passed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .attacks.cli import add_attack_parser, cmd_attack
from .errors import OutputExistsError, QcbError, UsageError
from .output import write_atomic

EXIT_INTERRUPTED = 130


def _number_or(word: str, kind: type[int] | type[float]):
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


def _budget_summary(search: dict) -> str:
    """One line on how EFRAP's error budget was set, so a shrunk budget is not a surprise."""
    if search["mode"] != "auto":
        return f"error budget {search['chosen']:g} ({search['mode']})"
    ref, *tried = search["probes"]
    steps = ", ".join(f"{p['budget']:g}: {p['agreement']:.1f} %" for p in tried)
    return (
        f"error budget {search['chosen']:g} (auto; top-1 agreement with FP32 on the calibration set: "
        f"no pull {ref['agreement']:.1f} %, {steps})"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qcb_onnx", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"qcb-onnx {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="FP32 ONNX -> QDQ ONNX with EFRAP (default), AdaRound or nearest rounding")
    c.add_argument("model", help="FP32 .onnx file")
    c.add_argument("--calib", required=True, help=".npy, .npz, image folder or .tar[.gz] ImageFolder (path[:split])")
    c.add_argument("--out", required=True, help="output .onnx path")
    c.add_argument(
        "--method",
        choices=["efrap", "adaround", "nearest", "efrap-official"],
        default="efrap",
        help="efrap (default: one sequential rounding pass per strength, seconds per layer), adaround, "
        "nearest, or efrap-official: the official data-driven Adam schedule (10,000 steps per layer by "
        "default), for reference: hours on a CPU",
    )
    c.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8 (default 8)")
    bits_or_none = _number_or("none", int)
    c.add_argument("--a-bits", type=bits_or_none, default=8, help="activation bits: 8, 4 or none (default 8)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=True, help="(default)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_false")
    c.add_argument(
        "--int8-storage",
        action="store_true",
        help="store 2-4 bit weights in INT8 tensors (same integers): ORT's CPU EP then fuses them into "
        "QLinearConv/QGemm, which it does not do for INT4 (see BENCHMARKS.md)",
    )
    c.add_argument("--calib-method", choices=["minmax", "percentile", "mse"], default="minmax")
    c.add_argument(
        "--act-headroom",
        type=float,
        default=None,
        help="stretch calibrated activation ranges by this factor, so values a trigger drives past what "
        "the calibration set showed are not clipped; 1 = ORT's ranges (default: 2 at 8-bit activations, 1 at 4)",
    )
    c.add_argument("--calib-size", type=int, default=1024, help="calibration samples drawn (seeded) (default 1024)")
    c.add_argument(
        "--preprocess",
        default=None,
        help="for image data: size=HxW,scale=..,mean=a/b/c,std=a/b/c,layout=NCHW",
    )
    c.add_argument(
        "--iters",
        type=int,
        default=None,
        help="Adam steps per layer for adaround (default 1000) and efrap-official (default 10000)",
    )
    c.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3 * 10000 / iters)")
    c.add_argument(
        "--strength",
        type=float,
        default=None,
        help="EFRAP flipping coefficient; default: per-layer search within --error-budget",
    )
    c.add_argument(
        "--error-budget",
        type=_number_or("auto", float),
        default=None,
        help="auto strength: share of the reconstruction-error gap between rounding without pull and "
        "nearest that flipping may spend, per layer; default auto: 0.25, shrunk per model until the "
        "calibration images' top-1 agreement with FP32 is within 2 points of rounding without pull's",
    )
    c.add_argument(
        "--reg-weight",
        type=float,
        default=3.0,
        help="AdaRound's rounding regulariser weight, in units of nearest rounding's error (default 3)",
    )
    c.add_argument("--beta", type=float, default=None, help="AdaRound: fixed regulariser exponent (default 20->2)")
    c.add_argument(
        "--guide",
        choices=["element", "neuron"],
        default="element",
        help="flip guidance: element-wise |e| (official code) or neuron-wise ||e_i|| (paper)",
    )
    c.add_argument("--max-rows", type=int, default=1 << 16, help="input rows sampled per layer for the moments")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device")
    c.add_argument("--providers", default="auto", help="ORT providers for verification: auto, cpu, cuda or EP list")
    c.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    c.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its per-layer checkpoint next to --out"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bars or summary")

    e = sub.add_parser("evaluate", help="CDA and ASR of ONNX models in ONNX Runtime")
    e.add_argument("models", nargs="+", help=".onnx files; the first is the FP32 reference for --baseline")
    e.add_argument("--data", required=True, help="labelled test data: .npz (x, y) or ImageFolder / .tar[.gz][:split]")
    e.add_argument("--trigger", default=None, help="patch:size=3,value=1,pos=br | blend:file=..,alpha=.. | mask:..")
    e.add_argument("--target", type=int, default=None, help="backdoor target class")
    e.add_argument(
        "--baseline",
        choices=["ort"],
        default=None,
        help="add the first model quantized by ORT's quantize_static with the same bits and scheme",
    )
    e.add_argument("--calib", default=None, help="calibration data for --baseline (default: --data)")
    e.add_argument("--calib-size", type=int, default=1024)
    e.add_argument("--w-bits", type=int, default=None, help="baseline weight bits (default: from a qcb-onnx model)")
    e.add_argument("--a-bits", type=bits_or_none, default=None)
    e.add_argument("--per-tensor", action="store_true", default=None)
    e.add_argument("--preprocess", default=None)
    e.add_argument("--limit", type=int, default=None, help="evaluate on at most this many test samples (seeded)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--providers", default="auto")
    e.add_argument("--json", default=None, help="write the table as JSON here")
    e.add_argument("--markdown", action="store_true", help="print a markdown table")
    e.add_argument("--plot", default=None, help="write a bar chart of CDA/ASR per model to this PNG")
    add_attack_parser(sub)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = Path(args.out)
    if out.exists() and not args.force:
        raise OutputExistsError(f"output {out} exists; pass --force to overwrite it")
    checkpoint = out.parent / f".{out.name}.resume.npz"
    model = convert(
        args.model,
        args.calib,
        method=args.method,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        per_channel=args.per_channel,
        int8_storage=args.int8_storage,
        calib_method=args.calib_method,
        act_headroom=args.act_headroom,
        calib_size=args.calib_size,
        iters=args.iters,
        lr=args.lr,
        strength=args.strength,
        error_budget=args.error_budget,
        reg_weight=args.reg_weight,
        beta=args.beta,
        guide=args.guide,
        max_rows=args.max_rows,
        batch_size=args.batch_size,
        preprocess=args.preprocess,
        seed=args.seed,
        device=args.device,
        providers=args.providers,
        progress=not args.quiet,
        checkpoint=checkpoint,
        resume=args.resume,
    )
    written = write_atomic(model, out, args.force)
    if not args.quiet:
        meta = {p.key: p.value for p in model.metadata_props}
        print(
            f"wrote {' + '.join(str(p) for p in reversed(written))}: method={args.method} "
            f"w_bits={args.w_bits} a_bits={args.a_bits} "
            f"{'per-channel' if args.per_channel else 'per-tensor'}, {meta.get('qcb_onnx.seconds')} s"
        )
        if "qcb_onnx.error_budget" in meta:
            print(_budget_summary(json.loads(meta["qcb_onnx.error_budget"])))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import Preprocess, input_specs, load_calibration, load_labelled
    from .evaluate import format_markdown, format_table, metadata, ort_quantize, plot, score, write_json
    from .load import load_model
    from .triggers import Trigger

    models = [(Path(p).stem, load_model(p, allow_quantized=True)) for p in args.models]
    fp_meta = metadata(models[0][1])
    # bits, scheme and preprocessing of the first qcb-onnx output, for the baseline
    meta = next((metadata(m) for _, m in models if "qcb_onnx.method" in metadata(m)), {})
    pre_text = args.preprocess or meta.get("qcb_onnx.preprocess") or fp_meta.get("qcb_onnx.preprocess")
    pre = Preprocess.parse(pre_text) if pre_text else None
    specs = input_specs(models[0][1])
    x_map, y = load_labelled(args.data, specs, preprocess=pre, limit=args.limit, seed=args.seed)
    x = next(iter(x_map.values()))
    trigger_spec = args.trigger or fp_meta.get("qcb_onnx.trigger")
    target = args.target
    if target is None and "qcb_onnx.target" in fp_meta:
        if not fp_meta["qcb_onnx.target"].strip().isdigit():
            raise UsageError(f"model metadata qcb_onnx.target is not a class index: {fp_meta['qcb_onnx.target']!r:.40}")
        target = int(fp_meta["qcb_onnx.target"])
    trigger = Trigger.parse(trigger_spec) if trigger_spec else None
    if args.baseline == "ort":
        w_bits, a_bits, per_channel = _baseline_scheme(args, meta)
        calib_arrays = load_calibration(
            args.calib or args.data, specs, preprocess=pre, limit=args.calib_size, seed=args.seed
        )
        label = f"ort-quantize_static-w{w_bits}a{a_bits}-{'pc' if per_channel else 'pt'}"
        baseline = ort_quantize(models[0][1], next(iter(calib_arrays.values())), w_bits, a_bits, per_channel)
        models.insert(1, (label, baseline))
    scores = []
    for name, model in models:
        try:
            scores.append(score(name, model, x, y, trigger, target, pre, args.providers))
        except Exception as exc:  # noqa: BLE001 - e.g. ORT rejecting quantize_static's own A4 graph
            if not name.startswith("ort-quantize_static"):
                raise
            print(f"note: ONNX Runtime cannot run {name}: {str(exc).splitlines()[0]}", file=sys.stderr)
    print(format_markdown(scores) if args.markdown else format_table(scores))
    if args.json:
        extra = {"data": args.data, "trigger": trigger_spec, "target": target, "models": args.models}
        write_json(scores, args.json, extra)
    if args.plot:
        plot(scores, args.plot)
    return 0


def _baseline_scheme(args: argparse.Namespace, meta: dict[str, str]) -> tuple[int, int | None, bool]:
    """Explicit flags win; otherwise the bits and scheme recorded in a qcb-onnx output; else W8A8 per channel."""
    w_bits = args.w_bits or int(meta.get("qcb_onnx.w_bits", 8))
    a_text = meta.get("qcb_onnx.a_bits", "8")
    a_bits = args.a_bits if args.a_bits is not None else (None if a_text == "none" else int(a_text))
    if args.per_tensor is not None:
        return w_bits, a_bits, not args.per_tensor
    return w_bits, a_bits, "per-tensor" not in meta.get("qcb_onnx.scheme", "per-channel")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"convert": cmd_convert, "evaluate": cmd_evaluate, "attack": cmd_attack}[args.command](args)
    except QcbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = " (finished layers are saved: rerun with --resume)" if args.command == "convert" else ""
        print(f"error: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
