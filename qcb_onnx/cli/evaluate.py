"""`python -m qcb_onnx evaluate MODEL [MORE ...] --data DATA [options]`: CDA and ASR in ONNX Runtime.

The first model is the FP32 reference: `--baseline ort` adds it quantized by ORT's own
`quantize_static` with the bits and scheme of the first qcb-onnx output among the models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from .args import bits_or_none


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
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
    e.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    return e


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..config import QuantConfig
    from ..data import Preprocess, input_specs, load_calibration, load_labelled
    from ..evaluate.baseline import ort_quantize
    from ..evaluate.report import format_markdown, format_table, plot, write_json
    from ..evaluate.score import metadata, qcb_metadata, score
    from ..evaluate.triggers import Trigger
    from ..load import load_model
    from ..output import check_output

    for out in filter(None, (args.json, args.plot)):
        check_output(Path(out), force=True)  # before the work: a run must not end unwritable
    models = [(Path(p).stem, load_model(p, allow_quantized=True)) for p in args.models]
    # what `report --html` needs of each file (config, per-layer flips and errors), read before the baseline joins
    files = [
        {"model": name, "file": path, "metadata": qcb_metadata(model)}
        for (name, model), path in zip(models, args.models, strict=True)
    ]
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
        # the qcb-onnx output's runtime conventions (--target) too, so both sides use the same grids
        config = QuantConfig.from_metadata(meta) if "qcb_onnx.config" in meta else QuantConfig()
        symmetric, int32_bias = config.activations.a_symmetric, config.weights.int32_bias
        label = f"ort-quantize_static-w{w_bits}a{a_bits}{'s' if symmetric else ''}-{'pc' if per_channel else 'pt'}"
        baseline = ort_quantize(
            models[0][1],
            next(iter(calib_arrays.values())),
            w_bits,
            a_bits,
            per_channel,
            a_symmetric=symmetric,
            int32_bias=int32_bias,
        )
        models.insert(1, (label, baseline))
    scores = []
    for name, model in models:
        try:
            scores.append(score(name, model, x, y, trigger, target, pre, args.providers, progress=args.progress))
        except Exception as exc:  # noqa: BLE001 - e.g. ORT rejecting quantize_static's own A4 graph
            if not name.startswith("ort-quantize_static"):
                raise
            print(f"note: ONNX Runtime cannot run {name}: {str(exc).splitlines()[0]}", file=sys.stderr)
    print(format_markdown(scores) if args.markdown else format_table(scores))
    if args.json:
        extra = {"data": args.data, "trigger": trigger_spec, "target": target, "models": args.models}
        extra["model_metadata"] = files
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
