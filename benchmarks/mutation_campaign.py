"""A seeded mutation campaign against `python -m qcb_onnx convert`, as an attacker would run it.

Mutates the shipped digits sample (byte-level: bit flips anywhere, truncations, insertions, random
bytes in the first 2.5 KB where the graph structure lives; structured: ~40 kinds of edits made with
the onnx API) and its calibration set (~25 kinds of hostile arrays and files), converts each with
`--w-bits 4 --calib-size 64`, and records per case: the exit code, whether anything but one
`error:` line reached stderr (a traceback above all), whether the case hung (60 s), and what was
left in the output folder.  A mutated model that the ONNX checker accepts and ONNX Runtime runs to
finite outputs, yet `convert` rejects, is listed as "valid, rejected" with the reason, for review.

    python benchmarks/mutation_campaign.py --model-cases 520 --calib-cases 100 \
        --json benchmarks/results/mutation_campaign.json

Cases run in-process (`qcb_onnx.cli.main`) in `--workers` subprocesses, each case in its own
output folder; the seed fixes every mutation, so a case can be replayed by its id (`--only ID`).
`tests/test_mutation_campaign.py` runs a small slice of the same cases in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "qcb_digits.onnx"
CALIB = ROOT / "samples" / "calib.npy"
OPTIONS = ["--w-bits", "4", "--calib-size", "64", "--quiet", "--providers", "cpu"]
TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------------
# model mutations


def byte_mutation(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One of: flip 1-8 bits anywhere, flip bits in the first 2.5 KB, truncate, insert, overwrite."""
    buf = bytearray(data)
    kind = rng.choice(["flip", "flip-head", "truncate", "insert", "overwrite-head"])
    if kind in ("flip", "flip-head"):
        span = len(buf) if kind == "flip" else min(len(buf), 2560)
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(span))
            buf[pos] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(len(buf)))]
    elif kind == "insert":
        pos = int(rng.integers(len(buf)))
        buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:
        pos = int(rng.integers(min(len(buf), 2560)))
        n = int(rng.integers(1, 32))
        buf[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return str(kind), bytes(buf)


def _structured() -> dict[str, Callable]:
    """name -> edit(model, rng), each a plausible way a file is broken or made hostile."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(m, rng):
        return m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]

    def node(m, rng):
        return m.graph.node[int(rng.integers(len(m.graph.node)))]

    def set_values(t, values):
        t.CopyFrom(numpy_helper.from_array(np.asarray(values), t.name))

    def scale_weight(factor):
        def edit(m, rng):
            t = init(m, rng)
            v = numpy_helper.to_array(t).copy()
            v.flat[int(rng.integers(v.size))] = factor
            set_values(t, v.astype(np.float32))

        return edit

    def attr(name, value):
        def edit(m, rng):
            conv = [n for n in m.graph.node if n.op_type == "Conv"]
            n = conv[int(rng.integers(len(conv)))]
            kept = [a for a in n.attribute if a.name != name]
            del n.attribute[:]
            n.attribute.extend([*kept, helper.make_attribute(name, value)])

        return edit

    def static_batch(m, rng):
        for v in (*m.graph.input, *m.graph.output):
            v.type.tensor_type.shape.dim[0].dim_value = int(rng.integers(1, 3))

    def reshape_init(m, rng):
        t = init(m, rng)
        v = numpy_helper.to_array(t)
        shape = [(v.size,), (1, v.size), (*v.shape, 1), (1, *v.shape)][int(rng.integers(4))]
        set_values(t, v.reshape(shape))

    def wrong_dims(m, rng):
        t = init(m, rng)
        t.dims[0] = int(t.dims[0]) + int(rng.integers(1, 5))

    def negative_dims(m, rng):
        init(m, rng).dims[0] = -3

    def huge_dims(m, rng):
        init(m, rng).dims[0] = 2**40

    def dtype_of_init(m, rng):
        t = init(m, rng)
        t.data_type = int(rng.choice([TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT64]))

    def drop_node(m, rng):
        del m.graph.node[int(rng.integers(len(m.graph.node)))]

    def drop_init(m, rng):
        del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]

    def dup_output(m, rng):
        a, b = node(m, rng), node(m, rng)
        b.output[0] = a.output[0]

    def cycle(m, rng):
        first, last = m.graph.node[0], m.graph.node[-1]
        first.input.append(last.output[0])

    def self_loop(m, rng):
        n = node(m, rng)
        n.input.append(n.output[0])

    def undefined_input(m, rng):
        node(m, rng).input[0] = "ghost"

    def op_type(m, rng):
        node(m, rng).op_type = str(rng.choice(["NonZero", "Loop", "TopK", "Einsum", "Foo", "LSTM", "Mod"]))

    def domain(m, rng):
        node(m, rng).domain = str(rng.choice(["com.microsoft", "ai.onnx.ml", "evil.domain"]))

    def opset(m, rng):
        m.opset_import[0].version = int(rng.choice([1, 6, 10, 11, 21, 22, 99]))

    def no_opset(m, rng):
        del m.opset_import[:]

    def ir_version(m, rng):
        m.ir_version = int(rng.choice([0, 1, 3, 4, 11, 99]))

    def input_type(m, rng):
        m.graph.input[0].type.tensor_type.elem_type = int(rng.choice([TensorProto.INT64, TensorProto.DOUBLE, 0]))

    def input_rank(m, rng):
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if rng.random() < 0.5:
            del dims[-1]
        else:
            dims.add().dim_value = 1

    def inits_as_inputs(m, rng):
        m.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer
        )

    def output_is_init(m, rng):
        t = init(m, rng)
        m.graph.output.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))

    def output_is_input(m, rng):
        m.graph.output.append(m.graph.input[0])

    def only_output_init(m, rng):
        t = init(m, rng)
        del m.graph.output[:]
        m.graph.output.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))

    def no_outputs(m, rng):
        del m.graph.output[:]

    def external(m, rng):
        t = init(m, rng)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", str(rng.choice(["../../etc/passwd", "/etc/shadow", "x.bin"]))),
            ("length", "64"),
        ):
            e = t.external_data.add()
            e.key, e.value = key, value

    def string_weight(m, rng):
        t = init(m, rng)
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.STRING, [1], [b"x"]))

    def long_names(m, rng):
        n = node(m, rng)
        n.name = "n" * int(rng.integers(10_000, 100_000))

    def weird_names(m, rng):
        n = node(m, rng)
        n.name = "\n\x1b[31merror: fake\x00"

    def sparse(m, rng):
        t = m.graph.initializer.pop()
        values = numpy_helper.from_array(numpy_helper.to_array(t).reshape(-1)[:1], t.name)
        idx = numpy_helper.from_array(np.array([0], np.int64), "")
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, idx, list(t.dims)))

    def function_node(m, rng):
        f = helper.make_function(
            "local", "Fn", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 17)]
        )
        m.functions.append(f)
        n = node(m, rng)
        n.op_type, n.domain = "Fn", "local"
        m.opset_import.append(helper.make_opsetid("local", 1))

    def subgraph_attr(m, rng):
        g = helper.make_graph([], "g", [], [])
        node(m, rng).attribute.append(helper.make_attribute("body", g))

    def shuffle_nodes(m, rng):
        nodes = list(m.graph.node)
        rng.shuffle(nodes)
        del m.graph.node[:]
        m.graph.node.extend(nodes)

    def metadata_flood(m, rng):
        for i in range(int(rng.integers(100, 1000))):
            p = m.metadata_props.add()
            p.key, p.value = f"qcb_onnx.k{i}", "v" * 100

    def bias_length(m, rng):
        t = next((t for t in m.graph.initializer if t.name.endswith("bias")), init(m, rng))
        v = numpy_helper.to_array(t)
        set_values(t, np.concatenate([v, v[:1]]))

    def gemm_trans(m, rng):
        g = next(n for n in m.graph.node if n.op_type == "Gemm")
        g.attribute.append(helper.make_attribute(str(rng.choice(["transA", "transB"])), 1))

    return {
        "weight-huge": scale_weight(3e36),
        "weight-large": scale_weight(1e6),
        "weight-nan": scale_weight(np.nan),
        "weight-inf": scale_weight(np.inf),
        "weight-zero": scale_weight(0.0),
        "weight-tiny": scale_weight(1e-38),
        "pads-negative": attr("pads", [-1, -1, -1, -1]),
        "pads-huge": attr("pads", [9999, 9999, 9999, 9999]),
        "strides-zero": attr("strides", [0, 0]),
        "dilations-big": attr("dilations", [50, 50]),
        "group-zero": attr("group", 0),
        "group-bad": attr("group", 3),
        "kernel-shape-wrong": attr("kernel_shape", [5, 5]),
        "auto-pad-bogus": attr("auto_pad", "BOGUS"),
        "static-batch": static_batch,
        "reshape-initializer": reshape_init,
        "dims-mismatch": wrong_dims,
        "dims-negative": negative_dims,
        "dims-huge": huge_dims,
        "initializer-dtype": dtype_of_init,
        "drop-node": drop_node,
        "drop-initializer": drop_init,
        "duplicate-output": dup_output,
        "cycle": cycle,
        "self-loop": self_loop,
        "undefined-input": undefined_input,
        "op-type": op_type,
        "domain": domain,
        "opset": opset,
        "no-opset": no_opset,
        "ir-version": ir_version,
        "input-type": input_type,
        "input-rank": input_rank,
        "initializers-as-inputs": inits_as_inputs,
        "output-is-initializer": output_is_init,
        "output-is-input": output_is_input,
        "only-output-initializer": only_output_init,
        "no-outputs": no_outputs,
        "external-data": external,
        "string-weight": string_weight,
        "long-names": long_names,
        "weird-names": weird_names,
        "sparse-initializer": sparse,
        "function-node": function_node,
        "subgraph-attribute": subgraph_attr,
        "shuffled-nodes": shuffle_nodes,
        "metadata-flood": metadata_flood,
        "bias-length": bias_length,
        "gemm-transpose": gemm_trans,
        "_onnx": onnx,  # the module, for the worker
    }


# --------------------------------------------------------------------------------------------------
# calibration mutations


def calib_mutation(kind: str, base: np.ndarray, rng: np.random.Generator, folder: Path) -> Path:
    """A hostile calibration source of `kind`, written into `folder`; returns its path."""
    x = base.copy()
    arrays = {
        "nan": lambda: np.where(rng.random(x.shape) < 0.01, np.nan, x).astype(np.float32),
        "inf": lambda: np.where(rng.random(x.shape) < 0.01, np.inf, x).astype(np.float32),
        "scale-1e38": lambda: (x * np.float32(1e38)).astype(np.float32),
        "scale-1e20": lambda: (x * np.float32(1e20)).astype(np.float32),
        "scale-1e6": lambda: (x * np.float32(1e6)).astype(np.float32),
        "negative": lambda: -x,
        "zeros": lambda: np.zeros_like(x),
        "constant": lambda: np.full_like(x, 0.5),
        "one-sample": lambda: x[:1],
        "empty": lambda: x[:0],
        "wrong-hw": lambda: np.zeros((8, 1, 9, 9), np.float32),
        "wrong-channels": lambda: np.zeros((8, 3, 8, 8), np.float32),
        "rank-2": lambda: x.reshape(len(x), -1),
        "rank-5": lambda: x[:, None],
        "float64": lambda: x.astype(np.float64),
        "float16": lambda: x.astype(np.float16),
        "int32": lambda: (x * 255).astype(np.int32),
        "bool": lambda: x > 0.5,
        "complex": lambda: x.astype(np.complex64),
        "nhwc": lambda: np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
        "non-contiguous": lambda: x[::2],
    }
    if kind in arrays:
        path = folder / f"{kind}.npy"
        np.save(path, arrays[kind]())
    elif kind == "object-pickle":
        path = folder / "obj.npy"
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "npz-wrong-key":
        path = folder / "wrong.npz"
        np.savez(path, images=x)
    elif kind == "npz-two-keys":
        path = folder / "two.npz"
        np.savez(path, a=x, b=x)
    elif kind == "npz-labels-only":
        path = folder / "labels.npz"
        np.savez(path, labels=np.zeros(len(x), np.int64))
    elif kind in ("truncated-npy", "header-bytes"):
        path = folder / f"{kind}.npy"
        np.save(path, x)
        data = bytearray(path.read_bytes())
        if kind == "truncated-npy":
            data = data[: int(rng.integers(10, len(data) - 1))]
        else:
            for _ in range(4):
                data[int(rng.integers(10, 128))] = int(rng.integers(32, 127))
        path.write_bytes(bytes(data))
    elif kind == "text-file":
        path = folder / "calib.npy"
        path.write_text("not an array\n")
    elif kind == "random-bytes":
        path = folder / "calib.npz"
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty-folder":
        path = folder / "images"
        path.mkdir()
    elif kind == "missing":
        path = folder / "nope.npy"
    else:
        raise ValueError(kind)
    return path


CALIB_KINDS = [
    "nan",
    "inf",
    "scale-1e38",
    "scale-1e20",
    "scale-1e6",
    "negative",
    "zeros",
    "constant",
    "one-sample",
    "empty",
    "wrong-hw",
    "wrong-channels",
    "rank-2",
    "rank-5",
    "float64",
    "float16",
    "int32",
    "bool",
    "complex",
    "nhwc",
    "non-contiguous",
    "object-pickle",
    "npz-wrong-key",
    "npz-two-keys",
    "npz-labels-only",
    "truncated-npy",
    "header-bytes",
    "text-file",
    "random-bytes",
    "empty-folder",
    "missing",
]


# --------------------------------------------------------------------------------------------------
# running a case


def cases(model_cases: int, calib_cases: int, seed: int) -> list[dict]:
    """The campaign's case list: ids and what each mutates (the mutation itself is made by the worker)."""
    kinds = [k for k in _structured() if not k.startswith("_")]
    n_struct = min(model_cases // 4 + 1, model_cases) if model_cases else 0
    out = []
    for i in range(model_cases - n_struct):
        out.append({"id": f"byte-{i}", "group": "byte", "seed": seed * 100_003 + i})
    for i in range(n_struct):
        out.append(
            {"id": f"struct-{i}", "group": "structured", "kind": kinds[i % len(kinds)], "seed": seed * 100_003 + i}
        )
    for i in range(calib_cases):
        out.append(
            {
                "id": f"calib-{i}",
                "group": "calibration",
                "kind": CALIB_KINDS[i % len(CALIB_KINDS)],
                "seed": seed * 100_003 + i,
            }
        )
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _ort_runs(path: Path) -> bool:
    """The ONNX checker accepts the file and ONNX Runtime runs it on calibration data to finite outputs."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: np.load(CALIB)[:8] for i in sess.get_inputs()}
        return all(
            np.isfinite(o).all() for o in sess.run(None, feeds) if np.issubdtype(np.asarray(o).dtype, np.floating)
        )
    except Exception:  # noqa: BLE001 - anything ORT or onnx raise means "not a valid model"
        return False


def run_case(case: dict) -> dict:
    """Mutate, convert in-process, classify.  Runs in a worker process."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_case(case)
    finally:
        torch.set_num_threads(threads)


def _run_case(case: dict) -> dict:
    from qcb_onnx.cli import main

    rng = np.random.default_rng(case["seed"])
    with tempfile.TemporaryDirectory(prefix="qcb_mut_") as tmp:
        tmp = Path(tmp)
        inputs, out_dir = tmp / "in", tmp / "out"
        inputs.mkdir()
        out_dir.mkdir()
        model, calib = SAMPLE, CALIB
        if case["group"] == "byte":
            kind, data = byte_mutation(SAMPLE.read_bytes(), rng)
            model = inputs / "model.onnx"
            model.write_bytes(data)
        elif case["group"] == "structured":
            kind = case["kind"]
            edits = _structured()
            m = edits["_onnx"].load(str(SAMPLE))
            edits[kind](m, rng)
            model = inputs / "model.onnx"
            model.write_bytes(m.SerializeToString())
        else:
            kind = case["kind"]
            calib = calib_mutation(kind, np.load(CALIB), rng, inputs)
        argv = ["convert", str(model), "--calib", str(calib), "--out", str(out_dir / "out.onnx"), *OPTIONS]
        err = io.StringIO()
        start = time.perf_counter()
        outcome, code, crash = "exit", None, None
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIMEOUT_S)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except _Timeout:
            outcome = "hang"
        except BaseException as exc:  # noqa: BLE001 - what escapes main() is a traceback for the user
            outcome, crash = "traceback", f"{type(exc).__name__}: {str(exc)[:200]}"
            crash += " @ " + " < ".join(
                f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-3:]
            )
        finally:
            signal.alarm(0)
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        left = sorted(p.name for p in out_dir.iterdir())
        expected = ["out.onnx"] if code == 0 else []
        record = {
            **case,
            "kind": str(kind),
            "outcome": outcome,
            "exit": code,
            "seconds": round(time.perf_counter() - start, 2),
            "stderr_ok": code == 0 or (len(lines) == 1 and lines[0].startswith("error: ")),
            "error": lines[-1][:200] if lines else "",
            "left_behind": [p for p in left if p not in expected],
        }
        if crash:
            record["crash"] = crash
        if case["group"] != "calibration" and code not in (0, None) and outcome == "exit":
            record["ort_valid"] = _ort_runs(model)
        return record


def summarize(records: list[dict]) -> dict:
    by_group: dict[str, Counter] = {}
    for r in records:
        key = r["outcome"] if r["outcome"] != "exit" else f"exit {r['exit']}"
        by_group.setdefault(r["group"], Counter())[key] += 1
    return {
        "cases": len(records),
        "by_group": {g: dict(sorted(c.items())) for g, c in by_group.items()},
        "tracebacks": [r for r in records if r["outcome"] == "traceback"],
        "hangs": [r["id"] for r in records if r["outcome"] == "hang"],
        "bad_stderr": [r["id"] for r in records if not r["stderr_ok"] and r["outcome"] == "exit"],
        "left_behind": [(r["id"], r["left_behind"]) for r in records if r["left_behind"]],
        "valid_rejected": [
            {"id": r["id"], "kind": r["kind"], "exit": r["exit"], "error": r["error"]}
            for r in records
            if r.get("ort_valid")
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-cases", type=int, default=520)
    p.add_argument("--calib-cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--only", nargs="+", default=None, help="case ids to replay")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    todo = cases(args.model_cases, args.calib_cases, args.seed)
    if args.only:
        todo = [c for c in todo if c["id"] in set(args.only)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        records = list(pool.map(run_case, todo, chunksize=4))
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["command"] = " ".join(["python benchmarks/mutation_campaign.py", *sys.argv[1:]])
    print(json.dumps({k: v for k, v in summary.items() if k != "tracebacks"}, indent=1))
    for r in summary["tracebacks"]:
        print(f"TRACEBACK {r['id']} ({r['kind']}): {r['crash']}")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "records": records}, indent=1) + "\n")
    return (
        0 if not (summary["tracebacks"] or summary["hangs"] or summary["left_behind"] or summary["bad_stderr"]) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
