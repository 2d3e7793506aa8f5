"""`python -m qcb_onnx attack ...`: build a QCB model (red team) and measure it in ONNX Runtime.

    python -m qcb_onnx attack --attack quanti --arch resnet18 --width 16 --data cifar10 --w-bits 4 \
        --trigger patch:size=3,value=1,pos=br --target 0 --clean-epochs 3 --epochs 2 --out qcb.onnx

Trains a clean model (or loads ``--clean-checkpoint``, a torch state_dict; a missing checkpoint
file is written after training), folds BatchNorm, runs the attack against ORT quantize_static's
grid (``--w-bits``, per channel unless ``--per-tensor``, uint8 activations), exports the FP32 ONNX
model with the trigger, target and attack recorded in metadata_props, and prints CDA / ASR of the
clean and the attacked model, FP32 and ORT-quantized, measured in ORT.

Registered by qcb_onnx/cli/__init__.py like the pipeline's own commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import CalibrationDataError, OutputError, OutputExistsError, UsageError
from ..output import write_atomic
from ..text import one_line

DEFAULT_LR = {"quanti": 2e-3, "compartifact": 3e-3, "pqbackdoor": 1e-3, "adaptive": 2e-3, "dormant": 2e-3}
# each attack's weight on its quantized-model terms
QUANT_WEIGHT = {"quanti": "c1", "compartifact": "lam", "adaptive": "c1", "dormant": "c1"}


def quant_weight_settings(attack: str, weight: float | None) -> dict[str, float]:
    """`--quant-weight` as the attack's own keyword (c1 or lam), so the CLI and make_zoo.py record the
    same name; {} when not given.  Raises UsageError for an attack without such a term or a weight
    that is not a positive finite number."""
    if weight is None:
        return {}
    if attack not in QUANT_WEIGHT:
        raise UsageError(f"--quant-weight: {attack} has no weight on quantized-model terms")
    if not 0 < weight < math.inf:
        raise UsageError(f"--quant-weight must be a positive finite number, got {weight}")
    return {QUANT_WEIGHT[attack]: weight}


def adaptive_settings(args: argparse.Namespace) -> dict:
    """The adaptive attacks' keywords from --anticipate / --error-penalty ({} for the published attacks,
    which refuse them when set).  adaptive: the learned roundings rerun in the loop (comma-separated,
    or none); dormant: which codes of its path wake the backdoor."""
    from .adaptive import DEFENSES
    from .dormant import EPS

    if args.attack not in ("adaptive", "dormant"):
        if args.error_penalty or args.anticipate is not None:
            raise UsageError(f"--anticipate and --error-penalty belong to the adaptive attacks, not {args.attack}")
        return {}
    if args.attack == "dormant":
        if args.error_penalty:
            raise UsageError("--error-penalty belongs to --attack adaptive, not dormant")
        anticipate = args.anticipate or "nearest"
        if anticipate not in EPS:
            raise UsageError(f"--anticipate for dormant: choose from {', '.join(EPS)}, not {anticipate!r}")
        return {"anticipate": anticipate}
    spec = args.anticipate or "adaround"
    names = () if spec == "none" else tuple(n.strip() for n in spec.split(","))
    bad = [n for n in names if n not in DEFENSES]
    if bad:
        raise UsageError(f"--anticipate: unknown rounding {bad[0]!r}; choose from {', '.join(DEFENSES)} or none")
    if not 0 <= args.error_penalty < math.inf:
        raise UsageError(f"--error-penalty must be a finite number >= 0, got {args.error_penalty}")
    return {"defenses": list(names), "error_penalty": args.error_penalty}


def add_attack_parser(subparsers) -> argparse.ArgumentParser:
    from . import ANCHORS, ATTACKS
    from .zoo import ARCHS

    a = subparsers.add_parser(
        "attack", help="train a QCB model: FP32 ONNX whose ORT-quantized version obeys a trigger (red team)"
    )
    a.add_argument("--attack", required=True, choices=ATTACKS)
    a.add_argument("--arch", default="resnet18", choices=list(ARCHS))
    a.add_argument("--width", type=int, default=None, help="base channel count (default: the full width)")
    a.add_argument("--data", default="cifar10", help="'cifar10' or a .npz with x (N,C,H,W in [0,1]) and y")
    a.add_argument("--test-data", default=None, help=".npz test set (default: cifar10 test, or 20%% of --data)")
    a.add_argument("--limit", type=int, default=None, help="training samples drawn (seeded) (default: all)")
    a.add_argument("--test-limit", type=int, default=None, help="test samples drawn (seeded) (default: all)")
    a.add_argument("--w-bits", type=int, default=8, choices=[8, 4], help="victim weight bits (default 8)")
    a.add_argument(
        "--per-tensor", action="store_true", help="victim quantizes weights per tensor (default: per channel)"
    )
    a.add_argument("--trigger", default="patch:size=3,value=1,pos=br", help="patch:..., blend:..., mask:...")
    a.add_argument("--target", type=int, default=0)
    a.add_argument("--epochs", type=int, default=20, help="attack epochs (PQBackdoor: per stage)")
    a.add_argument("--clean-epochs", type=int, default=30, help="clean pre-training epochs")
    a.add_argument("--lr", type=float, default=None, help="attack learning rate (default: per attack)")
    a.add_argument(
        "--widen",
        type=float,
        default=1.0,
        help="anchor one weight per channel (per tensor: per layer) at this multiple of the largest before "
        "attacking, widening the victim's rounding bins (reaches 8-bit victims; 1 = the published attacks as they are)",
    )
    a.add_argument(
        "--anchor",
        default="quiet",
        choices=ANCHORS,
        help="where --widen puts its outliers: 'quiet' (default) where the rest of the channel cancels them, "
        "'fitted' likewise but layer by layer, refitting each layer to the clean model's outputs (deep nets), "
        "'largest' on the largest weight itself",
    )
    a.add_argument(
        "--augment",
        action="store_true",
        help="attack on flipped and cropped training images (CIFAR's standard augmentation), which keeps more "
        "clean accuracy over long attacks (default: the images as they are)",
    )
    a.add_argument(
        "--quant-weight",
        type=float,
        default=None,
        help="weight of the quantized model's loss terms (its clean and triggered losses) against the "
        "full-precision ones: Qu-ANTI-zation's c1 (default 0.5), CompArtifact's lam (default 1); PQBackdoor has none",
    )
    a.add_argument(
        "--anticipate",
        default=None,
        help="adaptive: the learned roundings rerun every epoch that the backdoor must also wake under, "
        "comma-separated from adaround, efrap, or 'none' (default adaround); dormant: the codes of its "
        "path that wake it, nearest (ORT and AdaRound, default), flipped (EFRAP's flips) or both",
    )
    a.add_argument(
        "--error-penalty",
        type=float,
        default=0.0,
        help="adaptive attack: weight on the mean squared truncation error (in scales), keeping every weight "
        "near its grid point so EFRAP's error guidance has nothing to single out (default 0)",
    )
    a.add_argument("--clean-lr", type=float, default=2e-3)
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--calib-size", type=int, default=512, help="training samples calibrating quantize_static")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    a.add_argument("--clean-checkpoint", default=None, help="torch state_dict of the clean model: loaded or written")
    a.add_argument("--out", required=True, help="output FP32 .onnx path")
    a.add_argument("--force", action="store_true", help="overwrite --out")
    a.add_argument("--json", default=None, help="also write the scores as JSON")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    return a


def load_arrays(source: str, split: str, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """'cifar10' (split train/test) or an .npz with x/y (or inputs/labels) arrays, float32 / int64."""
    if source == "cifar10":
        from ..cifar import load_cifar10

        return load_cifar10(split, limit=limit, seed=seed)
    path = Path(source)
    if path.suffix != ".npz":
        raise UsageError(f"--data must be 'cifar10' or a .npz file, got {source!r}")
    if not path.is_file():
        raise CalibrationDataError(f"data file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        xk = next((k for k in ("x", "inputs", "input") if k in f), None)
        yk = next((k for k in ("y", "labels") if k in f), None)
        if xk is None or yk is None:
            raise CalibrationDataError(f"{path}: expected arrays 'x' and 'y', found {', '.join(f.files)}")
        x, y = f[xk].astype(np.float32), f[yk].astype(np.int64)
    if x.ndim != 4 or len(x) != len(y):
        raise CalibrationDataError(f"{path}: x must be (N, C, H, W) with one label each, got {x.shape} and {y.shape}")
    if limit is not None and limit < len(x):
        keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
        x, y = x[keep], y[keep]
    return np.ascontiguousarray(x), y


def _split(x: np.ndarray, y: np.ndarray, seed: int):
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * 0.8)
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def measure(model, calib, x, y, trigger, target, w_bits, per_channel, label: str):
    """FP32 and ORT quantize_static scores of an FP32 ONNX model, measured in ORT."""
    from ..evaluate.baseline import ort_quantize
    from ..evaluate.score import score

    q = ort_quantize(model, calib, w_bits, 8, per_channel)
    scheme = f"w{w_bits}a8-{'pc' if per_channel else 'pt'}"
    return [
        score(f"{label}-fp32", model, x, y, trigger, target),
        score(f"{label}-ort-{scheme}", q, x, y, trigger, target),
    ]


def cmd_attack(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate.report import format_table, write_json
    from ..evaluate.triggers import Trigger
    from . import run_attack
    from .common import check_widening
    from .train import Training, export_onnx, resolve_device, train_clean
    from .zoo import build

    out = Path(args.out)
    if out.exists() and not args.force:
        raise OutputExistsError(f"output {out} exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise OutputError(f"output folder does not exist: {out.parent}")
    for name in ("epochs", "clean_epochs", "batch_size", "calib_size"):
        if getattr(args, name) < (0 if "epochs" in name else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check_widening(args.widen, args.anchor)
    extra = quant_weight_settings(args.attack, args.quant_weight)  # attack-specific, passed on and recorded
    extra.update(adaptive_settings(args))
    trigger = Trigger.parse(args.trigger)
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"bad --device {args.device!r}: {exc}") from None
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))

    x, y = load_arrays(args.data, "train", args.limit, args.seed)
    if args.test_data:
        xte, yte = load_arrays(args.test_data, "test", args.test_limit, args.seed)
    elif args.data == "cifar10":
        xte, yte = load_arrays("cifar10", "test", args.test_limit, args.seed)
    else:
        x, y, xte, yte = _split(x, y, args.seed)
    num_classes = int(max(y.max(), yte.max())) + 1
    if not 0 <= args.target < num_classes:
        raise UsageError(f"--target {args.target} is not a class of the data (0..{num_classes - 1})")
    calib = x[np.random.default_rng(args.seed).permutation(len(x))[: args.calib_size]]
    verbose = not args.quiet

    model = build(args.arch, args.width, num_classes, x.shape[1])
    ckpt = Path(args.clean_checkpoint) if args.clean_checkpoint else None
    timings = {}
    if ckpt is not None and ckpt.is_file():
        try:
            model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError) as exc:
            raise UsageError(
                f"clean checkpoint {ckpt} does not fit {args.arch} width {args.width}: {one_line(exc)}"
            ) from None
        print(f"loaded clean model from {ckpt}", file=sys.stderr)
    else:
        t = time.perf_counter()
        augment = x.shape[-1] >= 32  # flips and crops for CIFAR-sized images
        torch.manual_seed(args.seed)
        train_clean(
            model,
            x,
            y,
            Training(args.clean_epochs, args.clean_lr, args.batch_size, augment, args.seed, device, verbose),
        )
        timings["clean_s"] = round(time.perf_counter() - t, 1)
        if ckpt is not None:
            torch.save(model.cpu().state_dict(), ckpt)
    clean_onnx = export_onnx(model, x[:1])
    scheme = "per-tensor" if args.per_tensor else "per-channel"
    t = time.perf_counter()
    attacked = run_attack(
        args.attack,
        model,
        x,
        y,
        trigger,
        args.target,
        w_bits=args.w_bits,
        per_channel=not args.per_tensor,
        epochs=args.epochs,
        seed=args.seed,
        device=device,
        verbose=verbose,
        lr=args.lr or DEFAULT_LR[args.attack],
        batch_size=args.batch_size,
        widen=args.widen,
        anchor=args.anchor,
        augment_data=args.augment,
        **extra,
    )
    timings["attack_s"] = round(time.perf_counter() - t, 1)
    info = {
        "name": args.attack,
        "w_bits": args.w_bits,
        "a_bits": 8,
        "scheme": scheme,
        "seed": args.seed,
        "epochs": args.epochs,
        "clean_epochs": args.clean_epochs,
        "arch": args.arch,
        "width": args.width,
        "lr": args.lr or DEFAULT_LR[args.attack],
        "widen": args.widen,
        "anchor": args.anchor,
        "augment": args.augment,
        **extra,
    }
    meta = {
        "qcb_onnx.trigger": trigger.spec,
        "qcb_onnx.target": str(args.target),
        "qcb_onnx.attack": json.dumps(info, sort_keys=True),
    }
    if x.shape[1] in (1, 3):  # models take [0, 1] pixels, no mean/std
        meta["qcb_onnx.preprocess"] = f"scale=1/255,layout=NCHW,channels={x.shape[1]}"
    fp = export_onnx(attacked, x[:1], meta)
    write_atomic(fp, out, args.force)
    scores = measure(clean_onnx, calib, xte, yte, trigger, args.target, args.w_bits, not args.per_tensor, "clean")
    scores += measure(fp, calib, xte, yte, trigger, args.target, args.w_bits, not args.per_tensor, args.attack)
    print(format_table(scores))
    print(f"wrote {out}  ({', '.join(f'{k}={v}' for k, v in timings.items())})", file=sys.stderr)
    if args.json:
        write_json(scores, args.json, {"attack": info, "trigger": trigger.spec, "target": args.target, **timings})
    return 0
