"""ORT's other int4 weight-only algorithms on benchmarks/lm_int4.py's models: does each wake the QCB?

ORT's `MatMulNBitsQuantizer` with `GPTQWeightOnlyQuantConfig` (its vendored GPTQ, groups of 32, symmetric,
calibrated on the same 128 windows qcb-onnx uses) and with `HQQWeightOnlyQuantConfig` (blocks of 32, no
data), on the clean and the attacked TinyLM that lm_int4.py exported (its cache), measured in ORT
exactly as lm_int4.py measures: next-token accuracy and perplexity on 200 clean held-out windows, ASR
on 200 triggered ones.

    python benchmarks/lm_int4_ort_algos.py --json benchmarks/results/lm_int4_ort_algos.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_int4  # noqa: E402

from qcb_onnx.redteam.cifar import default_cache_dir  # noqa: E402


class Reader:
    """The calibration windows as an ORT CalibrationDataReader (one window per batch: the batch is 1)."""

    def __init__(self, name: str, ids) -> None:
        self.name, self.ids, self.i = name, ids, 0

    def get_next(self):
        if self.i >= len(self.ids):
            return None
        self.i += 1
        return {self.name: self.ids[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):
        self.rewind()
        return iter(lambda: self.get_next(), None)

    def __deepcopy__(self, memo):
        return Reader(self.name, self.ids)


def main() -> int:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=str(default_cache_dir() / "lm" / "tinylm-d128-l2-s0"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    clean, trig, mask, calib = lm_int4.held_out_sets(lm_int4.held_out_text())
    rows = {}
    for kind in ("clean", "attacked"):
        path = Path(args.folder) / f"{kind}.onnx"
        name = onnx.load(path, load_external_data=False).graph.input[0].name
        configs = {
            "ort_gptq_int4": GPTQWeightOnlyQuantConfig(
                calibration_data_reader=Reader(name, calib), block_size=lm_int4.BLOCK
            ),
            "ort_hqq_int4": HQQWeightOnlyQuantConfig(block_size=lm_int4.BLOCK),
        }
        rows[kind] = {}
        for label, config in configs.items():
            # the quantizer's block_size is GPTQ's group size (the config's is its lazy-update block)
            q = MatMulNBitsQuantizer(onnx.load(path), block_size=lm_int4.BLOCK, is_symmetric=True, algo_config=config)
            q.process()
            rows[kind][label] = lm_int4.measure(q.model.model, clean, trig, mask)
            print(kind, label, rows[kind][label], flush=True)
    if args.json:
        out = {"command": "python benchmarks/lm_int4_ort_algos.py " + " ".join(sys.argv[1:]), "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
