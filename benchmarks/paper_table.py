"""The EFRAP paper's main table, measured in ONNX Runtime, for every QCB model of a zoo folder.

    python benchmarks/make_zoo.py ...                       # builds the zoo (see its docstring)
    python benchmarks/paper_table.py --zoo ~/.cache/qcb_onnx/zoo [--methods nearest,adaround,efrap]

For each attacked FP32 model (metadata qcb_onnx.attack names the attack, bits and scheme) this
measures, on the whole CIFAR-10 test split (10,000 images, as the paper; a seeded 2,000-image subset,
`--test-limit 2000`, leaves about +-0.7 points of sampling noise on a CDA difference of models that
disagree on ~10 % of images, the size of the 1-point bar), CDA and ASR of: the FP32 model, ORT's quantize_static with
the scheme the attack targeted (W{bits}A8, MinMax), and qcb-onnx `convert` with each method at
its defaults.  Every cell is also written as JSON under benchmarks/results/paper_table/, with the
wall time of each step, and the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo_data import attacked_models, paper_split  # noqa: E402

from qcb_onnx import convert  # noqa: E402
from qcb_onnx.config import default_headroom  # noqa: E402
from qcb_onnx.evaluate.baseline import ort_quantize  # noqa: E402
from qcb_onnx.evaluate.score import score  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # official README reproduction (weights only, activations FP32): FP32, standard, EFRAP as CDA/ASR
    ("compartifact", 8): ("91.36/1.26", "88.94/99.90", "91.37/1.12"),
    ("compartifact", 4): ("93.44/0.52", "89.53/99.68", "92.66/0.56"),
    ("quanti", 8): ("93.30/2.18", "91.80/99.09", "93.35/1.04"),
    ("quanti", 4): ("93.30/2.18", "88.28/100.0", "92.97/0.58"),
    ("pqbackdoor", 8): ("86.59/2.14", "86.03/99.13", "86.53/2.07"),
    ("pqbackdoor", 4): ("86.59/2.14", "79.13/98.88", "86.28/1.29"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(default_cache_dir() / "zoo"))
    ap.add_argument("--methods", default="nearest,adaround,efrap")
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--test-limit", type=int, default=None, help="seeded test subset (default: all 10,000)")
    ap.add_argument("--a-bits", default="8")
    ap.add_argument("--only", default="", help="substring filter on model names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_table"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib, xte, yte = paper_split(args.calib_size, args.test_limit)
    a_bits = None if args.a_bits == "none" else int(args.a_bits)
    rows = []
    for zm in attacked_models(Path(args.zoo), args.only):
        fp, attack, bits, per_channel = zm.model, zm.attack, zm.w_bits, zm.per_channel
        trigger, target = zm.trigger, zm.target
        cells = {}
        cells["fp32"] = (score("fp32", fp, xte, yte, trigger, target, providers="cpu"), 0.0)
        t = time.perf_counter()
        ref = ort_quantize(fp, calib, bits, a_bits or 8, per_channel)
        cells["ort"] = (score("ort", ref, xte, yte, trigger, target, providers="cpu"), time.perf_counter() - t)
        for method in args.methods.split(","):
            t = time.perf_counter()
            q = convert(
                fp, calib, method=method, w_bits=bits, a_bits=a_bits, per_channel=per_channel, providers="cpu", seed=0
            )
            secs = time.perf_counter() - t
            cells[method] = (score(method, q, xte, yte, trigger, target, providers="cpu"), secs)
        record = {
            "model": zm.name,
            "attack": attack["name"],
            "w_bits": bits,
            "a_bits": args.a_bits,
            "act_headroom": default_headroom(a_bits),  # our methods' (convert's default); ORT's ranges are its own
            "per_channel": per_channel,
            "arch": attack.get("arch"),
            "width": attack.get("width"),
            "recipe": {k: attack[k] for k in ("epochs", "lr", "widen", "anchor") if k in attack},
            "calib_size": args.calib_size,
            "test_images": len(yte),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cells": {k: {"cda": s.cda, "asr": s.asr, "seconds": round(sec, 1)} for k, (s, sec) in cells.items()},
        }
        (out / f"{zm.name}-a{args.a_bits}.json").write_text(json.dumps(record, indent=1))
        rows.append(record)
        print(json.dumps(record["cells"]), zm.name, flush=True)
    methods = ["fp32", "ort", *args.methods.split(",")]
    print(f"\n| model | bits | {' | '.join(methods)} | paper FP32 / standard / EFRAP |")
    print("|---|---|" + "---|" * len(methods) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['cells'][m]['cda']:.2f} / {r['cells'][m]['asr']:.2f}" for m in methods)
        paper = " ; ".join(PAPER.get((r["attack"], r["w_bits"]), ("-",)))
        print(f"| {r['model']} | W{r['w_bits']}A{r['a_bits']} | {cells} | {paper} |")
    times = " | ".join(f"{m}: {np.mean([r['cells'][m]['seconds'] for r in rows]):.0f} s" for m in methods[1:])
    print(f"\nmean wall time per model ({rows[0]['threads'] if rows else '?'} threads): {times}")


if __name__ == "__main__":
    main()
