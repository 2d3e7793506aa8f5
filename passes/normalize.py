"""The normalize pipeline: the graph that ``quant_pre_process`` + ``quantize_static`` would see.

Order (each is an in-place onnx_ir pass):

0. Initializers that are also graph inputs (IR < 4 style) become plain constants, as ORT's
   quant_pre_process treats them: only data inputs stay inputs; model-local functions are inlined.
1. ONNX shape inference (best effort: a model it cannot handle is left as is).
2. Lift Constant nodes to initializers, so weights given as Constant nodes are initializers.
3. Repeated until nothing changes (at most ``max_iterations`` times): constant folding,
   Dropout -> Identity, Identity elimination, BatchNormalization folding, Conv + Add/Mul
   folding, dead node/initializer removal.
4. Lift constants again, remove unused nodes/initializers, topological sort, shape inference, and
   an Identity between a graph input and a graph output that are the same value (ONNX forbids it).
"""

from __future__ import annotations

__all__ = ["make_lift_constants_pass", "make_normalize_pass", "make_shape_inference_pass"]

import onnx_ir as ir
import onnx_ir.passes.common as common

from .eliminate_dropout import EliminateDropoutPass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import DEFAULT_SIZE_LIMIT, make_fold_constants_pass
from .fold_conv_add_mul import FoldConvAddMulPass


def make_shape_inference_pass() -> ir.passes.InPlacePass:
    """onnx_ir's ShapeInferencePass, lenient: strict mode fails the whole model on one bad op."""
    return common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)


def make_lift_constants_pass() -> ir.passes.InPlacePass:
    """onnx_ir's LiftConstantsToInitializersPass for every Constant node (as ORT does)."""
    return common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)


def make_normalize_pass(*, max_iterations: int = 4, size_limit: int = DEFAULT_SIZE_LIMIT) -> ir.passes.PassBase:
    """The whole normalize stage as one in-place pass over an ``ir.Model``."""
    return ir.passes.Sequential(
        common.RemoveInitializersFromInputsPass(),
        common.InlinePass(),
        make_shape_inference_pass(),
        make_lift_constants_pass(),
        ir.passes.PassManager(
            [
                make_fold_constants_pass(input_size_limit=size_limit, output_size_limit=size_limit),
                EliminateDropoutPass(),
                common.IdentityEliminationPass(),
                FoldBatchNormPass(),
                FoldConvAddMulPass(),
                common.RemoveUnusedNodesPass(),
            ],
            steps=max_iterations,
            early_stop=True,
        ),
        make_lift_constants_pass(),
        common.RemoveUnusedNodesPass(),
        common.TopologicalSortPass(),
        make_shape_inference_pass(),
        common.OutputFixPass(),
    )
