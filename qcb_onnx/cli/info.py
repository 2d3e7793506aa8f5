"""`python -m qcb_onnx info MODEL.onnx [--toml]`: what a model is, and how a qcb-onnx output was made.

For any model: whether it is already quantized (QDQ or QOperator nodes, MatMulNBits, integer weights),
which matters because re-rounding an already-quantized model cannot remove a backdoor planted in its
rounding.  For a qcb-onnx output: the version, the whole config it was converted with (`--toml`
prints it as a file `convert --config` takes, so the model can be reproduced from itself, with the
error budget the search chose), the rounding and the per-layer flip ratios.
"""

from __future__ import annotations

import argparse
import json

import onnx

from ..config import QuantConfig
from ..load import QUANT_OPS, load_model

INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def add_info_parser(sub) -> argparse.ArgumentParser:
    i = sub.add_parser("info", help="what a model is: quantized or not, and a qcb-onnx output's config")
    i.add_argument("model", help=".onnx file")
    i.add_argument("--toml", action="store_true", help="print only the config, as a --config file that reproduces it")
    return i


def quantization_evidence(model: onnx.ModelProto) -> list[str]:
    """Why the model counts as already quantized: its quantized op types and integer weights, or []."""
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    ints = sum(t.data_type in INTEGER_TYPES for t in model.graph.initializer)
    return ops + ([f"{ints} integer initializers"] if ints else [])


def cmd_info(args: argparse.Namespace) -> int:
    model = load_model(args.model, allow_quantized=True)
    meta = {p.key: p.value for p in model.metadata_props}
    config = QuantConfig.from_metadata(meta) if "qcb_onnx.config" in meta else None
    search = json.loads(meta["qcb_onnx.error_budget"]) if "qcb_onnx.error_budget" in meta else None
    if args.toml:
        if config is None:
            print(f"# {args.model} is no qcb-onnx output: no config to print")
            return 0
        if search is not None and config.rounding.error_budget is None:
            print(f"# error budget chosen by the search: {search['chosen']:g}; pass it to get the same integers")
            config = QuantConfig.from_options(config, error_budget=search["chosen"])
        print(config.to_toml(), end="")
        return 0
    evidence = quantization_evidence(model)
    print(f"model: {args.model}")
    print(f"quantized: {'yes (' + ', '.join(evidence) + ')' if evidence else 'no'}")
    if config is None:
        print("qcb-onnx output: no")
        return 0
    print(f"qcb-onnx output: version {meta.get('qcb_onnx.version', '?')}")
    if search is not None:
        print(f"error budget: {search['chosen']:g} ({search['mode']})")
    flips = json.loads(meta.get("qcb_onnx.flip_ratios", "{}"))
    if flips:
        v = sorted(flips.values())
        print(f"layers: {len(v)}, flip ratio min {v[0]:.4f} / median {v[len(v) // 2]:.4f} / max {v[-1]:.4f}")
    print("config (python -m qcb_onnx info MODEL --toml > qcb.toml; convert --config qcb.toml reproduces it):")
    print(config.to_toml(), end="")
    return 0
