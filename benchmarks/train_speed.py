"""How fast each zoo architecture trains here: the number that decides which zoo fits a session.

    python benchmarks/train_speed.py [--archs resnet18:16 vgg16:16 alexnet:32 mobilenetv2:16] [--steps 10]

Plain SGD steps (forward, cross-entropy, backward, update) on batches of 128 random 3x32x32 images
with torch's CPU threads set by --threads; two warm-up steps, then --steps timed ones.  No data
loading or augmentation, so real epochs are somewhat slower; the attacks' fake-quantized passes
slower still.  Writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcb_onnx.redteam.zoo import build  # noqa: E402


def images_per_second(arch: str, width: int, steps: int, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = build(arch, width).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["resnet18:16", "vgg16:16", "alexnet:32", "mobilenetv2:16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | images/s | minutes per 25,000-image epoch |\n|---|---:|---:|")
    for spec in args.archs:
        arch, width = spec.split(":")
        ips = images_per_second(arch, int(width), args.steps)
        minutes = 25000 / ips / 60
        rows.append({"arch": arch, "width": int(width), "images_per_s": round(ips), "epoch_25k_min": round(minutes, 2)})
        print(f"| {arch} w{width} | {ips:,.0f} | {minutes:.1f} |", flush=True)
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    Path(args.out).write_text(json.dumps({"machine": machine, "batch": 128, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
