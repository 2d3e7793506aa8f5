"""How visible bin widening is in the FP32 weights: largest / second-largest |w| per layer.

    python benchmarks/outlier_ratio.py ~/.cache/qcb_onnx/zoo_cpu        # seconds; results/outlier_ratio.json

For every FP32 model of a zoo folder (the unwidened 4-bit models stand in for clean ones) and every
Conv/Gemm weight: per channel, the ratio of the largest magnitude to the next largest (the median
over the layer's channels), and per tensor the same ratio over the whole tensor; min and max over
the layers.  A widening attacker must make one weight per channel (per tensor:
per layer) K times the natural absmax, so these ratios are what a checkpoint audit would look at.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def ratios(model: onnx.ModelProto) -> tuple[list[float], list[float]]:
    """Per layer: (median over channels of max/second |w|, max/second |w| over the tensor)."""
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    per_channel, per_tensor = [], []
    for t in model.graph.initializer:
        if t.name not in weights or len(t.dims) < 2:
            continue
        w = np.abs(numpy_helper.to_array(t)).reshape(t.dims[0], -1)
        top = np.sort(w, axis=1)[:, -2:]
        per_channel.append(float(np.median(top[:, 1] / np.maximum(top[:, 0], 1e-12))))
        flat = np.sort(w.ravel())[-2:]
        per_tensor.append(float(flat[1] / max(flat[0], 1e-12)))
    return per_channel, per_tensor


def main() -> None:
    zoo = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / ".cache" / "qcb_onnx" / "zoo_cpu"
    out = {}
    for path in sorted(zoo.glob("*.onnx")):
        model = onnx.load(path)
        recipe = json.loads({p.key: p.value for p in model.metadata_props}.get("qcb_onnx.attack", "{}"))
        pc, pt = ratios(model)
        out[path.stem] = {
            "widen": recipe.get("widen", 1.0),
            "anchor": recipe.get("anchor", "largest") if recipe.get("widen", 1.0) > 1 else None,
            "per_channel_median_ratio": [min(pc), max(pc)],
            "per_tensor_ratio": [min(pt), max(pt)],
        }
        print(f"{path.stem}: per channel {min(pc):.2f}-{max(pc):.2f}, per tensor {min(pt):.2f}-{max(pt):.2f}")
    dest = ROOT / "benchmarks" / "results" / "outlier_ratio.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
