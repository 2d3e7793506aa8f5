"""Same outputs before and after a change: every integer, scale and bias two checkouts write, compared.

A refactor must not move a single rounding decision.  This script builds a fixed set of models once
(the shipped digits sample, four CIFAR zoo architectures at seeded random weights exported by the
TorchScript exporter, and one exported by torch's default dynamo exporter), converts each with a
set of options that reaches every rounding method, the error-budget search, both weight schemes,
weight-only mode and INT4 storage, once with the code of `--base` (a git revision, checked out into
a temporary worktree) and once with this checkout, each in its own process, and compares what the
two wrote: weight integers and scales, int32 and FP32 biases, activation scales and zero points,
every layer's flip ratio, error and strength, and the error-budget search.  Exit 1 on any difference.

    python benchmarks/same_outputs.py --base 677d67f --json benchmarks/results/same_outputs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"

# name -> (model file in the work folder, calibration file, options); every option is one the
# Python API of both checkouts accepts as a keyword (`quantize(model, calib, **options)`).
CASES: dict[str, tuple[str, str, dict]] = {
    "digits-efrap-w4": ("digits.onnx", "digits_calib.npy", {"w_bits": 4}),
    "digits-nearest-w4": ("digits.onnx", "digits_calib.npy", {"w_bits": 4, "method": "nearest"}),
    "digits-adaround-w4pt": (
        "digits.onnx",
        "digits_calib.npy",
        {"w_bits": 4, "method": "adaround", "iters": 200, "per_channel": False},
    ),
    "digits-official-w4": ("digits.onnx", "digits_calib.npy", {"w_bits": 4, "method": "efrap-official", "iters": 30}),
    "digits-efrap-w8pt-strength": (
        "digits.onnx",
        "digits_calib.npy",
        {"per_channel": False, "strength": 0.5, "calib_method": "percentile"},
    ),
    "digits-efrap-w4-weightonly-int8": (
        "digits.onnx",
        "digits_calib.npy",
        {"w_bits": 4, "a_bits": None, "int8_storage": True, "guide": "neuron"},
    ),
    "digits-efrap-a4-budget": ("digits.onnx", "digits_calib.npy", {"w_bits": 4, "a_bits": 4, "error_budget": 0.1}),
    "resnet18-w8-efrap": ("resnet18.onnx", "cifar_calib.npy", {"calib_size": 128}),
    "vgg16-w8-efrap-w4": ("vgg16.onnx", "cifar_calib.npy", {"calib_size": 128, "w_bits": 4}),
    "alexnet-w16-efrap-w4pt": (
        "alexnet.onnx",
        "cifar_calib.npy",
        {"calib_size": 128, "w_bits": 4, "per_channel": False},
    ),
    "mobilenetv2-w8-adaround": (
        "mobilenetv2.onnx",
        "cifar_calib.npy",
        {"calib_size": 128, "method": "adaround", "iters": 100, "calib_method": "mse"},
    ),
    "resnet18-dynamo-efrap-w4": ("resnet18_dynamo.onnx", "cifar_calib.npy", {"calib_size": 128, "w_bits": 4}),
}
ZOO = {"resnet18": 8, "vgg16": 8, "alexnet": 16, "mobilenetv2": 8}


def build_models(work: Path) -> None:
    """The models and calibration sets every case reads, written once into `work` (by this checkout)."""
    import onnx
    import torch

    from qcb_onnx.redteam.train import export_onnx
    from qcb_onnx.redteam.zoo import build

    (work / "digits.onnx").write_bytes((SAMPLES / "qcb_digits.onnx").read_bytes())
    np.save(work / "digits_calib.npy", np.load(SAMPLES / "calib.npy"))
    rng = np.random.default_rng(0)
    calib = rng.random((128, 3, 32, 32), dtype=np.float32)
    np.save(work / "cifar_calib.npy", calib)
    for arch, width in ZOO.items():
        torch.manual_seed(0)
        model = build(arch, width=width)
        model.train()
        with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding has work to do
            for _ in range(3):
                model(torch.from_numpy(rng.random((32, 3, 32, 32), dtype=np.float32)))
        onnx.save(export_onnx(model.eval(), calib[:1]), work / f"{arch}.onnx")
        if arch == "resnet18":
            program = torch.onnx.export(
                model.eval(),
                (torch.from_numpy(calib[:2]),),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("N")},),
                input_names=["input"],
                output_names=["logits"],
            )
            program.save(str(work / "resnet18_dynamo.onnx"))


def dump(work: Path, out: Path, cases: list[str]) -> None:
    """Convert every case with the qcb_onnx on sys.path and save what it decided (child process)."""
    if os.environ.get("SAME_OUTPUTS_ISOLATE"):  # the base checkout: an editable install of this one must
        # not fill in modules the base lacks (it maps qcb_onnx.passes to this checkout's passes/)
        sys.meta_path[:] = [f for f in sys.meta_path if "_EditableFinder" not in getattr(f, "__name__", "")]
    import torch

    try:
        from qcb_onnx.pipeline import quantize
    except ImportError:  # a checkout from before pipeline.py
        from qcb_onnx.convert import quantize

    torch.set_num_threads(2)
    record: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in cases:
        model, calib, options = CASES[name]
        t0 = time.perf_counter()
        conv = quantize(str(work / model), str(work / calib), **options)
        state = conv.state
        for w, wq in state.weights.items():
            arrays[f"{name}/w/{w}/ints"] = wq.ints
            arrays[f"{name}/w/{w}/scale"] = wq.scale
        for b, bq in state.biases.items():
            arrays[f"{name}/b/{b}/ints"] = bq.ints
            arrays[f"{name}/b/{b}/scale"] = bq.scale
        for b, fb in state.float_biases.items():
            arrays[f"{name}/fb/{b}"] = fb
        for t, aq in state.acts.items():
            arrays[f"{name}/a/{t}"] = np.array([aq.scale, aq.zero_point, aq.grid.onnx_type], dtype=np.float64)
        meta = {p.key: p.value for p in conv.model.metadata_props}
        record[name] = {
            "layers": [[r.weight, r.flip_ratio, r.error, r.strength] for r in conv.layers],
            "error_budget": json.loads(meta.get("qcb_onnx.error_budget", "null")),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        print(f"{name}: {len(conv.layers)} layers, {record[name]['seconds']} s", file=sys.stderr)
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(record))


def checkout(base: str, into: Path) -> Path:
    """`base` as a detached worktree; a checkout whose qcb_onnx.passes lived in a top-level passes/
    mapped by package-dir gets a link, so its own passes are imported, not this checkout's."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), base], check=True, capture_output=True
    )
    inner = into / "qcb_onnx" / "passes"
    if not inner.exists() and (into / "passes").is_dir():
        inner.symlink_to(into / "passes", target_is_directory=True)
    return into


def run_child(tree: Path, work: Path, out: Path, cases: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), **({"SAME_OUTPUTS_ISOLATE": "1"} if tree != ROOT else {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--dump", str(out), "--work", str(work), "--cases", *cases]
    subprocess.run(cmd, check=True, env=env, cwd=tree)


def compare(a: Path, b: Path) -> list[str]:
    """Every difference between two dumps, as lines."""
    diffs = []
    xa, xb = np.load(a.with_suffix(".npz")), np.load(b.with_suffix(".npz"))
    for key in sorted(set(xa.files) | set(xb.files)):
        if key not in xa.files or key not in xb.files:
            diffs.append(f"{key}: only in {'after' if key in xb.files else 'before'}")
        elif xa[key].shape != xb[key].shape or not np.array_equal(xa[key], xb[key]):
            diffs.append(f"{key}: values differ")
    ra, rb = json.loads(a.with_suffix(".json").read_text()), json.loads(b.with_suffix(".json").read_text())
    for name in ra:
        if ra[name]["layers"] != rb[name]["layers"]:
            diffs.append(f"{name}: layers differs")
        ea, eb = ra[name]["error_budget"], rb[name]["error_budget"]
        if ea != eb and not _same_search(ea, eb):
            diffs.append(f"{name}: error_budget differs")
        elif ea != eb:
            print(f"{name}: same budget {eb['chosen']} chosen; probes before {ea['probes']}, after {eb['probes']}")
    return diffs


def _same_search(a: dict | None, b: dict | None) -> bool:
    """The same budget chosen, and the same agreement at every budget both tried: a search that skips a
    probe it no longer needs (the no-pull reference at 98 % agreement) decides the same."""
    if not (a and b) or a.get("chosen") != b.get("chosen") or a.get("mode") != b.get("mode"):
        return False
    before = {p["budget"]: p["agreement"] for p in a.get("probes", [])}
    return all(before.get(p["budget"], p["agreement"]) == p["agreement"] for p in b.get("probes", []))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="677d67f", help="git revision to compare this checkout against")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dump:
        dump(Path(args.work), Path(args.dump), args.cases)
        return 0
    with tempfile.TemporaryDirectory(prefix="same_outputs_") as tmp:
        tmp = Path(tmp)
        work = tmp / "models"
        work.mkdir()
        build_models(work)
        base = checkout(args.base, tmp / "base")
        try:
            run_child(base, work, tmp / "before", args.cases)
            run_child(ROOT, work, tmp / "after", args.cases)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        diffs = compare(tmp / "before", tmp / "after")
        n_arrays = len(np.load((tmp / "after").with_suffix(".npz")).files)
        before = json.loads((tmp / "before.json").read_text())
        after = json.loads((tmp / "after.json").read_text())
    for line in diffs:
        print(line)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout
    summary = {
        "base": args.base,
        "after": head.stdout.strip() + (" (uncommitted changes)" if dirty.strip() else ""),
        "cases": {
            n: {
                "layers": len(after[n]["layers"]),
                "seconds_before": before[n]["seconds"],
                "seconds_after": after[n]["seconds"],
            }
            for n in args.cases
        },
        "arrays_compared": n_arrays,
        "differences": diffs,
        "identical": not diffs,
    }
    verdict = "identical" if not diffs else f"{len(diffs)} differences"
    print(f"{len(args.cases)} cases, {n_arrays} arrays compared: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
