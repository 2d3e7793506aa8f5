"""One self-contained HTML page from an `evaluate --json` result: CDA/ASR per model, each qcb-onnx
model's per-layer flip ratios and reconstruction errors, and the settings it was converted with.

Self-contained because a report is mailed, attached to tickets and opened offline, long after the run:
it must look the same everywhere and fetch nothing (a page that loads a script, font or image tells a
server it was opened, and can change after it was written).  So the CSS is inline, the charts are SVG
drawn here, and there is no JavaScript.  Model names, layer names and metadata come from files a third
party made: every string from the JSON is HTML-escaped, and every number is checked finite before it
becomes an SVG coordinate.  The page holds no timestamp: the same result renders to the same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..text import one_line
from .score import Score

MAX_BYTES = 64 << 20  # an evaluate result of a 1,000-layer model is well under a megabyte
CDA, ASR, ASR_ALL = "#3b7dd8", "#d8543b", "#e8a23b"  # CDA and ASR as in report.plot
FLIP, ERROR = "#6a4fb3", "#2a9d8f"


@dataclass
class Layer:
    node: str
    weight: str
    flip_ratio: float | None
    error: float | None  # reconstruction error of the chosen rounding, in nearest rounding's (1 = nearest's)
    strength: float | None


@dataclass
class QcbModel:
    """One evaluated qcb-onnx output, as its metadata describes it."""

    model: str
    file: str
    meta: dict[str, Any]
    config: dict[str, Any]
    layers: list[Layer] = field(default_factory=list)


@dataclass
class Result:
    source: str
    scores: list[Score]
    run: dict[str, Any]  # data, trigger, target
    files: list[tuple[str, str, dict[str, Any]]] | None  # (model, file, qcb_onnx metadata); None: not recorded
    qcb: list[QcbModel]


def load_result(path: str | Path) -> Result:
    """Read and check a result file; anything but what `evaluate --json` writes is a UsageError naming
    the first thing wrong, so the page is never drawn from half-understood input."""
    path = Path(path)
    hint = "expected the JSON `python -m qcb_onnx evaluate ... --json FILE` writes"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UsageError(f"{path} is over {MAX_BYTES >> 20} MiB: not an evaluate result")
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"result file not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; {hint}") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{path} is not JSON ({one_line(exc, 120)}); {hint}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {one_line(exc)}") from None
    try:
        return _parse(payload, str(path))
    except _Shape as exc:
        raise UsageError(f"{path}: {exc}; {hint}") from None


class _Shape(Exception):
    """Where a result file departs from evaluate's format (a JSON path and what was wanted)."""


def _parse(payload: Any, source: str) -> Result:
    top = _get(payload, dict, "the top level", "an object")
    rows = _get(top.get("results"), list, "results", "a list of scores")
    if not rows:
        raise _Shape("results is empty")
    scores = []
    for i, row in enumerate(rows):
        row = _get(row, dict, f"results[{i}]", "an object")
        model = _get(row.get("model"), str, f"results[{i}].model", "a string")
        cda, asr, asr_all = (_number(row.get(k), f"results[{i}].{k}") for k in ("cda", "asr", "asr_all"))
        n_clean, n_trig = (
            _get(row.get(k, 0), int, f"results[{i}].{k}", "an integer") for k in ("n_clean", "n_triggered")
        )
        scores.append(Score(model, cda, asr, n_clean, n_trig, asr_all))
    run = {k: top[k] for k in ("data", "trigger", "target") if top.get(k) is not None}
    files, qcb = None, []
    if "model_metadata" in top:
        files = []
        for i, entry in enumerate(_get(top["model_metadata"], list, "model_metadata", "a list")):
            where = f"model_metadata[{i}]"
            entry = _get(entry, dict, where, "an object")
            model = _get(entry.get("model"), str, f"{where}.model", "a string")
            file = _get(entry.get("file"), str, f"{where}.file", "a string")
            meta = _get(entry.get("metadata"), dict, f"{where}.metadata", "an object")
            files.append((model, file, meta))
            if "qcb_onnx.config" in meta:
                qcb.append(_qcb_model(model, file, meta, f"{where}.metadata"))
    return Result(source, scores, run, files, qcb)


def _qcb_model(model: str, file: str, meta: dict[str, Any], where: str) -> QcbModel:
    config = _get(meta["qcb_onnx.config"], dict, f"{where}['qcb_onnx.config']", "an object")
    layers = []
    if "qcb_onnx.layers" in meta:
        for j, layer in enumerate(_get(meta["qcb_onnx.layers"], list, f"{where}['qcb_onnx.layers']", "a list")):
            at = f"{where}['qcb_onnx.layers'][{j}]"
            layer = _get(layer, dict, at, "an object")
            names = (_get(layer.get(k), str, f"{at}.{k}", "a string") for k in ("node", "weight"))
            values = (_number(layer.get(k), f"{at}.{k}") for k in ("flip_ratio", "error_vs_nearest", "strength"))
            layers.append(Layer(*names, *values))
    elif "qcb_onnx.flip_ratios" in meta:  # older outputs: flip ratios per weight only
        flips = _get(meta["qcb_onnx.flip_ratios"], dict, f"{where}['qcb_onnx.flip_ratios']", "an object")
        layers = [
            Layer("", str(w), _number(v, f"{where}['qcb_onnx.flip_ratios'].{w}"), None, None) for w, v in flips.items()
        ]
    return QcbModel(model, file, meta, config, layers)


def _get(value: Any, kind: type, where: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Shape(f"{where} is not {what}")
    return value


def _number(value: Any, where: str) -> float | None:
    """A score or a layer value: a number, or absent / null / NaN (not measured), shown as n/a."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Shape(f"{where} is not a number")
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- page

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#fff;
max-width:1100px;margin:24px auto;padding:0 20px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dce4}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dce4;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f7}td.n{text-align:right}.na{color:#8a909c}.note{color:#4a5160;font-size:13px}
.none{background:#fff6e0;border:1px solid #f0d898;padding:8px 12px}code,.mono{font-family:ui-monospace,monospace}
svg{display:block;margin:6px 0 14px}svg text{font:11px system-ui,sans-serif;fill:#1d2330}svg text.na{fill:#8a909c}
"""


def render(result: Result) -> str:
    """The whole page, as text."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>qcb-onnx report: {_e(Path(result.source).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>qcb-onnx evaluation report</h1>",
        f'<p class="note">From <code>{_e(result.source)}</code>, written by <code>evaluate --json</code>; '
        "every number was measured in ONNX Runtime on the model files.</p>",
        _run_section(result),
        _scores_section(result.scores),
        _layers_section(result),
        _settings_section(result),
        f'<p class="note">qcb-onnx {_e(__version__)} report. Self-contained: no scripts, no external resources.</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _run_section(result: Result) -> str:
    rows = [(k, result.run[k]) for k in ("data", "trigger", "target") if k in result.run]
    out = ["<h2>Run</h2>", _table([], [[_e(k), _code(v)] for k, v in rows], show_head=False) if rows else ""]
    if result.files is None:
        out.append(
            '<p class="none">This result records no model metadata (an evaluate older than the report): '
            "rerun <code>evaluate --json</code> for the per-layer and settings sections.</p>"
        )
        return "\n".join(out)
    described = [[_e(m), _code(f), _e(_kind(meta))] for m, f, meta in result.files]
    out += ["<h3>Model files</h3>", _table(["model", "file", "what"], described)]
    return "\n".join(out)


def _kind(meta: dict[str, Any]) -> str:
    if "qcb_onnx.config" in meta:
        bits = f"w{meta.get('qcb_onnx.w_bits', '?')}a{meta.get('qcb_onnx.a_bits', '?')}"
        return f"qcb-onnx output: {meta.get('qcb_onnx.method', '?')} {bits}, {meta.get('qcb_onnx.scheme', '')}"
    if "qcb_onnx.attack" in meta:
        return f"backdoored model (attack recorded: {meta['qcb_onnx.attack']})"
    return "model without qcb-onnx metadata"


def _scores_section(scores: list[Score]) -> str:
    rows = [
        [_e(s.model), _num(s.cda, 2), _num(s.asr, 2), _num(s.asr_all, 2), _num(s.n_clean), _num(s.n_triggered)]
        for s in scores
    ]
    chart = _bars(
        [(s.model, [s.cda, s.asr, s.asr_all]) for s in scores],
        [("CDA %", CDA), ("ASR %", ASR), ("ASR all %", ASR_ALL)],
        scale=100.0,
        digits=1,
    )
    return "\n".join(
        [
            "<h2>Clean accuracy and attack success</h2>",
            '<p class="note">CDA: top-1 accuracy on the clean test inputs. ASR: triggered test inputs of '
            "non-target classes classified as the target. ASR all: every triggered input, target class included.</p>",
            _table(["model", "CDA %", "ASR %", "ASR all %", "clean inputs", "triggered non-target"], rows, numeric=1),
            chart,
        ]
    )


def _layers_section(result: Result) -> str:
    out = ["<h2>Per-layer rounding</h2>"]
    if not result.qcb:
        if result.files is not None:
            out.append(
                '<p class="none">No qcb-onnx model among the evaluated models (none carries '
                "<code>qcb_onnx.config</code> metadata): no per-layer flip ratios or errors to show.</p>"
            )
        return "\n".join(out)
    out.append(
        '<p class="note">Flip ratio: share of the integer weights that differ from nearest rounding\'s. '
        "Error: the layer's output reconstruction error E||W&#771;x&#771; - Wx||&sup2; with the chosen rounding, "
        "in units of nearest rounding's (1 = nearest's; below 1, the chosen rounding reproduces the FP32 "
        "layer better).</p>"
    )
    for q in result.qcb:
        out.append(f'<h3>{_e(q.model)} <span class="note">({len(q.layers)} layers)</span></h3>')
        if not q.layers:
            out.append('<p class="none">This model records no per-layer metadata.</p>')
            continue
        labels = [layer.node or layer.weight for layer in q.layers]
        out.append("<p><b>Flip ratio</b></p>")
        out.append(
            _bars(
                [(n, [la.flip_ratio]) for n, la in zip(labels, q.layers, strict=True)], [("flip ratio", FLIP)], 1.0, 3
            )
        )
        if any(layer.error is not None for layer in q.layers):
            out.append("<p><b>Reconstruction error vs nearest rounding</b></p>")
            errs = [(n, [la.error]) for n, la in zip(labels, q.layers, strict=True)]
            out.append(_bars(errs, [("error / nearest's", ERROR)], 1.0, 3, reference=(1.0, "nearest = 1")))
        rows = [
            [str(i), _e(la.node), _e(la.weight), _num(la.flip_ratio, 4), _num(la.error, 4), _num(la.strength, 4)]
            for i, la in enumerate(q.layers)
        ]
        out.append(_table(["#", "node", "weight", "flip ratio", "error vs nearest", "strength"], rows, numeric=3))
    return "\n".join(out)


def _settings_section(result: Result) -> str:
    out = ["<h2>Conversion settings</h2>"]
    if not result.qcb:
        if result.files is not None:
            out.append('<p class="none">No qcb-onnx model among the evaluated models: no conversion settings.</p>')
        return "\n".join(out)
    for q in result.qcb:
        out.append(
            f'<h3>{_e(q.model)} <span class="note">(<code>{_e(q.file)}</code>, qcb-onnx '
            f"{_e(q.meta.get('qcb_onnx.version', '?'))})</span></h3>"
        )
        out.append(
            '<p class="note">The resolved config, as recorded in the model; '
            f"<code>python -m qcb_onnx info {_e(q.file)} --toml</code> prints it as a <code>--config</code> file.</p>"
        )
        rows = []
        for section, values in q.config.items():
            if isinstance(values, dict):
                rows += [[_e(section), _e(k), _code(v)] for k, v in values.items()]
            else:
                rows.append([_e(section), "", _code(values)])
        out.append(_table(["section", "option", "value"], rows))
        search = q.meta.get("qcb_onnx.error_budget")
        if isinstance(search, dict):
            out.append(f"<p><b>Error budget</b>: {_code(search.get('chosen'))} ({_e(search.get('mode', '?'))})</p>")
            probes = search.get("probes")
            if isinstance(probes, list) and all(isinstance(p, dict) for p in probes) and probes:
                rows = [[_code(p.get("budget")), _code(p.get("agreement"))] for p in probes]
                out.append(_table(["budget tried", "top-1 agreement with FP32 on calibration, %"], rows, numeric=0))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ drawing


def _bars(
    rows: list[tuple[str, list[float | None]]],
    series: list[tuple[str, str]],
    scale: float,
    digits: int,
    reference: tuple[float, str] | None = None,
) -> str:
    """Horizontal grouped bars as inline SVG: a group per row (model or layer), a bar per series, the
    axis from 0 to `scale` or the largest value.  Horizontal, because layer names are long."""
    label_w, plot_w, bar_h, gap = 250, 560, 12, 8
    top = 22 if len(series) > 1 or reference is not None else 8  # room for the legend or the reference's label
    vmax = max([scale] + [v for _, values in rows for v in values if v is not None])
    group_h = bar_h * len(series) + gap
    height = top + group_h * len(rows) + 24
    width = label_w + plot_w + 70
    x0 = label_w

    def x(v: float) -> float:
        return x0 + plot_w * min(max(v, 0.0), vmax) / vmax

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    for k, (name, colour) in enumerate(series if len(series) > 1 else []):
        lx = x0 + 130 * k
        out.append(f'<rect x="{lx}" y="4" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="13">{_e(name)}</text>')
    axis_y = top + group_h * len(rows)
    for t in range(5):
        v = vmax * t / 4
        out.append(f'<line x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" y2="{axis_y}" stroke="#e3e6ec"/>')
        out.append(f'<text x="{x(v):.1f}" y="{axis_y + 14}" text-anchor="middle">{v:.3g}</text>')
    if reference is not None and reference[0] <= vmax:
        rx = x(reference[0])
        out.append(f'<line x1="{rx:.1f}" y1="{top}" x2="{rx:.1f}" y2="{axis_y}" stroke="#555" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{rx:.1f}" y="{top - 6}" text-anchor="middle">{_e(reference[1])}</text>')
    for i, (name, values) in enumerate(rows):
        y = top + group_h * i
        short = name if len(name) <= 38 else name[:37] + "\u2026"
        label_y = y + bar_h * len(series) / 2 + 4
        out.append(
            f'<text x="{label_w - 8}" y="{label_y:.1f}" text-anchor="end"><title>{_e(name)}</title>{_e(short)}</text>'
        )
        for k, ((_, colour), v) in enumerate(zip(series, values, strict=True)):
            by = y + bar_h * k
            if v is None:
                out.append(f'<text x="{x0 + 4}" y="{by + bar_h - 2}" class="na">n/a</text>')
                continue
            out.append(
                f'<rect class="bar" x="{x0}" y="{by}" width="{x(v) - x0:.1f}" height="{bar_h - 1}" fill="{colour}"/>'
            )
            out.append(f'<text x="{x(v) + 4:.1f}" y="{by + bar_h - 2}">{v:.{digits}f}</text>')
    out.append(f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{axis_y}" stroke="#555"/>')
    out.append("</svg>")
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]], numeric: int | None = None, show_head: bool = True) -> str:
    """Cells are HTML already (escaped by the caller); columns from `numeric` on are right-aligned."""
    out = ["<table>"]
    if show_head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = [
            f'<td class="n">{c}</td>' if numeric is not None and j >= numeric else f"<td>{c}</td>"
            for j, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _code(value: Any) -> str:
    """A value from the JSON, escaped, as the JSON spells it (strings bare)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f'<span class="mono">{_e(text)}</span>'


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None or not math.isfinite(value):
        return '<span class="na">n/a</span>'
    return f"{value:.{digits}f}"
