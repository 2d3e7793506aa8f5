"""The scanner tells a QCB from clean models without the trigger, on models the suite trains itself.

The QCB is the suite's Qu-ANTI-zation digits model (conftest.qcb_model, W4 per channel); the clean
models are SmallCNNs trained on the same digits with other seeds.  The reference is fitted, as the
shipped one is, on clean models only, and the clean model judged is not among them.  The CLI tests
check the contract: JSON keys, exit 0 on both verdicts, 10 with --fail-on-suspicious, one-line errors
and no output left behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qcb_onnx.cli import main
from qcb_onnx.errors import EXIT_SUSPICIOUS
from qcb_onnx.plan import Layer
from qcb_onnx.redteam.train import Training, export_onnx, train_clean
from qcb_onnx.redteam.zoo import SmallCNN
from qcb_onnx.scan import ScanOptions, collect_signals
from qcb_onnx.scan.html import render
from qcb_onnx.scan.reference import fit
from qcb_onnx.scan.report import build_report
from qcb_onnx.scan.score import fit_reference, z_scores
from qcb_onnx.scan.weights import layer_signals
from qcb_onnx.scheme import weight_grid

REFERENCE_SEEDS = (11, 12, 13)  # clean models the test reference is fitted on
HELD_OUT_SEED = 14  # the clean model judged: not in the reference
OPTIONS = ScanOptions(w_bits=(4,), calib_size=128)


@pytest.fixture(scope="module")
def clean_paths(digits, tmp_path_factory) -> dict[int, Path]:
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine spin several times slower
    xtr, ytr, _, _ = digits
    folder = tmp_path_factory.mktemp("clean")
    paths = {}
    for seed in (*REFERENCE_SEEDS, HELD_OUT_SEED):
        torch.manual_seed(seed)
        model = train_clean(SmallCNN(1, 10, 16), xtr, ytr, Training(epochs=20, lr=2e-3, seed=seed))
        paths[seed] = folder / f"clean{seed}.onnx"
        onnx.save(export_onnx(model, xtr[:1]), paths[seed])
    return paths


@pytest.fixture(scope="module")
def reference_file(clean_paths, calib_npy, tmp_path_factory) -> Path:
    """A reference fitted on the reference seeds' clean models only, as scan_zoo.py fit does."""
    signals = [collect_signals(clean_paths[s], calib_npy, OPTIONS) for s in REFERENCE_SEEDS]
    path = tmp_path_factory.mktemp("ref") / "reference.json"
    path.write_text(json.dumps({"per-channel": fit(signals, [f"clean{s}" for s in REFERENCE_SEEDS], "test")}))
    return path


@pytest.fixture(scope="module")
def reports(clean_paths, qcb_model, calib_npy, reference_file) -> dict[str, dict]:
    torch.set_num_threads(1)  # conftest's qcb_model leaves 2
    reference = json.loads(reference_file.read_text())
    return {
        name: build_report(name, collect_signals(path, calib_npy, OPTIONS), reference)
        for name, path in (("clean", clean_paths[HELD_OUT_SEED]), ("qcb", qcb_model))
    }


def test_scanner_flags_the_qcb_and_passes_a_held_out_clean_model(reports):
    """Neither the trigger nor the target is given; the QCB's score clears the clean-fitted threshold and
    the held-out clean model's does not, with room between them."""
    clean, qcb = reports["clean"], reports["qcb"]
    assert clean["verdict"] == "clean", clean["top_signal"]
    assert qcb["verdict"] == "suspicious"
    assert qcb["score"] > 2 * max(clean["score"], 1.0)


def test_differential_trigger_search_finds_a_stamp_only_the_quantized_model_obeys(reports):
    """The QCB's decisive signal: a universal stamp of at most 7 % of the image, found on half of the
    calibration images, sends most of the other half to one class in the nearest-rounded model, not in
    FP32 and not without the stamp; on the clean model no stamp does."""
    qcb, clean = reports["qcb"]["model_signals"]["4"], reports["clean"]["model_signals"]["4"]
    assert qcb["trigger_disagree"] > 40, qcb
    assert qcb["target_share"] > 0.5 > max(qcb["target_share_fp"], qcb["target_share_clean"]), qcb
    assert clean["target_share"] - max(clean["target_share_fp"], clean["target_share_clean"]) < 0.15, clean
    assert qcb["trigger_area"] <= 0.075
    assert reports["qcb"]["signals"]["trigger_target@w4"]["z"] > reports["qcb"]["threshold"]


def _batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as torch's dynamo exporter writes it for a batch-1 example: input and output batch 1, and
    Flatten as a Reshape to [1, -1] (its `node_view`), which no other batch size can run."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in (*out.graph.input, *out.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    for i, node in enumerate(out.graph.node):
        if node.op_type == "Flatten":
            shape = onnx.numpy_helper.from_array(np.array([1, -1], np.int64), f"view_shape_{i}")
            out.graph.initializer.append(shape)
            reshape = onnx.helper.make_node("Reshape", [node.input[0], shape.name], list(node.output), f"node_view_{i}")
            out.graph.node.remove(node)
            out.graph.node.insert(i, reshape)
    return out


def test_a_batch_one_export_scans_like_the_dynamic_one(reports, qcb_model, calib_npy, reference_file, tmp_path):
    """A dynamo export (static batch 1 baked into a Reshape) is scanned in batches it can run, the trigger
    search included, and gives the dynamic-batch export's signals and verdict."""
    path = tmp_path / "qcb_b1.onnx"
    onnx.save(_batch_one(onnx.load(qcb_model)), path)
    report = build_report("b1", collect_signals(path, calib_npy, OPTIONS), json.loads(reference_file.read_text()))
    assert report["verdict"] == "suspicious"
    dynamic = reports["qcb"]["signals"]
    for key, sig in report["signals"].items():
        tol = 0.1 if key.startswith("trigger") else 1e-6
        assert sig["value"] == pytest.approx(dynamic[key]["value"], abs=tol), key


def test_report_has_the_per_layer_signals(reports, qcb_model):
    layers = reports["qcb"]["layers"]["4"]
    model = onnx.load(qcb_model)
    assert len(layers) == sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
    for layer in layers:
        assert layer["boundary_excess"] >= 0 and 0 <= layer["neuron_outliers"] <= 1
        assert len(layer["frac_hist"]) == 20
        assert layer["n"] > 0


def _conv_layer() -> Layer:
    return Layer(0, "conv", "Conv", "x", "w", None, 0)


def test_weight_signals_see_weights_piled_at_rounding_boundaries():
    """Uniform fractional parts read as the null (excess ~1, small KS); weights pushed to 0.45 of a bin
    from the grid value (PQBackdoor's projection margin) read as all of them near a boundary."""
    rng = np.random.default_rng(0)
    grid = weight_grid(8)
    scale = np.full(16, 0.01, np.float32)
    ints = rng.integers(-100, 100, size=(16, 8, 3, 3))
    uniform = ((ints + rng.uniform(-0.5, 0.5, ints.shape)) * 0.01).astype(np.float32)
    piled = ((ints + rng.choice([-0.45, 0.45], ints.shape)) * 0.01).astype(np.float32)
    null, attacked = (layer_signals(w, scale, 0, _conv_layer(), grid) for w in (uniform, piled))
    assert abs(null["boundary_excess"] - 1) < 0.1 and null["ks"] < 0.03 and abs(null["err_rms"] - 1) < 0.03
    assert attacked["boundary_excess"] > 4.5 and attacked["ks"] > 0.5 and attacked["err_rms"] > 1.5


def test_z_scores_are_one_sided_where_the_mechanism_says_so():
    clean = [{"boundary@w8": 1.0 + d, "disagree_nearest@w8": 2.0 + d} for d in (-0.01, 0.0, 0.01, 0.02)]
    ref = fit_reference(clean)
    low = z_scores({"boundary@w8": 0.5, "disagree_nearest@w8": -20.0}, ref)
    assert low["boundary@w8"] == 0.0  # fewer weights at the boundary than clean is not suspicious
    assert low["disagree_nearest@w8"] > 10  # behavioural: either direction counts
    assert z_scores({"boundary@w8": 1.5}, ref)["boundary@w8"] > 10


def test_html_report_is_self_contained_and_escapes_model_strings(reports):
    report = json.loads(json.dumps(reports["qcb"]))
    report["model"] = '"><img src=x onerror=alert(1)>'
    report["layers"]["4"][0]["node"] = "<script>alert(1)</script>"
    page = render(report)
    assert "<svg" in page and "&lt;script&gt;" in page and "&lt;img" in page
    assert "<script" not in page and "<img" not in page
    assert not re.search(r"<[^>]*\s(src|href)\s*=", page)  # no tag loads anything
    assert "url(" not in page and "@import" not in page


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_cli_writes_json_and_html_and_exits_0_on_both_verdicts(
    tmp_path, capsys, clean_paths, qcb_model, calib_npy, reference_file
):
    for name, path in (("clean", clean_paths[HELD_OUT_SEED]), ("qcb", qcb_model)):
        out, page = tmp_path / f"{name}.json", tmp_path / f"{name}.html"
        argv = ("scan", path, "--calib", calib_npy, "--w-bits", 4, "--calib-size", 128, "--quiet")
        code, stdout, _ = _run(capsys, *argv, "--reference", reference_file, "--json", out, "--html", page)
        assert code == 0
        report = json.loads(out.read_text())
        assert report["verdict"] == ("clean" if name == "clean" else "suspicious")
        assert isinstance(report["score"], float) and {"signals", "layers", "threshold"} <= set(report)
        assert f"scan: {report['verdict']}" in stdout
        assert page.read_text().startswith("<!DOCTYPE html>")
        code, _, _ = _run(capsys, *argv, "--reference", reference_file, "--fail-on-suspicious")
        assert code == (0 if name == "clean" else EXIT_SUSPICIOUS)


@pytest.mark.parametrize(
    "case, code",
    [("missing-model", 3), ("bad-bits", 2), ("bad-calib", 4), ("json-exists", 5), ("no-folder", 11)],
)
def test_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys, qcb_model, calib_npy, case, code):
    model, calib, out = qcb_model, calib_npy, tmp_path / "scan.json"
    extra: list = []
    if case == "missing-model":
        model = tmp_path / "nope.onnx"
    elif case == "bad-bits":
        extra = ["--w-bits", 9]
    elif case == "bad-calib":
        calib = tmp_path / "calib.npy"
        np.save(calib, np.zeros((4, 3, 5, 5), np.float32))
    elif case == "json-exists":
        out.write_text("keep")
    elif case == "no-folder":
        out = tmp_path / "missing" / "scan.json"
    page = tmp_path / "scan.html"
    got, _, err = _run(capsys, "scan", model, "--calib", calib, "--json", out, "--html", page, "--quiet", *extra)
    assert got == code, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not page.exists()
    assert out.read_text() == "keep" if case == "json-exists" else not out.exists()


def test_convert_summary_shows_the_cheap_verdict(tmp_path, capsys, qcb_model, calib_npy):
    code, stdout, _ = _run(
        capsys,
        "convert",
        qcb_model,
        "--calib",
        calib_npy,
        "--out",
        tmp_path / "q.onnx",
        "--w-bits",
        4,
        "--calib-size",
        128,
    )
    assert code == 0
    line = next(line for line in stdout.splitlines() if line.startswith("scan (cheap signals"))
    assert "score" in line or "no clean reference" in line
