"""Small helpers shared by the normalize passes (constants, names, rewiring)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: Element types whose weights the folding passes may rewrite (computed in float64, cast back).
FOLDABLE_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of ``value`` (initializer or Constant output), else None.

    Initializers that are also graph inputs can be overridden at run time, so they are not
    constants (this matches ONNX Runtime for IR version >= 4).
    """
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None:
        return None
    return tensor.numpy()


def const_dtype(value: ir.Value | None) -> ir.DataType | None:
    """Element type of a constant value, or None when it is not a constant."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    return None if tensor is None else tensor.dtype


def single_consumer(value: ir.Value, consumer: ir.Node) -> bool:
    """True when ``consumer`` is the only user of ``value`` (once) and it is no graph output."""
    if value.is_graph_output():
        return False
    uses = list(value.uses())
    return len(uses) == 1 and uses[0].node is consumer


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used anywhere in ``graph`` (inputs, initializers, node outputs)."""
    used = {v.name for v in graph.inputs}
    used.update(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        used.update(o.name for o in node.outputs)
    if base not in used:
        return base
    i = 1
    while f"{base}_{i}" in used:
        i += 1
    return f"{base}_{i}"


def set_const_input(node: ir.Node, index: int, array: np.ndarray, base_name: str) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    The existing initializer is rewritten in place when ``node`` is its only user; otherwise
    (shared weight, Constant node output, missing optional input) a new initializer with a
    unique name is registered in the node's graph.
    """
    graph = node.graph
    assert graph is not None
    old = node.inputs[index] if index < len(node.inputs) else None
    dtype = ir.DataType.from_numpy(array.dtype)
    if (
        old is not None
        and old.is_initializer()
        and old.graph is graph
        and not old.is_graph_input()
        and single_consumer(old, node)
    ):
        old.const_value = ir.Tensor(array, dtype=dtype, name=old.name)
        old.shape = ir.Shape(array.shape)
        old.dtype = dtype
        return
    name = unique_name(graph, base_name)
    new = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(dtype),
        const_value=ir.Tensor(array, dtype=dtype, name=name),
    )
    graph.register_initializer(new)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)


def bypass_node(node: ir.Node, old_output: ir.Value, new_output: ir.Value) -> None:
    """Remove ``node`` after pointing every user of ``old_output`` at ``new_output``.

    ``new_output`` must be produced by another node of the same graph and must not be a graph
    output; if ``old_output`` was a graph output, ``new_output`` takes its name so the graph's
    output names do not change.
    """
    graph = node.graph
    assert graph is not None
    was_output = old_output.is_graph_output()
    if new_output.shape is None:
        new_output.shape = old_output.shape
    if new_output.type is None:
        new_output.type = old_output.type
    ir.convenience.replace_all_uses_with(old_output, new_output, replace_graph_outputs=True)
    name = old_output.name
    graph.remove(node, safe=True)
    if was_output:
        new_output.name = name


def cast_back(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """Cast a float64 result back to the element type of the tensor it replaces."""
    return np.asarray(array).astype(dtype.numpy())


def fold_each_node(model: ir.Model, try_fold, what: str, logger) -> ir.passes.PassResult:
    """Apply `try_fold(node) -> bool` to every node of the main graph (subgraphs are left alone)."""
    count = 0
    for node in list(model.graph):
        if node.graph is model.graph and try_fold(node):
            count += 1
    if count:
        logger.info("Folded %d %s", count, what)
    return ir.passes.PassResult(model, modified=bool(count))
