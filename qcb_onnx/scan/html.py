"""The scan's HTML report: one self-contained page (inline SVG and CSS, no script, nothing fetched).

Layer and tensor names come from the model, which is untrusted: every string is escaped
(`html.escape`, quotes included) before it reaches the page, in text and in attributes alike.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

BAR_W, PLOT_H, PAD = 14, 120, 36
PLOTS = (  # per-layer signal, title, the clean / null level to draw, log scale
    ("boundary_excess", "weights near a rounding boundary (x uniform)", 1.0, False),
    ("err_rms", "RMS truncation error (x uniform)", 1.0, False),
    ("neuron_outliers", "share of outlier output channels (mean e^2 > 4 SE)", None, False),
    ("concentration_nearest", "nearest error in the top 5 % channels (x even)", 1.0, False),
    ("anchor_ratio_channel", "largest / second |w|, median over channels", 1.0, False),
)
STYLE = """body{font-family:sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}td.l{text-align:left}.hot{background:#fdd}.verdict-suspicious{color:#b00}
.verdict-clean{color:#070}svg{margin:4px 8px 4px 0;background:#fafafa}"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str, level: float | None, log: bool) -> str:
    """One inline SVG bar chart, a bar per layer (its name in a tooltip), a dashed line at `level`."""
    vals = [max(v, 1e-6) if log else v for v in values]
    if not vals:
        return ""

    def t(v: float) -> float:
        return math.log10(v) if log else v

    lo = min(t(v) for v in vals) if log else min(0.0, *vals)
    hi = max([t(v) for v in vals] + ([t(level)] if level is not None else []))
    span = (hi - lo) or 1.0
    width = PAD + BAR_W * len(vals) + 8

    def y(v: float) -> float:
        return 20 + PLOT_H * (1 - (t(v) - lo) / span)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PLOT_H + 40}" role="img">',
        f'<text x="4" y="13" font-size="11">{esc(title)}</text>',
        f'<text x="2" y="{y(hi if not log else 10**hi) + 4:.1f}" font-size="9">{_fmt(10**hi if log else hi)}</text>',
    ]
    base = 20 + PLOT_H
    for i, (v, name) in enumerate(zip(vals, labels, strict=True)):
        top = y(v)
        parts.append(
            f'<rect x="{PAD + BAR_W * i}" y="{min(top, base):.1f}" width="{BAR_W - 2}" height="{abs(base - top):.1f}" '
            f'fill="#48c"><title>{esc(name)}: {esc(_fmt(values[i]))}</title></rect>'
        )
    if level is not None:
        parts.append(
            f'<line x1="{PAD}" x2="{width - 4}" y1="{y(level):.1f}" y2="{y(level):.1f}" '
            'stroke="#c33" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _histogram(layers: Sequence[dict]) -> str:
    """|e| density over [0, 1/2], weights of all layers pooled, against the uniform null (1.0)."""
    n = sum(layer["n"] for layer in layers) or 1
    bins = len(layers[0]["frac_hist"]) if layers else 0
    pooled = [sum(layer["frac_hist"][i] * layer["n"] for layer in layers) / n for i in range(bins)]
    labels = [f"|e| {i / (2 * bins):.3f}-{(i + 1) / (2 * bins):.3f}" for i in range(bins)]
    return bar_chart(pooled, labels, "|e| = |W/s - round(W/s)| density, 0 -> 1/2 (uniform = 1)", 1.0, False)


def heatmap(mask: Sequence[Sequence[float]], title: str, cell: int = 5) -> str:
    """The trigger search's mask as an SVG grid, white = 0, black = 1."""
    if not mask or not mask[0]:
        return ""
    h, w = len(mask), len(mask[0])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * cell + 8}" height="{h * cell + 24}" role="img">']
    parts.append(f'<text x="4" y="13" font-size="11">{esc(title)}</text>')
    for i, row in enumerate(mask):
        for j, v in enumerate(row):
            g = int(255 * (1 - min(max(float(v), 0.0), 1.0)))
            x, y = 4 + j * cell, 18 + i * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({g},{g},{g})"/>')
    parts.append("</svg>")
    return "".join(parts)


def _signal_table(report: dict) -> str:
    head = ("signal", "value", "clean median", "clean spread", "z", "meaning")
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for key, s in report["signals"].items():
        hot = s["z"] is not None and s["z"] > report["threshold"]
        rows.append(
            f'<tr class="{"hot" if hot else ""}"><td class="l">{esc(key)}</td><td>{esc(_fmt(s["value"]))}</td>'
            f"<td>{esc(_fmt(s['clean_median']))}</td><td>{esc(_fmt(s['clean_spread']))}</td>"
            f'<td>{esc(_fmt(s["z"]))}</td><td class="l">{esc(s["meaning"])}</td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


def render(report: dict) -> str:
    """The whole page for a report built by report.build_report."""
    verdict = report["verdict"]
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>qcb-onnx scan: {esc(report['model'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>qcb-onnx scan: {esc(report['model'])}</h1>",
        f'<p class="verdict-{esc(verdict)}"><b>{esc(verdict)}</b>: score {esc(_fmt(report["score"]))} '
        f"(threshold {esc(_fmt(report['threshold']))}; top signal {esc(report['top_signal'])}). "
        f"{esc(report['scheme'])}, weight bits {esc(' '.join(map(str, report['w_bits'])))}, "
        f"{esc(report['calibration_size'])} calibration samples.</p>",
        "<p>Each signal is compared with clean models (median and robust spread; z = how many spreads away, "
        "one-sided where only 'more' is suspicious). The score is the largest z. No trigger or target "
        "label is used; a clean verdict is not proof of absence (README, the scan command).</p>",
        _signal_table(report),
    ]
    for bits, layers in report["layers"].items():
        labels = [layer["node"] or layer["weight"] for layer in layers]
        out.append(f"<h2>victim grid: {esc(bits)}-bit weights</h2><div>{_histogram(layers)}")
        for key, title, level, log in PLOTS:
            if all(key in layer for layer in layers):
                out.append(bar_chart([float(layer[key]) for layer in layers], labels, title, level, log))
        out.append("</div><table><tr><th>layer</th><th>weights</th>")
        keys = [k for k, *_ in PLOTS if all(k in layer for layer in layers)]
        out.append("".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>")
        for name, layer in zip(labels, layers, strict=True):
            cells = "".join(f"<td>{esc(_fmt(float(layer[k])))}</td>" for k in keys)
            out.append(f'<tr><td class="l">{esc(name)}</td><td>{esc(layer["n"])}</td>{cells}</tr>')
        out.append("</table>")
        model = dict(report["model_signals"].get(bits, {}))
        mask = model.pop("trigger_mask", None)
        if model:
            items = ", ".join(f"{esc(k)} {esc(_fmt(v))}" for k, v in model.items())
            out.append(f"<p>FP32 vs nearest on the calibration samples: {items}</p>")
        if mask:
            out.append(heatmap(mask, "where the trigger search put its stamp (mask, black = 1)"))
    out.append("</body></html>")
    return "\n".join(out)
