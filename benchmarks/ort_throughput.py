"""ORT throughput of FP32, ORT quantize_static and qcb-onnx outputs, same session options and batches.

    python benchmarks/ort_throughput.py MODEL.onnx --calib calib.npy [--batch 64] [--repeats 7]

Quantizes MODEL with ORT's quantize_static (QDQ, W8A8 per channel) and with qcb-onnx (W8A8 per channel;
`--method nearest` by default: the emitted graph has the same structure whatever the rounding
method); with `--w4` also at 4-bit weights (INT4 tensors, the same integers in INT8 tensors via
`--int8-storage`, and W4A4), checks that ORT's CPU EP fuses both into QLinearConv, and reports the median images/s
of `--repeats` timed passes over `--images` random inputs after one warm-up pass, with 2 intra-op threads;
the passes go round-robin over the models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcb_onnx import convert
from qcb_onnx.evaluate.baseline import ort_quantize

ROOT = Path(__file__).resolve().parents[1]


def session(model: onnx.ModelProto) -> tuple[ort.InferenceSession, set[str]]:
    """A CPU session with the same options for every model, and the op types of its optimized graph."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    return sess, ops


def throughput(sessions: dict[str, ort.InferenceSession], x: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
    """Median images/s per session; the timed passes go round-robin over the models, so a slow or fast
    spell of the machine (turbo, another process) falls on all of them alike, not on whichever ran
    then (measured back to back, the first INT4 model once looked 50 % faster than an identical one)."""
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    for sess in sessions.values():  # warm-up
        for b in batches:
            sess.run(None, {sess.get_inputs()[0].name: b})
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for label, sess in sessions.items():
            name = sess.get_inputs()[0].name
            t = time.perf_counter()
            for b in batches:
                sess.run(None, {name: b})
            rates[label].append(len(x) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--method", default="nearest")
    ap.add_argument("--w4", action="store_true", help="also 4-bit weights: INT4, INT4 in INT8 tensors, W4A4")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ort_throughput.json"))
    args = ap.parse_args()
    fp = onnx.load(args.model)
    calib = np.load(args.calib)
    x = np.random.default_rng(0).random((args.images, *calib.shape[1:]), dtype=np.float32)
    c = calib[:256]
    models = {
        "fp32": fp,
        "ort quantize_static W8A8": ort_quantize(fp, c, 8, 8, True),
        f"qcb-onnx {args.method} W8A8": convert(fp, c, method=args.method, providers="cpu"),
    }
    if args.w4:
        models |= {
            "ort quantize_static W4A8 (INT4)": ort_quantize(fp, c, 4, 8, True),
            f"qcb-onnx {args.method} W4A8 (INT4)": convert(fp, c, method=args.method, w_bits=4, providers="cpu"),
            f"qcb-onnx {args.method} W4A8 --int8-storage": convert(
                fp, c, method=args.method, w_bits=4, int8_storage=True, providers="cpu"
            ),
            f"qcb-onnx {args.method} W4A4 (INT4/UINT4)": convert(
                fp, c, method=args.method, w_bits=4, a_bits=4, providers="cpu"
            ),
        }
    built = {label: session(model) for label, model in models.items()}
    rates = throughput({k: v[0] for k, v in built.items()}, x, args.batch, args.repeats)
    rows = []
    for label, (_, ops) in built.items():
        fused = sorted(ops & {"QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool"})
        if "Conv" in ops:
            fused.append("float Conv (unfused)")
        rows.append({"model": label, "images_per_s": round(rates[label], 1), "fused_ops": fused, "batch": args.batch})
        print(f"| {label} | {rates[label]:.1f} | {', '.join(fused) or '-'} |", flush=True)
    Path(args.json).write_text(json.dumps({"source": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
