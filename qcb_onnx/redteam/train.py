"""The training loop every model here goes through (clean pre-training and each attack), evaluation
and ONNX export."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from ..progress import progress_bar


@dataclass(frozen=True)
class Training:
    """How a model is trained: Adam at `lr` on seeded, shuffled batches of `batch_size`."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    augment_data: bool = False  # CIFAR's flips and crops (a trigger is stamped after them, at its place)
    seed: int = 0
    device: str | torch.device | None = "cpu"
    verbose: bool = False


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


def progress(iterable: Iterable, desc: str, enabled: bool):
    """The package's progress bar, left behind by nothing: epochs and batches come and go."""
    return progress_bar(iterable, desc=desc, enabled=enabled, leave=False)


def fit(
    model: nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: np.ndarray,
    y: np.ndarray,
    training: Training,
    rng: np.random.Generator,
    device: torch.device,
    desc: str,
    *,
    epochs: int | None = None,
    params: Iterable[torch.Tensor] | None = None,
    cosine: bool = False,
    after_step: Callable[[], None] | None = None,
) -> None:
    """`epochs` (default: the training's) of Adam on `loss(inputs, labels)` over shuffled batches of
    (x, y); `cosine` anneals the learning rate per epoch; `after_step` runs after every step (a
    projection).  `rng` and `device` come from the caller, so two stages can share one stream."""
    epochs = training.epochs if epochs is None else epochs
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=training.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs)) if cosine else None
    for ep in progress(range(epochs), desc, training.verbose):
        epoch = batches(x, y, training.batch_size, rng, device, training.augment_data)
        for xb, yb in progress(epoch, f"epoch {ep + 1}", training.verbose):
            value = loss(xb, yb)
            opt.zero_grad()
            value.backward()
            opt.step()
            if after_step is not None:
                after_step()
        if sched is not None:
            sched.step()


def train_clean(model: nn.Module, x: np.ndarray, y: np.ndarray, training: Training) -> nn.Module:
    """Adam + cosine schedule from scratch (train mode: BatchNorm learns its statistics)."""
    torch.manual_seed(training.seed)
    rng = np.random.default_rng(training.seed)
    dev = resolve_device(training.device)
    model.to(dev).train()
    fit(model, lambda xb, yb: nn.functional.cross_entropy(model(xb), yb), x, y, training, rng, dev, "clean training",
        cosine=True)  # fmt: skip
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
