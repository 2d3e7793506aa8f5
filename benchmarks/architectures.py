"""Real architectures: torchvision ImageNet CNNs and a ViT, both torch exporters, converted by qcb-onnx.

For each architecture x exporter (TorchScript at opset 17 with a dynamic batch; dynamo, torch's
default, opset 18+ with a static batch of 1) x method, with random weights (nothing can be
downloaded) and seeded random calibration images: whether `convert` succeeds (else its error line),
seconds and peak RSS of the conversion (its own process, read before ORT runs), top-1 agreement of
ONNX Runtime with our simulation on 64 test images (ORT's class is a maximum of our logits: ties on
the output grid count), and for `nearest` how many weight integers differ from ORT quantize_static's
on the same model (and quantize_static's own time).

    python benchmarks/architectures.py --size 224 --methods nearest \
        --json benchmarks/results/architectures_224_nearest.json
    python benchmarks/architectures.py --size 64 --methods efrap --json benchmarks/results/architectures_64_efrap.json

Needs torchvision and, for deit_tiny, timm (`pip install -e ".[models]"`;
qcb_onnx/redteam/torchvision_shim.py says why torchvision needs a shim on the CPU build of torch).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ARCHS = (
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "squeezenet1_1",
    "shufflenet_v2_x1_0",
    "densenet121",
    "regnet_y_400mf",
    "convnext_tiny",
    "vit_b_16",
    "deit_tiny_patch16_224",  # timm: ViT with a distillation token
)
TIMM = {"deit_tiny_patch16_224"}
EXPORTERS = ("torchscript", "dynamo")


def build(arch: str, size: int, **kwargs):
    """The architecture with seeded random weights, in eval mode (`kwargs` go to its constructor)."""
    import torch

    from qcb_onnx.redteam.torchvision_shim import import_torchvision

    tv = import_torchvision()  # before timm, which imports torchvision
    torch.manual_seed(0)
    if arch in TIMM:
        import timm

        return timm.create_model(arch, pretrained=False, img_size=size, **kwargs).eval()
    kwargs = {"image_size": size, **kwargs} if arch.startswith("vit") else kwargs
    return getattr(tv.models, arch)(**kwargs).eval()


def export(arch: str, exporter: str, size: int, path: Path) -> None:
    export_module(build(arch, size), exporter, size, path)


def export_module(model, exporter: str, size: int, path: Path) -> None:
    """TorchScript (opset 17, dynamic batch) or dynamo (torch's default: static batch of 1)."""
    import onnx
    import torch

    x = torch.rand(1, 3, size, size)
    if exporter == "dynamo":
        torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["logits"]).save(str(path))
        return
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})  # fmt: skip
    onnx.save(onnx.load_from_string(buf.getvalue()), path)


def convert_case(model: Path, method: str, size: int, calib_size: int, out: Path) -> None:
    """In its own process: convert, then measure agreement and (nearest) integers against ORT."""
    import torch

    from qcb_onnx.emit import read_weight_ints
    from qcb_onnx.errors import QcbError
    from qcb_onnx.evaluate.baseline import ort_quantize
    from qcb_onnx.evaluate.score import predict
    from qcb_onnx.pipeline import quantize

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    calib = rng.random((calib_size, 3, size, size), dtype=np.float32)
    test = rng.random((64, 3, size, size), dtype=np.float32)
    record: dict = {}
    t0 = time.perf_counter()
    try:
        conv = quantize(str(model), calib, method=method, calib_size=calib_size, providers="cpu")
    except QcbError as exc:
        record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["layers"] = len(conv.layers)
        sim, picks = conv.simulate(test), predict(conv.model, test, providers="cpu")
        # ORT's pick agrees when it is a maximum of the simulated logits: on the output's quantization grid
        # random-weight models often tie, and a tie is broken by float noise
        record["agreement"] = round(float((sim[np.arange(len(test)), picks] == sim.max(1)).mean()), 4)
        record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ours alone
        if method == "nearest":
            import onnx

            fp = onnx.load(str(model))
            t1 = time.perf_counter()
            ref = ort_quantize(fp, calib, 8, 8, True)
            record["ort_seconds"] = round(time.perf_counter() - t1, 1)
            weights = {
                n.input[1] for n in fp.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
            }
            names = [
                t.name.removesuffix("_quantized")
                for t in ref.graph.initializer
                if t.name.removesuffix("_quantized") in weights
            ]
            record["ort_weights"] = len(names)
            record["ints_differing"] = int(
                sum((read_weight_ints(conv.model, w) != read_weight_ints(ref, w)).sum() for w in names)
            )
    out.write_text(json.dumps(record))


def render(rows: list[dict]) -> str:
    """The markdown table BENCHMARKS.md shows."""
    head = "| architecture | exporter | method | result | seconds | peak RSS MiB | ORT agreement |"
    table = [
        head + " ints differing from ORT (weights) | quantize_static s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ints = f"{r['ints_differing']} ({r['ort_weights']})" if "ints_differing" in r else ""
        cells = [r["arch"], r["exporter"], r.get("method", ""), r.get("error", "ok"), r.get("seconds", ""),
                 r.get("peak_rss_mib", ""), r.get("agreement", ""), ints, r.get("ort_seconds", "")]  # fmt: skip
        table.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    p.add_argument("--methods", nargs="+", default=["nearest", "efrap"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calib-size", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--render", default=None, help="print the markdown table of a saved --json result and exit")
    p.add_argument("--case", nargs=4, default=None, help=argparse.SUPPRESS)  # child: model method size out
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())["rows"]))
        return 0
    if args.case:
        model, method, size, out = args.case
        convert_case(Path(model), method, int(size), args.calib_size, Path(out))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcb_arch_") as tmp:
        tmp = Path(tmp)
        for arch in args.archs:
            for exporter in args.exporters:
                path = tmp / f"{arch}-{exporter}.onnx"
                try:
                    export(arch, exporter, args.size, path)
                except Exception as exc:  # noqa: BLE001 - an exporter failure is a row, not the end
                    rows.append({"arch": arch, "exporter": exporter, "error": f"export: {str(exc)[:200]}"})
                    continue
                for method in args.methods:
                    out = tmp / "case.json"
                    cmd = [sys.executable, __file__, "--case", str(path), method, str(args.size), str(out),
                           "--calib-size", str(args.calib_size)]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    row = {"arch": arch, "exporter": exporter, "method": method}
                    if proc.returncode != 0 or not out.exists():
                        row["error"] = "traceback: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
                    else:
                        row.update(json.loads(out.read_text()))
                        out.unlink()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(render(rows))
    if args.json:
        command = "python benchmarks/architectures.py " + " ".join(sys.argv[1:])
        Path(args.json).write_text(json.dumps({"command": command, "size": args.size, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
