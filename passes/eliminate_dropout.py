"""Replace inference-mode Dropout by Identity (then removed by identity elimination).

A Dropout is an identity at inference when its ``training_mode`` input (opset >= 12) is
absent or a constant False; before opset 7 it also needs ``is_test=1``. Dropouts whose mask
output is used, or whose training mode is not a known constant, are left alone.
"""

from __future__ import annotations

__all__ = ["EliminateDropoutPass"]

import logging

import onnx_ir as ir

from ._utils import const_array

logger = logging.getLogger(__name__)


def _is_inference_dropout(node: ir.Node, opset: int) -> bool:
    if len(node.outputs) > 1 and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return False
    if not node.inputs or node.inputs[0] is None:
        return False
    if opset < 7:
        is_test = node.attributes.get("is_test")
        return is_test is not None and not is_test.is_ref() and is_test.as_int() != 0
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training = const_array(node.inputs[2])
        return training is not None and training.size == 1 and not bool(training.reshape(-1)[0])
    return True


class EliminateDropoutPass(ir.passes.InPlacePass):
    """Turn inference Dropout nodes into Identity nodes, in all graphs and functions."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        graphs_like = [(model.graph, model.graph.opset_imports.get("", 1))]
        graphs_like += [
            (f, f.opset_imports.get("", model.graph.opset_imports.get("", 1))) for f in model.functions.values()
        ]
        for root, opset in graphs_like:
            for node in list(ir.traversal.RecursiveGraphIterator(root)):
                if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                    continue
                if not _is_inference_dropout(node, opset):
                    continue
                graph = node.graph
                assert graph is not None
                identity = ir.Node("", "Identity", inputs=[node.inputs[0]], num_outputs=1)
                ir.convenience.replace_nodes_and_values(
                    graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]]
                )
                count += 1
        if count:
            logger.info("Replaced %d Dropout node(s) by Identity", count)
        return ir.passes.PassResult(model, modified=bool(count))
