"""Block-wise int4 weight-only quantization (issue 21): ORT's MatMulNBits integers, both output forms.

A tiny two-block transformer (LayerNorm, attention, GELU MLP; 8 MatMul weights and a Gemm head) is
exported by both torch exporters.  `--method nearest` must write exactly the bytes ORT's own
`MatMulNBitsQuantizer` (RTN) writes, in its QOperator (MatMulNBits) and its QDQ form; EFRAP's output
must run in ORT in both forms, hold the same integers in each, agree with our simulation and
reconstruct every layer better than nearest.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from torch import nn

from qcb_onnx import blockwise, quantize
from qcb_onnx.cli import main
from qcb_onnx.config import QuantConfig
from qcb_onnx.emit import read_weight_ints
from qcb_onnx.errors import UsageError
from qcb_onnx.runtime import session

D, T = 64, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // 2) ** 0.5, -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(D, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """The same seeded model, exported by the TorchScript exporter (dynamic batch) and by dynamo (batch 1)."""
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(1, T, D)
    folder = tmp_path_factory.mktemp("tiny")
    paths = {"torchscript": str(folder / "ts.onnx"), "dynamo": str(folder / "dynamo.onnx")}
    torch.onnx.export(
        model,
        (x,),
        paths["torchscript"],
        dynamo=False,
        opset_version=17,
        dynamic_axes={"x": {0: "N"}},
        input_names=["x"],
    )
    torch.onnx.export(model, (x,), paths["dynamo"], dynamo=True)
    return paths


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((32, T, D)).astype(np.float32)


def _ort_blocks(w: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORT's C++ quantizer on a (K, N) weight: canonical (N, K) integers, (N, n_blocks) scales and zero points."""
    k, n = w.shape
    nb = -(-k // block)
    padded = np.ascontiguousarray(np.pad(w, ((0, nb * block - k), (0, 0))))
    packed, zp = np.zeros((n, nb, block // 2), np.uint8), np.zeros((n, (nb + 1) // 2), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    quantize_matmul_4bits(packed, padded, scales, zp, block, n, nb * block, symmetric)
    ints = blockwise.unpack_nibbles(packed.reshape(n, -1), nb * block)[:, :k]
    return ints, scales, blockwise.unpack_nibbles(zp, nb)


def _tie_weights(rng: np.random.Generator, k: int, n: int, symmetric: bool) -> np.ndarray:
    """Columns of exact half-integer multiples of scales whose reciprocals are inexact (ties everywhere),
    one all-zero column and one all-positive one."""
    cols = []
    for _ in range(n):
        s = rng.choice([0.25, 0.1, 0.3, 0.07, 1 / 3, 0.013]) * rng.choice([-1, 1])
        halves = rng.integers(-15, 15, k) / 2 if symmetric else rng.integers(-6, 24, k) / 2
        cols.append(halves * s)
    w = np.stack(cols, 1).astype(np.float32)
    w[:, 0] = 0.0
    w[:, 1] = np.abs(w[:, 1])
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_mlas_arithmetic_matches_ort_bit_for_bit(symmetric, block):
    """Scales, zero points and integers equal ORT's quantizer on random weights and on weights that sit
    exactly on rounding ties, with K not a multiple of the block (padding) and an all-zero block."""
    rng = np.random.default_rng(block)
    for w in (rng.standard_normal((200, 24)).astype(np.float32), _tie_weights(rng, 200, 24, symmetric)):
        ints, scales, zps = _ort_blocks(w, block, symmetric)
        blocks = blockwise.block_params(w.T, block, symmetric)
        assert np.array_equal(blocks.scale, scales)
        if not symmetric:
            assert np.array_equal(blocks.zero_point, zps)
        assert np.array_equal(blockwise.nearest_unsigned(w.T, blocks), ints)


def _ort_reference(path: str, symmetric: bool, fmt: QuantFormat) -> dict[str, np.ndarray]:
    q = MatMulNBitsQuantizer(onnx.load(path), block_size=32, is_symmetric=symmetric, quant_format=fmt)
    q.process()
    return {t.name: numpy_helper.to_array(t) for t in q.model.model.graph.initializer}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_nearest_writes_ort_quantizers_bytes(models, calib, exporter, symmetric):
    """`--method nearest` equals ORT's RTN int4 quantizer byte for byte on every MatMul weight: MatMulNBits'
    packed B, scales and zero points, and the QDQ form's INT4/UINT4 integers, scales and zero points."""
    path = models[exporter]
    options = dict(method="nearest", w_bits=4, a_bits=None, block_size=32, w_asymmetric=not symmetric, providers="cpu")
    nbits = quantize(path, calib, weight_format="matmulnbits", **options).model
    ref = _ort_reference(path, symmetric, QuantFormat.QOperator)
    ours = {t.name: numpy_helper.to_array(t) for t in nbits.graph.initializer}
    keys = [k for k in ref if k.endswith(("_Q4", "_scales", "_zero_points"))]
    assert len([k for k in keys if k.endswith("_Q4")]) == 8
    for key in keys:
        assert ours[key].dtype == ref[key].dtype and np.array_equal(ours[key], ref[key]), key
    assert sum(n.op_type == "MatMulNBits" for n in nbits.graph.node) == 8

    qdq = quantize(path, calib, weight_format="qdq", **options).model
    ref = _ort_reference(path, symmetric, QuantFormat.QDQ)
    ours = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    weights = [k.removesuffix("_DQ_Q4") for k in ref if k.endswith("_DQ_Q4")]
    assert len(weights) == 8
    for w in weights:
        assert np.array_equal(ours[f"{w}_quantized"], ref[f"{w}_DQ_Q4"]), w
        assert np.array_equal(ours[f"{w}_scale"], ref[f"{w}_DQ_scales"]), w
        if not symmetric:
            assert np.array_equal(ours[f"{w}_zero_point"], ref[f"{w}_DQ_zero_points"]), w


@pytest.mark.parametrize("symmetric", [True, False])
def test_efrap_outputs_run_in_ort_in_both_forms(models, calib, symmetric):
    """EFRAP's block-wise output, as MatMulNBits and as QDQ: the same integers in both files, within each
    block's grid; ORT's logits equal our simulation's (float dequantization: to 1e-4 of their scale), and
    every layer reconstructs its FP output better than nearest rounding.  ORT's CPU EP fuses a QDQ int4
    MatMul into MatMulNBits at accuracy level 4 (int8 activations, `session.qdq_matmulnbits_accuracy_level`)
    unless told otherwise: at level 0 it computes what MatMulNBits without an accuracy_level does."""
    path = models["dynamo"]
    options = dict(w_bits=4, a_bits=None, block_size=32, w_asymmetric=not symmetric, providers="cpu")
    runs = {fmt: quantize(path, calib, weight_format=fmt, **options) for fmt in ("matmulnbits", "qdq")}
    x = calib[:8]
    for fmt, run in runs.items():
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        for sess, tol in (
            (ort.InferenceSession(run.model.SerializeToString(), so, ["CPUExecutionProvider"]), 1e-4),
            (session(run.model, "cpu"), 1e-2 if fmt == "qdq" else 1e-4),
        ):
            feed = sess.get_inputs()[0].name
            ort_out = np.concatenate([sess.run(None, {feed: x[i : i + 1]})[0] for i in range(len(x))])
            sim = run.simulate(x)
            assert np.abs(ort_out - sim).max() <= tol * np.abs(sim).max(), fmt
    nbits, qdq = runs["matmulnbits"], runs["qdq"]
    for name, wq in nbits.state.weights.items():
        assert np.array_equal(read_weight_ints(qdq.model, name), wq.ints)
        assert np.array_equal(read_weight_ints(nbits.model, name), wq.ints)  # MatMulNBits unpacked; Gemm's DQ
        lo, hi = (-8, 7) if symmetric else (0, 15)
        assert wq.ints.min() >= lo and wq.ints.max() <= hi
    layers = json.loads({p.key: p.value for p in nbits.model.metadata_props}["qcb_onnx.layers"])
    assert len(layers) == 9 and sum(n.op_type == "MatMulNBits" for n in nbits.model.graph.node) == 8
    assert all(layer["error_vs_nearest"] < 1.0 and layer["flip_ratio"] > 0 for layer in layers), layers


def test_int4_weight_only_target_is_block_wise_and_bad_options_fail_cleanly(models, calib, tmp_path, capsys):
    """The preset means ORT's int4 quantizer's defaults (blocks of 32, symmetric); block-wise options that
    cannot hold are one-line errors (exit 2) before any work, and no output is written."""
    config = QuantConfig.for_target("int4-weight-only")
    assert (config.weights.block_size, config.weights.w_asymmetric, config.activations.a_bits) == (32, False, None)
    with pytest.raises(UsageError, match="needs --a-bits none"):
        QuantConfig.from_options(block_size=32, w_bits=4)
    with pytest.raises(UsageError, match="--block-size must be one of"):
        QuantConfig.from_options(block_size=48, w_bits=4, a_bits=None)
    with pytest.raises(UsageError, match="need --block-size"):
        QuantConfig.from_options(weight_format="matmulnbits")
    np.save(tmp_path / "calib.npy", calib)
    out = tmp_path / "out.onnx"
    argv = ["convert", models["torchscript"], "--calib", str(tmp_path / "calib.npy"), "--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--block-size", "32", "--w-bits", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--a-bits none" in err[0] and not out.exists()
    assert main([*argv, "--target", "int4-weight-only", "--weight-format", "matmulnbits", "--method", "nearest"]) == 0
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(out).graph.node) == 8


def test_budget_search_measures_next_token_agreement_on_a_sequence_output(tmp_path):
    """A (batch, tokens, vocabulary) first output is a language model's next-token decisions: the
    error-budget search measures FP32 agreement per position instead of leaving the budget fixed."""
    torch.manual_seed(0)
    lm = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, 32)).eval()
    path = tmp_path / "lm.onnx"
    torch.onnx.export(lm, (torch.randn(1, T, D),), str(path), dynamo=True)
    tokens = np.random.default_rng(1).standard_normal((32, T, D)).astype(np.float32)
    out = quantize(
        str(path), tokens, QuantConfig.for_target("int4-weight-only", QuantConfig.from_options(providers="cpu"))
    )
    search = json.loads({p.key: p.value for p in out.model.metadata_props}["qcb_onnx.error_budget"])
    assert search["mode"] == "auto" and search["probes"], search
    assert all(0 <= p["agreement"] <= 100 for p in search["probes"])


def test_lm_attack_box_keeps_orts_int4_integers_and_a_causal_lm_converts(tmp_path):
    """The LM attack's PGD box (redteam/lm.py): after any perturbation and projection, every Linear weight
    still has the RTN integers and scales of ORT's quantizer (blockwise.py's, equal to ORT's above).  The
    dynamo export of that causal LM, token ids in and an additive -inf mask inside, converts and runs."""
    from qcb_onnx.redteam.lm import BlockBox, TinyLM

    torch.manual_seed(0)
    lm = TinyLM(d=32, depth=1, heads=2, context=16).eval()
    linears = [m for m in lm.modules() if isinstance(m, nn.Linear)]

    def rtn(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        blocks = blockwise.block_params(w.detach().numpy(), 32, True)
        return blockwise.nearest_unsigned(w.detach().numpy(), blocks), blocks.scale

    before = [rtn(m.weight) for m in linears]
    box = BlockBox(lm, 32)
    with torch.no_grad():
        for m in linears:
            m.weight.add_(torch.randn_like(m.weight) * m.weight.abs().mean())
    box.project()
    for m, (ints, scale) in zip(linears, before, strict=True):
        after_ints, after_scale = rtn(m.weight)
        assert np.array_equal(after_ints, ints) and np.array_equal(after_scale, scale)
    path = tmp_path / "lm.onnx"
    torch.onnx.export(lm, (torch.zeros(1, 16, dtype=torch.int64),), str(path), dynamo=True)
    ids = np.random.default_rng(0).integers(0, 96, (16, 16)).astype(np.int64)
    out = quantize(
        str(path), ids, QuantConfig.for_target("int4-weight-only", QuantConfig.from_options(providers="cpu"))
    )
    assert sum(n.op_type == "DequantizeLinear" for n in out.model.graph.node) == len(linears)
