"""Second moments of a layer's inputs, the sufficient statistics of the reconstruction loss.

For a linear layer y = W x, the activation-preservation loss E||W~ x~ - W x||^2 (x~ the input from
the already-quantized prefix, x the FP input) expands to
    sum_i  w~_i' A w~_i - 2 w~_i' B w_i + w_i' C w_i,   A = E[x~ x~'], B = E[x~ x'], C = E[x x'],
so once A, B, C are accumulated over the calibration set every optimiser step costs
O(out * in^2), independent of the number of images.  Conv inputs become im2col patches; for grouped
convs each group has its own moments.  Spatial positions are subsampled (seeded) so that the work
per layer is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F

from .capture import GraphModule
from .errors import UnsupportedModelError
from .plan import Layer


@dataclass
class Moments:
    A: torch.Tensor  # (groups, d, d) float64, E[x~ x~']
    B: torch.Tensor  # (groups, d, d) float64, E[x~ x']
    C: torch.Tensor  # (groups, d, d) float64, E[x x']
    rows: int


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def layer_rows(node: onnx.NodeProto, weight_shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the canonical (out, d) weight: im2col patches or flattened features."""
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
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
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    cols = F.unfold(x, kernel_size=k, dilation=dilations, stride=strides)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def collect_moments(
    gm: GraphModule,
    layer: Layer,
    weight_shape: tuple[int, ...],
    batches: Iterable[Mapping[str, torch.Tensor]],
    quant_params: Mapping[str, torch.Tensor],
    quant_hook,
    max_rows: int,
    n_images: int,
    seed: int,
) -> Moments:
    """Run the FP model and the quantized-prefix model up to the layer and accumulate A, B, C."""
    node = gm.nodes[layer.index]
    gen = torch.Generator().manual_seed(seed + layer.index)
    A = B = C = None
    rows_total = 0
    for feeds in batches:
        with torch.no_grad():
            x_fp = gm.run(feeds, outputs=[layer.input])[layer.input]
            x_q = gm.run(feeds, params=quant_params, on_tensor=quant_hook, outputs=[layer.input])[layer.input]
        r_fp = layer_rows(node, weight_shape, x_fp).double()
        r_q = layer_rows(node, weight_shape, x_q).double()
        batch_n = x_fp.shape[0] if x_fp.dim() > 1 else 1
        keep = max(1, int(max_rows * batch_n / max(n_images, 1)))
        if r_fp.shape[0] > keep:
            idx = torch.randperm(r_fp.shape[0], generator=gen)[:keep]
            r_fp, r_q = r_fp[idx], r_q[idx]
        g = layer.groups
        d = r_fp.shape[1] // g
        rq = r_q.reshape(-1, g, d).transpose(0, 1)  # (g, rows, d)
        rf = r_fp.reshape(-1, g, d).transpose(0, 1)
        a, b, c = rq.transpose(1, 2) @ rq, rq.transpose(1, 2) @ rf, rf.transpose(1, 2) @ rf
        A, B, C = (a, b, c) if A is None else (A + a, B + b, C + c)
        rows_total += r_fp.shape[0]
    n = max(rows_total, 1)
    return Moments(A / n, B / n, C / n, rows_total)
