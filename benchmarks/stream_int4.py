"""Weights streamed from external data: int4 weight-only conversion of transformer stacks of growing size.

Builds a decoder-style stack (per block: LayerNormalization -> MatMul d x 4d -> Relu -> MatMul 4d x d ->
residual Add; a vocabulary MatMul at the end, so the output is (batch, tokens, vocabulary)) with seeded
random weights, saved the way exporters save big models (every weight in `model.onnx.data`), and runs
`python -m qcb_onnx convert --target int4-weight-only` on it in a child process.  Reports wall time,
peak RSS (VmHWM: file pages of the mapped weights included) and the peak of anonymous memory (RssAnon,
sampled every 50 ms: what the conversion holds itself and the OS cannot drop), next to the size of the
FP32 weights.  With `--limit-mib`, the child runs in a memory cgroup (v1, needs root) capped below the
model's size: a conversion that held the model in memory is killed there.

    python benchmarks/stream_int4.py --dims 1024 1024 2048 --blocks 2 8 8 --method nearest --limit-mib 1200 \
        --json benchmarks/results/stream_int4_nearest.json
    python benchmarks/stream_int4.py --dims 512 1024 --blocks 4 4 --json benchmarks/results/stream_int4_efrap.json

`--code DIR` runs another checkout's qcb_onnx (e.g. a git worktree of the commit before streaming).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
VOCAB, TOKENS = 256, 32
CGROUP = Path("/sys/fs/cgroup/memory")


def build(d: int, blocks: int, path: Path) -> int:
    """The stack with external data at `path`; returns its number of MatMul parameters."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    params = 0

    def weight(name: str, shape: tuple[int, int]) -> str:
        nonlocal params
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(shape[0]))
        inits.append(numpy_helper.from_array(w, name))
        params += w.size
        return name

    for i in range(blocks):
        inits += [
            numpy_helper.from_array(np.ones(d, np.float32), f"ln{i}.g"),
            numpy_helper.from_array(np.zeros(d, np.float32), f"ln{i}.b"),
        ]
        nodes += [
            helper.make_node("LayerNormalization", [x, f"ln{i}.g", f"ln{i}.b"], [f"n{i}"], name=f"ln{i}", axis=-1),
            helper.make_node("MatMul", [f"n{i}", weight(f"up{i}", (d, 4 * d))], [f"u{i}"], name=f"up{i}"),
            helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("MatMul", [f"r{i}", weight(f"down{i}", (4 * d, d))], [f"m{i}"], name=f"down{i}"),
            helper.make_node("Add", [x, f"m{i}"], [f"h{i}"], name=f"res{i}"),
        ]
        x = f"h{i}"
    nodes.append(helper.make_node("MatMul", [x, weight("head", (d, VOCAB))], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", TOKENS, d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TOKENS, VOCAB])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return params


def watch(pid: int, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith(("RssAnon:", "VmHWM:")):
                key, value = line.split(":")
                peak[key] = max(peak.get(key, 0), int(value.split()[0]))
        stop.wait(0.05)


def run(cmd: list[str], env: dict, limit_mib: int | None, cwd: str) -> dict:
    group = None
    if limit_mib:
        group = CGROUP / f"qcb_stream_{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_mib << 20))

    def enter() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=enter
    )
    peak: dict = {}
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(proc.pid, peak, stop))
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    record = {
        "seconds": round(time.perf_counter() - t0, 1),
        "returncode": proc.returncode,
        "peak_rss_mib": round(peak.get("VmHWM", 0) / 1024),
        "peak_anon_mib": round(peak.get("RssAnon", 0) / 1024),
    }
    if group is not None:
        record["cgroup_max_usage_mib"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 2**20)
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        record["oom_kills"] = int(oom.get("oom_kill", 0))
        group.rmdir()
    if proc.returncode != 0:
        record["error"] = (err.strip().splitlines() or [f"killed by signal {-proc.returncode}"])[-1][:300]
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 4])
    p.add_argument("--method", default="efrap", choices=("efrap", "nearest"))
    p.add_argument("--calib", type=int, default=32, help="calibration sequences")
    p.add_argument("--limit-mib", type=int, default=None, help="run each conversion in a memory cgroup this small")
    p.add_argument("--code", default=str(ROOT), help="the checkout whose qcb_onnx runs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": args.code, "OMP_NUM_THREADS": "2"}
    rows = []
    for d, blocks in zip(args.dims, args.blocks, strict=True):
        with tempfile.TemporaryDirectory(prefix="qcb_stream_") as tmp:
            tmp = Path(tmp)
            model = tmp / "model.onnx"
            params = build(d, blocks, model)
            calib = tmp / "calib.npy"
            np.save(calib, np.random.default_rng(1).standard_normal((args.calib, TOKENS, d), dtype=np.float32))
            cmd = [sys.executable, "-m", "qcb_onnx", "convert", str(model), "--calib", str(calib), "--out",
                   str(tmp / "int4.onnx"), "--target", "int4-weight-only", "--weight-format", "matmulnbits",
                   "--method", args.method, "--providers", "cpu", "--quiet"]  # fmt: skip
            record = {
                "d": d,
                "blocks": blocks,
                "matmul_params_m": round(params / 1e6, 1),
                "fp32_weights_mib": round((tmp / "model.onnx.data").stat().st_size / 2**20),
                **run(cmd, env, args.limit_mib, args.code),  # `-m` puts the working folder first on the path
            }
            if (tmp / "int4.onnx").exists():
                record["output_mib"] = round(sum(f.stat().st_size for f in tmp.glob("int4.onnx*")) / 2**20)
        print(record, flush=True)
        rows.append(record)
    if args.json:
        out = {
            "command": "python benchmarks/stream_int4.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "limit_mib": args.limit_mib,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
