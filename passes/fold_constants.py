"""Constant folding, delegated to onnxscript's optimizer.

``onnxscript.optimizer._constant_folding.FoldConstantsPass`` evaluates nodes whose inputs are
all constants (with ONNX's reference evaluator), folds ``Shape`` of values with a static shape
and propagates shape values through Gather/Slice/Concat/..., so chains such as
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` become a constant Reshape shape when the
shapes are static. Initializers that are graph inputs are not treated as constants.

ONNX Runtime folds constants without a size limit, so the limits here are large by default: a
weight computed from constants (e.g. ``Cast`` of a float16 initializer, ``Transpose``) must be
folded to be seen by quantization as it would be by ORT.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SIZE_LIMIT", "make_fold_constants_pass"]

import onnx_ir as ir
from onnxscript.optimizer._constant_folding import FoldConstantsPass

#: Element count above which tensors are not folded (inputs or outputs).
DEFAULT_SIZE_LIMIT = 1 << 26


def make_fold_constants_pass(
    *, input_size_limit: int = DEFAULT_SIZE_LIMIT, output_size_limit: int = DEFAULT_SIZE_LIMIT
) -> ir.passes.InPlacePass:
    """onnxscript's FoldConstantsPass with node-level shape inference and large size limits."""
    return FoldConstantsPass(
        shape_inference=True,
        input_size_limit=input_size_limit,
        output_size_limit=output_size_limit,
    )
