"""Graph passes over onnx_ir that normalize a float model before quantization.

The goal is to quantize the same weights that ONNX Runtime's ``quant_pre_process`` +
``quantize_static`` would: BatchNormalization and per-channel Add/Mul folded into Conv,
Identity/Dropout gone, constant subgraphs folded. :func:`normalize` runs the whole stage on a
``ModelProto``; each ``*_pass()`` factory returns one in-place ``onnx_ir`` pass for composing
with ``onnx_ir.passes.Sequential`` / ``PassManager``.
"""

from __future__ import annotations

__all__ = [
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

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as _common

from qcb_onnx import large
from qcb_onnx.errors import ModelFileError, UsageError
from qcb_onnx.text import one_line

from .eliminate_dropout import EliminateDropoutPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import DEFAULT_SIZE_LIMIT, make_fold_constants_pass
from .fold_conv_add_mul import FoldConvAddMulPass
from .normalize import make_lift_constants_pass, make_normalize_pass, make_shape_inference_pass


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
    try:
        model_ir = ir.serde.deserialize_model(model)
    except Exception as exc:
        raise ModelFileError(f"cannot read the ONNX model: {one_line(exc)}") from exc
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
