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


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    device: torch.device,
    augment_data: bool = False,
):
    """One shuffled epoch of (inputs, labels) on `device`; `augment_data` flips and crops each batch
    (CIFAR's standard augmentation; training loops apply any trigger after it, at its fixed place)."""
    for xb, yb in iterate(x, y, batch_size, rng):
        xb, yb = xb.to(device), yb.to(device)
        yield (augment(xb) if augment_data else xb), yb


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or 'auto' -> CUDA when present, else CPU."""
    return default_device() if device in (None, "auto") else torch.device(device)


def augment(xb: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: random horizontal flip and random crop after zero padding."""
    n, _, h, w = xb.shape
    flip = torch.rand(n, device=xb.device) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    padded = nn.functional.pad(xb, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def progress(iterable, desc: str, enabled: bool):
    """tqdm progress bar when `enabled` (the CLI), the plain iterable otherwise (tests, library)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False)


def train_clean(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    augment_data: bool = False,
    verbose: bool = False,
) -> nn.Module:
    """Adam + cosine schedule; `augment_data` adds flips and crops (for CIFAR)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = resolve_device(device)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for ep in progress(range(epochs), "clean training", verbose):
        for xb, yb in progress(batches(x, y, batch_size, rng, dev, augment_data), f"epoch {ep + 1}", verbose):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    dev = next(model.parameters()).device
    batches = iterate(x, y, 512, np.random.default_rng(0), False)
    pred = torch.cat([model(xb.to(dev)).argmax(1).cpu() for xb, _ in batches])
    return float((pred.numpy() == y).mean() * 100)


def export_onnx(
    model: nn.Module, sample: np.ndarray, metadata: dict[str, str] | None = None, opset: int = 17
) -> onnx.ModelProto:
    """Export in eval mode (BatchNorm folded into Conv, as deployed) with a dynamic batch dim."""
    model = model.cpu().eval()
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
