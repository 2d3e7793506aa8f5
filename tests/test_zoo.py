"""The CIFAR model zoo: every architecture builds, exports to ONNX faithfully, and folds its BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qcb_onnx.errors import UsageError
from qcb_onnx.redteam.train import export_onnx
from qcb_onnx.redteam.zoo import ARCHS, build, fuse_batchnorm
from qcb_onnx.runtime import session

SMALL = {"smallcnn": 8, "resnet18": 8, "vgg16": 8, "mobilenetv2": 8, "alexnet": 8}  # torchvision archs: own width
SMALL.update({name: None for name in ARCHS if name.startswith("tv_")})


def _trained_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm non-trivial running statistics and affine parameters (as after training), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_forward_export_matches_ort(name):
    """At a small width each architecture maps (2, 3, 32, 32) to (2, 10) logits, exports to ONNX, and
    ONNX Runtime reproduces the torch outputs within 1e-4."""
    torch.manual_seed(0)
    model = _trained_bn(build(name, SMALL[name], num_classes=10, in_channels=3))
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert ref.shape == (2, 10)
    sess = session(export_onnx(model, x), "auto")
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(ARCHS))
def test_fuse_batchnorm_preserves_outputs(name):
    """fuse_batchnorm folds every BatchNorm into its Conv (none remains) without changing outputs, and
    leaves the original model untouched."""
    torch.manual_seed(0)
    model = _trained_bn(build(name, SMALL[name]))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_build_rejects_unknown_arch_and_bad_width():
    """Unknown architecture names and non-positive widths are UsageErrors; default width is the full one."""
    with pytest.raises(UsageError, match="unknown architecture"):
        build("resnet50")
    with pytest.raises(UsageError, match="width"):
        build("resnet18", 0)
    full = build("resnet18")
    assert full.features[0][0].out_channels == 64
    assert 10e6 < sum(p.numel() for p in full.parameters()) < 12e6  # the usual 11.2 M CIFAR ResNet-18
