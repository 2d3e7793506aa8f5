"""Tests for the normalize stage (qcb_onnx.passes): BN/Add/Mul folding, Identity/Dropout removal,
constant folding, and parity with onnxruntime.quantization.quant_pre_process."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from onnxruntime.quantization import quant_pre_process

from qcb_onnx.errors import ModelFileError, UsageError
from qcb_onnx.passes import (
    eliminate_dropout_pass,
    eliminate_identity_pass,
    fold_batchnorm_pass,
    normalize,
    remove_unused_pass,
)

REMOVED_OPS = {"BatchNormalization", "Identity", "Dropout"}


# --------------------------------------------------------------------------- helpers


def _randomize_bn(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running stats and affine params (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)


def _export(
    module: torch.nn.Module,
    shape: tuple[int, ...],
    *,
    dynamic_batch: bool = False,
    keep_initializers_as_inputs: bool = False,
) -> onnx.ModelProto:
    """Export in eval mode without torch's constant folding (keeps BN, Identity, Shape chains).

    With ``dynamic_batch`` the export uses a symbolic batch (so torch emits Shape->Gather->...
    chains) and the batch dimension is then pinned to ``shape[0]`` in the ONNX graph, giving a
    model with static shapes whose Reshape shapes are still computed at run time.
    """
    torch.manual_seed(0)
    module.eval()
    buf = io.BytesIO()
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"x": {0: "N"}, "y": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            torch.randn(*shape),
            buf,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["x"],
            output_names=["y"],
            keep_initializers_as_inputs=keep_initializers_as_inputs,
            **kwargs,
        )
    model = onnx.load_from_string(buf.getvalue())
    if dynamic_batch:
        for vi in (model.graph.input[0], model.graph.output[0]):
            vi.type.tensor_type.shape.dim[0].dim_value = shape[0]
    return model


def _insert_after(model: onnx.ModelProto, value: str, op_type: str, extra_inputs=()) -> None:
    """Reroute every consumer of ``value`` through a new ``op_type`` node (in place)."""
    new_value = f"{value}__{op_type.lower()}"
    for node in model.graph.node:
        node.input[:] = [new_value if name == value else name for name in node.input]
    index = next(i for i, n in enumerate(model.graph.node) if value in n.output)
    node = helper.make_node(op_type, [value, *extra_inputs], [new_value], name=f"inserted_{op_type}")
    model.graph.node.insert(index + 1, node)


def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """A hand-built opset-17 model with an IR version this onnxruntime can load."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _weights(model: onnx.ModelProto, op_type: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weight, bias) initializers of every ``op_type`` node, in node order."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == op_type:
            bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            out.append((inits[node.input[1]], bias))
    return out


def _check_normalized(original: onnx.ModelProto, normalized: onnx.ModelProto, x: np.ndarray) -> None:
    """The common contract: valid, same I/O names, same ORT outputs, no BN/Identity/Dropout."""
    onnx.checker.check_model(normalized, full_check=True)
    assert [i.name for i in normalized.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in normalized.graph.output] == [o.name for o in original.graph.output]
    assert not REMOVED_OPS & set(_ops(normalized)), _ops(normalized)
    for want, got in zip(_run(original, x), _run(normalized, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _ort_pre_processed(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    src, dst = tmp_path / "in.onnx", tmp_path / "pre.onnx"
    onnx.save(model, src)
    quant_pre_process(str(src), str(dst))
    return onnx.load(dst)


def _input(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- models


class ConvNet(torch.nn.Module):
    """Conv+BN, depthwise Conv+BN, Conv(no bias)+BN, Dropout, flatten via x.view(x.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.pw = torch.nn.Conv2d(8, 6, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(6)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(6 * 5 * 5, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        y = self.drop(self.bn3(self.pw(y)))
        return self.fc(y.view(y.size(0), -1))


# --------------------------------------------------------------------------- tests


def test_conv_bn_model_matches_original_and_quant_pre_process(tmp_path):
    """On a torch-exported CNN with Conv+BN (with bias, depthwise, without bias), Dropout, Identity
    and a Shape->Gather->Unsqueeze->Concat->Reshape chain, normalize() removes every
    BN/Identity/Dropout, keeps ORT outputs and I/O names, passes the full checker, and its Conv
    weights/biases equal those of ORT's quant_pre_process (by node order)."""
    net = ConvNet()
    _randomize_bn(net)
    model = _export(net, (2, 3, 5, 5), dynamic_batch=True)
    conv_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    _insert_after(model, conv_out, "Identity")
    relu_out = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    model.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(0.25, dtype=np.float32), "drop_ratio"),
            onnx.numpy_helper.from_array(np.array(False), "drop_training"),
        ]
    )
    _insert_after(model, relu_out, "Dropout", ["drop_ratio", "drop_training"])
    onnx.checker.check_model(model, full_check=True)
    before = _ops(model)
    assert before.count("BatchNormalization") == 3
    assert {"Identity", "Dropout", "Shape", "Gather", "Concat", "Reshape"} <= set(before)

    x = _input((2, 3, 5, 5))
    normalized = normalize(model)
    _check_normalized(model, normalized, x)
    assert _ops(normalized).count("Conv") == 3

    reference = _ort_pre_processed(model, tmp_path)
    ours, theirs = _weights(normalized, "Conv"), _weights(reference, "Conv")
    assert len(ours) == len(theirs) == 3
    for (w, b), (w_ref, b_ref) in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6)


def test_shape_chain_is_folded_to_constant_reshape():
    """With static shapes, the Shape->Gather->Unsqueeze->Concat chain feeding Reshape is folded:
    no Shape/Gather/Unsqueeze/Concat/Constant node is left and Reshape's shape is an initializer."""
    net = ConvNet()
    _randomize_bn(net)
    model = _export(net, (2, 3, 5, 5), dynamic_batch=True)
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((2, 3, 5, 5)))
    ops = _ops(normalized)
    assert not {"Shape", "Gather", "Unsqueeze", "Concat", "Constant"} & set(ops), ops
    reshape = next(n for n in normalized.graph.node if n.op_type == "Reshape")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in normalized.graph.initializer}
    assert inits[reshape.input[1]].tolist() == [2, -1]


def test_bn_folding_is_float64_exact():
    """The folded weight/bias equal W*s and (b-mean)*s+beta computed in float64 from the export's
    own parameters (s = gamma/sqrt(var+eps)), rounded once to float32."""
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3))
    _randomize_bn(net, seed=3)
    model = _export(net, (1, 2, 6, 6))
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((1, 2, 6, 6)))
    conv, bn = net[0], net[1]
    f64 = lambda t: t.detach().double().numpy()  # noqa: E731
    s = f64(bn.weight) / np.sqrt(f64(bn.running_var) + np.float64(np.float32(1e-3)))
    want_w = (f64(conv.weight) * s[:, None, None, None]).astype(np.float32)
    want_b = ((f64(conv.bias) - f64(bn.running_mean)) * s + f64(bn.bias)).astype(np.float32)
    [(w, b)] = _weights(normalized, "Conv")
    np.testing.assert_array_equal(w, want_w)
    np.testing.assert_array_equal(b, want_b)


def test_conv_without_bias_gets_bias(tmp_path):
    """Conv(bias=False)+BN folds into a Conv with a new bias input, equal to quant_pre_process."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, bias=False), torch.nn.BatchNorm2d(5))
    _randomize_bn(net, seed=1)
    model = _export(net, (2, 3, 7, 7))
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((2, 3, 7, 7)))
    [(w, b)] = _weights(normalized, "Conv")
    assert b is not None and b.shape == (5,)
    [(w_ref, b_ref)] = _weights(_ort_pre_processed(model, tmp_path), "Conv")
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6)


def test_depthwise_conv_bn(tmp_path):
    """Depthwise Conv (group == channels) + BN scales each (1, k, k) filter by its channel's
    factor; outputs and weights match the original model and quant_pre_process."""
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.nn.BatchNorm2d(6))
    _randomize_bn(net, seed=2)
    model = _export(net, (2, 6, 5, 5))
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((2, 6, 5, 5)))
    [(w, b)] = _weights(normalized, "Conv")
    assert w.shape == (6, 1, 3, 3)
    [(w_ref, b_ref)] = _weights(_ort_pre_processed(model, tmp_path), "Conv")
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6)


def test_gemm_bn_folded():
    """Linear + BatchNorm1d (exported as Gemm(transB=1) + BatchNormalization) folds into one Gemm
    whose weight rows are scaled per output feature; outputs are unchanged. (ORT's
    quant_pre_process leaves this BN in place, so there is no ORT weight to compare with.)"""
    net = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.BatchNorm1d(7))
    _randomize_bn(net, seed=4)
    model = _export(net, (3, 12))
    assert _ops(model) == ["Gemm", "BatchNormalization"]
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((3, 12)))
    assert _ops(normalized) == ["Gemm"]
    lin, bn = net[0], net[1]
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    [(w, b)] = _weights(normalized, "Gemm")
    np.testing.assert_allclose(w, (lin.weight.double() * s[:, None]).detach().numpy(), rtol=1e-6)
    expected_b = (lin.bias.double() - bn.running_mean.double()) * s + bn.bias.double()
    np.testing.assert_allclose(b, expected_b.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_gemm_bn_with_beta_and_no_transpose():
    """A hand-built Gemm(transB=0, beta=0.5) + BN folds too: beta is folded into the new bias."""
    rng = np.random.default_rng(5)
    k, n = 6, 4
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"),
        onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, n).astype(np.float32), "gamma"),
        onnx.numpy_helper.from_array(rng.uniform(-1, 1, n).astype(np.float32), "beta"),
        onnx.numpy_helper.from_array(rng.uniform(-1, 1, n).astype(np.float32), "mean"),
        onnx.numpy_helper.from_array(rng.uniform(0.3, 2, n).astype(np.float32), "var"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "C"], ["g"], beta=0.5, alpha=1.5),
            helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"]),
        ],
        "gemm_bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = _make_model(graph)
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((3, k)))
    assert _ops(normalized) == ["Gemm"]


def test_conv_transpose_bn():
    """ConvTranspose (grouped) + BN folds into the ConvTranspose with unchanged outputs."""
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), torch.nn.BatchNorm2d(6))
    _randomize_bn(net, seed=6)
    model = _export(net, (2, 4, 4, 4))
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((2, 4, 4, 4)))
    assert _ops(normalized) == ["ConvTranspose"]


class ConvAffine(torch.nn.Module):
    """Conv followed by a per-channel Mul and Add of constant parameters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.scale = torch.nn.Parameter(torch.rand(5, 1, 1, generator=gen) + 0.5)
        self.shift = torch.nn.Parameter(torch.randn(1, 5, 1, 1, generator=gen))

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


def test_conv_add_mul_folded(tmp_path):
    """Conv * per-channel constant + per-channel constant folds into a single Conv, like ORT's
    ConvMulFusion/ConvAddFusion: outputs unchanged and weights equal quant_pre_process."""
    model = _export(ConvAffine(), (2, 3, 6, 6))
    assert _ops(model) == ["Conv", "Mul", "Add"]
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((2, 3, 6, 6)))
    assert _ops(normalized) == ["Conv"]
    [(w, b)] = _weights(normalized, "Conv")
    reference = _ort_pre_processed(model, tmp_path)
    assert _ops(reference) == ["Conv"]
    [(w_ref, b_ref)] = _weights(reference, "Conv")
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6)


def test_add_not_per_channel_is_kept():
    """An Add whose constant varies over the spatial axes is not a bias and stays."""
    rng = np.random.default_rng(8)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"]),
            helper.make_node("Add", ["c", "A"], ["y"]),
        ],
        "conv_add",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 3, 3])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "W"),
            onnx.numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B"),
            onnx.numpy_helper.from_array(rng.standard_normal((3, 1, 3)).astype(np.float32), "A"),
        ],
    )
    model = _make_model(graph)
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((1, 2, 5, 5)))
    assert _ops(normalized) == ["Conv", "Add"]


class TwoConsumers(torch.nn.Module):
    """The Conv output feeds the BN and also a residual Add, so the BN must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


def test_bn_with_shared_conv_output_not_folded():
    """A BN whose Conv output has two consumers is left alone (folding would change the other
    consumer's input), and the normalized model still computes the same outputs."""
    net = TwoConsumers()
    _randomize_bn(net, seed=9)
    model = _export(net, (2, 4, 5, 5))
    normalized = normalize(model)
    onnx.checker.check_model(normalized, full_check=True)
    assert _ops(normalized).count("BatchNormalization") == 1
    x = _input((2, 4, 5, 5))
    np.testing.assert_allclose(_run(normalized, x)[0], _run(model, x)[0], rtol=1e-4, atol=1e-5)
    conv_w = next(t for t in model.graph.initializer if t.name == "conv.weight")
    [(w, _)] = _weights(normalized, "Conv")
    np.testing.assert_array_equal(w, onnx.numpy_helper.to_array(conv_w))


def test_metadata_opsets_and_input_preserved():
    """normalize() keeps opset imports, IR version, producer and metadata_props, and leaves its
    input proto untouched."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    _randomize_bn(net, seed=10)
    model = _export(net, (1, 3, 5, 5))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    helper.set_model_props(model, {"author": "qcb", "source": "unit-test"})
    snapshot = model.SerializeToString()
    normalized = normalize(model)
    assert model.SerializeToString() == snapshot
    assert {(o.domain, o.version) for o in normalized.opset_import} == {
        (o.domain, o.version) for o in model.opset_import
    }
    assert normalized.ir_version == model.ir_version
    assert (normalized.producer_name, normalized.producer_version) == (
        model.producer_name,
        model.producer_version,
    )
    assert {p.key: p.value for p in normalized.metadata_props} == {"author": "qcb", "source": "unit-test"}


def test_initializers_that_are_graph_inputs_become_constants():
    """Old-style models list initializers as graph inputs; as ORT's quant_pre_process does, they are
    treated as constants: BN is folded, only the data input stays an input, and outputs match."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    _randomize_bn(net, seed=11)
    model = _export(net, (1, 3, 5, 5), keep_initializers_as_inputs=True)
    assert len(model.graph.input) > 1
    normalized = normalize(model)
    onnx.checker.check_model(normalized, full_check=True)
    assert [i.name for i in normalized.graph.input] == [model.graph.input[0].name]
    assert "BatchNormalization" not in _ops(normalized)
    x = _input((1, 3, 5, 5))
    np.testing.assert_allclose(_run(normalized, x)[0], _run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_identity_to_graph_output_keeps_output_name():
    """When the removed Identity/Dropout/BN produces a graph output, the surviving producer takes
    over the output name."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    _randomize_bn(net, seed=12)
    model = _export(net, (1, 3, 5, 5))
    model.graph.node.append(helper.make_node("Identity", ["y"], ["y_out"]))
    model.graph.output[0].name = "y_out"
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((1, 3, 5, 5)))
    assert _ops(normalized) == ["Conv"]
    assert normalized.graph.node[0].output[0] == "y_out"


def test_fold_batchnorm_pass_alone():
    """fold_batchnorm_pass() works as a standalone onnx_ir pass and reports modification; a
    second run finds nothing to do."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    _randomize_bn(net, seed=13)
    model = _export(net, (1, 3, 5, 5))
    model_ir = ir.serde.deserialize_model(model)
    assert fold_batchnorm_pass()(model_ir).modified
    assert not fold_batchnorm_pass()(model_ir).modified
    remove_unused_pass()(model_ir)
    folded = ir.serde.serialize_model(model_ir)
    assert _ops(folded) == ["Conv"]
    assert len(folded.graph.initializer) == 2
    x = _input((1, 3, 5, 5))
    np.testing.assert_allclose(_run(folded, x)[0], _run(model, x)[0], rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    """normalize() rejects a non-ModelProto with UsageError and a model that fails the ONNX
    checker with ModelFileError."""
    with pytest.raises(UsageError):
        normalize(b"not a model")  # type: ignore[arg-type]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["y"])],
        "dup",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ModelFileError):
        normalize(_make_model(graph))


def test_dropout_pass_keeps_training_dropout():
    """eliminate_dropout_pass() + eliminate_identity_pass() remove a Dropout without
    training_mode and one with a constant-False training_mode, but keep a training-mode Dropout
    (which is random, not an identity)."""
    graph = helper.make_graph(
        [
            helper.make_node("Dropout", ["x", "r"], ["a"]),
            helper.make_node("Dropout", ["a", "r", "off"], ["b"]),
            helper.make_node("Dropout", ["b", "r", "on"], ["y"]),
        ],
        "dropouts",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [
            onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float32), "r"),
            onnx.numpy_helper.from_array(np.array(False), "off"),
            onnx.numpy_helper.from_array(np.array(True), "on"),
        ],
    )
    model_ir = ir.serde.deserialize_model(_make_model(graph))
    assert eliminate_dropout_pass()(model_ir).modified
    eliminate_identity_pass()(model_ir)
    remove_unused_pass()(model_ir)
    out = ir.serde.serialize_model(model_ir)
    assert _ops(out) == ["Dropout"]
    assert list(out.graph.node[0].input) == ["x", "r", "on"]
    assert out.graph.node[0].output[0] == "y"
    onnx.checker.check_model(out, full_check=True)


def test_shared_weight_is_not_overwritten():
    """Two Convs share one weight initializer and only one is followed by BN: the folded Conv gets
    a new weight initializer, the other Conv keeps the original, outputs are unchanged."""
    rng = np.random.default_rng(14)
    c = 3
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["y1"]),
            helper.make_node("Conv", ["x", "W", "B"], ["y2"], pads=[1, 1, 1, 1]),
        ],
        "shared",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 4, 4])],
        [
            helper.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, [1, c, 4, 4]),
            helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [1, c, 4, 4]),
        ],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "W"),
            onnx.numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "B"),
            onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "g"),
            onnx.numpy_helper.from_array(rng.uniform(-1, 1, c).astype(np.float32), "b"),
            onnx.numpy_helper.from_array(rng.uniform(-1, 1, c).astype(np.float32), "m"),
            onnx.numpy_helper.from_array(rng.uniform(0.3, 2, c).astype(np.float32), "v"),
        ],
    )
    model = _make_model(graph)
    normalized = normalize(model)
    _check_normalized(model, normalized, _input((1, c, 4, 4)))
    assert _ops(normalized) == ["Conv", "Conv"]
    weight_names = [n.input[1] for n in normalized.graph.node]
    assert "W" in weight_names and len(set(weight_names)) == 2
