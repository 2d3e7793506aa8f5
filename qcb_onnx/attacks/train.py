"""Plain training loops shared by the attacks (clean pre-training, evaluation, ONNX export)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from torch import nn


def iterate(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator, shuffle: bool = True):
    idx = rng.permutation(len(x)) if shuffle else np.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = idx[i : i + batch_size]
        yield torch.from_numpy(x[j]), torch.from_numpy(y[j])


def train_clean(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for xb, yb in iterate(x, y, batch_size, rng):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    pred = torch.cat([model(xb).argmax(1) for xb, _ in iterate(x, y, 512, np.random.default_rng(0), False)])
    return float((pred.numpy() == y).mean() * 100)


def export_onnx(
    model: nn.Module, sample: np.ndarray, metadata: dict[str, str] | None = None, opset: int = 17
) -> onnx.ModelProto:
    """Export in eval mode (BatchNorm folded into Conv, as deployed) with a dynamic batch dim."""
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        torch.from_numpy(sample[:1]),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    m = onnx.load_from_string(buf.getvalue())
    for k, v in (metadata or {}).items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    return m
