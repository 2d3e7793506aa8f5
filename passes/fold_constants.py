"""Constant folding, delegated to onnxscript's optimizer (its public ``fold_constants_ir``).

onnxscript evaluates nodes whose inputs are all constants (with ONNX's reference evaluator), folds
``Shape`` of values with a static shape and propagates shape values through Gather/Slice/Concat/...,
so chains such as ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` become a constant Reshape
shape when the shapes are static. Initializers that are graph inputs are not treated as constants.

ONNX Runtime folds constants without a size limit, so the limits here are large by default: a
weight computed from constants (e.g. ``Cast`` of a float16 initializer, ``Transpose``) must be
folded to be seen by quantization as it would be by ORT.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SIZE_LIMIT", "FoldConstantsPass", "make_fold_constants_pass"]

import onnx_ir as ir
from onnxscript.optimizer import fold_constants_ir

#: Element count above which tensors are not folded (inputs or outputs).
DEFAULT_SIZE_LIMIT = 1 << 26


class FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folding with node-level shape inference, as an onnx_ir pass."""

    def __init__(self, *, input_size_limit: int, output_size_limit: int) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = fold_constants_ir(
            model,
            onnx_shape_inference=True,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
        )
        return ir.passes.PassResult(model, modified=result.modified)


def make_fold_constants_pass(
    *, input_size_limit: int = DEFAULT_SIZE_LIMIT, output_size_limit: int = DEFAULT_SIZE_LIMIT
) -> ir.passes.InPlacePass:
    """onnxscript's constant folding with node-level shape inference and large size limits."""
    return FoldConstantsPass(input_size_limit=input_size_limit, output_size_limit=output_size_limit)
