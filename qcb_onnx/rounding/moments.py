"""Sufficient statistics of the reconstruction loss, accumulated once per layer.

For a linear layer y = W x, the activation-preservation loss (x~ the input from the already
quantized prefix, x the FP input, D = W~ - W the rounding perturbation) is

    E||W~ x~ - W x||^2 = E||D x~ + W (x~ - x)||^2 = sum_i D_i A D_i' + 2 <D, Q> + c
    A = E[x~ x~'],   Q_i = E[x~ r_i],   c = E||r||^2,   r = W (x~ - x),

so once A, Q and c are accumulated over the calibration set, a rounding pass (sequential.py) or an
AdaRound step costs O(out * in^2), independent of the number of images.  The means E[x~] and E[r]
come along for free: the mean of the chosen rounding's output error, D E[x~] + E[r], is what the
layer's bias absorbs afterwards (`output_shift`).
Conv inputs become im2col patches; grouped convs have one A per group.  Patch positions are
subsampled (seeded) so the work per layer is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F

from ..capture import GraphModule
from ..errors import UnsupportedModelError
from ..plan import Layer


@dataclass
class Moments:
    A: torch.Tensor  # (groups, d, d) float64, E[x~ x~']
    Q: torch.Tensor  # (groups, out/groups, d) float64, E[x~ r'] with r = W (x~ - x)
    const: float  # E||W (x~ - x)||^2
    rows: int
    mean_x: torch.Tensor  # (groups, d) float64, E[x~]
    mean_r: torch.Tensor  # (groups, out/groups) float64, E[r]

    def output_shift(self, delta: torch.Tensor) -> torch.Tensor:
        """E[W~ x~ - W x] per output channel (out,) for the canonical perturbation D = W~ - W (out, d).

        Bias correction (Nagel et al. 2019, data-free quantization) subtracts it from the bias, so the
        quantized layer keeps the FP layer's mean output on the calibration images.  It is chosen after
        the rounding, so it moves no decision of this layer; it removes the part of the error a constant
        carries before the next layer sees it (what that is worth: BENCHMARKS.md §2)."""
        g = self.mean_x.shape[0]
        d = delta.reshape(g, -1, delta.shape[-1]).to(self.mean_x.dtype)
        return ((d @ self.mean_x.unsqueeze(-1)).squeeze(-1) + self.mean_r).reshape(-1)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _padded(node: onnx.NodeProto, weight_shape: tuple[int, ...], x: torch.Tensor):
    """A Conv's input zero-padded as the node pads it, as 2-D (N, C, H, W), with its kernel geometry."""
    k = list(weight_shape[2:])
    if len(k) == 1:  # Conv1d as a 2-D conv over a height of 1
        x = x.unsqueeze(2)
    elif len(k) != 2:
        raise UnsupportedModelError(f"Conv node '{node.name}' is {len(k)}-D; only 1-D and 2-D Conv are supported")
    nd = len(k)
    strides = list(_attr(node, "strides", [1] * nd))
    dilations = list(_attr(node, "dilations", [1] * nd))
    pads = list(_attr(node, "pads", [0] * 2 * nd))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    spatial = list(x.shape[-nd:])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * nd
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (k[i] - 1) * dilations[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * 2 * nd
    if nd == 1:
        k, strides, dilations = [1] + k, [1] + strides, [1] + dilations
        pads = [0, pads[0], 0, pads[1]]
    # F.pad takes the last dim first: (left, right, top, bottom)
    return F.pad(x, (pads[1], pads[3], pads[0], pads[2])), k, strides, dilations


def layer_rows(node: onnx.NodeProto, weight_shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the canonical (out, d) weight: im2col patches or flattened features."""
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
    x, k, strides, dilations = _padded(node, weight_shape, x)
    cols = F.unfold(x, kernel_size=k, dilation=dilations, stride=strides)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def sampled_rows(
    node: onnx.NodeProto, weight_shape: tuple[int, ...], xs: list[torch.Tensor], keep: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """At most `keep` rows of `layer_rows`, the same (seeded) rows of every tensor in `xs`.

    Conv patches are gathered only at the sampled positions: the full im2col of an early layer is
    ~100x the rows kept, and building it dominated the moments' cost."""
    if node.op_type != "Conv":
        rows = [x.reshape(-1, x.shape[-1]) for x in xs]
        if rows[0].shape[0] <= keep:
            return rows
        idx = torch.randperm(rows[0].shape[0], generator=gen)[:keep].to(rows[0].device)
        return [r[idx] for r in rows]
    padded = [_padded(node, weight_shape, x) for x in xs]
    _, k, strides, dilations = padded[0]
    n, c, h, w = padded[0][0].shape
    oh = (h - dilations[0] * (k[0] - 1) - 1) // strides[0] + 1
    ow = (w - dilations[1] * (k[1] - 1) - 1) // strides[1] + 1
    total = n * oh * ow
    flat = torch.randperm(total, generator=gen)[:keep] if total > keep else torch.arange(total)
    flat = flat.to(xs[0].device)
    img, pos = flat // (oh * ow), flat % (oh * ow)
    ky = torch.arange(k[0], device=flat.device) * dilations[0]
    kx = torch.arange(k[1], device=flat.device) * dilations[1]
    top = (pos // ow * strides[0])[:, None, None] + ky[None, :, None]  # (rows, kh, 1)
    left = (pos % ow * strides[1])[:, None, None] + kx[None, None, :]  # (rows, 1, kw)
    out = []
    for x, *_ in padded:
        patch = x[img[:, None, None], :, top, left]  # (rows, kh, kw, C): advanced indices first
        out.append(patch.permute(0, 3, 1, 2).reshape(len(flat), -1))  # unfold's (C, kh, kw) order
    return out


def collect_moments(
    gm: GraphModule,
    layer: Layer,
    weight_shape: tuple[int, ...],
    weight: torch.Tensor,
    inputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_rows: int,
    n_images: int,
    seed: int,
) -> Moments:
    """Accumulate A, Q, c over the layer's (FP input, quantized-prefix input) batch pairs.

    `weight` is the canonical (out, d) FP weight (rows grouped by conv group)."""
    node = gm.nodes[layer.index]
    gen = torch.Generator().manual_seed(seed + layer.index)
    g = layer.groups
    w = weight.float().reshape(g, weight.shape[0] // g, -1)  # (g, o, d)
    A = Q = sum_x = sum_r = None
    const = 0.0
    rows_total = 0
    for x_fp, x_q in inputs:
        batch_n = x_fp.shape[0] if x_fp.dim() > 1 else 1
        keep = max(1, int(max_rows * batch_n / max(n_images, 1)))
        xq, diff = sampled_rows(node, weight_shape, [x_q.float(), (x_q - x_fp).float()], keep, gen)
        d = xq.shape[1] // g
        xq = xq.reshape(-1, g, d).transpose(0, 1)  # (g, rows, d)
        r = diff.reshape(-1, g, d).transpose(0, 1) @ w.transpose(1, 2)  # (g, rows, o): W (x~ - x)
        # float32 products over one batch, float64 sums over batches
        a, q = (xq.transpose(1, 2) @ xq).double(), (r.transpose(1, 2) @ xq).double()
        A, Q = (a, q) if A is None else (A + a, Q + q)
        sx, sr = xq.double().sum(1), r.double().sum(1)
        sum_x, sum_r = (sx, sr) if sum_x is None else (sum_x + sx, sum_r + sr)
        const += float(r.double().pow(2).sum())
        rows_total += xq.shape[1]
    n = max(rows_total, 1)
    return Moments(A / n, Q / n, const / n, rows_total, sum_x / n, sum_r / n)
