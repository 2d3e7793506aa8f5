"""EFRAP's per-model error budget: the search itself (synthetic agreement curves) and what a conversion
with the default (auto) records and emits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qcb_onnx
from qcb_onnx.rounding.budget import FLOOR, START, TOLERANCE, choose_budget


def _search(agreement_at):
    """choose_budget over a fake rounding whose 'result' is its budget."""
    return choose_budget(lambda b: b, agreement_at)


def test_budget_kept_when_flipping_costs_little_agreement():
    """Where the largest budget costs less than the tolerance, it is kept after one probe."""
    chosen, probes = _search(lambda b: 95.0 - 4.0 * b)
    assert chosen == START
    assert [p.budget for p in probes] == [0.0, START]


def test_reference_pass_skipped_when_the_start_budget_agrees_within_tolerance():
    """At >= 100 - tolerance % agreement no reference can be more than the tolerance above the start
    budget, so the search keeps it without rounding the reference (one layer loop, not two), exactly
    the choice the full search makes; just below that line the reference is rounded."""
    rounded = []

    def round_at(b):
        rounded.append(b)
        return b

    chosen, probes = choose_budget(round_at, lambda b: 100.0 - TOLERANCE if b == START else 100.0)
    assert chosen == START and rounded == [START] and [p.budget for p in probes] == [START]
    rounded.clear()
    chosen, probes = choose_budget(round_at, lambda b: 99.9 - TOLERANCE if b == START else 99.0)
    assert chosen == START and rounded == [START, 0.0] and [p.budget for p in probes] == [0.0, START]


def test_budget_shrinks_until_agreement_is_within_tolerance():
    """A drop that grows linearly with the budget (as measured on AlexNet) is brought within the
    tolerance by the proportional step, and the rounding returned is the one at the budget chosen."""
    chosen, probes = _search(lambda b: 94.0 - 12.0 * b)  # 0.25 costs 3 points
    assert [p.budget for p in probes][:2] == [0.0, START]
    assert 0 < chosen < START and chosen == probes[-1].budget
    assert probes[0].agreement - probes[-1].agreement <= TOLERANCE
    assert probes[0].agreement - probes[-1].agreement > TOLERANCE / 2  # not shrunk further than needed


def test_budget_never_below_the_floor():
    """However much flipping costs, some stays: the nearest-rounding pattern a QCB relies on must break."""
    chosen, probes = _search(lambda b: 94.0 - 1000.0 * b)
    assert chosen == FLOOR
    assert min(p.budget for p in probes[1:]) == FLOOR


def test_budget_search_is_bounded_and_budgets_only_fall():
    """A drop concave in the budget (worse at small budgets than a line predicts) still ends within
    the probe limit; each budget tried is below the last, so the last is the largest left."""
    chosen, probes = _search(lambda b: 94.0 - 14.0 * np.sqrt(b))
    budgets = [p.budget for p in probes[1:]]
    assert len(probes) <= 4
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == len(budgets)
    assert chosen == budgets[-1]


def test_auto_budget_is_recorded_and_reproducible(qcb_model, digits):
    """The default conversion records the search (reference agreement, every budget tried, the one
    chosen), and its integers are exactly those of a conversion fixed at the chosen budget, so a
    user can reproduce the model from the metadata."""
    fp, calib = onnx.load(qcb_model), digits[0][:256]
    auto = qcb_onnx.convert(fp, calib, w_bits=4, providers="cpu")
    search = json.loads({p.key: p.value for p in auto.metadata_props}["qcb_onnx.error_budget"])
    assert search["mode"] == "auto"
    budgets = [p["budget"] for p in search["probes"]]
    assert budgets[0] == START or budgets[:2] == [0.0, START], budgets  # reference only where needed
    assert search["chosen"] in [b for b in budgets if b > 0]
    fixed = qcb_onnx.convert(fp, calib, w_bits=4, providers="cpu", error_budget=search["chosen"])
    ints = {t.name: numpy_helper.to_array(t) for t in auto.graph.initializer if t.name.endswith("_quantized")}
    assert ints
    for t in fixed.graph.initializer:
        if t.name in ints:
            np.testing.assert_array_equal(numpy_helper.to_array(t), ints.pop(t.name))
    assert not ints


def test_search_reads_agreement_off_the_layer_loop_exactly(qcb_model, digits, monkeypatch):
    """The search's agreement comes from the layer loop's own paused runs, finished to the output
    (no extra forward pass): after every pass those decisions equal FP32's and the simulated
    quantized model's top-1 on the loop's batches, computed from scratch."""
    from qcb_onnx.rounding.layers import ModelRounder

    original, checked = ModelRounder.run, []

    def run(self, method, tag=""):
        state, reports = original(self, method, tag)
        batches = self.data_batches()
        with torch.no_grad():
            fp = [self.gm.run(b)[self.gm.output_names[0]].argmax(-1) for b in batches]
        quantized = [out.argmax(-1) for out in state.outputs(self.gm, batches)]
        assert all(torch.equal(a, b) for a, b in zip(fp, self.decisions.fp, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(quantized, self.decisions.quantized, strict=True))
        checked.append(self.decisions.agreement())
        return state, reports

    monkeypatch.setattr(ModelRounder, "run", run)
    out = qcb_onnx.convert(onnx.load(qcb_model), digits[0][:256], w_bits=4, providers="cpu")
    search = json.loads({p.key: p.value for p in out.metadata_props}["qcb_onnx.error_budget"])
    assert sorted(round(a, 2) for a in checked) == sorted(p["agreement"] for p in search["probes"])


def test_budget_stays_fixed_without_a_class_output(tmp_path):
    """A model whose output is a feature map has no top-1 decision to agree on: the budget stays at its
    default and the metadata says why."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], rng.normal(size=36).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "fmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    out = qcb_onnx.convert(model, rng.random((32, 1, 8, 8), dtype=np.float32), providers="cpu")
    search = json.loads({p.key: p.value for p in out.metadata_props}["qcb_onnx.error_budget"])
    assert search["chosen"] == START and search["mode"].startswith("fixed: the first output is not")


@pytest.mark.parametrize("options", [{"error_budget": 0.1}, {"strength": 1.0}, {"method": "adaround", "iters": 20}])
def test_explicit_choices_skip_the_search(qcb_model, digits, options):
    """A budget or strength the user gives, or another method, is used as given: no search is recorded."""
    out = qcb_onnx.convert(onnx.load(qcb_model), digits[0][:128], providers="cpu", **options)
    meta = {p.key: p.value for p in out.metadata_props}
    if "error_budget" in options:
        assert json.loads(meta["qcb_onnx.error_budget"]) == {"mode": "fixed", "chosen": 0.1}
    else:
        assert "qcb_onnx.error_budget" not in meta


def test_cli_says_how_the_budget_was_set(qcb_model, calib_npy, tmp_path, capsys):
    """`convert` prints the chosen budget and the agreements behind it, matching the metadata."""
    from qcb_onnx.cli import main

    out = tmp_path / "auto.onnx"
    assert main(["convert", str(qcb_model), "--calib", str(calib_npy), "--out", str(out), "--w-bits", "4"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("error budget"))
    search = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["qcb_onnx.error_budget"])
    assert line.startswith(f"error budget {search['chosen']:g} (auto; top-1 agreement")
    first = search["probes"][0]
    said = f"no pull {first['agreement']:.1f} %" if first["budget"] == 0 else "no-pull reference not needed"
    assert said in line and f"{search['chosen']:g}: " in line

    fixed = tmp_path / "fixed.onnx"
    argv = ["convert", str(qcb_model), "--calib", str(calib_npy), "--out", str(fixed), "--error-budget", "0.1"]
    assert main(argv) == 0
    assert "error budget 0.1 (fixed)" in capsys.readouterr().out.splitlines()
