"""The scanner (`python -m qcb_onnx scan`) on a zoo: ROC AUC and TPR at 5 % FPR per attack, fitted on clean models only.

    # 1. attacked models (make_zoo.py, AlexNet w32, seeds 0 and 1; BENCHMARKS.md "Scanning for QCBs")
    # 2. more clean models, other seeds / widths / epochs / architectures:
    python benchmarks/scan_zoo.py train-clean --zoo ~/.cache/qcb_onnx/scan_zoo \
        --models alexnet:32:2:15,alexnet:24:3:15,resnet18:16:0:4,smallcnn:16:0:10 --threads 1
    # 3. scan every model (clean .pt checkpoints exported to ONNX first), score, table:
    python benchmarks/scan_zoo.py scan --zoo ~/.cache/qcb_onnx/scan_zoo      # -> benchmarks/results/scan_zoo.json
    # 4. refit the shipped reference (qcb_onnx/scan/reference.json) on every clean model's signals:
    python benchmarks/scan_zoo.py fit
    # 5. (no zoo at hand) score an earlier run's stored features with this checkout's scored signals:
    python benchmarks/scan_zoo.py rescore --results benchmarks/results/scan_zoo_abee7f8_with_flips.json

A model is attacked when its metadata has `qcb_onnx.attack` (make_zoo.py writes it); whether it is a
real QCB (FP32 ASR < 10 %, ORT quantize_static ASR > 90 %) comes from make_zoo's zoo.json.  Scores
of clean models are leave-one-out: each is scored against a reference fitted on the other clean
models only, never on an attacked one; attacked models against the reference of all clean models.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcb_onnx.evaluate.score import predict  # noqa: E402
from qcb_onnx.output import write_text_atomic  # noqa: E402
from qcb_onnx.redteam.cifar import default_cache_dir, load_cifar10  # noqa: E402
from qcb_onnx.redteam.train import Training, export_onnx, train_clean  # noqa: E402
from qcb_onnx.redteam.zoo import build  # noqa: E402
from qcb_onnx.scan import ScanOptions, collect_signals  # noqa: E402
from qcb_onnx.scan.reference import fit, load_reference, scheme_name  # noqa: E402
from qcb_onnx.scan.report import judge  # noqa: E402
from qcb_onnx.scan.score import CHEAP, FEATURES, SCORED, fit_reference, fit_threshold, model_features  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
RESULTS = ROOT / "benchmarks" / "results" / "scan_zoo.json"
CLEAN_PT = re.compile(r"(?P<arch>[a-z0-9]+)-w(?P<width>\d+)-s(?P<seed>\d+)(?:-e(?P<epochs>\d+))?-clean\.pt$")


def cmd_train_clean(args: argparse.Namespace) -> int:
    """Train clean models `arch:width:seed:epochs` on --limit training images, each saved as a
    state_dict and exported to ONNX in the zoo (skipped when already there)."""
    torch.set_num_threads(args.threads)
    zoo = Path(args.zoo)
    zoo.mkdir(parents=True, exist_ok=True)
    for spec in filter(None, args.models.split(",")):
        arch, width, seed, epochs = spec.split(":")
        stem = f"{arch}-w{width}-s{seed}-e{epochs}-clean"
        if (zoo / f"{stem}.pt").is_file():
            continue
        x, y = load_cifar10("train", args.limit, int(seed), archive=args.archive)
        torch.manual_seed(int(seed))
        model = build(arch, int(width), 10, 3)
        t = time.perf_counter()
        train_clean(model, x, y, Training(int(epochs), 2e-3, 128, True, int(seed), "cpu", False))
        torch.save(model.cpu().state_dict(), zoo / f"{stem}.pt")
        print(f"{stem}: {time.perf_counter() - t:.0f} s", flush=True)
    return 0


def export_clean(zoo: Path) -> list[Path]:
    """Every clean checkpoint of the zoo as an FP32 ONNX model beside it (written once)."""
    out = []
    for pt in sorted(zoo.glob("*-clean.pt")):
        m = CLEAN_PT.match(pt.name)
        if m is None:
            continue
        path = pt.with_suffix(".onnx")
        if not path.is_file():
            model = build(m["arch"], int(m["width"]), 10, 3)
            model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
            info = {"kind": "clean", "arch": m["arch"], "width": int(m["width"]), "seed": int(m["seed"])}
            meta = {"qcb_onnx.scan_zoo": json.dumps(info)}
            onnx.save(export_onnx(model, np.zeros((1, 3, 32, 32), np.float32), meta), path)
        out.append(path)
    return out


CALIB_SEED, CALIB_SIZE = 99, 256  # the scan's calibration images: 256 seeded CIFAR-10 training images
MIN_CDA = 20.0  # % on 1,000 test images: below it a model is degenerate (a dead network), not a zoo member
REFERENCE = ROOT / "qcb_onnx" / "scan" / "reference.json"


def label_of(model: onnx.ModelProto) -> dict:
    """What a zoo model is: clean (scan_zoo.py's export) or attacked (make_zoo.py's metadata)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "qcb_onnx.attack" in meta:
        info = json.loads(meta["qcb_onnx.attack"])
        return {"kind": "attacked", "attack": info["name"], "w_bits": int(info["w_bits"]), "seed": info.get("seed")}
    return {"kind": "clean", **json.loads(meta.get("qcb_onnx.scan_zoo", "{}"))}


def calibration(zoo: Path, archive: str) -> Path:
    """The scan's calibration set, written once into the zoo (CIFAR training images, [0, 1] NCHW)."""
    path = zoo / f"scan_calib_{CALIB_SIZE}.npy"
    if not path.is_file():
        np.save(path, load_cifar10("train", CALIB_SIZE, CALIB_SEED, archive=archive)[0])
    return path


def zoo_signals(zoo: Path, per_channel: bool, archive: str, threads: int) -> dict[str, dict]:
    """Raw scan signals of every model in the zoo, cached in the zoo folder (a model is scanned once)."""
    torch.set_num_threads(threads)
    cache = zoo / f"scan_signals_{scheme_name(per_channel)}.json"
    signals = json.loads(cache.read_text()) if cache.is_file() else {}
    calib = calibration(zoo, archive)
    export_clean(zoo)
    xte, yte = load_cifar10("test", 1000, 0, archive=archive)
    for path in sorted(zoo.glob("*.onnx")):
        model = onnx.load(path, load_external_data=False)
        label = {**label_of(model), "test_cda": round(float((predict(model, xte) == yte).mean() * 100), 2)}
        if path.stem in signals:
            signals[path.stem]["label"] = label
            continue
        sig = collect_signals(path, calib, ScanOptions(per_channel=per_channel, calib_size=CALIB_SIZE))
        signals[path.stem] = {"label": label, "signals": sig}
        cache.write_text(json.dumps(signals))
        print(f"{path.stem}: scanned in {sig['seconds']:.1f} s", flush=True)
    return signals


def roc_auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def tpr_at_fpr(pos: list[float], neg: list[float], fpr: float = 0.05) -> float | None:
    """The largest share of positives at or above a threshold that at most `fpr` of negatives reach."""
    if not pos or not neg:
        return None
    best = 0.0
    for t in sorted(set(pos) | {max(neg) + 1e-9}):
        if sum(n >= t for n in neg) / len(neg) <= fpr:
            best = max(best, sum(p >= t for p in pos) / len(pos))
    return best


def qcb_status(zoo: Path) -> dict[str, dict]:
    """make_zoo.py's measurements by model name: FP32 / ORT CDA and ASR, and whether it is a real QCB."""
    path = zoo / "zoo.json"
    out = {}
    for name, rec in (json.loads(path.read_text()) if path.is_file() else {}).items():
        fp, q = rec["fp32"], rec["ort"]
        out[name] = {
            "fp32": [fp["cda"], fp["asr"]],
            "ort": [q["cda"], q["asr"]],
            "qcb": fp["asr"] < 10 and q["asr"] > 90,
            "meets_bar": rec.get("meets_bar"),
        }
    return out


def evaluate(
    feats: dict[str, dict[str, float]], labels: dict[str, dict], status: dict[str, dict], only: tuple[str, ...] = SCORED
) -> dict:
    """Scores (clean: leave-one-out), verdicts at nested thresholds, and AUC / TPR per attack."""
    clean = sorted(k for k in feats if labels[k]["kind"] == "clean")
    attacked = sorted(k for k in feats if k not in clean)
    rows = {}
    for name in clean:
        rest = [feats[c] for c in clean if c != name]
        section = {"features": fit_reference(rest), "threshold": fit_threshold(rest)}
        rows[name] = {**judge(feats[name], section, only), "threshold": section["threshold"]}
    section = {
        "features": fit_reference([feats[c] for c in clean]),
        "threshold": fit_threshold([feats[c] for c in clean]),
    }
    for name in attacked:
        rows[name] = {**judge(feats[name], section, only), "threshold": section["threshold"]}
    neg = [rows[c]["score"] for c in clean]
    groups: dict[str, list[str]] = {}
    for name in attacked:
        lab = labels[name]
        for key in ("all attacks", lab["attack"], f"{lab['attack']} w{lab['w_bits']}"):
            groups.setdefault(key, []).append(name)
    table = {}
    for key, names in sorted(groups.items()):
        real = [n for n in names if status.get(n, {}).get("qcb")]
        pos, pos_real = [rows[n]["score"] for n in names], [rows[n]["score"] for n in real]
        table[key] = {
            "n_attacked": len(names),
            "n_real_qcb": len(real),
            "n_clean": len(neg),
            "auc": roc_auc(pos, neg),
            "tpr_at_5fpr": tpr_at_fpr(pos, neg),
            "auc_real_qcb": roc_auc(pos_real, neg),
            "tpr_at_5fpr_real_qcb": tpr_at_fpr(pos_real, neg),
            "flagged": sum(rows[n]["verdict"] == "suspicious" for n in names),
        }
    fp = sum(rows[c]["verdict"] == "suspicious" for c in clean)
    return {"rows": rows, "table": table, "clean_flagged": fp, "n_clean": len(clean), "threshold": section["threshold"]}


def usable(signals: dict[str, dict]) -> dict[str, dict]:
    """The zoo's models but the degenerate ones (test CDA below MIN_CDA)."""
    return {k: v for k, v in signals.items() if v["label"].get("test_cda", 100.0) >= MIN_CDA}


def single_signal_auc(feats: dict[str, dict[str, float]], labels: dict[str, dict]) -> dict[str, float | None]:
    """Each feature alone (its clean-referenced z, clean models leave-one-out): AUC over all attacked models."""
    clean = [k for k in feats if labels[k]["kind"] == "clean"]
    keys = sorted({k for f in feats.values() for k in f if k.split("@")[0] in FEATURES})
    out = {}
    for key in keys:
        neg, only = [], (key.split("@")[0],)
        for name in clean:
            ref = fit_reference([feats[c] for c in clean if c != name])
            neg.append(judge({key: feats[name][key]}, {"features": ref, "threshold": 0}, only)["score"])
        ref = fit_reference([feats[c] for c in clean])
        section = {"features": ref, "threshold": 0}
        pos = [judge({key: feats[n][key]}, section, only)["score"] for n in feats if n not in clean]
        out[key] = roc_auc(pos, neg)
    return out


def markdown(result: dict) -> str:
    lines = [
        "| attack | attacked models (real QCBs) | clean models | AUC all | TPR @ 5 % FPR all | AUC real QCBs "
        "| TPR @ 5 % FPR real | flagged at threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for key, r in result["table"].items():
        lines.append(
            f"| {key} | {r['n_attacked']} ({r['n_real_qcb']}) | {r['n_clean']} | {f(r['auc'])} | "
            f"{f(r['tpr_at_5fpr'])} | {f(r['auc_real_qcb'])} | {f(r['tpr_at_5fpr_real_qcb'])} | "
            f"{r['flagged']}/{r['n_attacked']} |"
        )
    lines.append(
        f"\nclean models flagged (threshold fitted without them): {result['clean_flagged']}/{result['n_clean']}"
    )
    return "\n".join(lines)


def cmd_scan(args: argparse.Namespace) -> int:
    zoo = Path(args.zoo)
    every = zoo_signals(zoo, not args.per_tensor, args.archive, args.threads)
    signals, status = usable(every), qcb_status(zoo)
    models = {
        name: {
            **v["label"],
            **status.get(name, {}),
            "scan_seconds": v["signals"]["seconds"],
            "features": model_features(v["signals"]),
        }
        for name, v in sorted(signals.items())
    }
    excluded = {k: v["label"] for k, v in every.items() if k not in models}
    return write_results(models, excluded, scheme_name(not args.per_tensor), Path(args.out))


def cmd_rescore(args: argparse.Namespace) -> int:
    """Score an earlier run's stored model features with this checkout's SCORED / CHEAP features (the zoo
    itself is not needed: features of signals that were dropped are ignored, the rest are unchanged)."""
    prior = json.loads(Path(args.results).read_text())
    return write_results(prior["models"], prior.get("excluded_degenerate", {}), prior["scheme"], Path(args.out))


def write_results(models: dict[str, dict], excluded: dict, scheme: str, dest: Path) -> int:
    """Evaluate the zoo's model features with every scored signal and with the cheap ones, print the
    tables and write them with each model's score into `dest`."""
    feats = {name: m["features"] for name, m in models.items()}
    status = {name: {"qcb": m.get("qcb")} for name, m in models.items()}
    full, cheap = evaluate(feats, models, status, SCORED), evaluate(feats, models, status, CHEAP)
    for name, m in models.items():
        m.update(
            score=full["rows"][name]["score"],
            verdict=full["rows"][name]["verdict"],
            top_signal=full["rows"][name]["top"],
            threshold=full["rows"][name]["threshold"],
            cheap_score=cheap["rows"][name]["score"],
        )
    out = {
        "command": " ".join(["python", "benchmarks/scan_zoo.py", *(argv_used or [])]),
        "scheme": scheme,
        "scored_signals": list(SCORED),
        "all_signals": {k: full[k] for k in ("table", "clean_flagged", "n_clean", "threshold")},
        "cheap_signals": {k: cheap[k] for k in ("table", "clean_flagged", "n_clean", "threshold")},
        "single_signal_auc": single_signal_auc(feats, models),
        "models": models,
        "excluded_degenerate": excluded,
    }
    write_text_atomic(json.dumps(out, indent=1), dest, force=True)
    print("all signals:\n" + markdown(full))
    print("\ncheap signals only (what convert's summary uses):\n" + markdown(cheap))
    for name, m in models.items():
        qcb = "" if m["kind"] == "clean" else f" fp32 {m.get('fp32')} ort {m.get('ort')} qcb={m.get('qcb')}"
        print(f"{name}: {m['verdict']} score {m['score']:.2f} ({m['top_signal']}) cheap {m['cheap_score']:.2f}{qcb}")
    print(
        "single-signal AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in out["single_signal_auc"].items() if v is not None)
    )
    print(f"wrote {dest}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Refit the shipped reference on the zoo's clean models (every granularity scanned)."""
    zoo = Path(args.zoo)
    reference = load_reference() if REFERENCE.is_file() else {}
    for per_channel in (True, False):
        cache = zoo / f"scan_signals_{scheme_name(per_channel)}.json"
        if not cache.is_file():
            continue
        signals = usable(json.loads(cache.read_text()))
        clean = sorted(k for k, v in signals.items() if v["label"]["kind"] == "clean")
        command = f"python benchmarks/scan_zoo.py fit --zoo {args.zoo}"
        section = reference[scheme_name(per_channel)] = fit([signals[c]["signals"] for c in clean], clean, command)
        print(f"{scheme_name(per_channel)}: {len(clean)} clean models, threshold {section['threshold']}")
    write_text_atomic(json.dumps(reference, indent=1) + "\n", REFERENCE, force=True)
    print(f"wrote {REFERENCE}")
    return 0


argv_used: list[str] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-clean", help="train extra clean models into the zoo")
    t.add_argument("--zoo", default=str(default_cache_dir() / "scan_zoo"))
    t.add_argument("--models", required=True, help="arch:width:seed:epochs,...")
    t.add_argument("--limit", type=int, default=10000)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--archive", default=str(ARCHIVE))
    for name in ("scan", "fit"):
        c = sub.add_parser(name)
        c.add_argument("--zoo", default=str(default_cache_dir() / "scan_zoo"))
        c.add_argument("--archive", default=str(ARCHIVE))
        c.add_argument("--threads", type=int, default=1)
        c.add_argument("--per-tensor", action="store_true")
        c.add_argument("--out", default=str(RESULTS))
    r = sub.add_parser("rescore", help="score an earlier scan_zoo.json's stored features with this checkout's signals")
    r.add_argument("--results", required=True)
    r.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global argv_used
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return {"train-clean": cmd_train_clean, "scan": cmd_scan, "rescore": cmd_rescore, "fit": cmd_fit}[args.command](
        args
    )


if __name__ == "__main__":
    sys.exit(main())
