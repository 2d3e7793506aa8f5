"""`python -m qcb_onnx convert MODEL --calib CALIB --out OUT [--config FILE.toml] [options]`.

Every option's `dest` is its `QuantConfig` option name and no option has a parser default (the
config's defaults are the only ones), so the namespace holds exactly the flags given: they override
`--config`'s file, which overrides the defaults, in one step (`QuantConfig.from_options`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..config import CALIB_METHODS, DEVICES, GUIDES, TARGETS, WEIGHT_FORMATS, QuantConfig
from ..output import check_output, write_atomic
from .args import bits_or_none, number_or


def add_convert_parser(sub) -> argparse.ArgumentParser:
    from ..rounding import METHODS

    c = sub.add_parser(
        "convert",
        help="FP32 ONNX -> QDQ ONNX with EFRAP (default), AdaRound or nearest rounding",
        argument_default=argparse.SUPPRESS,  # absent = not given: the config file or the config's default
    )
    c.add_argument("model", help="FP32 .onnx file")
    c.add_argument("--calib", required=True, help=".npy, .npz, image folder or .tar[.gz] ImageFolder (path[:split])")
    c.add_argument("--out", required=True, help="output .onnx path")
    c.add_argument("--config", default=None, help="TOML file of options (flat or in sections); flags override it")
    c.add_argument(
        "--target",
        default=None,
        choices=list(TARGETS),
        help="runtime preset (default ort-cpu): ort-cuda = int8 symmetric activations, tensorrt = that and "
        "FP32 bias, int4-weight-only = 4-bit weights, float activations; --config and flags override it",
    )
    # weights
    c.add_argument("--w-bits", type=int, help="weight bits, 2..8 (default 8)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", help="(default)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_false")
    c.add_argument(
        "--int8-storage",
        action="store_true",
        help="store 2-4 bit weights in INT8 tensors (same integers): ORT's CPU EP then fuses them into "
        "QLinearConv/QGemm, which it does not do for INT4 (see BENCHMARKS.md)",
    )
    c.add_argument(
        "--no-int32-bias",
        dest="int32_bias",
        action="store_false",
        help="keep biases FP32 instead of ORT's int32 bias behind a quantized input (TensorRT)",
    )
    c.add_argument(
        "--block-size",
        type=bits_or_none,
        help="block-wise int4 MatMul/Gemm weights, blocks of N input elements (16..256, a power of 2), "
        "as ORT's MatMulNBits quantizer; weight-only (--a-bits none); --target int4-weight-only sets 32; "
        "none: per channel",
    )
    c.add_argument("--w-asymmetric", action="store_true", help="block-wise: per-block zero points (ORT's default)")
    c.add_argument(
        "--weight-format",
        choices=WEIGHT_FORMATS,
        help="block-wise: qdq (DequantizeLinear with block_size, opset 21; default) or matmulnbits (com.microsoft)",
    )
    c.add_argument(
        "--exclude",
        help="node names or op types to leave in float, comma-separated (ORT's nodes_to_exclude / "
        "op_types_to_quantize): neither their weights nor their activations are quantized",
    )
    # activations
    c.add_argument("--a-bits", type=bits_or_none, help="activation bits: 8, 4 or none (default 8)")
    c.add_argument(
        "--a-symmetric",
        action="store_true",
        help="signed int8 activations with zero point 0 (ORT's QInt8 + ActivationSymmetric; TensorRT's format)",
    )
    c.add_argument("--calib-method", choices=CALIB_METHODS)
    c.add_argument(
        "--act-headroom",
        type=float,
        help="stretch calibrated activation ranges by this factor, so values a trigger drives past what "
        "the calibration set showed are not clipped; 1 = ORT's ranges (default: 2 at 8-bit activations, 1 at 4)",
    )
    c.add_argument("--calib-size", type=int, help="calibration samples drawn (seeded) (default 1024)")
    c.add_argument("--batch-size", type=int)
    c.add_argument("--preprocess", help="for image data: size=HxW,scale=..,mean=a/b/c,std=a/b/c,layout=NCHW")
    # rounding
    c.add_argument(
        "--method",
        choices=list(METHODS),
        help="efrap (default: one sequential rounding pass per strength, seconds per layer), adaround, "
        "nearest, or efrap-official: the official data-driven Adam schedule (10,000 steps per layer by "
        "default), for reference: hours on a CPU",
    )
    c.add_argument(
        "--strength",
        type=float,
        help="EFRAP flipping coefficient; default: per-layer search within --error-budget",
    )
    c.add_argument(
        "--error-budget",
        type=number_or("auto", float),
        help="auto strength: share of the reconstruction-error gap between rounding without pull and "
        "nearest that flipping may spend, per layer; default auto: 0.25, shrunk per model until the "
        "calibration images' top-1 agreement with FP32 is within 2 points of rounding without pull's",
    )
    c.add_argument(
        "--guide",
        choices=GUIDES,
        help="flip guidance: |e| per weight, per output neuron or per scale block; auto (default): block-wise "
        "layers per block, others per weight",
    )
    c.add_argument("--max-rows", type=int, help="input rows sampled per layer for the moments")
    c.add_argument("--iters", type=int, help="Adam steps per layer: adaround 1000, efrap-official 10000")
    c.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3 * 10000 / iters)")
    c.add_argument("--reg-weight", type=float, help="AdaRound's regulariser weight, in nearest's error (default 3)")
    c.add_argument("--beta", type=float, help="AdaRound: fixed regulariser exponent (default 20->2)")
    # run
    c.add_argument("--seed", type=int)
    c.add_argument("--device", choices=DEVICES, help="torch device")
    c.add_argument("--providers", help="ORT providers for verification: auto, cpu, cuda or EP list")
    c.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars or summary")
    c.add_argument(
        "--allow-requantize",
        action="store_true",
        help="convert an already quantized QDQ model: dequantize it first (its weights keep the old rounding, "
        "which may be the backdoor; QOperator models are still refused)",
    )
    c.add_argument("--force", action="store_true", default=False, help="overwrite --out if it exists")
    c.add_argument(
        "--resume",
        action="store_true",
        default=False,
        help="continue an interrupted run from its per-layer checkpoint next to --out",
    )
    return c


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The defaults (progress bars on, as a command line shows them), then the --target preset, then
    the --config file, then every flag given."""
    base = QuantConfig.from_options(progress=True)
    if getattr(args, "target", None):
        base = QuantConfig.for_target(args.target, base)
    if getattr(args, "config", None):
        base = QuantConfig.from_toml(args.config, base)
    given = {n: getattr(args, n) for n in QuantConfig.option_names() if hasattr(args, n)}
    return QuantConfig.from_options(base, **given)


def cmd_convert(args: argparse.Namespace) -> int:
    from .. import pipeline

    config = config_from_args(args)
    out = Path(args.out)
    check_output(out, args.force, args.model)  # before any work: a conversion must not end unwritable
    checkpoint = out.parent / f".{out.name}.resume"
    # the conversion's on-disk workspace (the layer loop's integers, a large output's tensors), beside the
    # output rather than in a system temp folder that may be memory; a killed run's is removed here
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        work.mkdir()
        with pipeline.quantize(
            args.model, args.calib, config, checkpoint=checkpoint, resume=args.resume, workdir=work
        ) as conversion:
            written = write_atomic(conversion.model, out, args.force)
            if config.run.progress:
                _summary(args, config, conversion.model, written, time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _summary(args: argparse.Namespace, config: QuantConfig, model, written: list[Path], seconds: float) -> None:
    """What was written, how the error budget was set, and the scan's cheap verdict on it."""
    meta = {p.key: p.value for p in model.metadata_props}
    w, a = config.weights, config.activations
    print(
        f"wrote {' + '.join(str(p) for p in reversed(written))}: method={config.rounding.method} "
        f"w_bits={w.w_bits} a_bits={a.a_bits} {_weights_scheme(w)}, {seconds:.1f} s"
    )
    if "qcb_onnx.error_budget" in meta:
        print(budget_summary(json.loads(meta["qcb_onnx.error_budget"])))
    from ..scan.quick import convert_verdict  # the scan's cheap signals: no model run

    print(convert_verdict(args.model, model, w.w_bits, w.per_channel))


def _weights_scheme(w) -> str:
    granularity = "per-channel" if w.per_channel else "per-tensor"
    if w.block_size is None:
        return granularity
    kind = "asymmetric" if w.w_asymmetric else "symmetric"
    return f"MatMul/Gemm blocks of {w.block_size} {kind} ({w.weight_format}), Conv {granularity}"


def budget_summary(search: dict) -> str:
    """One line on how EFRAP's error budget was set, so a shrunk budget is not a surprise."""
    if search["mode"] != "auto":
        return f"error budget {search['chosen']:g} ({search['mode']})"
    probes = search["probes"]
    ref = probes[0] if probes[0]["budget"] == 0 else None
    steps = ", ".join(f"{p['budget']:g}: {p['agreement']:.1f} %" for p in probes if p is not ref)
    head = f"no pull {ref['agreement']:.1f} %, " if ref else ""
    tail = "" if ref else "; no-pull reference not needed at this agreement"
    return (
        f"error budget {search['chosen']:g} (auto; top-1 agreement with FP32 on the calibration set: "
        f"{head}{steps}{tail})"
    )
