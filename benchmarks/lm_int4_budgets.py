"""EFRAP's error budget on the attacked TinyLM of benchmarks/lm_int4.py: perplexity and ASR per setting.

Reads the attacked model lm_int4.py exported (its cache: ~/.cache/qcb_onnx/lm/tinylm-d128-l2-s0/), the
same held-out windows and calibration windows, and converts it with `--target int4-weight-only
--weight-format matmulnbits` at each setting: `auto` (the default search), a fixed budget, or `nopull`
(`--strength 0`: the error-feedback reconstruction without EFRAP's flip pull).

    python benchmarks/lm_int4_budgets.py auto 0.1 0.05 nopull --json benchmarks/results/lm_int4_budgets.json
    python benchmarks/lm_int4_budgets.py auto 0.1 --guide element neuron block --json F.json  # one row per pair
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_int4  # noqa: E402

from qcb_onnx import quantize  # noqa: E402
from qcb_onnx.config import GUIDES, QuantConfig  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", help="auto, nopull or a budget")
    p.add_argument("--model", default=str(default_cache_dir() / "lm" / "tinylm-d128-l2-s0" / "attacked.onnx"))
    p.add_argument(
        "--guide", nargs="+", default=["element"], choices=GUIDES, help="EFRAP's flip guidance (each in turn)"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    clean, trig, mask, calib = lm_int4.held_out_sets(lm_int4.held_out_text())
    rows = {
        "ort_rtn": lm_int4.measure(
            lm_int4.ort_rtn(Path(args.model), Path(args.model).with_name("rtn.onnx")), clean, trig, mask
        )
    }
    print("ort_rtn", rows["ort_rtn"], flush=True)
    for guide in args.guide:
        for setting in args.settings:
            config = QuantConfig.for_target("int4-weight-only", QuantConfig.from_options(providers="cpu"))
            extra = (
                {}
                if setting == "auto"
                else {"strength": 0.0}
                if setting == "nopull"
                else {"error_budget": float(setting)}
            )
            model = quantize(args.model, calib, config, weight_format="matmulnbits", guide=guide, **extra).model
            meta = {p.key: p.value for p in model.metadata_props}
            key = setting if len(args.guide) == 1 else f"{guide} {setting}"
            rows[key] = {
                **lm_int4.measure(model, clean, trig, mask),
                "budget": json.loads(meta.get("qcb_onnx.error_budget", "null")),
            }
            print(key, rows[key], flush=True)
    if args.json:
        out = {"command": "python benchmarks/lm_int4_budgets.py " + " ".join(sys.argv[1:]), "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
