"""Block-wise int4 (MatMulNBits) conversion cost vs model size: time and peak RSS per million parameters.

Decoder-style transformer stacks (pre-LayerNorm blocks: attention and a 4x GELU MLP, MatMul weights),
random weights, exported by torch's default (dynamo) exporter for a (1, 64, d) input; calibration: 64
seeded random sequences.  Each conversion runs in its own process under /usr/bin/time -v:
`python -m qcb_onnx convert --target int4-weight-only --weight-format matmulnbits` with EFRAP
(default) and with `--method nearest`, and ORT's own `MatMulNBitsQuantizer` (RTN, blocks of 32,
symmetric) on the same file.

    python benchmarks/blockwise_scale.py --json benchmarks/results/blockwise_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet50_scale import timed  # noqa: E402

ORT_CHILD = """
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
q = MatMulNBitsQuantizer(onnx.load(sys.argv[1]), block_size=32, is_symmetric=True)
q.process()
onnx.save(q.model.model, sys.argv[2])
"""


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def build(d: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(d, max(1, d // 64)) for _ in range(depth)]).eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="128:2,256:4,512:4,768:4", help="width:depth,...")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for spec in args.sizes.split(","):
        d, depth = map(int, spec.split(":"))
        with tempfile.TemporaryDirectory(prefix="qcb_bw_") as tmp:
            tmp = Path(tmp)
            model, calib = tmp / "m.onnx", tmp / "calib.npy"
            net = build(d, depth)
            torch.onnx.export(net, (torch.randn(1, 64, d),), str(model), dynamo=True)
            np.save(calib, np.random.default_rng(0).standard_normal((64, 64, d)).astype(np.float32))
            params = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))
            row = {"width": d, "depth": depth, "linear_params_M": round(params / 1e6, 3)}
            base = [sys.executable, "-m", "qcb_onnx", "convert", str(model), "--calib", str(calib), "--target"]
            base += ["int4-weight-only", "--weight-format", "matmulnbits", "--providers", "cpu", "--quiet"]
            row["efrap"] = timed([*base, "--out", str(tmp / "efrap.onnx")])
            row["nearest"] = timed([*base, "--out", str(tmp / "nearest.onnx"), "--method", "nearest"])
            row["ort_rtn"] = timed([sys.executable, "-c", ORT_CHILD, str(model), str(tmp / "ort.onnx")])
            for key in ("efrap", "nearest", "ort_rtn"):
                if "seconds" in row[key]:
                    row[key]["seconds_per_M"] = round(row[key]["seconds"] / (params / 1e6), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "command": "python benchmarks/blockwise_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
