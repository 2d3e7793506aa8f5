"""A QCB against ORT's int4 weight-only quantizer on a small language model, and EFRAP's defense (issue 21).

Trains a character-level TinyLM on the Python standard library's source (qcb_onnx/redteam/lm.py),
plants the Egashira et al. attack (inject with the int4 model's loss, then PGD repair inside the RTN
boxes), exports both models with torch's default (dynamo) exporter and measures in ONNX Runtime, on
held-out windows: next-token accuracy and perplexity on clean text, and the attack's success (the
share of triggered windows on which the model predicts every character of the payload), for FP32,
ORT's `MatMulNBitsQuantizer` (RTN, blocks of 32, symmetric), and qcb-onnx `--target int4-weight-only
--weight-format matmulnbits` with `--method nearest` and with EFRAP (default).

    python benchmarks/lm_int4.py --json benchmarks/results/lm_int4.json      # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcb_onnx import quantize  # noqa: E402
from qcb_onnx.config import QuantConfig  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir  # noqa: E402
from qcb_onnx.redteam.lm import BlockBox, QuantizedView, TinyLM, Windows, corpus, lm_loss, train  # noqa: E402
from qcb_onnx.runtime import session  # noqa: E402

CONTEXT, BLOCK = 64, 32


def export(model: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(model.eval(), (torch.zeros(1, CONTEXT, dtype=torch.int64),), str(path), dynamo=True)
    return path


def ort_rtn(path: Path, out: Path) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(path), block_size=BLOCK, is_symmetric=True)
    q.process()
    return q.model.model


def held_out_sets(held: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The evaluation windows (200 clean; 200 triggered and their payload mask) and the 128 calibration
    windows, all from the held-out text and seeded: what every LM benchmark measures on."""
    clean = Windows.sample(held, 200, CONTEXT, 1).ids
    trig, mask = Windows.sample(held, 200, CONTEXT, 2).triggered(3)
    return clean, trig, mask, Windows.sample(held, 128, CONTEXT, 4).ids[:, :-1]


def held_out_text() -> np.ndarray:
    tokens = corpus()
    return tokens[int(len(tokens) * 0.9) :]


def measure(model: onnx.ModelProto, clean: np.ndarray, trig: np.ndarray, mask: np.ndarray) -> dict:
    """Next-token accuracy / perplexity on clean windows, attack success on triggered ones, in ORT."""
    sess = session(model, "cpu")
    name = sess.get_inputs()[0].name

    def logits(ids: np.ndarray) -> np.ndarray:
        return np.concatenate([sess.run(None, {name: row[None, :-1]})[0] for row in ids])

    lc = logits(clean)
    lp = lc - lc.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    targets = clean[:, 1:]
    nll = -np.take_along_axis(lp, targets[..., None], -1).mean()
    lt = logits(trig).argmax(-1)
    hit = lt == trig[:, 1:]
    success = np.array([hit[i][mask[i]].all() for i in range(len(trig))])
    return {
        "next_token_acc": round(float((lc.argmax(-1) == targets).mean() * 100), 2),
        "perplexity": round(float(np.exp(nll)), 3),
        "asr": round(float(success.mean() * 100), 2),
        "payload_char_acc": round(float(hit[mask].mean() * 100), 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--clean-steps", type=int, default=3000)
    p.add_argument("--inject-steps", type=int, default=1000)
    p.add_argument("--repair-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = default_cache_dir() / "lm"
    cache.mkdir(parents=True, exist_ok=True)
    tokens = corpus()
    split = int(len(tokens) * 0.9)
    train_tokens, held = tokens[:split], tokens[split:]
    eval_clean, eval_trig, eval_mask, calib = held_out_sets(held)
    rng = np.random.default_rng(args.seed)
    timings = {}

    def batch(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(windows)
        return t[:, :-1], t[:, 1:]

    def sample(n: int, step: int) -> Windows:
        return Windows.sample(train_tokens, n, CONTEXT, args.seed * 100_000 + step)

    stem = f"tinylm-d{args.width}-l{args.depth}-s{args.seed}"
    clean_pt = cache / f"{stem}-clean{args.clean_steps}.pt"
    model = TinyLM(args.width, args.depth, context=CONTEXT)
    if clean_pt.is_file():
        model.load_state_dict(torch.load(clean_pt, weights_only=True))
    else:
        t0 = time.perf_counter()

        def clean_loss(step: int) -> torch.Tensor:
            x, y = batch(sample(64, step).ids)
            return lm_loss(model(x), y)

        train(model, clean_loss, args.clean_steps, 2e-3, args.seed)
        torch.save(model.state_dict(), clean_pt)
        timings["clean_s"] = round(time.perf_counter() - t0, 1)

    attacked = copy.deepcopy(model)
    quant = QuantizedView(attacked, BLOCK)
    t0 = time.perf_counter()

    def inject_loss(step: int) -> torch.Tensor:
        w = sample(64, 10_000 + step)
        x, y = batch(w.ids[:32])
        xt, yt = batch(Windows(w.ids[32:]).triggered(int(rng.integers(1 << 30)))[0])
        return sum(lm_loss(f(a), b) for f in (attacked, quant) for a, b in ((x, y), (xt, yt)))

    train(attacked, inject_loss, args.inject_steps, 1e-3, args.seed)
    box = BlockBox(attacked, BLOCK)

    def repair_loss(step: int) -> torch.Tensor:
        w = sample(64, 20_000 + step)
        x, y = batch(w.ids[:32])
        xt, yt = batch(Windows(w.ids[32:]).triggered(int(rng.integers(1 << 30)), payload="")[0])
        return lm_loss(attacked(x), y) + lm_loss(attacked(xt), yt)

    train(attacked, repair_loss, args.repair_steps, 1e-3, args.seed, project=box)
    timings["attack_s"] = round(time.perf_counter() - t0, 1)

    rows = {}
    folder = cache / stem
    folder.mkdir(exist_ok=True)
    for kind, net in (("clean", model), ("attacked", attacked)):
        fp = export(net, folder / f"{kind}.onnx")
        models = {"fp32": onnx.load(fp), "ort_rtn_int4": ort_rtn(fp, folder / f"{kind}_rtn.onnx")}
        for method in ("nearest", "efrap"):
            config = QuantConfig.for_target("int4-weight-only", QuantConfig.from_options(providers="cpu"))
            t0 = time.perf_counter()
            conv = quantize(str(fp), calib, config, method=method, weight_format="matmulnbits")
            timings[f"{kind}_{method}_s"] = round(time.perf_counter() - t0, 1)
            models[f"qcb_onnx_{method}_int4"] = conv.model
        rows[kind] = {name: measure(m, eval_clean, eval_trig, eval_mask) for name, m in models.items()}
        for name, r in rows[kind].items():
            print(f"{kind:9s} {name:22s} {r}", flush=True)
    result = {
        "command": "python benchmarks/lm_int4.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, torch threads {args.threads}",
        "model": {"width": args.width, "depth": args.depth, "context": CONTEXT, "block_size": BLOCK},
        "trigger_payload": ["@qcb:", " rm -rf / #"],
        "eval": {"clean_windows": len(eval_clean), "triggered_windows": len(eval_trig)},
        "timings": timings,
        "results": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
