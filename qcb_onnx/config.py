"""One typed, frozen description of a conversion: what the CLI parses, what a Python user builds, what
the checkpoint fingerprint hashes and what the output's metadata records.

A conversion is described by four sections, each validated once when it is built, so a mistake is
reported before any model is read:

* `WeightScheme`: how weights become integers (ORT's symmetric grid; bits, per channel or tensor);
* `ActivationCalibration`: which activations get a Q/DQ pair and how their ranges are observed;
* `RoundingOptions`: which rounding method chooses the integers, and its knobs (`rounding/`);
* `RunOptions`: where and how the work runs (seed, devices, progress); none of these may change a
  rounding decision except the seed.

Every field has one flat name, the CLI option's in snake case (``--w-bits`` -> ``w_bits``), and
no two sections share a name, so ``QuantConfig.from_options(w_bits=4, method="nearest")`` is the
keyword form of the Python API and the CLI builds the same object from its parsed arguments.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .data import Preprocess
from .errors import UsageError

CALIB_METHODS = ("minmax", "percentile", "mse")
GUIDES = ("auto", "element", "neuron", "block")
DEVICES = ("auto", "cpu", "cuda")
WEIGHT_FORMATS = ("qdq", "matmulnbits")


def default_headroom(a_bits: int | None) -> float:
    """2 at 8-bit activations, 1 below.  Calibrated ranges clip what a trigger drives past them, and a
    QCB can ride that clipping where weight rounding cannot reach it (BENCHMARKS.md §2: EFRAP left 12 %
    ASR on two ResNet-18 models through one clipped tensor).  One of 8 activation bits buys a 2x margin
    at no measurable CDA cost on 27 QCB models; at 4 bits the same margin costs 12-40 CDA points."""
    return 2.0 if a_bits is not None and a_bits >= 8 else 1.0


def _integer(name: str, value: Any, low: int, high: float = math.inf, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bound = f"between {low} and {high}" if high < math.inf else f">= {low}"
        raise UsageError(f"--{name.replace('_', '-')} must be an integer {bound}{what}, got {value!r}")


def _number(name: str, value: Any, low: float, *, open_low: bool = False, what: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
    value = float(value)
    if not (value > low if open_low else value >= low) or not math.isfinite(value):
        raise UsageError(
            f"--{name.replace('_', '-')} must be a finite number {'>' if open_low else '>='} {low:g}{what}, got {value}"
        )
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...], what: str = "") -> None:
    if value not in choices:
        raise UsageError(f"unknown {what or name.replace('_', ' ')} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class WeightScheme:
    """What becomes integers, on ORT's symmetric weight grid: [-127, 127] at 8 bits, [-8, 7] at 4
    (2..4 bits stored as INT4)."""

    w_bits: int = 8
    per_channel: bool = True
    int8_storage: bool = False  # 2..4-bit integers in INT8 tensors: ORT's CPU EP fuses those, not INT4
    exclude: tuple[str, ...] = ()  # node names or op types left in float (weights and activations)
    int32_bias: bool = True  # ORT's int32 bias behind a quantized input; False keeps it FP32 (TensorRT)
    # block-wise 4-bit MatMul/Gemm weights (ORT's MatMulNBits quantizer, blockwise.py); None: per channel
    block_size: int | None = None
    w_asymmetric: bool = False  # block-wise only: per-block zero points (ORT's is_symmetric=False)
    weight_format: str = "qdq"  # block-wise only: "qdq" (DequantizeLinear block_size) or "matmulnbits"

    def __post_init__(self) -> None:
        _integer("w_bits", self.w_bits, 2, 8)
        _choice("weight_format", self.weight_format, WEIGHT_FORMATS, "weight format")
        if self.block_size is not None:
            from .blockwise import check_block_size

            check_block_size(self.block_size)
            if self.w_bits != 4 or self.int8_storage:
                raise UsageError("--block-size is ORT's block-wise int4: it needs --w-bits 4 and no --int8-storage")
        elif self.w_asymmetric or self.weight_format != "qdq":
            raise UsageError("--w-asymmetric and --weight-format matmulnbits need --block-size")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", tuple(e.strip() for e in self.exclude.split(",") if e.strip()))
        if not all(isinstance(e, str) and e for e in self.exclude):
            raise UsageError(f"--exclude takes node names or op types, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def storage(self) -> str:
        return "int8" if (self.int8_storage or self.w_bits > 4) else "int4"


@dataclass(frozen=True)
class ActivationCalibration:
    """Activation Q/DQ as ORT's QDQ quantize_static places it; a_bits None = weight-only."""

    a_bits: int | None = 8
    a_symmetric: bool = False  # signed int8 activations, zero point 0 (TensorRT, ORT's GPU path)
    calib_method: str = "minmax"
    act_headroom: float | None = None  # None: default_headroom(a_bits), filled in on construction
    calib_size: int | None = 1024  # samples drawn (seeded) from the calibration data; None: all
    batch_size: int = 64
    preprocess: Preprocess | None = None  # image files -> model input; a CLI string is parsed

    def __post_init__(self) -> None:
        if self.a_bits is not None and (isinstance(self.a_bits, bool) or self.a_bits not in (4, 8)):
            raise UsageError(f"--a-bits must be 8, 4 or none, got {self.a_bits}")
        if self.a_symmetric and self.a_bits != 8:
            raise UsageError(f"--a-symmetric needs 8-bit activations, got --a-bits {self.a_bits or 'none'}")
        _choice("calib_method", self.calib_method, CALIB_METHODS, "calibration method")
        headroom = default_headroom(self.a_bits) if self.act_headroom is None else self.act_headroom
        object.__setattr__(self, "act_headroom", _number("act_headroom", headroom, 1.0, what=" (1: ORT's ranges)"))
        if self.calib_size is not None:
            _integer("calib_size", self.calib_size, 1)
        _integer("batch_size", self.batch_size, 1)
        if isinstance(self.preprocess, str):
            object.__setattr__(self, "preprocess", Preprocess.parse(self.preprocess))
        elif self.preprocess is not None and not isinstance(self.preprocess, Preprocess):
            raise UsageError(f"preprocess must be a Preprocess or its text form, got {type(self.preprocess).__name__}")


@dataclass(frozen=True)
class RoundingOptions:
    """Which method picks each weight's integer (floor or floor + 1 of w/s), and its knobs.

    None means "the method's own default" (rounding/: each method class owns its defaults)."""

    method: str = "efrap"
    strength: float | None = None  # EFRAP flip coefficient; None: per-layer search within the budget
    error_budget: float | None = None  # EFRAP's per-layer share of the error gap; None: auto (budget.py)
    guide: str = "auto"  # EFRAP flip guidance (rounding/efrap.py: flip_guide); auto: block-wise layers per block
    max_rows: int = 1 << 16  # input rows sampled per layer for the second moments
    iters: int | None = None  # Adam steps per layer (adaround, efrap-official)
    lr: float | None = None  # Adam learning rate; None: 1e-3 * 10000 / iters
    reg_weight: float = 3.0  # AdaRound's regulariser weight, in units of nearest rounding's error
    beta: float | None = None  # AdaRound's fixed regulariser exponent; None: annealed 20 -> 2

    def __post_init__(self) -> None:
        from .rounding import METHODS  # the registry is the one list of method names

        _choice("method", self.method, tuple(METHODS))
        _choice("guide", self.guide, GUIDES, "flip guide")
        if self.strength is not None:
            object.__setattr__(self, "strength", _number("strength", self.strength, 0.0))
        if self.error_budget is not None:
            budget = _number("error_budget", self.error_budget, 0.0, what=" (or auto)")
            object.__setattr__(self, "error_budget", budget)
        _integer("max_rows", self.max_rows, 1)
        if self.iters is not None:
            _integer("iters", self.iters, 1)
        if self.lr is not None:
            object.__setattr__(self, "lr", _number("lr", self.lr, 0.0, open_low=True))
        object.__setattr__(self, "reg_weight", _number("reg_weight", self.reg_weight, 0.0))
        if self.beta is not None:
            object.__setattr__(self, "beta", _number("beta", self.beta, 0.0, open_low=True))


@dataclass(frozen=True)
class RunOptions:
    """Where the work runs.  Only `seed` can change a decision; the fingerprint leaves the rest out."""

    seed: int = 0
    device: str = "auto"  # torch device for the optimisation
    providers: str | tuple[str, ...] = "auto"  # ONNX Runtime providers for the post-write verification
    progress: bool = False
    check: bool = True  # verify the written model (checker, integers, ORT vs simulation)
    allow_requantize: bool = False  # dequantize an already quantized QDQ model and convert it (passes/dequantize.py)

    def __post_init__(self) -> None:
        _integer("seed", self.seed, 0)
        _choice("device", self.device, DEVICES)
        if isinstance(self.providers, list):
            object.__setattr__(self, "providers", tuple(self.providers))


# Runtime presets (`--target`): the scheme each runtime runs best, as option values a flag still
# overrides.  README "Runtime targets" says why each convention holds.
TARGETS: dict[str, dict[str, Any]] = {
    # quantize_static's defaults: uint8 asymmetric activations, int8 per-channel symmetric weights,
    # int32 bias; the CPU EP fuses these Q/DQ groups into QLinearConv / QGemm / QLinearMatMul
    "ort-cpu": {},
    # int8 activations with zero point 0 (S8S8), ORT's recommended GPU format: the CUDA EP has no int8
    # convolution (it runs DQ -> float op -> Q) but takes S8S8 through its TensorRT path
    "ort-cuda": {"a_symmetric": True},
    # TensorRT explicit quantization: symmetric int8 activations (zero point 0), int8 [-127, 127]
    # per-channel weights on the output axis, FP32 bias (TensorRT fuses the bias itself; its
    # DequantizeLinear takes int8, not int32)
    "tensorrt": {"a_symmetric": True, "int32_bias": False},
    # 4-bit weights, activations in float: MatMul/Gemm weights block-wise as ORT's MatMulNBits quantizer
    # (its command line's defaults: blocks of 32, symmetric), Conv per channel; ONNX INT4 DequantizeLinear
    # (opset 21), or MatMulNBits with --weight-format matmulnbits
    "int4-weight-only": {"w_bits": 4, "a_bits": None, "block_size": 32},
}


# TOML has no null: the words a config file (and the CLI) uses where a field is None on purpose
NONE_WORDS = {"a_bits": "none", "error_budget": "auto", "calib_size": "all", "block_size": "none"}

SECTIONS = {
    "weights": WeightScheme,
    "activations": ActivationCalibration,
    "rounding": RoundingOptions,
    "run": RunOptions,
}
_SECTION_OF = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class QuantConfig:
    """Everything a conversion depends on.  Build it from sections, or flat with `from_options`."""

    weights: WeightScheme = field(default_factory=WeightScheme)
    activations: ActivationCalibration = field(default_factory=ActivationCalibration)
    rounding: RoundingOptions = field(default_factory=RoundingOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        for section, cls in SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise UsageError(f"QuantConfig.{section} must be a {cls.__name__}")
        if self.weights.block_size is not None and self.activations.a_bits is not None:
            raise UsageError(
                "--block-size quantizes weights only (MatMulNBits has float activations): it needs --a-bits none"
            )

    @classmethod
    def for_target(cls, target: str, base: QuantConfig | None = None) -> QuantConfig:
        """`base` with the preset of runtime `target` (TARGETS) applied; later options still override."""
        _choice("target", target, tuple(TARGETS), "target")
        return cls.from_options(base, **TARGETS[target])

    @staticmethod
    def option_names() -> tuple[str, ...]:
        """Every flat option name, in section order: the CLI's options in snake case."""
        return tuple(_SECTION_OF)

    @classmethod
    def from_options(cls, base: QuantConfig | None = None, **options: Any) -> QuantConfig:
        """`base` (default: all defaults) with flat options replaced, e.g. ``from_options(w_bits=4)``.

        A headroom left unset follows a_bits again, so ``from_options(base, a_bits=4)`` does not keep
        the 8-bit default of `base`."""
        unknown = sorted(set(options) - set(_SECTION_OF))
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; options are {', '.join(_SECTION_OF)}")
        base = base or cls()
        changes: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            changes.setdefault(_SECTION_OF[name], {})[name] = value
        acts = changes.get("activations", {})
        if "a_bits" in acts and "act_headroom" not in acts:
            acts["act_headroom"] = None
        return replace(base, **{s: replace(getattr(base, s), **c) for s, c in changes.items()})

    def options(self) -> dict[str, Any]:
        """The flat view: option name -> value."""
        return {name: getattr(getattr(self, section), name) for name, section in _SECTION_OF.items()}

    def to_dict(self) -> dict[str, Any]:
        """Sections as plain JSON-ready values (the metadata's `config` entry; `from_dict` reads it back)."""
        out = asdict(self)
        pre = self.activations.preprocess
        out["activations"]["preprocess"] = None if pre is None else pre.to_metadata()
        out["run"]["providers"] = (
            self.run.providers if isinstance(self.run.providers, str) else list(self.run.providers)
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        try:
            return cls(**{s: SECTIONS[s](**values) for s, values in data.items()})
        except (KeyError, TypeError) as exc:
            raise UsageError(f"not a qcb-onnx config: {exc}") from None

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> QuantConfig:
        """The config a qcb-onnx output was converted with, from its metadata_props as a dict."""
        text = metadata.get("qcb_onnx.config")
        if text is None:
            raise UsageError("the model records no qcb-onnx config (not a qcb-onnx output, or one older than 0.3.0)")
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError:
            raise UsageError("the model's qcb_onnx.config metadata is not JSON") from None

    @classmethod
    def from_toml(cls, path: str | Path, base: QuantConfig | None = None) -> QuantConfig:
        """Options from a TOML file, flat (``w_bits = 4``) or in sections (``[weights]``), over `base`.
        ``a_bits = "none"``, ``error_budget = "auto"``, ``calib_size = "all"`` stand for None."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"config file {path} is not TOML: {str(exc).splitlines()[0]}") from None
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, dict):
                wrong = sorted(k for k in value if _SECTION_OF.get(k) != key)
                if wrong:
                    raise UsageError(f"config file {path}: [{key}] has no option {wrong[0]!r}")
                flat.update(value)
            else:
                flat[key] = value
        for key, value in flat.items():
            if key in _SECTION_OF and isinstance(value, list):
                flat[key] = tuple(value)
            if NONE_WORDS.get(key) == value:
                flat[key] = None
        try:
            return cls.from_options(base, **flat)
        except UsageError as exc:
            raise UsageError(f"config file {path}: {exc}") from None

    def to_toml(self) -> str:
        """This config as a TOML file `from_toml` reads back to an equal config."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                if value is None:
                    if key not in NONE_WORDS:
                        continue  # None is that field's default
                    value = NONE_WORDS[key]
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        return "\n".join(lines)

    def fingerprint(self) -> dict[str, Any]:
        """What the integers depend on: every section but the run options other than the seed."""
        out = self.to_dict()
        out["run"] = {"seed": self.run.seed}
        return out
