"""Models over protobuf's 2 GB limit: read, converted, verified in ORT and written as external data.

The fast tests lower `qcb_onnx.large.LIMIT` so that the large-model path (skeleton for the checker
and the version converter, external data for ORT and for the output) runs on a small model, and
compare it with the ordinary path bit for bit.  One test builds a real 2.15 GB model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcb_onnx import convert, large
from qcb_onnx.cli import main
from qcb_onnx.emit import read_weight_ints
from qcb_onnx.load import load_model
from qcb_onnx.scheme import scaled, weight_grid, weight_scales


def _model(opset: int = 13) -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm; the Gemm weight (40 kB) is the large tensor."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "b"),
        numpy_helper.from_array((rng.normal(size=(10, 1024)) / 30).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "large_path",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(1).random((16, 1, 8, 8), dtype=np.float32))
    return path


@pytest.fixture
def small_limit(monkeypatch):
    """Every model in the test counts as 'over 2 GB'."""
    monkeypatch.setattr(large, "LIMIT", 4000)


def test_save_writes_external_data_and_leaves_the_model_alone(tmp_path, small_limit):
    """A large model is written as a small model file + one data file; the caller's proto keeps its
    weights (onnx.save(save_as_external_data=True) would empty it), and ORT reads it back exactly."""
    model = _model()
    before = model.SerializeToString()
    written = large.save(model, tmp_path / "m.onnx")
    assert written == [tmp_path / "m.onnx.data", tmp_path / "m.onnx"]
    assert model.SerializeToString() == before
    on_disk = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    external = {t.name for t in on_disk.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"fc"}  # only tensors over large.BIG_TENSOR leave the model file
    assert (tmp_path / "m.onnx").stat().st_size < 4000
    x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    want = ort.InferenceSession(before).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    reloaded = load_model(tmp_path / "m.onnx")  # our hardened loader accepts what we write
    assert (
        numpy_helper.to_array(reloaded.graph.initializer[2]).tobytes()
        == numpy_helper.to_array(model.graph.initializer[2]).tobytes()
    )


def test_checker_and_version_converter_on_the_skeleton(small_limit, monkeypatch):
    """The checker and the version converter never receive the large tensors, and the converted
    model holds them unchanged as initializers (not as the graph inputs the skeleton used)."""
    sizes = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, **kw: (sizes.append(m.ByteSize()), real(m, **kw)))
    model = _model()
    large.check_model(model)
    assert sizes and max(sizes) < 4000
    converted = large.convert_version(model, 21)
    assert converted.opset_import[0].version == 21
    assert [i.name for i in converted.graph.input] == ["x"]
    fc = next(t for t in converted.graph.initializer if t.name == "fc")
    assert fc.raw_data == model.graph.initializer[2].raw_data


def test_cli_convert_large_model_end_to_end(tmp_path, calib, small_limit, capsys, monkeypatch):
    """Through the CLI: an external-data input, the version converter (W4 needs opset 21), ORT
    verification and an external-data output whose integers are those of the ordinary path."""
    src = tmp_path / "fp.onnx"
    large.save(_model(), src)
    out = tmp_path / "q.onnx"
    args = ["convert", str(src), "--calib", str(calib), "--out", str(out), "--w-bits", "4", "--iters", "20"]
    assert main([*args, "--quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "q.onnx.data").is_file()
    assert not list(tmp_path.glob(".q.onnx.*"))  # no temporary folder left behind
    written = load_model(out, allow_quantized=True)

    monkeypatch.setattr(large, "LIMIT", 2_000_000_000)  # the ordinary path
    reference = convert(_model(), calib, w_bits=4, iters=20)
    assert not large.is_large(reference)
    for name in ("w", "fc"):
        np.testing.assert_array_equal(read_weight_ints(written, name), read_weight_ints(reference, name))
    x = np.load(calib)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, ort.InferenceSession(reference.SerializeToString()).run(None, {"x": x})[0])


def test_existing_data_file_is_not_clobbered(tmp_path, calib, small_limit, capsys):
    """The data file counts as output too: without --force an existing one stops the run (exit 5)."""
    src = tmp_path / "fp.onnx"
    large.save(_model(), src)
    (tmp_path / "q.onnx.data").write_bytes(b"keep me")
    code = main(["convert", str(src), "--calib", str(calib), "--out", str(tmp_path / "q.onnx"), "--method", "nearest"])
    err = capsys.readouterr().err
    assert code == 5 and "q.onnx.data exists" in err, err
    assert (tmp_path / "q.onnx.data").read_bytes() == b"keep me"
    assert not (tmp_path / "q.onnx").exists()


def _external(model: onnx.ModelProto, path: Path) -> Path:
    """`model` saved the way exporters save big models: every tensor of 1 kB or more in `<name>.data`."""
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return path


def test_external_weights_stay_mapped_until_a_layer_reads_them(tmp_path, calib):
    """A conversion leaves external weights in their file: loaded as references (nothing read), run
    by the torch executor straight from a copy-on-write memory map (the OS reads a weight's pages
    when its layer runs and may drop them again), and the output holds the same integers and bytes
    as converting the model from memory; the output is a plain, self-contained model."""
    src = _external(_model(), tmp_path / "fp.onnx")
    loaded = load_model(src, map_external=True)
    fc = next(t for t in loaded.graph.initializer if t.name == "fc")
    assert large.mapped(fc) and not fc.raw_data  # a reference to the checked file, by absolute path
    assert isinstance(large.to_array(fc), np.memmap)
    np.testing.assert_array_equal(large.to_array(fc), numpy_helper.to_array(_model().graph.initializer[2]))
    assert large.is_large(loaded)  # so no mapped reference ever reaches C++ (checker, converter, ORT)
    large.check_model(loaded)

    from qcb_onnx import quantize

    streamed = quantize(str(src), np.load(calib), w_bits=4, method="nearest")
    address = streamed.graph.params["fc"].data_ptr()
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    mapped_from = {
        m[-1] for m in maps if len(m) > 5 and int(m[0].split("-")[0], 16) <= address < int(m[0].split("-")[1], 16)
    }
    assert mapped_from == {str((tmp_path / "fp.onnx.data").resolve())}  # the executor reads the file's pages
    assert not any(t.data_location == TensorProto.EXTERNAL for t in streamed.model.graph.initializer)
    in_memory = convert(_model(), np.load(calib), w_bits=4, method="nearest")
    assert streamed.model.SerializeToString() == in_memory.SerializeToString()
    efrap = [convert(m, np.load(calib), w_bits=4, error_budget=0.25) for m in (str(src), _model())]
    assert efrap[0].SerializeToString() == efrap[1].SerializeToString()


def test_mapped_weights_are_copied_into_a_large_output(tmp_path, calib, small_limit, capsys):
    """Where the output is over the limit, float weights still mapped from the input are copied into
    the output's data file in chunks, byte for byte, and ORT runs the result like the in-memory one."""
    src = _external(_model(), tmp_path / "fp.onnx")
    out = tmp_path / "q.onnx"
    argv = ["convert", str(src), "--calib", str(calib), "--out", str(out), "--exclude", "fc", "--method", "nearest"]
    assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
    written = onnx.load(out, load_external_data=False)
    fc = next(t for t in written.graph.initializer if t.name == "fc")
    assert fc.data_location == TensorProto.EXTERNAL and not large.mapped(fc)  # relative, in q.onnx.data
    x = np.load(calib)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    want = convert(_model(), x, method="nearest", exclude=["fc"])
    np.testing.assert_array_equal(got, ort.InferenceSession(want.SerializeToString()).run(None, {"x": x})[0])


def test_real_model_over_2gb(tmp_path):
    """No lowered limit: eight 8192x8192 Gemms (2.15 GB of FP32) written with external data, loaded,
    converted (nearest, W8A8), verified in ORT, with nearest integers in the result.  About 100 s and
    11.4 GB peak RSS on the 2-core machine (17 GB before the conversion mapped external weights instead
    of reading them: the test itself builds the 2.15 GB model in memory and writes it first)."""
    n, layers = 8192, 8
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = rng.random((n, n), dtype=np.float32)
        w -= 0.5
        w *= np.float32(3.4 / np.sqrt(n))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        del w
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}"], [f"g{i}"], name=f"fc{i}", transB=1))
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"], name=f"relu{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    del inits
    assert large.is_large(model)
    src = tmp_path / "big.onnx"
    large.save(model, src)
    del model
    assert (tmp_path / "big.onnx.data").stat().st_size > large.LIMIT
    t0 = time.perf_counter()
    calib = np.random.default_rng(1).random((8, n), dtype=np.float32)
    q = convert(src, calib, method="nearest", calib_size=8)  # verify() runs inside: checker, ints, ORT
    assert time.perf_counter() - t0 < 600
    w0 = np.random.default_rng(0).random((n, n), dtype=np.float32)  # the first weight again, as built above
    w0 -= 0.5
    w0 *= np.float32(3.4 / np.sqrt(n))
    grid = weight_grid(8)
    scale = weight_scales(w0, grid, 0)
    nearest = np.clip(np.round(scaled(w0, scale, 0)), grid.qmin, grid.qmax)  # == ORT's (test_nearest_matches_ort)
    np.testing.assert_array_equal(read_weight_ints(q, "w0"), nearest)
