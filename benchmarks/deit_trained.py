"""A trained DeiT-tiny at 224x224: does ORT agree with our simulation once the logits depend on the image?

With random weights deit_tiny's logits hardly depend on the input (BENCHMARKS.md §7), so the post-write
check (ORT vs simulation, top-1) fails on near-ties.  Nothing can be downloaded here, so this trains
timm's deit_tiny_patch16_224 (10 classes, same topology) on CIFAR-10 images upsampled to 224x224 for a
fixed number of steps on the CPU (AdamW, seeded; the state_dict is cached), then exports it with both
exporters and converts it with `--method nearest` and with EFRAP (defaults), and reports per case:
whether `convert` succeeds (its own post-write check included), seconds, and on held-out test images
ORT's top-1 agreement with our simulation (exact argmax, and with ties within one output step counted,
the check's rule), and top-1 accuracy of FP32 (ORT) and of the quantized model (ORT).

    python benchmarks/deit_trained.py --steps 300 --json benchmarks/results/deit_trained.json
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import build, export_module  # noqa: E402

from qcb_onnx import quantize  # noqa: E402
from qcb_onnx.errors import QcbError  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir, load_cifar10  # noqa: E402
from qcb_onnx.runtime import session  # noqa: E402
from qcb_onnx.verify import decision_agreement  # noqa: E402

SIZE = 224


def up(x: np.ndarray) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x), size=SIZE, mode="bilinear", align_corners=False).numpy()


def train(steps: int, batch: int, lr: float, seed: int, cache: Path) -> tuple[torch.nn.Module, dict]:
    model = build("deit_tiny_patch16_224", SIZE, num_classes=10)
    path = cache / f"deit_tiny_cifar224_s{seed}_{steps}x{batch}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), {"cached": str(path)}
    x, y = load_cifar10("train", limit=steps * batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen).numpy()
        xb = torch.from_numpy(up(x[idx]))
        flip = torch.rand(batch, generator=gen) < 0.5
        xb[flip] = xb[flip].flip(-1)
        loss = F.cross_entropy(model(xb), torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), {"train_seconds": round(time.perf_counter() - t0, 1), "saved": str(path)}


def run_ort(model, x: np.ndarray, batch: int) -> np.ndarray:
    sess = session(model, "cpu")
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--test", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=["nearest", "efrap"])
    p.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    p.add_argument("--cache", default=str(default_cache_dir() / "deit"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, trained = train(args.steps, args.batch, args.lr, args.seed, Path(args.cache))
    xc, _ = load_cifar10("train", limit=args.calib, seed=args.seed + 1)
    xt, yt = load_cifar10("test", limit=args.test, seed=args.seed)
    calib, test = up(xc), up(xt)
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(test)).argmax(1).numpy() == yt).mean())
    print("FP32 torch accuracy", torch_acc, flush=True)
    rows = []
    for exporter in args.exporters:
        path = Path(args.cache) / f"deit_{exporter}.onnx"
        export_module(model, exporter, SIZE, path)
        batch = 1 if exporter == "dynamo" else 32
        fp_acc = float((run_ort(str(path), test, batch).argmax(1) == yt).mean())
        for method in args.methods:
            row = {"exporter": exporter, "method": method, "fp32_accuracy": fp_acc}
            t0 = time.perf_counter()
            try:
                conv = quantize(str(path), calib, method=method, providers="cpu")
            except QcbError as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                row["seconds"] = round(time.perf_counter() - t0, 1)
                ort, sim = run_ort(conv.model, test, batch), conv.simulate(test)
                out_q = conv.state.acts.get(conv.graph.output_names[0])
                row["agreement_exact"] = float((ort.argmax(1) == sim.argmax(1)).mean())
                row["agreement_check_rule"] = decision_agreement(ort, sim, 0.0 if out_q is None else float(out_q.scale))
                row["quantized_accuracy"] = float((ort.argmax(1) == yt).mean())
                row["rel_l2_ort_vs_sim"] = float(np.linalg.norm(ort - sim) / np.linalg.norm(sim))
            print(row, flush=True)
            rows.append(row)
    if args.json:
        out = {
            "command": "python benchmarks/deit_trained.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, **trained},
            "fp32_torch_accuracy": torch_acc,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
