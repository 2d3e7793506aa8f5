"""Scale: torchvision ResNet-50 at 224x224, W8A8, 1,024 calibration images, on this CPU.

Wall time and peak RSS of `python -m qcb_onnx convert` (EFRAP, defaults) and of ORT's own
`quantize_static` on the same model and images, each in its own process under /usr/bin/time -v
(random weights and seeded random images: time and memory do not depend on the values).

    python benchmarks/resnet50_scale.py --json benchmarks/results/resnet50_scale.json
    python benchmarks/resnet50_scale.py --error-budget 0.25 --json benchmarks/results/resnet50_scale_budget025.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import export  # noqa: E402

ORT_CHILD = """
import sys, numpy as np, onnx
from qcb_onnx.evaluate.baseline import ort_quantize
model, calib = onnx.load(sys.argv[1]), np.load(sys.argv[2], mmap_mode="r")
onnx.save(ort_quantize(model, np.asarray(calib), 8, 8, True), sys.argv[3])
"""


def timed(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-30:]}
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": round(3600 * h + 60 * m + s, 1), "peak_rss_mib": round(rss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--error-budget", default=None, help="passed to convert (default: its auto search)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcb_r50_") as tmp:
        tmp = Path(tmp)
        model, calib = tmp / "resnet50.onnx", tmp / "calib.npy"
        export("resnet50", "torchscript", 224, model)
        rng = np.random.default_rng(0)
        np.save(calib, rng.random((args.calib_size, 3, 224, 224), dtype=np.float32))
        out = str(tmp / "efrap.onnx")
        cli = ["-m", "qcb_onnx", "convert", str(model), "--calib", str(calib), "--out", out, "--calib-size"]
        budget = [] if args.error_budget is None else ["--error-budget", args.error_budget]
        ours = timed([sys.executable, *cli, str(args.calib_size), "--providers", "cpu", "--quiet", *budget])
        if Path(out).exists():  # what the search tried and how many samples the layer loop rounded on
            meta = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
            ours["error_budget"] = json.loads(meta.get("qcb_onnx.error_budget", "null"))
            ours["rounding_samples"] = int(meta.get("qcb_onnx.rounding_samples", args.calib_size))
        ort = timed([sys.executable, "-c", ORT_CHILD, str(model), str(calib), str(tmp / "ort.onnx")])
    result = {
        "command": "python benchmarks/resnet50_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "calibration_images": args.calib_size,
        "error_budget": args.error_budget or "auto",
        "qcb_onnx_efrap": ours,
        "ort_quantize_static": ort,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
