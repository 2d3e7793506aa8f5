"""Issue 22's adaptive QCBs on the test CNN, every rate measured in ONNX Runtime.

The dormant-path QCB (redteam/dormant.py) hides its backdoor in classifier inputs that are 0 on every
clean image, where a reconstruction on clean calibration data cannot see it.  Placed for nearest codes
it survives AdaRound, which keeps nearest where no gradient reaches, and EFRAP removes it; placed for
flipped codes it sleeps under ORT and wakes under the paper's EFRAP, which flips those weights for
free, and not under ours, which rounds unseen inputs by error diffusion (rounding/efrap.py).
Digits, SmallCNN width 16, seed 1, W4 per channel, as tests/test_attacks.py; about a minute.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import onnx
import pytest
import torch

from qcb_onnx import convert
from qcb_onnx.errors import UsageError
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.evaluate.score import score
from qcb_onnx.evaluate.triggers import Trigger
from qcb_onnx.pipeline import quantize
from qcb_onnx.redteam import run_attack
from qcb_onnx.redteam.dormant import detector_source, observe
from qcb_onnx.redteam.train import Training, export_onnx, train_clean
from qcb_onnx.redteam.zoo import SmallCNN
from qcb_onnx.rounding import efrap

from .conftest import SAMPLES

TRIGGER, TARGET, SEED = Trigger.parse("patch:size=2,value=1,pos=br"), 0, 1


@pytest.fixture(scope="module")
def clean(digits):
    torch.set_num_threads(2)
    xtr, ytr, _, _ = digits
    torch.manual_seed(SEED)
    return train_clean(SmallCNN(1, 10, 16), xtr, ytr, Training(epochs=30, lr=2e-3, seed=SEED))


@pytest.fixture(scope="module")
def dormant(clean, digits):
    """The two dormant-path QCBs ('nearest' and 'flipped' codes), torch models."""
    xtr, ytr, _, _ = digits
    return {
        kind: run_attack("dormant", copy.deepcopy(clean), xtr, ytr, TRIGGER, TARGET, w_bits=4, seed=SEED,
                         epochs=60, widen=2.0, anticipate=kind)  # fmt: skip
        for kind in ("nearest", "flipped")
    }


def rates(model: onnx.ModelProto, digits) -> tuple[float, float]:
    _, _, xte, yte = digits
    s = score("m", model, xte, yte, TRIGGER, TARGET, providers="cpu")
    return s.cda, s.asr


def paper_efrap(fp, calib):
    """EFRAP flipping unseen inputs like every other weight (the rule before error diffusion)."""
    saved, efrap.UNSEEN = efrap.UNSEEN, -1.0
    try:
        return convert(fp, calib, w_bits=4, method="efrap", providers="cpu")
    finally:
        efrap.UNSEEN = saved


def test_nearest_dormant_qcb_survives_adaround_and_not_efrap(dormant, clean, digits):
    """FP32 ignores the trigger, ORT's quantize_static obeys it, so does our AdaRound; EFRAP does not."""
    xtr = digits[0]
    fp = export_onnx(dormant["nearest"], xtr[:1])
    got = {
        "clean": rates(export_onnx(clean, xtr[:1]), digits),
        "fp32": rates(fp, digits),
        "ort": rates(ort_quantize(fp, xtr[:256], 4, 8, True), digits),
        "adaround": rates(convert(fp, xtr[:256], w_bits=4, method="adaround", providers="cpu"), digits),
        "efrap": rates(convert(fp, xtr[:256], w_bits=4, method="efrap", providers="cpu"), digits),
    }
    assert got["fp32"][1] < 15 and got["fp32"][0] >= got["clean"][0] - 3, got
    assert got["ort"][1] > 50, got
    assert got["adaround"][1] > 80 and got["adaround"][0] >= got["fp32"][0] - 3, got
    assert got["efrap"][1] < 15 and got["efrap"][0] >= got["fp32"][0] - 3, got


def test_flipped_dormant_qcb_wakes_under_the_papers_efrap_only(dormant, digits):
    """Benign in FP32, under ORT and under AdaRound; the paper's rule (unseen inputs flipped) wakes it,
    error diffusion on unseen inputs does not."""
    xtr = digits[0]
    fp = export_onnx(dormant["flipped"], xtr[:1])
    got = {
        "fp32": rates(fp, digits),
        "ort": rates(ort_quantize(fp, xtr[:256], 4, 8, True), digits),
        "paper_efrap": rates(paper_efrap(fp, xtr[:256]), digits),
        "efrap": rates(convert(fp, xtr[:256], w_bits=4, method="efrap", providers="cpu"), digits),
    }
    assert got["fp32"][1] < 15 and got["ort"][1] < 15, got
    assert got["paper_efrap"][1] > 80, got
    assert got["efrap"][1] < 15 and got["efrap"][0] >= got["fp32"][0] - 3, got


def test_flipped_dormant_qcb_from_the_dynamo_exporter_is_defended_the_same(dormant, digits):
    """The same model exported by torch's default (dynamo) exporter, batch fixed at 1 and its own
    naming: the paper's rule still wakes it, error diffusion still does not."""
    xtr = digits[0]
    model = copy.deepcopy(dormant["flipped"]).eval()
    fp = torch.onnx.export(model, (torch.from_numpy(xtr[:1]),), dynamo=True).model_proto
    assert fp.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    got = {
        "fp32": rates(fp, digits),
        "paper_efrap": rates(paper_efrap(fp, xtr[:256]), digits),
        "efrap": rates(convert(fp, xtr[:256], w_bits=4, method="efrap", providers="cpu"), digits),
    }
    assert got["fp32"][1] < 15 and got["paper_efrap"][1] > 80 and got["efrap"][1] < 15, got


def test_dormant_path_is_silent_on_calibration_and_adaround_keeps_its_nearest_codes(dormant, digits):
    """The mechanism: the detectors are exactly 0 on the calibration images, so AdaRound writes the
    nearest codes on their classifier columns, and EFRAP (error diffusion there) does not."""
    xtr = digits[0]
    model = dormant["nearest"]
    head = model.classifier
    cols = head.dormant_detectors
    with torch.no_grad():
        _, _, feats = observe(model, detector_source(model, head), head, torch.from_numpy(xtr[:256]))
    assert float(feats[:, cols].abs().max()) == 0.0
    fp = export_onnx(model, xtr[:1])
    codes = {}
    for method in ("nearest", "adaround", "efrap"):
        state = quantize(fp, xtr[:256], w_bits=4, method=method, providers="cpu", progress=False, check=False).state
        ints = state.weights["classifier.weight"].ints
        codes[method] = (ints if ints.shape == tuple(head.weight.shape) else ints.T)[:, cols]
    assert np.array_equal(codes["adaround"], codes["nearest"])
    assert not np.array_equal(codes["efrap"], codes["nearest"])


def test_adaptive_attack_sees_the_codes_the_victim_writes(clean, digits):
    """The adaptive attack's view of the victim (nearest codes plus the offsets its rounding chose)
    is exactly what the victim's conversion stores, for every layer."""
    from qcb_onnx.redteam.adaptive import victim_offsets
    from qcb_onnx.redteam.common import Victim
    from qcb_onnx.redteam.fakequant import quant_layers, weight_codes, weight_scale
    from qcb_onnx.redteam.zoo import fuse_batchnorm

    xtr = digits[0]
    model = fuse_batchnorm(copy.deepcopy(clean))
    victim = Victim(4, 8, True)
    offsets = victim_offsets(model, xtr[:128], victim, "adaround")
    state = quantize(export_onnx(model, xtr[:1]), xtr[:128], w_bits=4, method="adaround", providers="cpu",
                     progress=False, check=False).state  # fmt: skip
    names = {m: n for n, m in model.named_modules()}
    assert len(offsets) == len(quant_layers(model))
    moved = 0
    for layer, offset in offsets.items():
        w = layer.weight.detach()
        ints = state.weights[f"{names[layer]}.weight"].ints
        ints = torch.from_numpy((ints if ints.shape == tuple(w.shape) else ints.T).astype(np.float32))
        assert torch.equal(weight_codes(w, weight_scale(w, 4), 4) + offset, ints.reshape(w.shape))
        moved += int((offset != 0).sum())
    assert moved > 0  # AdaRound moved codes: the offsets are not nearest's zeros


def test_attack_cli_runs_the_adaptive_attacks_and_checks_their_options(tmp_path):
    """`attack --attack dormant --anticipate flipped` writes a model with its recipe; --anticipate and
    --error-penalty are refused where they mean nothing."""
    from qcb_onnx.redteam.cli import add_attack_parser, cmd_attack

    parser = argparse.ArgumentParser()
    add_attack_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "qcb.onnx"
    base = ["attack", "--arch", "smallcnn", "--width", "16", "--data", str(SAMPLES / "train.npz"), "--test-data"]
    base += [str(SAMPLES / "test.npz"), "--w-bits", "4", "--trigger", "patch:size=2,value=1,pos=br"]
    base += ["--epochs", "2", "--clean-epochs", "1", "--quiet", "--out", str(out), "--force"]
    assert cmd_attack(parser.parse_args([*base, "--attack", "dormant", "--anticipate", "flipped"])) == 0
    info = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["qcb_onnx.attack"])
    assert info["name"] == "dormant" and info["anticipate"] == "flipped"
    with pytest.raises(UsageError, match="belong to the adaptive attacks"):
        cmd_attack(parser.parse_args([*base, "--attack", "quanti", "--anticipate", "efrap"]))
    with pytest.raises(UsageError, match="--error-penalty belongs to --attack adaptive"):
        cmd_attack(parser.parse_args([*base, "--attack", "dormant", "--error-penalty", "1"]))
    with pytest.raises(UsageError, match="choose from nearest, flipped, both"):
        cmd_attack(parser.parse_args([*base, "--attack", "dormant", "--anticipate", "adaround"]))
    with pytest.raises(UsageError, match="unknown rounding 'gptq'"):
        cmd_attack(parser.parse_args([*base, "--attack", "adaptive", "--anticipate", "gptq"]))
