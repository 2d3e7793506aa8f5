"""Model architectures used by the tests, the samples and the red-team suite.

Width is an option everywhere so the same topology can be trained on a 2-core CPU.
"""

from __future__ import annotations

from torch import nn


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
