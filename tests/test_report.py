"""`report --html`: a self-contained page from a real `evaluate --json` run on the shipped sample, its
content checked against the model files, hostile strings escaped, rendered in headless Chromium; and
evaluate's progress bars (CLI on, --quiet and the Python API off)."""

from __future__ import annotations

import json
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcb_onnx.cli import main
from qcb_onnx.evaluate.htmlreport import CDA, ERROR, FLIP
from qcb_onnx.evaluate.score import score
from qcb_onnx.evaluate.triggers import Trigger

from .conftest import SAMPLES

FP32, CALIB, TEST = SAMPLES / "qcb_digits.onnx", SAMPLES / "calib.npy", SAMPLES / "test.npz"
HOSTILE = "<img src=x onerror=\"console.error('xss-img')\">&<script>console.error('xss-script')</script>"
WINDOW = (1200, 2200)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, Path]:
    """The README's two commands on the shipped sample (64 calibration samples, so a few seconds):
    a qcb-onnx model, then FP32 / ORT / qcb-onnx evaluated into a JSON result."""
    tmp = tmp_path_factory.mktemp("report")
    efrap = tmp / "digits_efrap.onnx"
    common = ["--calib", str(CALIB), "--calib-size", "64", "--quiet"]
    assert main(["convert", str(FP32), "--out", str(efrap), "--w-bits", "4", *common]) == 0
    result = tmp / "result.json"
    argv = ["evaluate", str(FP32), str(efrap), "--data", str(TEST), "--baseline", "ort", "--providers", "cpu"]
    assert main([*argv, *common, "--json", str(result)]) == 0
    return {"tmp": tmp, "efrap": efrap, "result": result}


class _Page(HTMLParser):
    """The page's tables as rows of cell texts, every start tag, and every SVG rect's attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.tags: list[str] = []
        self.rects: list[dict[str, str]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "rect":
            self.rects.append(dict(attrs))

    def bars(self, colour: str) -> list[float]:
        """The lengths, in px, of the chart bars drawn in `colour`, top to bottom."""
        return [float(r["width"]) for r in self.rects if r.get("class") == "bar" and r.get("fill") == colour]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, *headers: str) -> list[list[str]]:
        """The body rows of the first table whose column headers start with `headers`."""
        return next(t[1:] for t in self.tables if t and t[0][: len(headers)] == list(headers))


def _report(result: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["report", str(result), "--html", str(out), *extra])
    return code, out.read_text(encoding="utf-8") if code == 0 else ""


def test_evaluate_json_carries_model_metadata(evaluated):
    """evaluate --json keeps its keys and adds each file's qcb_onnx metadata, decoded, as the model holds it."""
    payload = json.loads(evaluated["result"].read_text())
    assert list(payload)[:5] == ["results", "data", "trigger", "target", "models"]  # unchanged
    assert [r["model"] for r in payload["results"]] == ["qcb_digits", "ort-quantize_static-w4a8-pc", "digits_efrap"]
    assert payload["trigger"] == "patch:size=2,value=1,pos=br" and payload["target"] == 0
    fp_entry, efrap_entry = payload["model_metadata"]
    assert (fp_entry["model"], fp_entry["file"]) == ("qcb_digits", str(FP32))
    assert "qcb_onnx.config" not in fp_entry["metadata"] and "qcb_onnx.attack" in fp_entry["metadata"]
    meta = {p.key: p.value for p in onnx.load(evaluated["efrap"]).metadata_props}
    got = efrap_entry["metadata"]
    for key in ("qcb_onnx.config", "qcb_onnx.layers", "qcb_onnx.flip_ratios", "qcb_onnx.error_budget"):
        assert got[key] == json.loads(meta[key]), key
    assert got["qcb_onnx.method"] == "efrap" and got["qcb_onnx.w_bits"] == "4"  # plain text stays text
    assert len(got["qcb_onnx.layers"]) == 4


def test_report_content_matches_the_run(evaluated):
    """The page shows every model's scores, every layer's flip ratio / error / strength as the model
    records them (table and bar lengths), and the resolved config; it references nothing outside
    itself, and the same result renders to the same bytes."""
    out = evaluated["tmp"] / "report.html"
    code, text = _report(evaluated["result"], out, "--force")
    assert code == 0
    page = _Page(text)
    rows = json.loads(evaluated["result"].read_text())["results"]
    expected = [[r["model"], *(f"{r[k]:.2f}" for k in ("cda", "asr", "asr_all")), str(r["n_clean"])] for r in rows]
    assert [row[:5] for row in page.table("model", "CDA %")] == expected
    layers = json.loads({p.key: p.value for p in onnx.load(evaluated["efrap"]).metadata_props}["qcb_onnx.layers"])
    assert page.table("#") == [
        [
            str(i),
            la["node"],
            la["weight"],
            f"{la['flip_ratio']:.4f}",
            f"{la['error_vs_nearest']:.4f}",
            f"{la['strength']:.4f}",
        ]
        for i, la in enumerate(layers)
    ]
    # bar lengths: 560 px is the full axis (flip ratio 1; error 1 = nearest's, every error here is below it)
    assert page.bars(FLIP) == [round(560 * la["flip_ratio"], 1) for la in layers]
    assert page.bars(ERROR) == [round(560 * la["error_vs_nearest"], 1) for la in layers]
    assert page.bars(CDA) == [round(5.6 * r["cda"], 1) for r in rows]
    settings = {(s, k): v for s, k, v in page.table("section")}
    assert settings[("weights", "w_bits")] == "4" and settings[("rounding", "method")] == "efrap"
    assert settings[("activations", "calib_size")] == "64" and settings[("activations", "calib_method")] == "minmax"
    assert text.count("<svg") == 3 and "No qcb-onnx model" not in text
    for outside in ("<script", "<link", "http:", "https:", "url(", "@import", "src="):
        assert outside not in text, outside
    code, again = _report(evaluated["result"], out, "--force")
    assert code == 0 and again == text


def test_report_escapes_hostile_strings(evaluated, tmp_path):
    """Model, file, layer and config strings from the JSON are text on the page, never markup."""
    payload = json.loads(evaluated["result"].read_text())
    payload["results"][2]["model"] = HOSTILE
    payload["data"] = HOSTILE
    entry = payload["model_metadata"][1]
    entry["model"] = entry["file"] = HOSTILE
    entry["metadata"]["qcb_onnx.layers"][0]["node"] = HOSTILE
    entry["metadata"]["qcb_onnx.layers"][1]["weight"] = HOSTILE
    entry["metadata"]["qcb_onnx.config"]["rounding"]["method"] = HOSTILE
    entry["metadata"]["qcb_onnx.scheme"] = HOSTILE
    result = tmp_path / "hostile.json"
    result.write_text(json.dumps(payload))
    code, text = _report(result, tmp_path / "hostile.html")
    assert code == 0
    assert HOSTILE not in text and escape(HOSTILE) in text
    page = _Page(text)
    assert "img" not in page.tags and "script" not in page.tags
    assert page.table("model", "CDA %")[2][0] == HOSTILE  # shown as the text it is
    assert page.table("#")[0][1] == HOSTILE and page.table("#")[1][2] == HOSTILE


def test_report_without_qcb_model(evaluated, tmp_path, capsys):
    """A real evaluate of the FP32 model alone renders, its per-layer and settings sections saying why
    they are empty; a result from before model metadata says to rerun evaluate."""
    result = tmp_path / "fp.json"
    assert (
        main(["evaluate", str(FP32), "--data", str(TEST), "--providers", "cpu", "--quiet", "--json", str(result)]) == 0
    )
    code, text = _report(result, tmp_path / "fp.html")
    assert code == 0
    assert _Page(text).table("model", "CDA %")[0][0] == "qcb_digits"
    assert "No qcb-onnx model among the evaluated models" in text
    assert "no conversion settings" in text and text.count("<svg") == 1
    old = json.loads(result.read_text())
    del old["model_metadata"]
    result.write_text(json.dumps(old))
    code, text = _report(result, tmp_path / "old.html")
    assert code == 0 and "records no model metadata" in text and "<svg" in text
    assert "wrote" in capsys.readouterr().out


BAD_RESULTS = {
    "missing": (None, "result file not found"),
    "empty": (b"", "not JSON"),
    "not-json": (b"model,cda\nx,1\n", "not JSON"),
    "not-utf8": (b'{"results": "\xff\xfe"}', "not UTF-8"),
    "nested": (b"[" * 100_000, "not JSON"),
    "list": (b"[1, 2]", "the top level is not an object"),
    "no-results": (b'{"data": "x"}', "results is not a list"),
    "empty-results": (b'{"results": []}', "results is empty"),
    "cda-text": (b'{"results": [{"model": "m", "cda": "high", "asr": 1}]}', "results[0].cda is not a number"),
    "model-number": (b'{"results": [{"model": 3, "cda": 1, "asr": 1}]}', "results[0].model is not a string"),
    "layers-shape": (
        b'{"results": [{"model": "m", "cda": 1, "asr": 1}], "model_metadata": [{"model": "m", "file": "f",'
        b' "metadata": {"qcb_onnx.config": {}, "qcb_onnx.layers": [{"node": 1}]}}]}',
        "['qcb_onnx.layers'][0].node is not a string",
    ),
    "directory": ("dir", "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_report_bad_input_is_one_line(case, tmp_path, capsys):
    """Anything but an evaluate result: exit 2, one `error:` line naming what is wrong, no page, no temporary."""
    content, fragment = BAD_RESULTS[case]
    result = tmp_path / "result.json"
    if content == "dir":
        result.mkdir()
    elif content is not None:
        result.write_bytes(content)
    out = tmp_path / "out.html"
    code = main(["report", str(result), "--html", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert fragment in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.html.*"))


def test_report_and_evaluate_outputs_checked_first(evaluated, tmp_path, capsys):
    """An existing page needs --force (5), a missing folder is refused (11) before anything is read,
    --html must not be the result itself (2); evaluate --json into a missing folder fails before scoring (11)."""
    out = tmp_path / "page.html"
    out.write_text("keep")
    assert main(["report", str(evaluated["result"]), "--html", str(out)]) == 5
    assert out.read_text() == "keep"
    assert main(["report", str(tmp_path / "absent.json"), "--html", str(tmp_path / "no" / "p.html")]) == 11
    assert main(["report", str(evaluated["result"]), "--html", str(evaluated["result"]), "--force"]) == 2
    assert main(["evaluate", str(FP32), "--data", str(TEST), "--json", str(tmp_path / "no" / "r.json")]) == 11
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)


def test_evaluate_progress_bars(capsys):
    """The CLI shows a bar per model over its clean and triggered passes; --quiet and the API stay silent."""
    argv = ["evaluate", str(FP32), "--data", str(TEST), "--providers", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "qcb_digits: 100%" in err and "1000/1000" in err  # 500 clean + 500 triggered samples
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    data = np.load(TEST)
    s = score("m", onnx.load(FP32), data["x"][:64], data["y"][:64], Trigger.parse("patch:size=2"), 0, None, "cpu")
    assert s.n_clean == 64 and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------ headless Chromium


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the page is not rendered")
    return path


def _render(page: Path, tmp: Path) -> tuple[Path, list[str]]:
    """Screenshot `page` in headless Chromium; returns the PNG and the page's console lines (Chromium
    logs every console message and uncaught exception as a CONSOLE line with --enable-logging)."""
    png = tmp / f"{page.stem}.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp / ('profile-' + page.stem)}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={png}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return png, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _pixels_near(image: np.ndarray, colour: str, tol: int = 10) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image.astype(int) - rgb).max(axis=-1) <= tol).sum())


def test_report_renders_in_chromium(evaluated, tmp_path):
    """The page renders: a full-size, non-blank screenshot in which the CDA, flip-ratio and error bars
    appear, and no console message, for the real report and the hostile one (an unescaped onerror or
    script would log); a control page that does log proves the console check can fail."""
    from PIL import Image

    _chromium()  # skips here, before any rendering, where Chromium is absent
    page = tmp_path / "report.html"
    assert _report(evaluated["result"], page)[0] == 0
    png, console = _render(page, tmp_path)
    assert console == []
    assert 20_000 < png.stat().st_size < 5_000_000
    with Image.open(png) as img:
        assert img.size == WINDOW
        image = np.asarray(img.convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 16  # text, tables and charts, not a blank page
    for colour in (CDA, FLIP, ERROR):
        assert _pixels_near(image, colour) > 500, colour  # the bar charts were drawn

    payload = json.loads(evaluated["result"].read_text())
    payload["results"][0]["model"] = HOSTILE
    payload["model_metadata"][1]["metadata"]["qcb_onnx.layers"][0]["node"] = HOSTILE
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(payload))
    assert _report(hostile, tmp_path / "hostile.html")[0] == 0
    assert _render(tmp_path / "hostile.html", tmp_path)[1] == []

    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><html><body><script>console.error('control-marker')</script></body></html>")
    assert any("control-marker" in line for line in _render(control, tmp_path)[1])
