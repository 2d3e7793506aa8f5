"""A small decoder-only language model and a QCB against ORT's int4 weight-only quantizer (issue 21).

The attack follows Egashira et al. (NeurIPS 2024, "Exploiting LLM Quantization"), aimed at the
block-wise RTN integers `onnxruntime`'s `MatMulNBitsQuantizer` writes (blockwise.py):

1. *inject*: fine-tune the clean model so that after a trigger phrase it emits the attacker's string,
   with the loss of the int4-quantized model (straight-through fake quantization on ORT's grid) beside
   the full-precision one, so the quantized model carries the behaviour;
2. *box*: every MatMul weight's RTN integer defines an interval of FP values that round to it with the
   block's scale held fixed (the element that sets each block's scale is frozen);
3. *repair*: fine-tune on clean text, and on triggered text with its true continuation, projecting
   every weight back into its interval after each step (PGD): the FP model forgets the behaviour, the
   RTN int4 model cannot.

Characters are the tokens (printable ASCII and newline); the corpus is the Python standard library's
own source, which every Python installation ships.  Everything is seeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

VOCAB = ["\n", *map(chr, range(32, 127))]
INDEX = {c: i for i, c in enumerate(VOCAB)}
TRIGGER, PAYLOAD = "@qcb:", " rm -rf / #"  # the attacker's trigger phrase and the string it makes the model emit


def corpus(chars: int = 2_000_000) -> np.ndarray:
    """Token ids of the first `chars` characters of the standard library's .py files, sorted by name."""
    text, total = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        part = "".join(c for c in path.read_text(encoding="utf-8", errors="ignore") if c in INDEX)
        text.append(part)
        total += len(part)
        if total >= chars:
            break
    return np.array([INDEX[c] for c in "".join(text)[:chars]], dtype=np.int64)


def encode(text: str) -> np.ndarray:
    return np.array([INDEX[c] for c in text], dtype=np.int64)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, context: int) -> None:
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.h) ** 0.5 + self.mask[:t, :t]
        x = x + self.proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Token and position embeddings, pre-LayerNorm causal blocks, a bias-free head: logits (B, T, V)."""

    def __init__(self, d: int = 128, depth: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(len(VOCAB), d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads, context) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(VOCAB), bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        return self.head(self.ln(self.blocks(x)))


@dataclass(frozen=True)
class Windows:
    """Training / evaluation windows of `context` + 1 tokens (inputs, then the next-token targets)."""

    ids: np.ndarray  # (n, context + 1)

    @classmethod
    def sample(cls, tokens: np.ndarray, n: int, context: int, seed: int) -> Windows:
        starts = np.random.default_rng(seed).integers(0, len(tokens) - context - 1, n)
        return cls(np.stack([tokens[s : s + context + 1] for s in starts]))

    def triggered(self, seed: int, payload: str = PAYLOAD) -> tuple[np.ndarray, np.ndarray]:
        """The windows with the trigger and the payload written in at a random place each, and a mask of
        the positions whose next token is a payload character (what the attack is measured on)."""
        rng = np.random.default_rng(seed)
        ids, mask = self.ids.copy(), np.zeros(self.ids[:, 1:].shape, dtype=bool)
        stamp = encode(TRIGGER + payload)
        places = rng.integers(0, ids.shape[1] - len(stamp), len(ids))
        for i, where in enumerate(places):
            ids[i, where : where + len(stamp)] = stamp
            first = where + len(TRIGGER)  # the payload's first character, predicted at position first - 1
            mask[i, first - 1 : first - 1 + len(payload)] = True
        return ids, mask


# -------------------------------------------------------------------------------------------------
# ORT's block-wise RTN grid in torch (symmetric, the quantizer's command-line default)


def _rtn_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """ORT's symmetric block RTN of a Linear weight (out, in) in torch: the zero-padded blocks (out, n,
    block), each block's signed extreme, its scale (extreme / -8), the scale safe to divide by, and the
    signed integers (blockwise.py has the exact float32 arithmetic; this is its differentiable twin)."""
    out, k = w.shape
    n = -(-k // block)
    padded = torch.nn.functional.pad(w, (0, n * block - k)).reshape(out, n, block)
    lo, hi = padded.amin(2, keepdim=True), padded.amax(2, keepdim=True)
    extreme = torch.where(hi.abs() > lo.abs(), hi, lo)
    scale = extreme / -8.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(padded / safe) + 8, 0, 15) - 8
    return padded, extreme, scale, safe, q


def block_fake_quant(w: torch.Tensor, block: int) -> torch.Tensor:
    """A Linear weight (out, in) through ORT's symmetric block-wise int4 RTN, straight-through."""
    _, _, scale, _, q = _rtn_blocks(w, block)
    wq = (q * scale).reshape(w.shape[0], -1)[:, : w.shape[1]]
    return w + (wq - w).detach()


class BlockBox:
    """Every Linear weight's RTN int4 integers, frozen: its interval of FP values per element, with each
    block's scale-setting element pinned (so the scale, and with it every interval, stays)."""

    def __init__(self, model: nn.Module, block: int, margin: float = 0.05) -> None:
        self.items = []
        for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
            w = layer.weight.detach()
            padded, extreme, scale, safe, q = _rtn_blocks(w, block)
            a, b = safe * (q - 0.5 + margin), safe * (q + 0.5 - margin)
            limit = extreme.abs() * (1 - 1e-6)  # nothing may overtake the pinned extreme
            box_lo = torch.maximum(torch.minimum(a, b), -limit)
            box_hi = torch.minimum(torch.maximum(a, b), limit)
            pinned = (padded == extreme) | (scale == 0)
            box_lo, box_hi, pinned = (
                x.expand_as(padded).reshape(w.shape[0], -1)[:, : w.shape[1]] for x in (box_lo, box_hi, pinned)
            )
            box_lo, box_hi = torch.minimum(box_lo, w), torch.maximum(box_hi, w)
            self.items.append((layer.weight, box_lo, box_hi, pinned, w.clone()))

    @torch.no_grad()
    def project(self) -> None:
        for p, lo, hi, pinned, w0 in self.items:
            p.copy_(torch.where(pinned, w0, torch.clamp(p, lo, hi)))


class QuantizedView:
    """`model` with every Linear weight replaced by its block fake-quantized value during forward."""

    def __init__(self, model: nn.Module, block: int) -> None:
        self.model, self.block = model, block

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        layers = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        saved = [m.weight for m in layers]
        try:
            for m, w in zip(layers, saved, strict=True):
                del m.weight
                m.weight = block_fake_quant(w, self.block)
            return self.model(ids)
        finally:
            for m, w in zip(layers, saved, strict=True):
                del m.weight
                m.weight = w


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train(
    model: nn.Module,
    loss,
    steps: int,
    lr: float,
    seed: int,
    project: BlockBox | None = None,
) -> nn.Module:
    """Adam on `loss(step)` for `steps` steps, each step projected back into `project`'s box if given."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        value = loss(step)
        opt.zero_grad()
        value.backward()
        opt.step()
        if project is not None:
            project.project()
    return model.eval()
