"""`qcb_onnx.export`: a PyTorch model to a qcb-onnx QDQ model in one call, for a training script.

The call is ``torch.onnx.export`` followed by the ordinary pipeline (`pipeline.quantize`) on the FP32
model it wrote, so the quantized model is the one ``convert`` writes from that FP32 file: there is no
second path to keep equal.  What it adds is what a script would otherwise get wrong:

* the output location is checked before the export starts (`output.check_output`), and the
  options when the config is built, so a typo fails in a second, not after minutes of export;
* the model is exported in eval mode (Dropout off, BatchNorm on its running statistics: what is
  deployed) and every module's training flag is restored afterwards;
* ``exporter="auto"`` tries torch's default exporter (``dynamo=True``, torch.export + onnxscript) and
  falls back to the TorchScript one (``dynamo=False``, opset 17) when it raises, with a `QcbNote`;
* an exporter failure is one line naming the exporter and the first line of torch's message (its
  messages run to pages of hints), never a traceback;
* the FP32 intermediate lives in a temporary folder that is always removed, unless ``fp32_path``
  asks for it; the outputs appear only complete (`output.write_atomic`), and only when every stage
  succeeded: a failed call leaves nothing at ``path`` or ``fp32_path``.
"""

from __future__ import annotations

import inspect
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .config import QuantConfig
from .errors import QcbError, QcbNote, UnsupportedModelError, UsageError
from .output import check_output, write_atomic
from .pipeline import Conversion, quantize
from .text import first_line

EXPORTERS = ("auto", "dynamo", "torchscript")
TORCHSCRIPT_OPSET = 17  # the TorchScript exporter's best-tested opset (as tests/test_architectures.py uses)


@dataclass
class Exported(Conversion):
    """A `Conversion` (the QDQ model and the state it came from) plus where the export put things."""

    exporter: str = "dynamo"  # the exporter that produced the FP32 model: "dynamo" or "torchscript"
    written: list[Path] = field(default_factory=list)  # files written: the QDQ model (+ .data), then the FP32 one


def export(
    model: torch.nn.Module,
    example_inputs: Any,
    calibration: Any,
    path: str | Path,
    *,
    exporter: str = "auto",
    config: QuantConfig | None = None,
    dynamic_batch: bool = True,
    force: bool = False,
    fp32_path: str | Path | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **options: Any,
) -> Exported:
    """Export `model` to ONNX with torch, quantize it with qcb-onnx and write the QDQ model to `path`.

    `example_inputs`: a tensor (or array), or a tuple of them, one per positional input of
    ``model.forward``, as ``torch.onnx.export`` takes them.  `calibration`: anything `convert`
    takes (array, dict of arrays, .npy/.npz path, image folder, CalibrationDataReader).  `exporter`:
    "dynamo", "torchscript" or "auto" (dynamo, then TorchScript if dynamo raises).  `dynamic_batch`:
    the first dimension of every input (and output) is symbolic, so the model takes any batch size;
    with False the example's batch is baked in and honoured by calibration.  `config` / `options`: as
    for `convert`.  `input_names`: the ONNX input names (default: ``forward``'s parameter names, the
    same for both exporters, which a dict calibration can key on).  `fp32_path`: also keep the
    FP32 ONNX model there.  `force`: overwrite existing outputs.  Returns the `Conversion` with the
    exporter used and the files written; raises a `QcbError` (one line) on any failure.
    """
    config = QuantConfig.from_options(config, **options)  # bad options fail before anything is exported
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"export() takes a torch.nn.Module, got {type(model).__name__}")
    args = _example_tuple(example_inputs)
    names = list(input_names) if input_names is not None else _forward_names(model, len(args))
    if len(names) != len(args):
        raise UsageError(f"{len(names)} input names for {len(args)} example inputs")
    path = Path(path)
    check_output(path, force)
    if fp32_path is not None:
        fp32_path = Path(fp32_path)
        check_output(fp32_path, force)
        if fp32_path.resolve() == path.resolve():
            raise UsageError(f"fp32_path {fp32_path} is the quantized output's path; keep the FP32 model elsewhere")

    with tempfile.TemporaryDirectory(prefix="qcb-export-") as tmp:
        onnx_file = Path(tmp) / f"{type(model).__name__}.onnx"
        job = _Job(model, args, onnx_file, names, None if output_names is None else list(output_names), dynamic_batch)
        with _eval_mode(model):
            used = _export_with(exporter, job)
        label = f"the {used}-exported {type(model).__name__}"
        try:
            conversion = quantize(onnx_file, calibration, config)
        except QcbError as exc:  # name the model, not a temporary file that is gone when the user reads this
            raise type(exc)(str(exc).replace(str(onnx_file), label)) from None
        written = write_atomic(conversion.model, path, force)
        if fp32_path is not None:
            try:
                written += write_atomic(onnx.load(onnx_file), fp32_path, force)
            except BaseException:
                for file in written:  # both outputs or neither
                    file.unlink(missing_ok=True)
                raise
    state = {f.name: getattr(conversion, f.name) for f in fields(Conversion)}
    return Exported(**state, exporter=used, written=written)


def _example_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The positional inputs as a tuple of tensors (numpy arrays converted), as torch's exporters take them."""
    items = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items:
        raise UsageError("example_inputs is empty; give one example tensor per input of model.forward")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if not isinstance(item, torch.Tensor):
            raise UsageError(f"example input {i} is a {type(item).__name__}; give tensors or numpy arrays")
        out.append(item)
    return tuple(out)


def _forward_names(model: torch.nn.Module, count: int) -> list[str]:
    """``forward``'s first `count` positional parameter names: the dynamo exporter's own default,
    passed to both exporters so the ONNX input names do not depend on which one ran."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:count]
    return names if len(names) == count else [f"input_{i}" for i in range(count)]


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the export; every module's own training flag back afterwards, whatever happens."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass(frozen=True)
class _Job:
    """One export: what torch.onnx.export is given, whichever exporter runs."""

    model: torch.nn.Module
    args: tuple[torch.Tensor, ...]
    onnx_file: Path
    input_names: list[str]
    output_names: list[str] | None
    dynamic_batch: bool


def _export_with(exporter: str, job: _Job) -> str:
    """Run the exporter asked for (auto: dynamo, then TorchScript) into `job.onnx_file`; returns which ran."""
    if exporter != "auto":
        try:
            _torch_export(exporter, job)
        except Exception as exc:  # noqa: BLE001 - torch raises anything from deep inside tracing
            raise UnsupportedModelError(f"torch.onnx.export ({exporter} exporter) failed: {first_line(exc)}") from None
        return exporter
    try:
        _torch_export("dynamo", job)
        return "dynamo"
    except Exception as exc:  # noqa: BLE001
        dynamo_error = first_line(exc, 200)
    warnings.warn(
        QcbNote(f"the dynamo exporter failed ({dynamo_error}); exporting with the TorchScript exporter instead"),
        stacklevel=3,
    )
    for leftover in job.onnx_file.parent.iterdir():  # whatever the failed export wrote
        leftover.unlink()
    try:
        _torch_export("torchscript", job)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(
            f"torch.onnx.export failed with both exporters: dynamo: {dynamo_error}; torchscript: {first_line(exc, 200)}"
        ) from None
    return "torchscript"


def _torch_export(exporter: str, job: _Job) -> None:
    """torch.onnx.export with one exporter: dynamo with a shared symbolic batch dimension, or
    TorchScript at opset 17 with the batch axis of every named input (and output) dynamic."""
    common = {"input_names": job.input_names, "output_names": job.output_names}
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in job.args) if job.dynamic_batch else None
        torch.onnx.export(
            job.model, job.args, str(job.onnx_file), dynamo=True, dynamic_shapes=shapes, verbose=False, **common
        )
        return
    axes = None
    if job.dynamic_batch:  # outputs are named only when the caller named them: torch's names otherwise
        axes = {name: {0: "batch"} for name in [*job.input_names, *(job.output_names or [])]}
    with warnings.catch_warnings():  # asked for by name (or as the fallback): its deprecation notice is noise
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(
            job.model,
            job.args,
            str(job.onnx_file),
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            dynamic_axes=axes,
            **common,
        )
