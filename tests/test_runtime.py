"""Device and provider selection: CUDA only where it really works, CPU first-class, no loader noise."""

from __future__ import annotations

import pytest
import torch

from qcb_onnx.errors import UsageError
from qcb_onnx.runtime import cuda_ep_works, resolve_providers, session, torch_device


def test_auto_providers_fall_back_quietly(capfd):
    """'auto' probes the CUDA EP in a real session and, where it cannot load, picks CPU without printing
    ORT's loader errors to the terminal."""
    cuda_ep_works.cache_clear()
    providers = resolve_providers("auto")
    err = capfd.readouterr().err
    assert providers[-1] == "CPUExecutionProvider"
    if not cuda_ep_works():
        assert providers == ["CPUExecutionProvider"]
        assert err == ""


def test_explicit_choices():
    """'cpu' is always CPU; an EP list is taken as given; unknown EP names are a one-line usage error."""
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="NoSuchExecutionProvider"):
        resolve_providers("NoSuchExecutionProvider")


@pytest.mark.skipif(cuda_ep_works(), reason="this machine has a working CUDA EP")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(UsageError, match="CUDA EP"):
        resolve_providers("cuda")


def test_torch_device_selection():
    """'auto' follows torch.cuda.is_available(); 'cuda' without CUDA is a usage error, not a crash later."""
    assert torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError):
            torch_device("cuda")


def test_session_runs_on_cpu():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    out = session(model, "cpu").run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0]
    assert out.tolist() == [0.0, 2.0]
