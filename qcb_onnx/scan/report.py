"""A scan's result: the verdict, the score and every signal behind it, as one JSON-ready dict."""

from __future__ import annotations

from collections.abc import Sequence

from .reference import scheme_name, section_for
from .score import FEATURES, SCORED, combined, model_features, z_scores


def verdict_of(score: float, threshold: float) -> str:
    return "suspicious" if score > threshold else "clean"


def judge(features: dict[str, float], section: dict, only: Sequence[str] = SCORED) -> dict:
    """Score and verdict of a model's features against one reference section."""
    z = z_scores(features, section["features"])
    score, top = combined(z, only)
    return {"verdict": verdict_of(score, section["threshold"]), "score": round(score, 3), "top": top, "z": z}


def build_report(model: str, signals: dict, reference: dict) -> dict:
    """The JSON the CLI writes: `verdict` ("clean" / "suspicious") and `score` (higher = more suspicious)
    first, then each feature with its clean median, spread and z, and the per-layer signals."""
    section = section_for(reference, signals["per_channel"])
    features = model_features(signals)
    judged = judge(features, section)
    refs = section["features"]
    table = {
        key: {
            "value": round(value, 5),
            "z": round(judged["z"][key], 3) if key in judged["z"] else None,
            "clean_median": round(refs[key]["median"], 5) if key in refs else None,
            "clean_spread": round(refs[key]["scale"], 5) if key in refs else None,
            "meaning": FEATURES[key.split("@")[0]].description,
            "scored": key.split("@")[0] in SCORED,
        }
        for key, value in sorted(features.items())
    }
    return {
        "verdict": judged["verdict"],
        "score": judged["score"],
        "threshold": section["threshold"],
        "top_signal": judged["top"],
        "model": model,
        "scheme": scheme_name(signals["per_channel"]),
        "w_bits": [int(b) for b in signals["bits"]],
        "calibration_size": signals["calibration_size"],
        "seconds": signals.get("seconds"),
        "reference": {"fitted_on": len(section.get("fitted_on", [])), "command": section.get("command")},
        "signals": table,
        "model_signals": {b: s["model"] for b, s in signals["bits"].items()},
        "layers": {b: s["layers"] for b, s in signals["bits"].items()},
    }


def summary_line(report: dict) -> str:
    """The one line the CLI prints: verdict, score against the threshold, and the signal that decided."""
    top = report["top_signal"]
    why = f", top signal {top} (z {report['signals'][top]['z']:.1f})" if top else ""
    return (
        f"scan: {report['verdict']} (score {report['score']:.2f}, threshold {report['threshold']:.2f}{why}; "
        f"{report['scheme']}, w_bits {' '.join(map(str, report['w_bits']))})"
    )
