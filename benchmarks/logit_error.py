"""How far each quantized model's logits are from FP32: ORT quantize_static against our nearest
at activation headroom 1 (ORT's ranges) and 2 (our default at 8 bits), in ONNX Runtime.

Relative L2 error ||logits_q - logits_fp|| / ||logits_fp|| over held-out random images, and top-1
agreement with FP32, per torchvision architecture (random weights, TorchScript export).  The
question it answers (issue 26): is our nearest further from FP32 than ORT's own model because of the
2x headroom, which costs one bit of activation resolution?

    python benchmarks/logit_error.py --archs efficientnet_b0 mobilenet_v3_small resnet50 --size 64 \\
        --json benchmarks/results/logit_error.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import export  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["efficientnet_b0", "mobilenet_v3_small", "resnet50"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import onnx
    import torch

    from qcb_onnx import convert
    from qcb_onnx.evaluate.baseline import ort_quantize
    from qcb_onnx.runtime import session

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    calib = rng.random((args.calib_size, 3, args.size, args.size), dtype=np.float32)
    test = rng.random((64, 3, args.size, args.size), dtype=np.float32)

    def logits(model) -> np.ndarray:
        sess = session(model, "cpu")
        return np.concatenate(
            [sess.run(None, {sess.get_inputs()[0].name: test[i : i + 1]})[0] for i in range(len(test))]
        )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            path = Path(tmp) / f"{arch}.onnx"
            export(arch, "torchscript", args.size, path)
            fp = onnx.load(path)
            ref = logits(fp)
            variants = {
                "ort quantize_static": ort_quantize(fp, calib, 8, 8, True),
                "ours nearest, headroom 1": convert(fp, calib, method="nearest", act_headroom=1.0, providers="cpu"),
                "ours nearest, headroom 2": convert(fp, calib, method="nearest", providers="cpu"),
            }
            for name, model in variants.items():
                out = logits(model)
                rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                agree = float((out.argmax(1) == ref.argmax(1)).mean())
                rows.append(
                    {"arch": arch, "model": name, "relative_l2": round(rel, 4), "top1_agreement": round(agree, 3)}
                )
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        command = "python benchmarks/logit_error.py " + " ".join(sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
