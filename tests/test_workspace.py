"""What a conversion keeps on disk instead of in memory (tensorfile.py): the layer loop's integers and a
large output's tensors, so that a model larger than memory streams through to its written file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx import QuantConfig, convert, large, quantize
from qcb_onnx.emit import read_weight_ints
from qcb_onnx.output import write_atomic
from qcb_onnx.rounding.checkpoint import Checkpoint
from qcb_onnx.rounding.problem import LayerReport
from qcb_onnx.tensorfile import ALIGN, TensorFile

D, TOKENS = 64, 8


def _stack(path: Path) -> Path:
    """Two pre-LayerNorm MLP blocks and a head, every weight in `<name>.data` as exporters save them."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(2):
        inits += [
            numpy_helper.from_array(np.ones(D, np.float32), f"g{i}"),
            numpy_helper.from_array(np.zeros(D, np.float32), f"b{i}"),
            numpy_helper.from_array((rng.standard_normal((D, 4 * D)) / 8).astype(np.float32), f"up{i}"),
            numpy_helper.from_array((rng.standard_normal((4 * D, D)) / 16).astype(np.float32), f"down{i}"),
        ]
        nodes += [
            helper.make_node("LayerNormalization", [x, f"g{i}", f"b{i}"], [f"n{i}"], axis=-1),
            helper.make_node("MatMul", [f"n{i}", f"up{i}"], [f"u{i}"], name=f"up{i}"),
            helper.make_node("Relu", [f"u{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"down{i}"], [f"m{i}"], name=f"down{i}"),
            helper.make_node("Add", [x, f"m{i}"], [f"h{i}"]),
        ]
        x = f"h{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((D, 32)) / 8).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", TOKENS, D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TOKENS, 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return path


@pytest.fixture
def stack(tmp_path) -> tuple[Path, np.ndarray]:
    calib = np.random.default_rng(1).standard_normal((8, TOKENS, D)).astype(np.float32)
    return _stack(tmp_path / "fp.onnx"), calib


def test_tensor_file_maps_back_what_it_appended(tmp_path):
    """Arrays come back equal, read-only, memory-mapped from the file at aligned offsets; an INT4
    initializer is stored packed and read back through large.py like any external weight."""
    store = TensorFile(tmp_path / "t.data")
    values = {
        "int8": np.arange(-100, 100, dtype=np.int8).reshape(10, 20),
        "float32": np.random.default_rng(0).standard_normal(7).astype(np.float32),
        "empty": np.zeros((0, 3), np.int32),
    }
    kept = {k: store.keep(v) for k, v in values.items()}
    for k, v in values.items():
        np.testing.assert_array_equal(kept[k], v)
        assert kept[k].dtype == v.dtype and kept[k].shape == v.shape
    assert isinstance(kept["int8"], np.memmap) and not kept["int8"].flags.writeable
    int4 = np.random.default_rng(1).integers(-8, 8, size=(33, 5)).astype(np.int8)  # odd element count
    tensor = store.tensor("w_quantized", int4, TensorProto.INT4)
    path, offset, length = large.mapped(tensor)
    assert Path(path) == (tmp_path / "t.data").resolve() and offset % ALIGN == 0 and length == (int4.size + 1) // 2
    np.testing.assert_array_equal(large.to_array(tensor), int4)
    store.close()


def _layer(name: str) -> LayerReport:
    return LayerReport(name, name, (4, 4), 0.0, 1.0, 0.0)


def test_checkpoint_resumes_what_its_index_covers_and_drops_the_rest(tmp_path):
    """Bytes appended after the last indexed layer (a run killed between the two writes) are cut off
    on resume; a data file shorter than its index starts afresh; another run's checkpoint is ignored."""
    path = tmp_path / "c.resume"
    first = Checkpoint(path, "run")
    assert first.load() == {}
    ints = np.arange(16, dtype=np.int8).reshape(4, 4)
    held = first.add("a", ints, _layer("a"), np.ones(4))
    np.testing.assert_array_equal(held, ints)
    covered = path.stat().st_size
    with open(path, "ab") as f:  # a second layer's bytes, its index entry never written
        f.write(b"\x07" * 100)

    again = Checkpoint(path, "run")
    done = again.load()
    assert list(done) == ["a"] and path.stat().st_size == covered
    np.testing.assert_array_equal(done["a"][0], ints)
    np.testing.assert_array_equal(done["a"][2], np.ones(4))
    again.add("b", -ints, _layer("b"), None)
    assert list(Checkpoint(path, "run").load()) == ["a", "b"]
    assert Checkpoint(path, "another run").load() == {}

    Checkpoint(path, "run").load()  # re-opening it must not lose the layers
    with open(path, "r+b") as f:
        f.truncate(covered // 2)
    assert Checkpoint(path, "run").load() == {}


def test_layer_loop_holds_its_integers_from_the_workspace(stack):
    """Every committed layer's integers are a read-only mapping of the workspace's file, not memory,
    and equal what the output stores; the workspace goes with the conversion."""
    src, calib = stack
    with quantize(str(src), calib, QuantConfig.for_target("int4-weight-only"), providers="cpu") as conversion:
        workspace = Path(conversion.workspace.name)
        assert workspace.is_dir()
        for name, wq in conversion.state.weights.items():
            assert isinstance(wq.ints, np.memmap) and Path(wq.ints.filename).parent == workspace, name
            np.testing.assert_array_equal(read_weight_ints(conversion.model, name), wq.ints)
    assert not workspace.exists()


@pytest.mark.parametrize("weight_format", ["qdq", "matmulnbits"])
def test_large_output_is_built_on_disk_and_written_from_there(stack, tmp_path, monkeypatch, weight_format):
    """An output over large.HANDOVER (lowered here) is built with its large tensors in the workspace's
    file, never in the proto; `write_atomic` copies them into the output's data file, and the written
    model computes in ORT exactly what `convert`'s in-memory model computes, which is self-contained."""
    src, calib = stack
    monkeypatch.setattr(large, "HANDOVER", 4096)
    config = QuantConfig.for_target("int4-weight-only")
    options = dict(providers="cpu", method="nearest", weight_format=weight_format)
    with quantize(str(src), calib, config, **options) as conversion:
        folder = Path(conversion.workspace.name).resolve()
        stored = [t for t in conversion.model.graph.initializer if large.mapped(t)]
        assert any(Path(large.mapped(t)[0]).parent == folder for t in stored)
        assert all(not t.raw_data for t in stored)
        out = tmp_path / "q.onnx"
        write_atomic(conversion.model, out, force=False)
    written = onnx.load(out, load_external_data=False)
    assert all(not large.mapped(t) for t in written.graph.initializer)  # relative, in q.onnx.data
    in_memory = convert(str(src), calib, config, **options)
    assert not any(large.mapped(t) for t in in_memory.graph.initializer)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": calib})[0]
    with large.on_disk(in_memory) as path:
        want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": calib})[0]
    np.testing.assert_array_equal(got, want)
