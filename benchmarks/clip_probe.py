"""Where does the backdoor EFRAP leaves behind live?  One activation quantizer at a time, with the trigger.

    python benchmarks/clip_probe.py ~/.cache/qcb_onnx/zoo_cpu/resnet18-w16-s0-quanti-w8pc.onnx [--headroom 1]

Converts the zoo model with EFRAP in the scheme its attack targeted (paper_table's 1,024 calibration
and 2,000 CIFAR-10 test images) and, in our PyTorch simulation of the quantized model (the
arithmetic `verify` proves equal to ORT's), measures ASR with every activation quantizer, with none,
and with each one removed in turn.  For the quantizers whose removal moves ASR most it also reports
how far triggered inputs drive the FP tensor past the range calibrated on clean data: values beyond
it are clipped by the quantized model only.  A forensic tool: it needs the trigger, the defense
does not.  Writes benchmarks/results/clip_probe_<model>_h<headroom>.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from zoo_data import paper_split, read_zoo_model

from qcb_onnx.pipeline import Conversion, quantize

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--headroom", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = Path(args.model).expanduser()
    zm = read_zoo_model(path)
    if zm is None:
        raise SystemExit(f"{path}: no qcb_onnx.attack metadata (not a zoo model)")
    calib, xte, yte = paper_split()
    xtr, keep, target = zm.trigger.apply(xte), yte != zm.target, zm.target
    conv = quantize(
        zm.model, calib, w_bits=zm.w_bits, per_channel=zm.per_channel, act_headroom=args.headroom, providers="cpu"
    )

    def asr(acts: dict) -> tuple[float, float]:
        state = replace(conv.state, acts=acts)
        clean, trig = conv.simulate(xte, state=state).argmax(1), conv.simulate(xtr, state=state).argmax(1)
        return round(float((clean == yte).mean() * 100), 2), round(float((trig[keep] == target).mean() * 100), 2)

    acts = conv.state.acts
    full, none = asr(acts), asr({})
    dropped = {name: asr({k: v for k, v in acts.items() if k != name}) for name in acts}
    ranked = sorted(dropped, key=lambda n: abs(dropped[n][1] - full[1]), reverse=True)[: args.top]
    rows = []
    for name in ranked:
        q = acts[name]
        lo = -q.zero_point * float(q.scale)
        hi = (q.grid.qmax - q.zero_point) * float(q.scale)
        clean, trig = fp_tensor(conv, name, xte[:256]), fp_tensor(conv, name, xtr[:256])
        rows.append(
            {
                "tensor": name,
                "without_it": dropped[name],
                "grid_range": [round(lo, 3), round(hi, 3)],
                "fp_clean_range": [round(float(clean.min()), 3), round(float(clean.max()), 3)],
                "fp_triggered_range": [round(float(trig.min()), 3), round(float(trig.max()), 3)],
                "triggered_share_clipped": round(float(((trig < lo) | (trig > hi)).float().mean()), 6),
            }
        )
    record = {"model": path.stem, "act_headroom": args.headroom, "all_quantizers": full, "none": none, "top": rows}
    out = ROOT / "benchmarks" / "results" / f"clip_probe_{path.stem}_h{args.headroom:g}.json"
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def fp_tensor(conv: Conversion, name: str, x: np.ndarray) -> torch.Tensor:
    """The FP model's value of one tensor (the quantized model sees it clipped to its grid's range)."""
    gm, got = conv.graph, {}

    def grab(tensor: str, value: torch.Tensor) -> torch.Tensor:
        if tensor == name:
            got["v"] = value.detach().clone()
        return value

    with torch.no_grad():
        gm.run({gm.input_names[0]: torch.from_numpy(x).to(gm.device)}, on_tensor=grab)
    return got["v"].cpu()


if __name__ == "__main__":
    main()
