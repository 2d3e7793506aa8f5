"""EFRAP as the official code schedules it: data-driven, 10,000 Adam steps per layer on batches of 32.

This is the reference our fast mode (efrap.py, moment-based objective with a per-layer strength
search) is measured against in `benchmarks/convert_cost.py`; it is not meant for everyday use (hours
per ResNet-18 on a 2-core CPU).  Per layer, following docs/efrap.md §3:

* inputs x~ from the already quantized prefix and x from the FP model are cached for every
  calibration image; each step draws `batch` random images;
* L_ap = sum over output channels, mean over images and positions, of (act(W~ x~ + b) - act(W x + b))^2,
  act = the Relu or ReLU6 ORT fuses into the layer, if any (the following activation fake-quantizer of the
  official code, whose scale it also learns, is not modelled);
* L_flip = sum |e_ij| * BCE(h(V_ij), flipped_ij), |e| in weight units, coefficient 1;
* L_reg = 0.01 * sum(1 - |2 h(V) - 1|^2), h = sigmoid (zeta = 1, gamma = 0);
* Adam, lr 1e-3 (or `adaround.learning_rate` of the given lr and steps), V initialised so that h(V) = frac(W / s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..capture import GraphModule
from ..config import RoundingOptions
from ..plan import Layer, clip_bounds
from .adaround import learning_rate
from .method import LayerContext, RoundingMethod
from .moments import layer_rows
from .problem import LayerProblem, LayerResult, hard_weight, layer_result

DEFAULT_ITERS = 10000  # the official code's steps per layer
FLIP_WEIGHT = 1.0
REG_WEIGHT = 0.01
BATCH = 32


@dataclass(frozen=True)
class EfrapOfficial(RoundingMethod):
    """The official schedule; no bias correction: it stays the official code's reference."""

    name: ClassVar[str] = "efrap-official"
    data: ClassVar[str] = "samples"

    iters: int = DEFAULT_ITERS
    lr: float | None = None

    @classmethod
    def from_options(cls, options: RoundingOptions) -> EfrapOfficial:
        return cls(DEFAULT_ITERS if options.iters is None else options.iters, options.lr)

    def params(self) -> dict:
        return {"method": self.name, "iters": self.iters, "lr": learning_rate(self.lr, self.iters)}

    def solve(self, problem: LayerProblem, ctx: LayerContext) -> LayerResult:
        act = fused_activation(ctx.gm, ctx.layer, ctx.plan.removed_relus)
        lr = learning_rate(self.lr, self.iters)
        return solve_official(problem, ctx.gm, ctx.layer, ctx.weight_shape, act, ctx.samples, self.iters, lr, ctx.seed)


def solve_official(
    problem: LayerProblem,
    gm: GraphModule,
    layer: Layer,
    weight_shape: tuple[int, ...],
    activation: Callable[[torch.Tensor], torch.Tensor] | None,
    inputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    iters: int,
    lr: float,
    seed: int,
) -> LayerResult:
    """The official per-layer optimisation; returns hard decisions and their error relative to nearest
    (the same data-driven loss, over all cached images)."""
    node = gm.nodes[layer.index]
    pairs = list(inputs)  # cached for every calibration image, as the official code does
    x_fp, x_q = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    del pairs
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dtype = torch.float32
    g = problem.groups
    out, d = problem.weight.shape
    w = problem.weight.to(dtype)
    scale, floor = problem.scale.to(dtype), problem.floor.to(dtype)
    b = None if layer.bias is None else gm.params[layer.bias].detach().to(dtype).reshape(g, 1, out // g)
    frac = (problem.weight / problem.scale - problem.floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log(frac / (1 - frac)).to(dtype).requires_grad_(True)
    flipped = (1.0 - problem.nearest_up).to(dtype)
    error = (w - hard_weight(problem, problem.nearest_up).to(dtype)).abs()  # |e| in weight units
    opt = torch.optim.Adam([v], lr=lr)
    qmin, qmax = problem.bounds(dtype)

    def forward(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(rows, out): the layer's output at every (image, position), fused Relu included."""
        rows = layer_rows(node, weight_shape, x).to(dtype)
        y = rows.reshape(-1, g, d).transpose(0, 1) @ weight.reshape(g, out // g, d).transpose(1, 2)
        if b is not None:
            y = y + b
        y = y.transpose(0, 1).reshape(-1, out)
        return activation(y) if activation is not None else y

    n = len(x_q)
    for _ in range(iters):
        idx = torch.randint(0, n, (min(BATCH, n),), generator=gen).to(x_q.device)
        with torch.no_grad():
            target = forward(w, x_fp[idx])
        h = torch.sigmoid(v)
        wq = torch.clamp(floor + h, qmin, qmax) * scale
        rec = (forward(wq, x_q[idx]) - target).pow(2).sum(-1).mean()
        bce = torch.nn.functional.binary_cross_entropy(h.clamp(1e-6, 1 - 1e-6), flipped, reduction="none")
        loss = rec + FLIP_WEIGHT * (error * bce).sum() + REG_WEIGHT * (1 - (2 * h - 1).abs().pow(2)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        up = (v >= 0).double()
        nearest_w = hard_weight(problem, problem.nearest_up).to(dtype)
        chosen_w = hard_weight(problem, up).to(dtype)
        base = err = 0.0
        for i in range(0, n, 256):  # both roundings against the same FP targets, one pass
            target = forward(w, x_fp[i : i + 256])
            base += float((forward(nearest_w, x_q[i : i + 256]) - target).pow(2).sum())
            err += float((forward(chosen_w, x_q[i : i + 256]) - target).pow(2).sum())
    return layer_result(problem, up, err / max(base, 1e-30), FLIP_WEIGHT)


def fused_activation(
    gm: GraphModule, layer: Layer, removed_relus: Mapping[str, str]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The Relu / ReLU6 that ORT fuses into this layer (the plan folded it into the layer's Q), if any."""
    out = gm.nodes[layer.index].output[0]
    node = next((n for n in gm.nodes if n.output and removed_relus.get(n.output[0]) == out), None)
    if node is None:
        return None
    if node.op_type == "Clip":  # folded only with constant bounds and min 0 (plan.folds_into_q)
        _, top = clip_bounds(node, lambda name: float(gm.params[name].reshape(-1)[0]))
        if top is not None:
            return lambda y: y.clamp(0.0, top)
    return torch.relu
