"""ONNX Runtime sessions and torch devices, CUDA when it really works, CPU otherwise."""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import onnx
import onnxruntime as ort
import torch

from . import large
from .errors import UsageError


def torch_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but PyTorch sees no CUDA device")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {choice!r}")
    return torch.device(choice)


@contextlib.contextmanager
def _quiet_stderr():
    """ORT prints loader errors straight to fd 2 when a provider library is missing; hide them."""
    fd = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


@lru_cache(maxsize=1)
def cuda_ep_works() -> bool:
    """True only if a session on the CUDA EP really gets the CUDA EP (libraries load, device present)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        with _quiet_stderr():
            sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in sess.get_providers()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def resolve_providers(choice: str | list[str] = "auto") -> list[str]:
    """'auto' -> CUDA EP when it works, then CPU; 'cpu', 'cuda' or a comma list of EP names."""
    if isinstance(choice, list):
        return choice
    if choice == "auto":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ep_works() else ["CPUExecutionProvider"]
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        if not cuda_ep_works():
            raise UsageError("--providers cuda requested but ONNX Runtime's CUDA EP cannot load on this machine")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    names = [p.strip() for p in choice.split(",") if p.strip()]
    unknown = [p for p in names if p not in ort.get_available_providers()]
    if unknown:
        raise UsageError(f"unknown ONNX Runtime providers: {', '.join(unknown)}")
    return names


def session(
    model: onnx.ModelProto | str, providers: str | list[str] = "auto", threads: int = 0, workdir: str | None = None
):
    """An ORT session; a large proto is saved for it in a temporary folder in `workdir` first."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    providers = resolve_providers(providers)
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model, opts, providers=providers)
    if large.split(model):  # ORT reads external data only from files; the session keeps what it needs
        with large.on_disk(model, workdir) as path:
            return ort.InferenceSession(path, opts, providers=providers)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
