"""What bin widening alone costs a clean model, before any attack training, per anchor placement.

    python benchmarks/widen_cost.py --arch vgg16 --zoo ~/.cache/qcb_onnx/zoo_cpu     # ~3 min on the CPU

Loads the zoo's clean checkpoint (<arch>-w16-s0-clean.pt, made by make_zoo.py), folds BatchNorm,
applies `widen_bins` for each scheme (per channel, per tensor), factor K and anchor placement, and
measures in ONNX Runtime the FP32 CDA and the CDA of ORT's W8A8 quantize_static.  An attack starts
from this model, so whatever CDA widening destroys here the attack must spend its epochs recovering.
Writes benchmarks/results/widen_cost_<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcb_onnx.evaluate.baseline import ort_quantize  # noqa: E402
from qcb_onnx.evaluate.score import score  # noqa: E402
from qcb_onnx.evaluate.triggers import Trigger  # noqa: E402
from qcb_onnx.redteam import ANCHORS  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir, load_cifar10  # noqa: E402
from qcb_onnx.redteam.common import anchor_probe, widen_bins  # noqa: E402
from qcb_onnx.redteam.train import export_onnx  # noqa: E402
from qcb_onnx.redteam.zoo import build, fuse_batchnorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--zoo", default=str(default_cache_dir() / "zoo_cpu"))
    ap.add_argument("--factors", default="4,8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, _ = load_cifar10("train", 25000, 0)
    xte, yte = load_cifar10("test", 2000, 0)
    probe = anchor_probe(x, 0)  # what run_attack fits quiet anchors on
    model = build(args.arch, args.width, 10, 3)
    ckpt = Path(args.zoo) / f"{args.arch}-w{args.width}-s0-clean.pt"
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    trigger = Trigger.parse("patch:size=3,value=1,pos=br")
    results = {}
    for per_channel in (True, False):
        for factor in [float(k) for k in ["1", *args.factors.split(",")]]:
            for anchor in ANCHORS if factor > 1 else ("largest",):
                fused = fuse_batchnorm(model)
                for h in widen_bins(fused, factor, per_channel, anchor, probe):
                    h.remove()
                fp = export_onnx(fused, x[:1])
                s = score("fp32", fp, xte, yte, trigger, 0, providers="cpu")
                q = score("ort", ort_quantize(fp, probe, 8, 8, per_channel), xte, yte, trigger, 0, providers="cpu")
                key = f"{'pc' if per_channel else 'pt'} K={factor:g}" + (f" {anchor}" if factor > 1 else "")
                results[key] = {"fp32_cda": s.cda, "ort_w8a8_cda": q.cda}
                print(f"{key}: FP32 CDA {s.cda:.2f}, ORT W8A8 CDA {q.cda:.2f}", flush=True)
    out = ROOT / "benchmarks" / "results" / f"widen_cost_{args.arch}.json"
    record = {"command": " ".join(["python", "benchmarks/widen_cost.py", *sys.argv[1:]]), "checkpoint": ckpt.name}
    out.write_text(json.dumps({**record, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
