"""Graph passes over onnx_ir that normalize a float model before quantization.

The goal is to quantize the same weights that ONNX Runtime's ``quant_pre_process`` +
``quantize_static`` would: BatchNormalization and per-channel Add/Mul folded into Conv,
Identity/Dropout gone, constant subgraphs folded. :func:`normalize` runs the whole stage on a
``ModelProto``; each ``*_pass()`` factory returns one in-place ``onnx_ir`` pass for composing
with ``onnx_ir.passes.Sequential`` / ``PassManager``.  :func:`dequantize` turns a QDQ model back
into float before that stage, for ``--allow-requantize``.
"""

from __future__ import annotations

__all__ = [
    "dequantize",
    "dequantize_pass",
    "eliminate_dropout_pass",
    "eliminate_identity_pass",
    "fold_batchnorm_pass",
    "fold_constants_pass",
    "fold_conv_add_mul_pass",
    "lift_constants_pass",
    "normalize",
    "normalize_pass",
    "remove_unused_pass",
    "shape_inference_pass",
    "topological_sort_pass",
]

import warnings

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as _common

from qcb_onnx import large
from qcb_onnx.errors import ModelFileError, QcbNote, UnsupportedModelError, UsageError
from qcb_onnx.load import QOPERATOR_OPS, quantization_nodes
from qcb_onnx.text import listing, one_line

from .dequantize import DequantizePass
from .eliminate_dropout import EliminateDropoutPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import DEFAULT_SIZE_LIMIT, make_fold_constants_pass
from .fold_conv_add_mul import FoldConvAddMulPass
from .normalize import make_lift_constants_pass, make_normalize_pass, make_shape_inference_pass

# metadata about the model itself, not about a conversion (redteam/cli.py, samples/make_sample.py write
# it): still true of a re-quantized model, and what `evaluate` reads its trigger and target from
MODEL_METADATA = frozenset({"qcb_onnx.trigger", "qcb_onnx.target", "qcb_onnx.attack"})


def shape_inference_pass() -> ir.passes.PassBase:
    """ONNX shape inference (onnx_ir ``ShapeInferencePass``, non-strict, with data propagation)."""
    return make_shape_inference_pass()


def lift_constants_pass() -> ir.passes.PassBase:
    """Constant nodes -> initializers (onnx_ir ``LiftConstantsToInitializersPass``)."""
    return make_lift_constants_pass()


def fold_constants_pass(*, size_limit: int = DEFAULT_SIZE_LIMIT) -> ir.passes.PassBase:
    """Constant folding incl. static Shape chains (onnxscript ``FoldConstantsPass``)."""
    return make_fold_constants_pass(input_size_limit=size_limit, output_size_limit=size_limit)


def eliminate_dropout_pass() -> ir.passes.PassBase:
    """Inference-mode Dropout -> Identity (run :func:`eliminate_identity_pass` after it)."""
    return EliminateDropoutPass()


def eliminate_identity_pass() -> ir.passes.PassBase:
    """Remove Identity nodes (onnx_ir ``IdentityEliminationPass``); output names are kept."""
    return _common.IdentityEliminationPass()


def fold_batchnorm_pass() -> ir.passes.PassBase:
    """Fold BatchNormalization into the preceding Conv / ConvTranspose / Gemm (float64 math)."""
    return FoldBatchNormPass()


def fold_conv_add_mul_pass() -> ir.passes.PassBase:
    """Fold a following per-output-channel constant Add/Mul into Conv (ORT ConvAdd/MulFusion)."""
    return FoldConvAddMulPass()


def remove_unused_pass() -> ir.passes.PassBase:
    """Remove dead nodes and unused initializers (onnx_ir ``RemoveUnusedNodesPass``)."""
    return _common.RemoveUnusedNodesPass()


def topological_sort_pass() -> ir.passes.PassBase:
    """Sort nodes topologically (onnx_ir ``TopologicalSortPass``)."""
    return _common.TopologicalSortPass()


def normalize_pass(*, max_iterations: int = 4, size_limit: int = DEFAULT_SIZE_LIMIT) -> ir.passes.PassBase:
    """The whole normalize stage as one in-place pass (see :func:`normalize`)."""
    return make_normalize_pass(max_iterations=max_iterations, size_limit=size_limit)


def dequantize_pass() -> ir.passes.PassBase:
    """A QDQ model back in float: DequantizeLinear of constants -> float initializers, Q -> DQ pairs
    removed (a Relu kept where the pair clamped at 0), the integers left unused removed."""
    return _dequantize_steps(DequantizePass())


def _dequantize_steps(step: DequantizePass) -> ir.passes.PassBase:
    return ir.passes.Sequential(_common.TopologicalSortPass(), step, _common.RemoveUnusedNodesPass())


def dequantize(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """The float model a QDQ model computes, without its rounding, for ``--allow-requantize``; a model
    without quantization nodes comes back as it is (no copy, no note).

    The weights become the dequantized values, exactly as ONNX Runtime computes them, so they keep
    the old rounding: a `QcbNote` says so.  A qcb-onnx output's record of its conversion (its other
    ``qcb_onnx.*`` metadata) goes: it describes a quantization that is no longer there, and the new
    conversion writes its own; what the red team recorded about the model (`MODEL_METADATA`) stays.

    A QOperator node (QLinearConv, MatMulNBits, ...) or a Q/DQ node that has no float equivalent
    here is an `UnsupportedModelError` naming them: the model is refused rather than converted with
    a piece of the old quantization left inside.
    """
    if not quantization_nodes(model):
        return model
    qoperator = quantization_nodes(model, QOPERATOR_OPS)
    if qoperator:
        raise UnsupportedModelError(
            f"{where} is quantized in QOperator form ({listing(qoperator)}): --allow-requantize turns only "
            "QDQ models (QuantizeLinear / DequantizeLinear) back into float; convert the original FP32 model"
        )
    step = DequantizePass()
    model_ir = _deserialize(model)
    try:
        _dequantize_steps(step)(model_ir)
        result = ir.serde.serialize_model(model_ir)
    except Exception as exc:  # noqa: BLE001 - whatever a pass raises on this model is about the model
        raise ModelFileError(f"cannot dequantize {where}: {one_line(exc)}") from exc
    kept = [p for p in result.metadata_props if p.key in MODEL_METADATA or not p.key.startswith("qcb_onnx.")]
    del result.metadata_props[:]
    result.metadata_props.extend(kept)
    left = quantization_nodes(result)
    if left:
        raise UnsupportedModelError(
            f"{where}: --allow-requantize cannot turn {listing(left)} back into float (a DequantizeLinear "
            "needs a constant integer input or a QuantizeLinear before it; a QuantizeLinear, a DequantizeLinear "
            "after it and no other reader)"
        )
    warnings.warn(
        QcbNote(
            f"{where} is already quantized: {step.constants} constant(s) dequantized, {step.pairs} Q/DQ pair(s) "
            "removed (--allow-requantize); the weights keep the old rounding, which may be the backdoor: "
            "convert the original FP32 model where you have it"
        ),
        stacklevel=2,
    )
    return result


def _deserialize(model: onnx.ModelProto) -> ir.Model:
    try:
        return ir.serde.deserialize_model(model)
    except Exception as exc:
        raise ModelFileError(f"cannot read the ONNX model: {one_line(exc)}") from exc


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference, fold BatchNormalization into the preceding Conv/Gemm/ConvTranspose, fold a
    following Add/Mul of a per-output-channel constant into Conv (like ORT's
    ConvAddFusion/ConvMulFusion), drop Identity and Dropout (inference), fold constants (incl.
    Shape->Gather->Unsqueeze->Concat->Reshape chains when the shapes are static), remove unused
    initializers/nodes, keep graph inputs/outputs names unchanged, return a model that passes
    ``onnx.checker.check_model(full_check=True)``.

    The input proto is not modified. Opset imports, IR version, producer, doc strings and
    ``metadata_props`` are preserved. Raises :class:`~qcb_onnx.errors.UsageError` for a
    non-ModelProto argument and :class:`~qcb_onnx.errors.ModelFileError` when the input model
    itself fails the ONNX checker.
    """
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"normalize() expects an onnx.ModelProto, got {type(model).__name__}")
    model_ir = _deserialize(model)
    try:  # a hostile graph the checker let through can still break a pass (onnx_ir's SerdeError, ...)
        normalize_pass()(model_ir)
        result = ir.serde.serialize_model(model_ir)
    except Exception as exc:  # noqa: BLE001 - whatever a pass raises on this model is about the model
        raise ModelFileError(f"cannot normalize the model: {one_line(exc)}") from exc
    try:
        large.check_model(result, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        try:
            large.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as in_exc:
            raise ModelFileError(f"the model fails the ONNX checker: {one_line(in_exc)}") from in_exc
        raise ModelFileError(
            f"normalizing the model produced an invalid graph (please report it): {one_line(exc)}"
        ) from exc
    return result
