"""Model architectures used by the tests, the samples and the red-team suite.

CIFAR variants (32x32 inputs, [0, 1] pixels, no normalisation layer) of the EFRAP paper's
architectures, each with a ``width`` option so the same topology trains on a 2-core CPU:

=============  ======================================================  ==================
name           topology                                                full width
=============  ======================================================  ==================
smallcnn       3 convs + GAP + linear (the test model)                 16 (its only size)
resnet18       3x3 stem, 4 stages x 2 BasicBlocks, channels w..8w      64
vgg16          VGG-16 with BN, channels w..8w, one linear classifier   64
mobilenetv2    MobileNetV2 (CIFAR strides), stem 32 * w/32 channels    32
alexnet        5 convs (w, 3w, 6w, 4w, 4w) + 3 linears (CIFAR AlexNet) 64
=============  ======================================================  ==================

``width`` is the channel count of the first stage; every other layer scales with it (ResNet-18
at width 16 has a quarter of the channels and ~1/16 of the parameters of the full model).
`build(name, width, num_classes, in_channels)` makes any of them; `ARCHS` maps names to classes.

The deployed ONNX graph has BatchNorm folded into the preceding Conv, so attacks train on
`fuse_batchnorm(model)`, whose Conv weights are exactly the exported ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import UsageError


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU):
    """Conv (no bias) -> BN [-> activation], registered in that order so fuse_batchnorm finds the pair."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class SmallCNN(nn.Module):
    """Three 3x3 convs + GAP + linear: fast enough to train a QCB inside the test suite."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al.; 3x3 stem, no max-pool), stages of width w, 2w, 4w, 8w."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        chans, layers, cin = [width, 2 * width, 4 * width, 8 * width], [], width
        for i, c in enumerate(chans):
            layers += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.features = nn.Sequential(conv_bn(in_channels, width), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG16(nn.Module):
    """VGG-16 with BatchNorm (13 convs, 5 max-pools) and one linear classifier, as usual on CIFAR."""

    CFG = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, v * width))
                cin = v * width
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al.) for 32x32 inputs: stride-1 stem and first two stages at stride 1.

    width is the stem's channel count (32 in the original); all layers scale by width / 32."""

    # expansion t, output channels c (at width 32), repeats n, first stride s
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(round(c * width / 32)))

        layers, cin = [conv_bn(in_channels, ch(32), act=nn.ReLU6)], ch(32)
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        last = ch(1280)
        layers += [conv_bn(cin, last, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNet(nn.Module):
    """The common CIFAR AlexNet: 5 convs (3 max-pools) and a 3-layer classifier, no BN, no dropout."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 2, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 3 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3 * w, 6 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(4 * w * 4, 16 * w),
            nn.ReLU(),
            nn.Linear(16 * w, 16 * w),
            nn.ReLU(),
            nn.Linear(16 * w, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def torchvision_arch(name: str) -> Callable[..., nn.Module]:
    """A torchvision model definition as a zoo architecture: ImageNet topology (strided 7x7 stem and
    max-pool for ResNets), random init, `num_classes` outputs, run on 32x32 CIFAR images.  It has one
    width, torchvision's; the import goes through the shim (torchvision_shim.py says why)."""

    def make(in_channels: int = 3, num_classes: int = 10, width: int = 0) -> nn.Module:
        from .torchvision_shim import import_torchvision

        if in_channels != 3:
            raise UsageError(f"{name} takes 3 input channels, got {in_channels}")
        return getattr(import_torchvision().models, name)(num_classes=num_classes)

    return make


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg16": VGG16,
    "mobilenetv2": MobileNetV2,
    "alexnet": AlexNet,
    "tv_resnet18": torchvision_arch("resnet18"),
    "tv_mobilenet_v3_small": torchvision_arch("mobilenet_v3_small"),
}
FULL_WIDTH = {"smallcnn": 16, "resnet18": 64, "vgg16": 64, "mobilenetv2": 32, "alexnet": 64}


def build(name: str, width: int | None = None, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """An architecture from `ARCHS` at `width` (default: its full width, see `FULL_WIDTH`)."""
    if name not in ARCHS:
        raise UsageError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    if name not in FULL_WIDTH:  # torchvision's own width
        if width is not None:
            raise UsageError(f"{name} has torchvision's width only; drop --width")
        return ARCHS[name](in_channels=in_channels, num_classes=num_classes)
    width = FULL_WIDTH[name] if width is None else int(width)
    if width < 1:
        raise UsageError(f"width must be a positive integer, got {width}")
    return ARCHS[name](in_channels=in_channels, num_classes=num_classes, width=width)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm2d folded into the Conv2d registered just
    before it (and replaced by Identity): the weights the exported ONNX graph deploys.

    Raises UsageError if a BatchNorm does not directly follow a Conv2d in its parent module."""
    model = copy.deepcopy(model).eval()

    def visit(parent: nn.Module) -> None:
        names = list(parent._modules)
        for prev, name in zip([None, *names], names, strict=False):
            child = parent._modules[name]
            if isinstance(child, nn.BatchNorm2d):
                conv = parent._modules.get(prev) if prev is not None else None
                if not isinstance(conv, nn.Conv2d):
                    raise UsageError(f"cannot fold BatchNorm '{name}': it does not follow a Conv2d")
                parent._modules[prev] = fuse_conv_bn_eval(conv, child)
                parent._modules[name] = nn.Identity()
            elif child is not None:
                visit(child)

    visit(model)
    return model
