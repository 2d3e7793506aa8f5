"""The patterns of real torchvision architectures, exported by both torch exporters, convert.

Each pattern is a small model built from torchvision's own blocks (random weights, 32x32 inputs):
squeeze-excite with hardswish (MobileNetV3), channel shuffle (ShuffleNetV2), a ConvNeXt block
(depthwise 7x7, LayerNorm and Linear on NHWC, GELU), and a 2-layer ViT (attention, MatMul/Gemm
weights, LayerNorm, Softmax).  Each is exported by the TorchScript exporter (opset 17, dynamic batch)
and by the dynamo exporter (torch's default: opset 18+, its own naming, a static batch of 1).  For
each: `--method nearest` writes exactly ORT quantize_static's integers for every weight ORT
quantizes, ORT agrees with our simulation on >= 99 % of top-1 decisions for nearest and EFRAP, and
transformer normalisation and activations stay in float.  benchmarks/architectures.py runs the full
architectures at 224x224."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qcb_onnx.emit import read_weight_ints
from qcb_onnx.evaluate.baseline import ort_quantize
from qcb_onnx.evaluate.score import predict
from qcb_onnx.pipeline import quantize

tv = pytest.importorskip("qcb_onnx.redteam.torchvision_shim").import_torchvision()
SIZE = 32


def _classifier(*body: nn.Module, channels: int) -> nn.Module:
    """`body` on 32x32 RGB, then global pooling and a 10-class Linear: the head every pattern shares."""
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def _se_hardswish() -> nn.Module:
    from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig

    cfg = InvertedResidualConfig(16, 3, 32, 16, True, "HS", 1, 1, 1.0)  # SE + hardswish
    stem = tv.ops.Conv2dNormActivation(3, 16, 3, stride=2, activation_layer=nn.Hardswish)
    return _classifier(stem, InvertedResidual(cfg, nn.BatchNorm2d), channels=16)


def _channel_shuffle() -> nn.Module:
    from torchvision.models.shufflenetv2 import InvertedResidual

    return _classifier(
        nn.Conv2d(3, 16, 3, padding=1), InvertedResidual(16, 32, 2), InvertedResidual(32, 32, 1), channels=32
    )


def _convnext_block() -> nn.Module:
    from torchvision.models.convnext import CNBlock

    return _classifier(
        nn.Conv2d(3, 16, 4, stride=4), CNBlock(16, layer_scale=0.5, stochastic_depth_prob=0.0), channels=16
    )


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)


PATTERNS = {
    "se-hardswish": _se_hardswish,
    "channel-shuffle": _channel_shuffle,
    "convnext": _convnext_block,
    "vit": _vit,
}


def _export(model: nn.Module, dynamo: bool) -> onnx.ModelProto:
    x = torch.rand(1, 3, SIZE, SIZE)
    if dynamo:
        return torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["logits"]).model_proto
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


@pytest.fixture(scope="module", params=[(p, d) for p in PATTERNS for d in (False, True)],
                ids=[f"{p}-{'dynamo' if d else 'torchscript'}" for p in PATTERNS for d in (False, True)])  # fmt: skip
def exported(request):
    name, dynamo = request.param
    torch.manual_seed(0)
    model = PATTERNS[name]().eval()
    with torch.no_grad():  # BatchNorm statistics away from the identity, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return name, dynamo, _export(model, dynamo)


CALIB = np.random.default_rng(0).random((64, 3, SIZE, SIZE), dtype=np.float32)
TEST = np.random.default_rng(1).random((64, 3, SIZE, SIZE), dtype=np.float32)


def _agreement(conversion) -> float:
    return float((predict(conversion.model, TEST, providers="cpu") == conversion.simulate(TEST).argmax(1)).mean())


def test_nearest_equals_ort_and_agrees(exported):
    """nearest: every weight ORT quantizes holds ORT's integers; ORT runs our model as we simulate it."""
    name, dynamo, model = exported
    ours = quantize(model, CALIB, method="nearest", calib_size=64, providers="cpu")
    ref = ort_quantize(model, CALIB, 8, 8, True)
    layers = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    weights = [
        t.name.removesuffix("_quantized") for t in ref.graph.initializer if t.name.removesuffix("_quantized") in layers
    ]
    assert weights, "ORT quantized no weight"
    for w in weights:
        np.testing.assert_array_equal(read_weight_ints(ours.model, w), read_weight_ints(ref, w), err_msg=w)
    assert len(ours.layers) >= len(weights)
    assert _agreement(ours) >= 0.99


def test_efrap_converts_and_agrees(exported):
    """The default (EFRAP, auto error budget) converts every pattern; ORT agrees with the simulation."""
    name, dynamo, model = exported
    conv = quantize(model, CALIB, calib_size=64, providers="cpu")
    assert _agreement(conv) >= 0.99
    assert any(r.flip_ratio > 0 for r in conv.layers)


def test_gelu_internals_stay_float(exported):
    """Inside an exported GELU (the Erf form) no tensor gets a Q/DQ pair, though ORT would put them on
    its Add and Muls; the GELU's output is quantized only as the next Linear's input."""
    name, dynamo, model = exported
    conv = quantize(model, CALIB, method="nearest", calib_size=64, providers="cpu")
    gm = conv.graph
    erfs = [n for n in gm.nodes if n.op_type == "Erf"]
    for erf in erfs:
        assert erf.output[0] not in conv.state.acts
        adds = [n for n in gm.nodes if erf.output[0] in n.input]
        assert adds and all(a.output[0] not in conv.state.acts for a in adds)
    if name in ("convnext", "vit") and not dynamo:
        assert erfs, "the TorchScript exporter writes GELU as Erf"


def test_exclude_leaves_nodes_in_float(exported):
    """--exclude by op type keeps those layers' weights in float and records the list in the config."""
    name, dynamo, model = exported
    conv = quantize(model, CALIB, method="nearest", calib_size=64, providers="cpu", exclude=("Gemm", "MatMul"))
    ops = {conv.graph.nodes[layer.index].op_type for layer in conv.plan.layers}
    assert ops == {"Conv"}
    meta = {p.key: p.value for p in conv.model.metadata_props}
    assert '"exclude": ["Gemm", "MatMul"]' in meta["qcb_onnx.config"]
