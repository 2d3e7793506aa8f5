"""One typed config: the CLI, the Python API, the checkpoint fingerprint and the metadata all use it."""

from __future__ import annotations

import json

import pytest

from qcb_onnx import QuantConfig, RoundingOptions, WeightScheme
from qcb_onnx.cli import build_parser
from qcb_onnx.cli.convert import config_from_args
from qcb_onnx.errors import UsageError
from qcb_onnx.rounding import METHODS, AdaRound, AutoBudget, Efrap, EfrapOfficial, Nearest, method_for


def _convert_parser():
    return build_parser()._subparsers._group_actions[0].choices["convert"]


def test_every_option_is_a_cli_flag_and_back():
    """The convert parser's destinations are exactly the config's option names, plus the command's own
    (`check` is API-only): a new field cannot miss its flag or vice versa."""
    own = {"help", "model", "calib", "out", "config", "target", "force", "resume", "verbose"}
    dests = {a.dest for a in _convert_parser()._actions} - own
    assert dests == set(QuantConfig.option_names()) - {"check"}


def test_cli_defaults_are_the_config_defaults():
    """Parsing only the required arguments gives the default config (progress on, as the CLI shows bars)."""
    args = build_parser().parse_args(["convert", "m.onnx", "--calib", "c.npy", "--out", "o.onnx"])
    assert config_from_args(args) == QuantConfig.from_options(progress=True)
    args = build_parser().parse_args(
        ["convert", "m.onnx", "--calib", "c.npy", "--out", "o.onnx", "--w-bits", "4", "--a-bits", "none",
         "--per-tensor", "--error-budget", "auto", "--method", "adaround", "--quiet"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.weights == WeightScheme(w_bits=4, per_channel=False)
    assert config.activations.a_bits is None and config.activations.act_headroom == 1.0
    assert config.rounding.method == "adaround" and config.rounding.error_budget is None
    assert config.run.progress is False


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"w_bits": 9}, "--w-bits"),
        ({"a_bits": 6}, "--a-bits"),
        ({"method": "stochastic"}, "unknown method"),
        ({"guide": "column"}, "unknown flip guide"),
        ({"calib_method": "kl"}, "unknown calibration method"),
        ({"act_headroom": 0.5}, "--act-headroom"),
        ({"error_budget": -1.0}, "--error-budget"),
        ({"iters": 0}, "--iters"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_rows": True}, "--max-rows"),
        ({"device": "tpu"}, "unknown device"),
        ({"preprocess": "layout=NWHC"}, "layout"),
        ({"wbits": 4}, "unknown option 'wbits'"),
    ],
)
def test_bad_values_fail_when_the_config_is_built(options, fragment):
    """Every option is checked once, on construction, before any model is read."""
    with pytest.raises(UsageError, match=fragment):
        QuantConfig.from_options(**options)


def test_headroom_follows_activation_bits_unless_given():
    """The activation headroom default (2 at 8 bits, 1 at 4) is resolved in the config, and re-resolved
    when a flat override changes a_bits without giving a headroom."""
    assert QuantConfig().activations.act_headroom == 2.0
    a4 = QuantConfig.from_options(QuantConfig(), a_bits=4)
    assert a4.activations.act_headroom == 1.0
    assert QuantConfig.from_options(a_bits=4, act_headroom=3.0).activations.act_headroom == 3.0


def test_dict_round_trip_and_fingerprint():
    """`to_dict` is JSON and reads back to the same config; the fingerprint leaves out what cannot change
    a decision (devices, providers, progress) but keeps the seed."""
    config = QuantConfig.from_options(w_bits=4, preprocess="size=8x8,channels=1", providers=["CPUExecutionProvider"])
    data = json.loads(json.dumps(config.to_dict()))
    assert QuantConfig.from_dict(data) == config
    assert QuantConfig.from_options(config, device="cpu", progress=True).fingerprint() == config.fingerprint()
    assert QuantConfig.from_options(config, seed=1).fingerprint() != config.fingerprint()
    with pytest.raises(UsageError, match="not a qcb-onnx config"):
        QuantConfig.from_dict({"weights": {"bits": 4}})


def test_registry_is_the_one_place_a_method_is_chosen():
    """Each method name maps to one class; EFRAP with neither strength nor budget is the budget search."""
    assert set(METHODS) == {"efrap", "adaround", "nearest", "efrap-official"}
    assert {c.name for c in METHODS.values()} == set(METHODS)
    assert isinstance(method_for(RoundingOptions()), AutoBudget)
    assert method_for(RoundingOptions(error_budget=0.1)) == Efrap(None, 0.1, "auto")
    assert method_for(RoundingOptions(strength=2.0, guide="neuron")) == Efrap(2.0, 0.25, "neuron")
    assert method_for(RoundingOptions(method="adaround")) == AdaRound(iters=1000)
    assert method_for(RoundingOptions(method="efrap-official")) == EfrapOfficial(iters=10000)
    assert isinstance(method_for(RoundingOptions(method="nearest")), Nearest)
    # what each needs from the layer loop, and who corrects biases
    assert [(c.data, c.corrects_bias) for c in (Efrap, AdaRound, Nearest, EfrapOfficial)] == [
        ("moments", True),
        ("moments", True),
        ("none", False),
        ("samples", False),
    ]


def test_output_reproduces_from_its_own_metadata(qcb_model, digits):
    """The config recorded in an output, passed back with the recorded error budget, converts the same
    model to the same integers (what "reproducible from itself" means)."""
    import numpy as np
    import onnx

    import qcb_onnx

    calib = digits[0][:96]
    first = qcb_onnx.convert(str(qcb_model), calib, w_bits=4, calib_size=64, providers="cpu")
    meta = {p.key: p.value for p in first.metadata_props}
    recorded = QuantConfig.from_metadata(meta)
    assert recorded == QuantConfig.from_options(w_bits=4, calib_size=64, providers="cpu")
    chosen = json.loads(meta["qcb_onnx.error_budget"])["chosen"]
    again = qcb_onnx.convert(str(qcb_model), calib, recorded, error_budget=chosen)
    ints = {t.name: onnx.numpy_helper.to_array(t) for t in first.graph.initializer if t.name.endswith("_quantized")}
    for t in again.graph.initializer:
        if t.name in ints:
            assert np.array_equal(onnx.numpy_helper.to_array(t), ints[t.name]), t.name


def test_config_file_and_flags(tmp_path, capsys, qcb_model, calib_npy):
    """`--config` reads a TOML file (flat or in sections), flags given on the command line override it,
    and `info --toml` prints an output's config as a file that converts the model to the same bytes."""
    from qcb_onnx.cli import main

    cfg = tmp_path / "qcb.toml"
    cfg.write_text('method = "nearest"\n[weights]\nw_bits = 4\nper_channel = false\n[activations]\ncalib_size = 64\n')
    args = build_parser().parse_args(
        ["convert", "m", "--calib", "c", "--out", "o", "--config", str(cfg), "--w-bits", "8"]
    )
    config = config_from_args(args)
    assert (config.rounding.method, config.weights.w_bits, config.weights.per_channel) == ("nearest", 8, False)
    assert config.activations.calib_size == 64

    out = tmp_path / "out.onnx"
    run = ["--quiet", "--providers", "cpu"]
    assert (
        main(["convert", str(qcb_model), "--calib", str(calib_npy), "--out", str(out), "--config", str(cfg), *run]) == 0
    )
    capsys.readouterr()
    assert main(["info", str(out), "--toml"]) == 0
    (tmp_path / "again.toml").write_text(capsys.readouterr().out)
    again = tmp_path / "again.onnx"
    argv = [
        "convert",
        str(qcb_model),
        "--calib",
        str(calib_npy),
        "--out",
        str(again),
        "--config",
        str(tmp_path / "again.toml"),
    ]
    assert main([*argv, *run]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantized: yes" in text and "qcb-onnx output: version" in text


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("w_bits = 9\n", "--w-bits"),
        ("[weights]\nmethod = 'x'\n", "[weights] has no option 'method'"),
        ("w_bits = \n", "not TOML"),
    ],
)
def test_bad_config_file(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        QuantConfig.from_toml(path)
