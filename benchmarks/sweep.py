"""What should the defense's knobs default to?  Measured on real QCBs, not guessed.

    python benchmarks/sweep.py [--knob error_budget --values 0.1 0.25 0.5 1.0] [--seeds 0 1 2]
                               [--zoo DIR --only w4 --test-limit 2000|all] [--no-digits] [--a-bits 8|4]
                               [--out results/NAME.json]

The knobs: `error_budget` (the share of the reconstruction-error gap between rounding without pull
and nearest rounding that flipping may spend, per layer) and `act_headroom` (how far activation
ranges reach beyond what the calibration set showed).  For digits QCB models built with the shipped
recipe (samples/make_sample.py, W4 per-channel Qu-ANTI-zation, one per seed) and for every attacked
model of a zoo folder (benchmarks/make_zoo.py; CIFAR-10, paper_table's 1,024 calibration images and
a seeded 2,000 of its 10,000 test images, or all of them with `--test-limit all`), this converts at
each value, in the scheme the attack targeted, and measures CDA/ASR in ONNX Runtime beside FP32 and
ORT's quantize_static.  Writes a JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
from zoo_data import attacked_models, paper_split

from qcb_onnx import convert
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.evaluate.score import metadata, score
from qcb_onnx.evaluate.triggers import Trigger
from qcb_onnx.redteam.train import export_onnx

ROOT = Path(__file__).resolve().parents[1]
KNOBS = ("error_budget", "act_headroom")


def _value(text: str) -> float | None:
    return None if text == "auto" else float(text)


def _chosen(row: dict) -> str:
    search = row["budget_search"]
    return f" (budget {search['chosen']:g})" if search and search["mode"] == "auto" else ""


def digits_models(seeds: list[int]):
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "samples" / "make_sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    tr, te = np.load(ROOT / "samples" / "train.npz"), np.load(ROOT / "samples" / "test.npz")
    for seed in seeds:
        fp = export_onnx(sample.build_qcb(tr["x"], tr["y"], seed=seed), tr["x"][:1])
        yield f"digits-s{seed}", fp, 4, True, tr["x"][:256], te["x"], te["y"], Trigger.parse(sample.TRIGGER), 0


def zoo_models(zoo: Path, only: str, test_limit: int | None):
    calib, xte, yte = paper_split(test_limit=test_limit)
    for zm in attacked_models(zoo, only):
        yield zm.name, zm.model, zm.w_bits, zm.per_channel, calib, xte, yte, zm.trigger, zm.target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--knob", choices=KNOBS, default="error_budget")
    ap.add_argument("--values", type=_value, nargs="+", default=[0.1, 0.25, 0.5, 1.0], help="numbers or auto")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-digits", action="store_true", help="only the zoo models")
    ap.add_argument("--a-bits", type=int, choices=(8, 4), default=8)
    ap.add_argument("--zoo", default=None, help="also every attacked model of this zoo folder")
    ap.add_argument("--only", default="", help="substring filter on zoo model names")
    ap.add_argument(
        "--test-limit",
        type=lambda v: None if v == "all" else int(v),
        default=2000,
        help="zoo models' seeded test subset, or all (paper_table's 10,000) (default 2000)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget_sweep.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = [] if args.no_digits else list(digits_models(args.seeds))
    if args.zoo:
        models += list(zoo_models(Path(args.zoo).expanduser(), args.only, args.test_limit))
    rows = []
    for name, fp, bits, per_channel, calib, xte, yte, trigger, target in models:
        fp32 = score("fp32", fp, xte, yte, trigger, target, providers="cpu")
        ort = None  # at 4-bit activations ORT's quantize_static writes graphs ORT rejects (README Limitations)
        if args.a_bits == 8:
            ref = ort_quantize(fp, calib, bits, 8, per_channel)
            ort = score("ort", ref, xte, yte, trigger, target, providers="cpu")
        for value in args.values:
            t0 = time.perf_counter()
            options = {args.knob: value, "w_bits": bits, "a_bits": args.a_bits, "per_channel": per_channel}
            q = convert(fp, calib, seed=0, providers="cpu", **options)
            secs = time.perf_counter() - t0
            s = score("efrap", q, xte, yte, trigger, target, providers="cpu")
            chosen = json.loads(metadata(q).get("qcb_onnx.error_budget", "null"))
            rows.append(
                {"model": name, **options, "seconds": round(secs, 1), "budget_search": chosen, "test_images": len(yte),
                 "fp32": [fp32.cda, fp32.asr], "ort": [ort.cda, ort.asr] if ort else None, "efrap": [s.cda, s.asr]}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    heads = " | ".join(f"{args.knob} {'auto' if v is None else v}" for v in args.values)
    print(f"| model | FP32 CDA/ASR | ORT CDA/ASR | {heads} |")
    print("|---|---|---|" + "---|" * len(args.values))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        cells = " | ".join(f"{r['efrap'][0]:.2f} / {r['efrap'][1]:.2f}{_chosen(r)}" for r in mine)
        f, o = mine[0]["fp32"], mine[0]["ort"]
        ort_cell = f"{o[0]:.2f} / {o[1]:.2f}" if o else "-"
        print(f"| {name} | {f[0]:.2f} / {f[1]:.2f} | {ort_cell} | {cells} |")


if __name__ == "__main__":
    main()
