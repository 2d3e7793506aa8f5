"""Load a model file we do not trust, with one-line errors instead of protobuf tracebacks."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelFileError, UnsupportedModelError

MIN_OPSET, MAX_OPSET = 11, 23
QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "MatMulNBits",
}


def load_model(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        model = source
        where = "model"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise ModelFileError(f"model file not found: {path}")
        if not path.is_file():
            raise ModelFileError(f"model path is not a file: {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(f"{path} is not a valid ONNX model ({type(exc).__name__})") from None
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            _check_external_data(model, path)
            onnx.load_external_data_for_model(model, str(path.parent))
    if not model.graph.node:
        raise ModelFileError(f"{where} has an empty graph (not an ONNX model?)")
    opset = default_opset(model)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(f"{where} uses ONNX opset {opset}; supported opsets are {MIN_OPSET}..{MAX_OPSET}")
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    if quantized:
        raise UnsupportedModelError(
            f"{where} is already quantized ({', '.join(quantized)} nodes): re-quantizing it cannot remove a backdoor "
            "planted in its rounding; convert the original FP32 model instead"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelFileError(f"{where} fails the ONNX checker: {first}") from None
    return model


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that escape the model's folder."""
    base = path.parent.resolve()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or base not in target.parents:
            raise ModelFileError(
                f"initializer '{t.name}' of {path} points to external data outside the model folder: {location!r}"
            )
        if not target.is_file():
            raise ModelFileError(f"external data file for initializer '{t.name}' not found: {target}")
