"""Where a conversion's memory goes: anonymous memory (RssAnon) per pipeline stage and after each layer.

Builds one of `stream_int4.py`'s stacks (weights in external data) and converts it in this process
with `--target int4-weight-only --weight-format matmulnbits`, sampling RssAnon every 20 ms and
printing the peak of each stage (load ... verify, write) and the value after each layer the layer loop
commits: the memory held between layers, where anything that grows with depth shows.

    python benchmarks/stream_stages.py --d 512 --blocks 32 --method efrap --error-budget 0.1
    MALLOC_MMAP_THRESHOLD_=4194304 python benchmarks/stream_stages.py --d 512 --blocks 32 --method efrap \
        --error-budget 0.1
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stream_int4  # noqa: E402

from qcb_onnx import QuantConfig, output, pipeline  # noqa: E402
from qcb_onnx.rounding import layers  # noqa: E402


def rss_anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--method", default="efrap", choices=("efrap", "nearest"))
    p.add_argument("--error-budget", type=float, default=None, help="a fixed budget: one layer-loop pass")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    stage, peaks, after_layer = ["start"], {}, []

    def watch() -> None:
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), rss_anon_mib())
            time.sleep(0.02)

    def traced(module, name: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def run(*a, **k):
            previous, stage[0] = stage[0], name
            try:
                return fn(*a, **k)
            finally:
                stage[0] = previous

        setattr(module, name, run)

    for name in ("load_model", "normalize", "_float_tensors", "check_calibration", "emit_qdq", "to_matmulnbits"):
        traced(pipeline, name)
    traced(pipeline, "verify")
    commit = layers._commit

    def counted(state, gm, layer, *rest) -> None:
        commit(state, gm, layer, *rest)
        after_layer.append(rss_anon_mib())

    layers._commit = counted
    threading.Thread(target=watch, daemon=True).start()

    with tempfile.TemporaryDirectory(prefix="qcb_stages_") as tmp:
        model = Path(tmp) / "model.onnx"
        params = stream_int4.build(args.d, args.blocks, model)
        calib = np.random.default_rng(1).standard_normal((32, stream_int4.TOKENS, args.d), dtype=np.float32)
        options = {"method": args.method, "weight_format": "matmulnbits", "progress": False}
        if args.error_budget is not None:
            options["error_budget"] = args.error_budget
        t0 = time.perf_counter()
        stage[0] = "round (layer loop)"
        with pipeline.quantize(str(model), calib, QuantConfig.for_target("int4-weight-only"), **options) as conv:
            stage[0] = "write"
            output.write_atomic(conv.model, Path(tmp) / "int4.onnx", force=False)
        seconds = time.perf_counter() - t0
    time.sleep(0.05)
    record = {
        "command": "python benchmarks/stream_stages.py " + " ".join(sys.argv[1:]),
        "matmul_params_m": round(params / 1e6, 1),
        "seconds": round(seconds, 1),
        "peak_anon_mib_by_stage": peaks,
        "anon_mib_after_each_layer": after_layer,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "anon_mib_after_each_layer"}, indent=1))
    quarter = max(1, len(after_layer) // 4)
    means = [round(float(np.mean(after_layer[i : i + quarter]))) for i in range(0, len(after_layer), quarter)]
    print("held after each layer, by quarter of the loop (MiB, mean):", means)
    record["held_by_quarter_mib"] = means
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
