"""MatMulNBits output: each block-wise DequantizeLinear -> MatMul pair as one com.microsoft MatMulNBits.

`MatMulNBits` is what ORT's own int4 quantizer writes and what its CPU and CUDA kernels run fastest
(`accuracy_level` picks the CPU kernel's compute type; unset, it dequantizes to float, so the output
agrees with our float simulation).  The integers, scales and zero points are the same ones the QDQ
form holds, repacked in ORT's layout (blockwise.matmulnbits_inputs; initializer names as ORT's,
`<w>_Q4`, `<w>_scales`, `<w>_zero_points`).  A Gemm, or a MatMul whose weight feeds anything else,
keeps its DequantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from . import large
from .blockwise import Blocks, matmulnbits_inputs, unpack_nibbles
from .emit import initializer
from .quantsim import QuantState, WeightQuant
from .tensorfile import TensorFile

DOMAIN = "com.microsoft"


def _blocks(wq: WeightQuant) -> Blocks:
    """The canonical (N, n_blocks) parameters of a 2-D (K, N) MatMul weight blocked along K."""
    zp = np.full(wq.scale.T.shape, 8, np.int32) if wq.zero_point is None else wq.zero_point.T
    return Blocks(wq.block_size, wq.scale.T, zp, wq.zero_point is None)


def to_matmulnbits(model: onnx.ModelProto, state: QuantState, store: TensorFile | None = None) -> onnx.ModelProto:
    """A copy of the QDQ `model` with every block-wise MatMul weight in MatMulNBits form, the large
    repacked initializers appended to `store` where one is given (emit._tensor).

    The copy is made without the initializers (only the ones kept are copied, at the end): the int4
    weights would otherwise exist three times at once, in `model`, in the copy and repacked."""
    out = onnx.ModelProto()
    large.copy_without_initializers(model, out)
    graph = out.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    new_nodes, new_inits, gone = [], [], set()
    fused: dict[str, onnx.NodeProto] = {}  # MatMul name -> its MatMulNBits
    for weight, wq in state.weights.items():
        dq_out = f"{weight}_DequantizeLinear_Output"
        users = consumers.get(dq_out, [])
        if wq.block_size is None or wq.axis != 0 or wq.ints.ndim != 2 or len(users) != 1:
            continue
        matmul = users[0]
        if matmul.op_type != "MatMul" or list(matmul.input).index(dq_out) != 1:
            continue
        k, n = wq.ints.shape
        blocks = _blocks(wq)
        unsigned = wq.ints.T + (8 if blocks.symmetric else 0)
        packed = matmulnbits_inputs(unsigned, blocks)
        names = {
            key: f"{weight}_{suffix}"
            for key, suffix in (("B", "Q4"), ("scales", "scales"), ("zero_points", "zero_points"))
        }
        new_inits += [initializer(names[key], v, store=store) for key, v in packed.items()]
        inputs = [matmul.input[0], names["B"], names["scales"]] + (
            [names["zero_points"]] if "zero_points" in packed else []
        )
        fused[matmul.name or matmul.output[0]] = helper.make_node(
            "MatMulNBits",
            inputs,
            list(matmul.output),
            name=f"{matmul.name}_Q4" if matmul.name else "",
            domain=DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=wq.block_size,
        )
        gone.add(f"{weight}_DequantizeLinear")
    if not fused:
        graph.initializer.extend(model.graph.initializer)
        return out
    for node in graph.node:
        if node.name in gone:
            continue
        new_nodes.append(fused.get(node.name or node.output[0], node) if node.op_type == "MatMul" else node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    graph.initializer.extend(new_inits)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out


def read_nbits_ints(model: onnx.ModelProto, weight: str) -> np.ndarray:
    """The stored integers of `weight` in a MatMulNBits model, in the weight's (K, N) layout and the QDQ
    form's convention (signed for symmetric, unsigned with zero points for asymmetric)."""
    inits = {t.name: t for t in model.graph.initializer}
    name = f"{weight}_Q4"
    node = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and name in n.input), None)
    if name not in inits or node is None:
        raise KeyError(weight)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    b = large.to_array(inits[name])  # (N, n_blocks, block_size / 2)
    u = unpack_nibbles(b.reshape(b.shape[0], -1), b.shape[1] * attrs["block_size"])[:, : attrs["K"]]
    symmetric = len(node.input) < 4 or not node.input[3]
    return (u - 8 if symmetric else u).T.astype(np.int32)
