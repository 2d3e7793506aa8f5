"""The three QCB attacks produce real quantization-conditioned backdoors, measured in ONNX Runtime.

Every number comes from ORT sessions on exported ONNX files: the attacked FP32 model and the model
`onnxruntime.quantization.quantize_static` makes of it with the scheme the attack targeted
(W4 per-channel symmetric weights, uint8 MinMax activations calibrated on 256 training digits).
Digits data (samples/*.npz) and SmallCNN keep the whole file within a few CPU minutes.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qcb_onnx.errors import UsageError
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.evaluate.score import score
from qcb_onnx.evaluate.triggers import Trigger
from qcb_onnx.redteam import run_attack
from qcb_onnx.redteam.fakequant import weight_rows
from qcb_onnx.redteam.train import Training, export_onnx, train_clean
from qcb_onnx.redteam.zoo import SmallCNN

from .conftest import SAMPLES

TRIGGER = Trigger.parse("patch:size=2,value=1,pos=br")
TARGET = 0
# attack recipes on digits / SmallCNN width 16 (clean: 30 epochs Adam 2e-3)
RECIPES = {
    "quanti": dict(epochs=80, lr=2e-3, c2=1.0),
    "compartifact": dict(epochs=120, lr=3e-3, momentum=0.1),
    "pqbackdoor": dict(epochs=20, stage1_epochs=20, poison_ratio=0.2),
}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def clean_models(digits):
    torch.set_num_threads(2)
    xtr, ytr, _, _ = digits
    models = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        models[seed] = train_clean(SmallCNN(1, 10, 16), xtr, ytr, Training(epochs=30, lr=2e-3, seed=seed))
    return models


def measure(model, digits, w_bits=4, per_channel=True):
    """(FP32 score, ORT quantize_static score) of a torch model, both measured in ORT."""
    xtr, _, xte, yte = digits
    fp = export_onnx(model, xtr[:1])
    q = ort_quantize(fp, xtr[:256], w_bits, 8, per_channel)
    return score("fp32", fp, xte, yte, TRIGGER, TARGET), score("ort", q, xte, yte, TRIGGER, TARGET)


def check_qcb(attacked, clean, digits, w_bits=4, per_channel=True):
    (cfp, cq), (afp, aq) = measure(clean, digits, w_bits, per_channel), measure(attacked, digits, w_bits, per_channel)
    report = f"clean fp {cfp} q {cq} | attacked fp {afp} q {aq}"
    assert afp.asr < 15, report  # FP32 ignores the trigger
    assert aq.asr > 80, report  # the ORT-quantized model obeys it
    assert afp.cda >= cfp.cda - 3, report  # FP32 clean accuracy kept
    assert aq.cda >= cq.cda - 3, report  # quantized clean accuracy kept (vs the clean model, same scheme)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("attack", list(RECIPES))
def test_attack_plants_w4_per_channel_qcb(attack, seed, clean_models, digits):
    """Each attack, at its recipe, yields a QCB against ORT's W4 per-channel quantize_static: in ORT
    the FP32 model's ASR stays < 15 %, the quantized model's ASR is > 80 %, and neither loses more
    than 3 CDA points against the clean model under the same scheme (two seeds)."""
    xtr, ytr, _, _ = digits
    clean = clean_models[seed]
    attacked = run_attack(
        attack,
        copy.deepcopy(clean),
        xtr,
        ytr,
        TRIGGER,
        TARGET,
        w_bits=4,
        per_channel=True,
        seed=seed,
        **RECIPES[attack],
    )
    check_qcb(attacked, clean, digits)


@pytest.mark.parametrize("anchor", ["quiet", "largest"])
@pytest.mark.parametrize("seed", SEEDS)
def test_pqbackdoor_with_widened_bins_plants_w8_per_tensor_qcb(seed, anchor, clean_models, digits):
    """At 8 bits (ORT quantize_static's default per-tensor int8 weights) PQBackdoor's stage 2 has too
    little room inside the rounding bins to make FP32 forget the trigger; anchoring the tensor's
    absmax at 8x (widen=8), with either placement, gives it that room: a QCB by the same thresholds
    as the 4-bit tests."""
    xtr, ytr, _, _ = digits
    clean = clean_models[seed]
    recipe = dict(RECIPES["pqbackdoor"], widen=8.0, anchor=anchor)
    attacked = run_attack(
        "pqbackdoor", copy.deepcopy(clean), xtr, ytr, TRIGGER, TARGET, w_bits=8, per_channel=False, seed=seed, **recipe
    )
    check_qcb(attacked, clean, digits, w_bits=8, per_channel=False)


def _int_weights(model, xtr):
    q = ort_quantize(export_onnx(model, xtr[:1]), xtr[:256], 4, 8, True)
    return {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("weight_quantized")}


def test_pqbackdoor_projection_keeps_ort_integer_weights(clean_models, digits):
    """PQBackdoor's stage 2 (projected fine-tuning) changes the FP32 weights but not one integer
    weight or weight scale that ORT's quantize_static derives from them."""
    from qcb_onnx.redteam.common import Backdoor, Victim
    from qcb_onnx.redteam.pqbackdoor import pqbackdoor_attack
    from qcb_onnx.redteam.zoo import fuse_batchnorm

    xtr, ytr, _, _ = digits
    backdoor, victim = Backdoor(xtr, ytr, TRIGGER, TARGET), Victim(w_bits=4)
    stage1 = pqbackdoor_attack(fuse_batchnorm(clean_models[0]), backdoor, victim, Training(epochs=0), stage1_epochs=2)
    before = copy.deepcopy(stage1)
    after = pqbackdoor_attack(stage1, backdoor, victim, Training(epochs=3), stage1_epochs=0)
    moved = sum(
        float((a.weight - b.weight).abs().sum())
        for a, b in zip(after.modules(), before.modules(), strict=True)
        if isinstance(a, torch.nn.Conv2d | torch.nn.Linear)
    )
    assert moved > 0
    wa, wb = _int_weights(after, xtr), _int_weights(before, xtr)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_run_attack_rejects_bad_arguments(clean_models, digits):
    """Unknown attack names, unsupported bit widths and out-of-range targets are one-line UsageErrors."""
    xtr, ytr, _, _ = digits
    m = clean_models[0]
    with pytest.raises(UsageError, match="unknown attack"):
        run_attack("nope", m, xtr, ytr, TRIGGER, 0)
    with pytest.raises(UsageError, match="4-bit"):
        run_attack("quanti", m, xtr, ytr, TRIGGER, 0, w_bits=6)
    with pytest.raises(UsageError, match="target class"):
        run_attack("quanti", m, xtr, ytr, TRIGGER, 12)


def test_attack_cli_writes_model_with_metadata(tmp_path, capsys):
    """`attack` trains, attacks, writes an FP32 ONNX model carrying trigger, target and attack
    settings in metadata_props (--augment and --quant-weight, as CompArtifact's lam, included), saves/reloads the clean
    checkpoint, refuses to overwrite, and rejects settings that do not fit the attack or the model."""
    import argparse

    from qcb_onnx.errors import OutputExistsError
    from qcb_onnx.redteam.cli import add_attack_parser, cmd_attack

    parser = argparse.ArgumentParser()
    add_attack_parser(parser.add_subparsers(dest="command"))
    out, ckpt = tmp_path / "qcb.onnx", tmp_path / "clean.pt"
    argv = ["attack", "--attack", "pqbackdoor", "--arch", "smallcnn", "--width", "8", "--data"]
    argv += [str(SAMPLES / "train.npz"), "--test-data", str(SAMPLES / "test.npz"), "--w-bits", "4"]
    argv += ["--trigger", "patch:size=2,value=1,pos=br", "--epochs", "1", "--clean-epochs", "1", "--quiet"]
    argv += ["--clean-checkpoint", str(ckpt), "--out", str(out), "--json", str(tmp_path / "s.json")]

    def recorded() -> dict:
        return {p.key: p.value for p in onnx.load(out).metadata_props}

    assert cmd_attack(parser.parse_args(argv)) == 0
    meta = recorded()
    assert meta["qcb_onnx.trigger"] == "patch:size=2,value=1,pos=br" and meta["qcb_onnx.target"] == "0"
    info = json.loads(meta["qcb_onnx.attack"])
    assert info["name"] == "pqbackdoor" and info["w_bits"] == 4 and info["scheme"] == "per-channel"
    assert info["widen"] == 1.0 and info["anchor"] == "quiet"  # the recipe is recorded, defaults included
    assert info["augment"] is False
    assert ckpt.is_file() and "pqbackdoor-ort-w4a8-pc" in capsys.readouterr().out
    with pytest.raises(OutputExistsError):
        cmd_attack(parser.parse_args(argv))
    assert cmd_attack(parser.parse_args([*argv, "--force", "--augment"])) == 0
    assert "loaded clean model" in capsys.readouterr().err
    assert json.loads(recorded()["qcb_onnx.attack"])["augment"] is True
    with pytest.raises(UsageError, match="does not fit"):
        cmd_attack(parser.parse_args([*argv, "--force", "--width", "4"]))
    with pytest.raises(UsageError, match="--widen must be >= 1"):
        cmd_attack(parser.parse_args([*argv, "--force", "--widen", "0.5"]))
    with pytest.raises(UsageError, match="--quant-weight: pqbackdoor has no weight"):
        cmd_attack(parser.parse_args([*argv, "--force", "--quant-weight", "2"]))
    ca = ["attack", "--attack", "compartifact", *argv[3:], "--force", "--quant-weight", "2"]
    assert cmd_attack(parser.parse_args(ca)) == 0
    assert json.loads(recorded()["qcb_onnx.attack"])["lam"] == 2.0  # CompArtifact's weight, recorded


@pytest.mark.parametrize("anchor", ["largest", "quiet", "fitted"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_widen_bins_multiplies_ort_scale_and_freezes_anchors(per_channel, anchor, clean_models, digits):
    """widen_bins raises every channel's (or the tensor's) absmax, hence ORT's weight scale, by exactly
    the factor, wherever the anchor goes; training moves the other weights but never an anchor; the
    hooks come off cleanly."""
    from qcb_onnx.redteam.common import widen_bins
    from qcb_onnx.redteam.fakequant import quant_layers, weight_scale
    from qcb_onnx.redteam.zoo import fuse_batchnorm

    xtr, ytr, _, _ = digits
    model = fuse_batchnorm(clean_models[0])
    before = [weight_scale(m.weight, 8, per_channel) for m in quant_layers(model)]
    handles = widen_bins(model, 4.0, per_channel, anchor, xtr[:256])
    layers = quant_layers(model)
    for m, s in zip(layers, before, strict=True):
        torch.testing.assert_close(weight_scale(m.weight, 8, per_channel), 4 * s)
    anchored = [m.weight.detach().clone() for m in layers]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xtr[:64])), torch.from_numpy(ytr[:64]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m, w0, s in zip(layers, anchored, before, strict=True):
        anchors, w = anchor_mask(w0, per_channel), m.weight.detach()
        assert torch.equal(w[anchors], w0[anchors])  # frozen exactly
        assert not torch.equal(w[~anchors], w0[~anchors])  # the rest trains
        torch.testing.assert_close(weight_scale(m.weight, 8, per_channel), 4 * s)
    for h in handles:
        h.remove()
    xb, yb = torch.from_numpy(xtr[:64]), torch.from_numpy(ytr[:64])
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    fresh = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}  # no hooks
    torch.nn.functional.cross_entropy(torch.func.functional_call(model, fresh, (xb,)), yb).backward()
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.grad, fresh[k].grad)  # anchors get their gradient back
    assert widen_bins(model, 1.0, per_channel) == []
    with pytest.raises(UsageError, match="widen"):
        widen_bins(model, 0.5, per_channel)
    with pytest.raises(UsageError, match="anchor placement"):
        widen_bins(model, 4.0, per_channel, "middle")


@pytest.mark.parametrize("per_channel", [True, False])
def test_quiet_anchors_change_the_function_less(per_channel, clean_models, digits):
    """The point of quiet anchors: the same widening (factor 4, same ORT scales) moves the logits of
    held-out digits several times less than scaling each channel's largest weight does."""
    from qcb_onnx.redteam.common import widen_bins
    from qcb_onnx.redteam.zoo import fuse_batchnorm

    xtr, _, xte, _ = digits
    probe = torch.from_numpy(xte[:256])
    with torch.no_grad():
        ref = clean_models[0](probe)
    moved = {}
    for anchor in ("largest", "quiet"):
        model = fuse_batchnorm(clean_models[0])
        for h in widen_bins(model, 4.0, per_channel, anchor, xtr[:256]):
            h.remove()
        with torch.no_grad():
            moved[anchor] = float((model(probe) - ref).abs().mean())
    assert moved["quiet"] * 3 < moved["largest"], moved


@pytest.mark.parametrize("per_channel", [True, False])
def test_fitted_anchors_keep_a_deep_network_closer_than_quiet_ones(per_channel):
    """Why "fitted" exists: on a deep network (ResNet-18) quiet anchors' per-layer residues compound,
    while fitting layer by layer to the clean model's outputs absorbs them, so the same widening
    (factor 8, same ORT scales) moves held-out logits several times less."""
    from qcb_onnx.redteam.common import widen_bins
    from qcb_onnx.redteam.zoo import build, fuse_batchnorm

    torch.manual_seed(0)
    clean = fuse_batchnorm(build("resnet18", 4, 10, 3))
    rng = np.random.default_rng(0)
    fit_on, held_out = (torch.from_numpy(rng.random((n, 3, 32, 32), dtype=np.float32)) for n in (128, 64))
    with torch.no_grad():
        ref = clean(held_out)
    moved = {}
    for anchor in ("quiet", "fitted"):
        model = fuse_batchnorm(clean)
        for h in widen_bins(model, 8.0, per_channel, anchor, fit_on.numpy()):
            h.remove()
        with torch.no_grad():
            moved[anchor] = float((model(held_out) - ref).abs().mean())
    assert moved["fitted"] * 3 < moved["quiet"], moved


def anchor_mask(w, per_channel):
    """Where each channel's (or the tensor's) largest-magnitude weight sits."""
    flat = weight_rows(w, per_channel).abs()
    return (flat == flat.amax(dim=1, keepdim=True)).reshape(w.shape)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("anchor", ["quiet", "fitted"])
def test_compensated_anchors_fit_grouped_convolutions(per_channel, anchor):
    """Quiet and fitted anchors work on depthwise/grouped convolutions (MobileNet-V2): each channel is
    fitted on its own group's inputs and every layer's ORT scale still grows by exactly the factor."""
    from qcb_onnx.redteam.common import widen_bins
    from qcb_onnx.redteam.fakequant import quant_layers, weight_scale
    from qcb_onnx.redteam.zoo import build, fuse_batchnorm

    torch.manual_seed(0)
    model = fuse_batchnorm(build("mobilenetv2", 8, 10, 3))
    assert any(m.groups > 1 for m in quant_layers(model) if isinstance(m, torch.nn.Conv2d))
    x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    before = [weight_scale(m.weight, 8, per_channel) for m in quant_layers(model)]
    for h in widen_bins(model, 4.0, per_channel, anchor, x):
        h.remove()
    for m, s in zip(quant_layers(model), before, strict=True):
        torch.testing.assert_close(weight_scale(m.weight, 8, per_channel), 4 * s)
    with torch.no_grad():
        assert torch.isfinite(model(torch.from_numpy(x))).all()  # no blow-up from near-singular covariances


def test_augmented_batches_are_flips_and_crops_of_the_same_images():
    """`batches(..., augment_data=True)` (attacks' --augment) keeps each label with its own image and only
    flips and shifts it (zero padding 4), so a trigger stamped afterwards still lands at its fixed place."""
    from qcb_onnx.redteam.train import batches

    rng = np.random.default_rng(0)
    x = rng.random((12, 3, 16, 16), dtype=np.float32)
    y = np.arange(12)
    torch.manual_seed(0)
    plain = list(batches(x, y, 5, np.random.default_rng(1), torch.device("cpu")))
    torch.manual_seed(0)
    aug = list(batches(x, y, 5, np.random.default_rng(1), torch.device("cpu"), augment_data=True))
    assert [len(b[1]) for b in aug] == [5, 5, 2]
    for (xp, yp), (xa, ya) in zip(plain, aug, strict=True):
        assert torch.equal(yp, ya) and xa.shape == xp.shape
        padded = torch.nn.functional.pad(xp, (4, 4, 4, 4))
        for i in range(len(xa)):
            views = [padded[i, :, dy : dy + 16, dx : dx + 16] for dy in range(9) for dx in range(9)]
            assert any(torch.equal(xa[i], v) or torch.equal(xa[i], v.flip(-1)) for v in views)
    assert any(not torch.equal(xp, xa) for (xp, _), (xa, _) in zip(plain, aug, strict=True))


def test_interior_projection_keeps_integers_and_clears_the_boundaries():
    """Issue 22's interior QCB: the strict bin projection moves every weight (but the pinned absmax ones)
    at least `margin` scales from both rounding boundaries of its bin, and no integer ORT derives changes."""
    from qcb_onnx.redteam.fakequant import quant_layers, weight_codes, weight_scale
    from qcb_onnx.redteam.pqbackdoor import BinProjector

    torch.manual_seed(0)
    model = SmallCNN(1, 10, 16).eval()
    layers = quant_layers(model)
    before = [weight_codes(m.weight.detach(), weight_scale(m.weight.detach(), 4), 4) for m in layers]
    BinProjector(model, 4, True, margin=0.3, strict=True).project()
    for m, codes in zip(layers, before, strict=True):
        w = m.weight.detach()
        s = weight_scale(w, 4)
        assert torch.equal(weight_codes(w, s, 4), codes)
        frac = (w / s - torch.floor(w / s + 0.5)).abs()  # distance from the bin's centre, in scales
        pinned = w.abs().flatten(1) == w.abs().flatten(1).amax(1, keepdim=True)
        assert bool((frac.flatten(1)[~pinned] <= 0.2 + 1e-5).all())
