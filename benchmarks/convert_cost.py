"""What a conversion costs: wall time and peak RSS of `convert`, against the official EFRAP schedule.

    python benchmarks/convert_cost.py cost      # models x schemes, fast EFRAP vs the official schedule
    python benchmarks/convert_cost.py cost --models resnet18:64 --official-steps 3 13 --json convert_cost_w64.json
    python benchmarks/convert_cost.py scaling   # time vs calibration-set size and vs model width (+ PNG)

Every measurement is one `python -m qcb_onnx convert ... --providers cpu` in a fresh process, timed
with a wall clock and its peak RSS (the process's own VmHWM), so model loading, calibration,
rounding, emitting and ORT verification are all included.  Models are the zoo's CIFAR-10
architectures with seeded random weights and BatchNorm folded (training changes neither their
layer shapes nor the number of optimisation runs, which is what the time depends on), calibration
images the first N of a seeded permutation of the CIFAR-10 training split (needs ../shared, see
qcb_onnx/cifar.py).

The official schedule (method efrap-official, 10,000 steps per layer) takes hours here, so it is
timed at two short step counts k1 < k2 in the same script and extrapolated linearly to 10,000:
T(10k) = T(k1) + (T(k2) - T(k1)) * (10000 - k1) / (k2 - k1).  The quality comparison of the two
modes on real QCB models is `paper_table.py --methods efrap,efrap-official`.

Results: benchmarks/results/convert_cost.json, convert_scaling.json and convert_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcb_onnx.redteam.cifar import load_cifar10  # noqa: E402
from qcb_onnx.redteam.train import export_onnx  # noqa: E402
from qcb_onnx.redteam.zoo import build, fuse_batchnorm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SCHEMES = {"w8a8": ("8", "8"), "w4a4": ("4", "4")}
OFFICIAL_STEPS = 10000
# The CLI in this process, reporting its own peak RSS (VmHWM belongs to the exec'd image; rusage's
# ru_maxrss would also count the parent's pages the child shared between fork and exec).
CHILD = (
    "import atexit, runpy, sys\n"
    "def hwm():\n"
    "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "    print('VmHWM', line.split()[1], file=sys.stderr)\n"
    "atexit.register(hwm)\n"
    "sys.argv = ['qcb_onnx', *sys.argv[1:]]\n"
    "runpy.run_module('qcb_onnx', run_name='__main__')\n"
)


def export(arch: str, width: int, folder: Path) -> Path:
    torch.manual_seed(0)
    model = fuse_batchnorm(build(arch, width).eval())
    path = folder / f"{arch}-w{width}.onnx"
    if not path.exists():
        path.write_bytes(export_onnx(model, torch.zeros(1, 3, 32, 32).numpy()).SerializeToString())
    return path


def calibration(n: int, folder: Path) -> Path:
    path = folder / f"calib{n}.npy"
    if not path.exists():
        x, _ = load_cifar10("train", None, 0)
        np.save(path, x[np.random.default_rng(0).permutation(len(x))[:n]])
    return path


def run_convert(model: Path, calib: Path, scheme: str, extra: list[str], threads: int) -> dict:
    """One conversion in a fresh process: wall seconds and peak RSS (MiB)."""
    w_bits, a_bits = SCHEMES[scheme]
    out = model.with_name(f"{model.stem}-{scheme}-out.onnx")
    argv = ["convert", str(model), "--calib", str(calib), "--out", str(out), "--w-bits", w_bits, "--a-bits", a_bits]
    argv += ["--providers", "cpu", "--quiet", "--force", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"convert failed ({' '.join(argv)}):\n{proc.stderr}")
    hwm_kib = int(proc.stderr.rsplit("VmHWM", 1)[1].split()[0])
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(hwm_kib / 1024)}


def machine(threads: int) -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"


def cost(args: argparse.Namespace, folder: Path) -> None:
    calib = calibration(args.calib_size, folder)
    k1, k2 = args.official_steps
    rows = []
    for spec in args.models:
        arch, width = spec.split(":")
        model = export(arch, int(width), folder)
        for scheme in args.schemes:
            fast = run_convert(model, calib, scheme, [], args.threads)
            t1 = run_convert(model, calib, scheme, ["--method", "efrap-official", "--iters", str(k1)], args.threads)
            t2 = run_convert(model, calib, scheme, ["--method", "efrap-official", "--iters", str(k2)], args.threads)
            official = t1["seconds"] + (t2["seconds"] - t1["seconds"]) * (OFFICIAL_STEPS - k1) / (k2 - k1)
            row = {
                "model": f"{arch} w{width}",
                "scheme": scheme.upper(),
                "efrap_s": fast["seconds"],
                "efrap_rss_mib": fast["peak_rss_mib"],
                "official_s_extrapolated": round(official),
                "official_rss_mib": t2["peak_rss_mib"],
                "official_measured": {str(k1): t1["seconds"], str(k2): t2["seconds"]},
                "speedup": round(official / fast["seconds"], 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"machine": machine(args.threads), "calib_size": args.calib_size, "rows": rows}
    (RESULTS / args.json).write_text(json.dumps(record, indent=1))
    print(f"\n{record['machine']}, {args.calib_size} calibration images\n")
    print(
        "| model | scheme | qcb-onnx efrap: s | peak RSS MiB | official schedule: s (extrapolated) | "
        "peak RSS MiB | official / ours |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['scheme']} | {r['efrap_s']} | {r['efrap_rss_mib']} | "
            f"{r['official_s_extrapolated']} | {r['official_rss_mib']} | {r['speedup']}x |"
        )


def scaling(args: argparse.Namespace, folder: Path) -> None:
    rows = []
    for n in args.calib_sizes:
        m = run_convert(export("resnet18", args.width, folder), calibration(n, folder), args.scheme, [], args.threads)
        rows.append({"vary": "calib", "calib_size": n, "width": args.width, **m})
        print(json.dumps(rows[-1]), flush=True)
    for width in args.widths:
        model = export("resnet18", width, folder)
        params = sum(p.numel() for p in build("resnet18", width).parameters())
        same = [r for r in rows if r["width"] == width and r["calib_size"] == args.calib_size]
        m = {k: same[0][k] for k in ("seconds", "peak_rss_mib")} if same else None  # measured above
        m = m or run_convert(model, calibration(args.calib_size, folder), args.scheme, [], args.threads)
        rows.append({"vary": "width", "calib_size": args.calib_size, "width": width, "params": params, **m})
        print(json.dumps(rows[-1]), flush=True)
    record = {"machine": machine(args.threads), "model": "resnet18", "scheme": args.scheme.upper(), "rows": rows}
    (RESULTS / "convert_scaling.json").write_text(json.dumps(record, indent=1))
    plot_scaling(record, RESULTS / "convert_scaling.png")
    print(f"\n{record['machine']}, ResNet-18 {record['scheme']}\n")
    print("| varied | calibration images | width | parameters | s | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['vary']} | {r['calib_size']} | {r['width']} | {r.get('params', '')} | {r['seconds']} | "
            f"{r['peak_rss_mib']} |"
        )


def plot_scaling(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calib = [r for r in record["rows"] if r["vary"] == "calib"]
    width = [r for r in record["rows"] if r["vary"] == "width"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot([r["calib_size"] for r in calib], [r["seconds"] for r in calib], "o-")
    a.set(xlabel="calibration images", ylabel="convert wall time (s)", title=f"ResNet-18 w{calib[0]['width']}")
    a.set_ylim(bottom=0)
    b.loglog([r["params"] for r in width], [r["seconds"] for r in width], "o-", label="measured")
    p0, t0 = width[0]["params"], width[0]["seconds"]
    b.loglog([r["params"] for r in width], [t0 * r["params"] / p0 for r in width], "--", label="linear in parameters")
    for r in width:
        b.annotate(f"w{r['width']}", (r["params"], r["seconds"]))
    b.set(xlabel="parameters", ylabel="convert wall time (s)", title="ResNet-18 by width")
    b.legend()
    fig.suptitle(f"qcb-onnx convert, EFRAP {record['scheme']} ({record['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--models", nargs="+", default=["smallcnn:16", "resnet18:16", "mobilenetv2:16"])
    c.add_argument("--schemes", nargs="+", default=["w8a8", "w4a4"], choices=list(SCHEMES))
    c.add_argument("--official-steps", type=int, nargs=2, default=[10, 310])
    c.add_argument("--calib-size", type=int, default=1024)
    c.add_argument("--json", default="convert_cost.json", help="result file name under benchmarks/results/")
    s = sub.add_parser("scaling")
    s.add_argument("--calib-sizes", type=int, nargs="+", default=[256, 512, 1024])
    s.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64])
    s.add_argument("--width", type=int, default=16, help="width of the calibration-size sweep")
    s.add_argument("--calib-size", type=int, default=1024, help="calibration size of the width sweep")
    s.add_argument("--scheme", default="w4a4", choices=list(SCHEMES))
    for p in (c, s):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--work", default=None, help="folder for models and calibration files (default: a temp dir)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.work or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (cost if args.what == "cost" else scaling)(args, folder)


if __name__ == "__main__":
    main()
