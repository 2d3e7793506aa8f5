"""PyTorch simulation of a quantized model: the exact arithmetic ORT's QDQ kernels perform.

The same `QuantState` drives three things: the rounding optimiser's view of the already-quantized
prefix, the agreement check against ONNX Runtime, and the emitter (which writes its integers).
Keeping one source of truth is what lets us promise that ORT runs the model EFRAP optimised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .scheme import Grid, broadcast_scale

if TYPE_CHECKING:
    from .capture import GraphModule

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class ActQuant:
    """Asymmetric quantization of one activation tensor.  `ort_scale` is the scale ORT's MinMax would
    give it, i.e. before `--act-headroom` stretched the range: weight scales that depend on their
    input's scale (scheme.fit_bias_scale) use it, so the headroom changes activation grids only."""

    scale: np.float32
    zero_point: int
    grid: Grid
    ort_scale: np.float32


@dataclass
class WeightQuant:
    """Integer weight of one layer, in the weight tensor's own layout: the integers the file stores.

    Per channel / per tensor: `scale` (C,) or (1,), zero point 0.  Block-wise (`block_size` set):
    `axis` is the blocked (input) axis and `scale` / `zero_point` have the weight's shape with that
    axis cut to the number of blocks: DequantizeLinear's block layout (opset 21)."""

    ints: np.ndarray  # values on the grid, in the smallest integer type that holds them (`compact`)
    scale: np.ndarray  # float32, (C,) per channel or (1,) per tensor; block-wise: see above
    axis: int | None  # None: per tensor
    grid: Grid
    block_size: int | None = None
    zero_point: np.ndarray | None = None  # block-wise asymmetric only (int32, scale's shape)

    def __post_init__(self) -> None:
        self.ints = compact(self.ints)

    def expand(self, values: np.ndarray) -> np.ndarray:
        """A block-wise parameter over every weight element."""
        n = self.ints.shape[self.axis]
        return np.take(np.repeat(values, self.block_size, axis=self.axis), np.arange(n), axis=self.axis)

    def dequantized(self) -> np.ndarray:
        if self.block_size is None:
            scale = broadcast_scale(self.scale, self.ints.ndim, self.axis)
            return (self.ints.astype(np.float32) * scale).astype(np.float32)
        ints = self.ints if self.zero_point is None else self.ints - self.expand(self.zero_point)
        return (ints.astype(np.float32) * self.expand(self.scale.astype(np.float32))).astype(np.float32)


def compact(ints: np.ndarray) -> np.ndarray:
    """Weight integers in the smallest NumPy type that holds them (a quarter of int32's memory for
    8- and 4-bit grids: the state holds every layer's integers at once)."""
    ints = np.asarray(ints)
    if ints.dtype.kind not in "iu" or ints.size == 0:
        return ints
    lo, hi = int(ints.min()), int(ints.max())
    for dtype in (np.int8, np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return ints.astype(dtype, copy=False)
    return ints


@dataclass
class BiasQuant:
    ints: np.ndarray  # int32
    scale: np.ndarray  # float32 per output channel

    def dequantized(self) -> np.ndarray:
        return (self.ints.astype(np.float32) * self.scale).astype(np.float32)


@dataclass
class QuantState:
    acts: dict[str, ActQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # by initializer name
    biases: dict[str, BiasQuant] = field(default_factory=dict)
    float_biases: dict[str, np.ndarray] = field(default_factory=dict)  # corrected, where the input stays FP32

    def params(self, device: torch.device | str = "cpu") -> Mapping[str, torch.Tensor]:
        """Initializer overrides: dequantized integer weights and biases, corrected FP32 biases.

        Computed when a node reads them, not all at once: the float copy of a whole model's weights
        would be as large as the model, and a model larger than memory streams (large.py)."""
        return _Dequantized(self, torch.device(device))

    def hook(self) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """on_tensor hook applying QuantizeLinear+DequantizeLinear to every planned activation."""
        acts = self.acts

        def on_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
            q = acts.get(name)
            return value if q is None else fake_quant(value, q)

        return on_tensor

    def outputs(self, gm: GraphModule, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """The quantized model's first output, batch by batch, in our simulation: what the ORT
        check, the error-budget search and `Conversion.simulate` all compare against."""
        params, hook = self.params(gm.device), self.hook()
        with torch.no_grad():
            for feeds in batches:
                yield gm.run(feeds, params=params, on_tensor=hook)[gm.output_names[0]]


class _Dequantized(Mapping[str, torch.Tensor]):
    def __init__(self, state: QuantState, device: torch.device) -> None:
        self.state, self.device = state, device

    def __getitem__(self, name: str) -> torch.Tensor:
        s = self.state
        if name in s.float_biases:
            array = s.float_biases[name]
        elif name in s.biases:
            array = s.biases[name].dequantized()
        elif name in s.weights:
            array = s.weights[name].dequantized()
        else:
            raise KeyError(name)
        return torch.from_numpy(array).to(self.device)

    def __iter__(self) -> Iterator[str]:
        s = self.state
        return iter(dict.fromkeys([*s.weights, *s.biases, *s.float_biases]))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        s = self.state
        return name in s.float_biases or name in s.biases or name in s.weights


def fake_quant(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """QuantizeLinear (x/scale, round half to even, + zp, saturate) then DequantizeLinear, in float32."""
    scale = torch.tensor(float(q.scale), dtype=x.dtype, device=x.device)
    if x.requires_grad and torch.is_grad_enabled():
        y = torch.clamp(torch.round(x / scale) + q.zero_point, q.grid.qmin, q.grid.qmax)
        return (y - q.zero_point) * scale
    y = x / scale  # the one new tensor, every later step in place: same arithmetic, less memory traffic
    y.round_().add_(q.zero_point).clamp_(q.grid.qmin, q.grid.qmax)
    return y.sub_(q.zero_point).mul_(scale)


def quantize_bias(bias: np.ndarray, input_scale: np.float32, weight: WeightQuant) -> BiasQuant:
    """ORT's int32 bias: scale = input_scale * weight_scale per output channel, round half to even."""
    n_out = bias.shape[0]
    w_scale = weight.scale if weight.scale.size == n_out else np.repeat(weight.scale, n_out)
    b_scale = (np.float32(input_scale) * w_scale.astype(np.float32)).astype(np.float32)
    ints = np.clip(np.round(bias.astype(np.float32) / b_scale), INT32_MIN, INT32_MAX).astype(np.int64)
    return BiasQuant(ints.astype(np.int32), b_scale)
