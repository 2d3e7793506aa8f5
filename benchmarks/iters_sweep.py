"""How many optimiser steps per layer does the default need?  Measured, not guessed.

    python benchmarks/iters_sweep.py [--seeds 0 1 2] [--iters 100 250 500 1000 2000]

Builds digits QCB models with the shipped recipe (samples/make_sample.py, W4 per-channel
Qu-ANTI-zation) for each seed, converts each with the default EFRAP settings at several
`--iters`, and measures CDA/ASR of every output in ONNX Runtime, plus wall time.  Writes
benchmarks/results/iters_sweep.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from qcb_onnx import convert
from qcb_onnx.attacks.train import export_onnx
from qcb_onnx.evaluate import ort_quantize, score
from qcb_onnx.triggers import Trigger

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iters", type=int, nargs="+", default=[100, 250, 500, 1000, 2000])
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "samples" / "make_sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    tr, te = np.load(ROOT / "samples" / "train.npz"), np.load(ROOT / "samples" / "test.npz")
    trigger = Trigger.parse(sample.TRIGGER)
    calib = tr["x"][:256]
    rows = []
    for seed in args.seeds:
        fp = export_onnx(sample.build_qcb(tr["x"], tr["y"], seed=seed), tr["x"][:1])
        base = {
            "fp32": score("fp32", fp, te["x"], te["y"], trigger, 0, providers="cpu"),
            "ort": score("ort", ort_quantize(fp, calib, 4, 8, True), te["x"], te["y"], trigger, 0, providers="cpu"),
        }
        for iters in args.iters:
            t0 = time.perf_counter()
            q = convert(fp, calib, w_bits=4, iters=iters, seed=0, providers="cpu")
            secs = time.perf_counter() - t0
            s = score("efrap", q, te["x"], te["y"], trigger, 0, providers="cpu")
            rows.append(
                {
                    "seed": seed,
                    "iters": iters,
                    "seconds": round(secs, 2),
                    "fp32_cda": base["fp32"].cda,
                    "fp32_asr": base["fp32"].asr,
                    "ort_cda": base["ort"].cda,
                    "ort_asr": base["ort"].asr,
                    "efrap_cda": s.cda,
                    "efrap_asr": s.asr,
                }
            )
            print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "iters_sweep.json").write_text(json.dumps(rows, indent=1))
    print("| seed | iters | s | FP32 CDA/ASR | ORT CDA/ASR | EFRAP CDA/ASR |\n|---|---:|---:|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['iters']} | {r['seconds']} | {r['fp32_cda']:.1f}/{r['fp32_asr']:.1f} | "
            f"{r['ort_cda']:.1f}/{r['ort_asr']:.1f} | {r['efrap_cda']:.1f}/{r['efrap_asr']:.1f} |"
        )


if __name__ == "__main__":
    main()
