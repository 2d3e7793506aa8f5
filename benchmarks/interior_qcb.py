"""Issue 22's interior QCB, first measurement: PQBackdoor with every weight held inside its rounding bin.

On the test suite's digits SmallCNN (width 16, clean 30 epochs, seeds 0 and 1), PQBackdoor against ORT's
W4 per-channel quantize_static with the test recipe, at `interior` 0 (the published attack), 0.25 and 0.4
(weights at least that far, in units of the scale, from either rounding boundary through stage 2); each
model measured in ORT: FP32, ORT quantize_static, qcb-onnx nearest at ORT's activation grids
(`--act-headroom 1`) and at our default 2x headroom, AdaRound and EFRAP (defaults), CDA / ASR in % on
the 500 test digits.

    python benchmarks/interior_qcb.py --json benchmarks/results/interior_qcb.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcb_onnx import convert  # noqa: E402
from qcb_onnx.evaluate.baseline import ort_quantize  # noqa: E402
from qcb_onnx.evaluate.score import score  # noqa: E402
from qcb_onnx.evaluate.triggers import Trigger  # noqa: E402
from qcb_onnx.redteam import run_attack  # noqa: E402
from qcb_onnx.redteam.train import Training, export_onnx, train_clean  # noqa: E402
from qcb_onnx.redteam.zoo import SmallCNN  # noqa: E402

TRIGGER, TARGET = Trigger.parse("patch:size=2,value=1,pos=br"), 0
RECIPE = dict(epochs=20, stage1_epochs=20, poison_ratio=0.2)  # tests/test_attacks.py's PQBackdoor recipe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interiors", default="0,0.25,0.4")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    tr, te = np.load(ROOT / "samples" / "train.npz"), np.load(ROOT / "samples" / "test.npz")
    xtr, ytr, xte, yte = tr["x"], tr["y"], te["x"], te["y"]
    rows = []
    for seed in map(int, args.seeds.split(",")):
        torch.manual_seed(seed)
        clean = train_clean(SmallCNN(1, 10, 16), xtr, ytr, Training(epochs=30, lr=2e-3, seed=seed))
        for interior in map(float, args.interiors.split(",")):
            attacked = run_attack(
                "pqbackdoor",
                copy.deepcopy(clean),
                xtr,
                ytr,
                TRIGGER,
                TARGET,
                w_bits=4,
                per_channel=True,
                seed=seed,
                interior=interior,
                **RECIPE,
            )
            fp = export_onnx(attacked, xtr[:1])
            models = {"fp32": fp, "ort": ort_quantize(fp, xtr[:256], 4, 8, True)}
            models["nearest"] = convert(fp, xtr[:256], w_bits=4, method="nearest", act_headroom=1.0, providers="cpu")
            models["nearest_headroom2"] = convert(fp, xtr[:256], w_bits=4, method="nearest", providers="cpu")
            for method in ("adaround", "efrap"):
                models[method] = convert(fp, xtr[:256], w_bits=4, method=method, providers="cpu")
            row = {"seed": seed, "interior": interior}
            for name, m in models.items():
                s = score(name, m, xte, yte, TRIGGER, TARGET, providers="cpu")
                row[name] = [s.cda, s.asr]
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        out = {"command": "python benchmarks/interior_qcb.py " + " ".join(sys.argv[1:]), "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
