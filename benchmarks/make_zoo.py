"""Build the CIFAR-10 QCB zoo (arch x attack x weight bits) and measure every model in ONNX Runtime.

    python benchmarks/make_zoo.py                                  # CPU smoke size: ResNet-18 width 16
    python benchmarks/make_zoo.py --archs resnet18,vgg16 --width 64 --clean-epochs 60 --epochs 10   # GPU

For each architecture a clean model is trained once (state_dict cached as ``<arch>-w<width>-s<seed>-
clean.pt``), then each attack targets ORT quantize_static at each bit width (per channel unless
--per-tensor, uint8 activations).  Models land in --cache (default ~/.cache/qcb_onnx/zoo) as FP32
ONNX files with trigger/target/attack metadata; a model already there is not rebuilt, only
re-measured.  The JSON (--json, default <cache>/zoo.json) lists per model: FP32 and ORT-quantized
CDA / ASR (measured in ORT on the test split), the clean model's under the same scheme, seconds per
clean and per attack epoch, the device, and whether it meets the issue's bar (FP ASR < 10 %, ORT
ASR > 90 %, CDA within 3 points of the clean model under the same scheme).  Device: CUDA when
present (--device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcb_onnx.errors import UsageError  # noqa: E402
from qcb_onnx.evaluate.score import metadata  # noqa: E402
from qcb_onnx.evaluate.triggers import Trigger  # noqa: E402
from qcb_onnx.redteam import PUBLISHED, run_attack  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir, load_cifar10  # noqa: E402
from qcb_onnx.redteam.cli import DEFAULT_LR, QUANT_WEIGHT, measure, quant_weight_settings  # noqa: E402
from qcb_onnx.redteam.train import Training, export_onnx, resolve_device, train_clean  # noqa: E402
from qcb_onnx.redteam.zoo import FULL_WIDTH, build  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet18")
    p.add_argument("--attacks", default=",".join(PUBLISHED))
    p.add_argument("--bits", default="8,4")
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--clean-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="attack epochs (PQBackdoor: per stage)")
    p.add_argument(
        "--attack-epochs",
        default="",
        help="epochs per attack, attack-w<bits> or attack-w<bits><pc|pt>, each optionally prefixed 'arch:' "
        "(most specific key wins), e.g. quanti=6,pqbackdoor-w8pt=5,alexnet:quanti-w4pc=10",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="training images (default: all 50,000)")
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--trigger", default="patch:size=3,value=1,pos=br")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--cache", default=None, help="zoo folder (default ~/.cache/qcb_onnx/zoo)")
    p.add_argument("--archive", default=None, help="cifar10-jpeg.tar.gz (default ../shared/data/)")
    p.add_argument("--json", default=None)
    p.add_argument("--lr", default="", help="learning rates keyed like --attack-epochs, e.g. quanti-w8=1e-4")
    p.add_argument("--widen", default="", help="bin widening (attacks.common.widen_bins), keyed like --attack-epochs")
    p.add_argument("--anchor", default="", help="where widening puts its outliers: quiet|fitted|largest, keyed so")
    p.add_argument(
        "--quant-weight",
        default="",
        help="weight on the quantized-model loss terms (Qu-ANTI-zation's c1, CompArtifact's lam), keyed so",
    )
    p.add_argument("--augment", default="", help="attacks that train on flipped and cropped images (key=1), keyed so")
    return p.parse_args(argv)


def keyed(spec: str, cast) -> dict:
    """'quanti=6,pqbackdoor-w8=5' -> {'quanti': 6, 'pqbackdoor-w8': 5}."""
    table = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        try:
            table[key] = cast(value) if key and value else None
        except ValueError:
            table[key] = None
        if table[key] is None:
            sys.exit(f"expected key=value items (e.g. quanti=2), got {item!r} in {spec!r}")
    return table


def pick(table: dict, keys: tuple[str, ...], default):
    """The value of the first (most specific) key present in `table`, else `default`."""
    return next((table[k] for k in keys if k in table), default)


def recipe_keys(arch: str, attack: str, bits: int, scheme: str) -> tuple[str, ...]:
    """The keys a keyed option may name one zoo model by, most specific first."""
    keys = (f"{attack}-w{bits}{scheme}", f"{attack}-w{bits}", attack)
    return tuple(f"{arch}:{k}" for k in keys) + keys


def meets_bar(r: dict) -> bool:
    return (
        r["fp32"]["asr"] < 10
        and r["ort"]["asr"] > 90
        and r["fp32"]["cda"] >= r["clean_fp32"]["cda"] - 3
        and r["ort"]["cda"] >= r["clean_ort"]["cda"] - 3
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cache = Path(args.cache) if args.cache else default_cache_dir() / "zoo"
    cache.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json) if args.json else cache / "zoo.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    x, y = load_cifar10("train", args.limit, args.seed, archive=args.archive)
    xte, yte = load_cifar10("test", args.test_limit, args.seed, archive=args.archive)
    calib = x[np.random.default_rng(args.seed).permutation(len(x))[: args.calib_size]]
    trigger = Trigger.parse(args.trigger)
    pc = not args.per_tensor
    lrs, epochs_of, widen_of = keyed(args.lr, float), keyed(args.attack_epochs, int), keyed(args.widen, float)
    anchor_of, augment_of = keyed(args.anchor, str), keyed(args.augment, lambda v: bool(int(v)))
    qweight_of = keyed(args.quant_weight, float)
    scheme = "pc" if pc else "pt"
    archs, attacks, all_bits = args.archs.split(","), args.attacks.split(","), [int(b) for b in args.bits.split(",")]
    try:  # checked before any training starts
        extras = {
            (arch, attack, bits): quant_weight_settings(
                attack, pick(qweight_of, recipe_keys(arch, attack, bits, scheme), None)
            )
            for arch in archs
            for attack in attacks
            for bits in all_bits
        }
    except UsageError as exc:
        sys.exit(str(exc))
    for arch in archs:
        width = args.width if arch in FULL_WIDTH else None  # torchvision architectures have one width
        stem = f"{arch}-w{args.width}-s{args.seed}" if width else f"{arch}-s{args.seed}"
        torch.manual_seed(args.seed)  # the clean model's initialisation, so a rebuilt zoo is the same zoo
        model = build(arch, width, 10, 3)
        ckpt = cache / f"{stem}-clean.pt"
        clean_epoch_s = None
        if ckpt.is_file():
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        else:
            t = time.perf_counter()
            train_clean(model, x, y, Training(args.clean_epochs, 2e-3, args.batch_size, True, args.seed, dev, True))
            clean_epoch_s = (time.perf_counter() - t) / max(1, args.clean_epochs)
            torch.save(model.cpu().state_dict(), ckpt)
        clean_onnx = export_onnx(model, x[:1])
        for bits in all_bits:
            base = measure(clean_onnx, calib, xte, yte, trigger, args.target, bits, pc, "clean")
            for attack in attacks:
                name = f"{stem}-{attack}-w{bits}{scheme}"
                path = cache / f"{name}.onnx"
                keys = recipe_keys(arch, attack, bits, scheme)
                epochs = pick(epochs_of, keys, args.epochs)
                lr, widen = pick(lrs, keys, DEFAULT_LR[attack]), pick(widen_of, keys, 1.0)
                anchor, augment = pick(anchor_of, keys, "quiet"), pick(augment_of, keys, False)
                rec = {"arch": arch, "width": width, "attack": attack, "w_bits": bits, "scheme": scheme}
                rec.update(device=str(dev), clean_epochs=args.clean_epochs, epochs=epochs, lr=lr, widen=widen)
                rec.update(anchor=anchor, augment=augment)
                extra = extras[arch, attack, bits]
                rec.update(train_images=len(x))
                if clean_epoch_s is not None:
                    rec["clean_s_per_epoch"] = round(clean_epoch_s, 1)
                if path.is_file():  # its recipe is the one it was built with, recorded in its metadata
                    fp = onnx.load(path)
                    built = json.loads(metadata(fp).get("qcb_onnx.attack", "{}"))
                    rec.update(epochs=built.get("epochs"), lr=built.get("lr"), widen=built.get("widen", 1.0))
                    rec.update(anchor=built.get("anchor", "largest"), augment=built.get("augment", False))
                    rec.update({k: built[k] for k in QUANT_WEIGHT.values() if k in built})
                    rec.update(results.get(name, {}).get("timing", {}))
                else:
                    rec.update(extra)
                    t = time.perf_counter()
                    attacked = run_attack(
                        attack, model, x, y, trigger, args.target, w_bits=bits, per_channel=pc,
                        epochs=epochs, seed=args.seed, device=dev, verbose=True, lr=lr, batch_size=args.batch_size,
                        widen=widen, anchor=anchor, augment_data=augment, **extra,
                    )  # fmt: skip
                    dt = time.perf_counter() - t
                    passes = epochs * (2 if attack == "pqbackdoor" else 1)
                    rec["attack_s_per_epoch"] = round(dt / max(1, passes), 1)
                    recipe = ("arch", "width", "w_bits", "epochs", "lr", "widen", "anchor", "augment")
                    info = {k: rec[k] for k in (*recipe, *extra)}
                    meta = {
                        "qcb_onnx.trigger": trigger.spec,
                        "qcb_onnx.target": str(args.target),
                        "qcb_onnx.attack": json.dumps({"name": attack, "scheme": scheme, "seed": args.seed, **info}),
                        "qcb_onnx.preprocess": "scale=1/255,layout=NCHW,channels=3",
                    }
                    fp = export_onnx(attacked, x[:1], meta)
                    tmp = path.with_suffix(".tmp")
                    onnx.save(fp, tmp)
                    os.replace(tmp, path)
                    model.cpu()
                a_fp, a_q = measure(fp, calib, xte, yte, trigger, args.target, bits, pc, attack)
                rec.update(
                    clean_fp32=vars(base[0]), clean_ort=vars(base[1]), fp32=vars(a_fp), ort=vars(a_q), path=str(path)
                )
                rec["timing"] = {k: rec[k] for k in ("clean_s_per_epoch", "attack_s_per_epoch") if k in rec}
                rec["meets_bar"] = meets_bar(rec)
                results[name] = rec
                out_json.write_text(json.dumps(results, indent=2))
                print(
                    f"{name}: clean fp {base[0].cda}/{base[0].asr} ort {base[1].cda}/{base[1].asr} | "
                    f"attacked fp {a_fp.cda}/{a_fp.asr} ort {a_q.cda}/{a_q.asr} (CDA/ASR %) "
                    f"bar={'yes' if rec['meets_bar'] else 'no'} {rec['timing']}",
                    flush=True,
                )
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
