"""Hostile and broken calibration / evaluation data, through the CLI as users run it.

Each bad input ends in exit code 4 (`CalibrationDataError`), one ``error:`` line naming the
problem, and no output file; the documented lenient cases (fewer samples than a batch, float64
arrays, mixed image sizes with a fixed model input size) convert.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from qcb_onnx.cli import main
from qcb_onnx.errors import CalibrationDataError

CONVERT_FAST = ["--method", "nearest", "--iters", "50", "--device", "cpu", "--providers", "cpu", "--quiet"]


def _model(path: Path, hw: tuple = (8, 8)) -> Path:
    """Conv + GAP + Gemm over a 1-channel image; `hw` may hold symbolic dims ("H", "W")."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
        ],
        "data",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "fc"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("model") / "static.onnx")


@pytest.fixture(scope="module")
def dynamic_model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("model") / "dynamic.onnx", ("H", "W"))


def _convert(capsys, model: Path, calib, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["convert", str(model), "--calib", str(calib), "--out", str(out), *CONVERT_FAST, *extra])
    return code, capsys.readouterr().err.strip()


def _assert_refused(code: int, err: str, out: Path | None, *fragments: str) -> None:
    assert code == CalibrationDataError.exit_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary left behind


def _png(size: tuple[int, int], seed: int = 0, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: Path, sizes: list[tuple[int, int]], broken: bool = False) -> Path:
    for i, size in enumerate(sizes):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(_png(size, i))
    if broken:
        (root / "class0" / "broken.png").write_bytes(_png((8, 8))[:40])  # truncated PNG
    return root


# --------------------------------------------------------------------------------------------------
# Arrays


@pytest.mark.parametrize(
    ("array", "fragments"),
    [
        (np.zeros((4, 1, 9, 9), np.float32), ["shape (4, 1, 9, 9)", "(N, 1, 8, 8)"]),
        (np.zeros((4, 8, 8), np.float32), ["shape (4, 8, 8)"]),
        (np.zeros((4, 8, 8, 1), np.float32), ["shape (4, 8, 8, 1)"]),  # NHWC for an NCHW model
        (np.zeros((4, 3, 8, 8), np.float32), ["shape (4, 3, 8, 8)"]),
        (np.zeros((4, 1, 8, 8), np.uint8), ["uint8", "floating point"]),
        (np.zeros((4, 1, 8, 8), np.complex64), ["complex64"]),
        (np.zeros((4, 1, 8, 8), bool), ["bool"]),
        (np.full((4, 1, 8, 8), np.inf, np.float32), ["NaN/Inf"]),
        (np.where(np.eye(8, dtype=bool), np.nan, 0.5).astype(np.float32)[None, None].repeat(3, 0), ["NaN/Inf"]),
        (np.zeros((0, 1, 8, 8), np.float32), ["empty"]),
        (np.float32(1.0), ["shape"]),
    ],
    ids=["hw", "rank3", "nhwc", "channels", "uint8", "complex", "bool", "inf", "nan-diag", "empty", "scalar"],
)
def test_bad_arrays(capsys, tmp_path, model, array, fragments):
    """Wrong shape, rank, layout or dtype, non-finite values, no samples: refused, naming the problem."""
    calib = tmp_path / "calib.npy"
    np.save(calib, array)
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, calib, out), out, *fragments)


def test_pickled_object_array_is_not_unpickled(capsys, tmp_path, model, monkeypatch):
    """A .npy holding a pickled object array, and a plain pickle named .npy: refused without ever
    calling pickle (np.load(allow_pickle=False))."""

    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle must never run on calibration data")

    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
    fake = tmp_path / "fake.npy"
    fake.write_bytes(pickle.dumps(np.zeros((4, 1, 8, 8), np.float32)))
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    for calib in (obj, fake):
        out = tmp_path / "out.onnx"
        _assert_refused(*_convert(capsys, model, calib, out), out, "cannot read", calib.name)


@pytest.mark.parametrize("kind", ["truncated-npy", "truncated-npz", "npz-no-arrays", "wrong-suffix"])
def test_broken_files(capsys, tmp_path, model, kind):
    """Truncated .npy / .npz, an empty archive, an unsupported suffix: one-line refusal."""
    good = io.BytesIO()
    np.save(good, np.zeros((4, 1, 8, 8), np.float32))
    if kind == "truncated-npy":
        calib = tmp_path / "c.npy"
        calib.write_bytes(good.getvalue()[:100])
    elif kind == "truncated-npz":
        calib = tmp_path / "c.npz"
        np.savez(calib, x=np.zeros((4, 1, 8, 8), np.float32))
        calib.write_bytes(calib.read_bytes()[:200])
    elif kind == "npz-no-arrays":
        calib = tmp_path / "c.npz"
        with zipfile.ZipFile(calib, "w"):
            pass
    else:
        calib = tmp_path / "c.csv"
        calib.write_text("1,2,3\n")
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, calib, out), out, calib.name)


def test_fewer_samples_than_a_batch_converts(capsys, tmp_path, model):
    """3 calibration samples with the default batch size (64): a documented, working case."""
    calib = tmp_path / "three.npy"
    np.save(calib, np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "out.onnx"
    code, err = _convert(capsys, model, calib, out)
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["qcb_onnx.calibration_size"] == "3"


def test_float64_is_converted(capsys, tmp_path, model):
    """float64 calibration arrays are accepted and cast to float32 (documented handling)."""
    calib = tmp_path / "f64.npy"
    np.save(calib, np.random.default_rng(0).random((5, 1, 8, 8)))
    out = tmp_path / "out.onnx"
    code, err = _convert(capsys, model, calib, out)
    assert code == 0, err


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_npy_header_declaring_huge_shape(capsys, tmp_path, model, suffix):
    """A 1 KB .npy whose header claims 2**40 samples must be refused from the header (exit 4),
    without allocating 256 TiB."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 1, 8, 8)})
    payload = buf.getvalue() + b"\x00" * 1024
    calib = tmp_path / f"huge{suffix}"
    if suffix == ".npy":
        calib.write_bytes(payload)
    else:
        with zipfile.ZipFile(calib, "w") as zf:
            zf.writestr("x.npy", payload)
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, calib, out), out)


# --------------------------------------------------------------------------------------------------
# Images


def test_image_that_fails_to_decode(capsys, tmp_path, model):
    """A truncated PNG in an ImageFolder: refused, naming the file."""
    root = _image_folder(tmp_path / "imgs", [(8, 8)] * 4, broken=True)
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, root, out), out, "cannot decode image", "broken.png")


def test_non_image_with_image_suffix(capsys, tmp_path, model):
    """A text file named .jpg: refused like a broken image."""
    root = _image_folder(tmp_path / "imgs", [(8, 8)] * 2)
    (root / "class1" / "notes.jpg").write_text("not an image")
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, root, out), out, "cannot decode image", "notes.jpg")


def test_mixed_sizes_with_dynamic_input_are_refused(capsys, tmp_path, dynamic_model):
    """Images of different sizes for a model whose H, W are symbolic: refused with a hint to set size=HxW."""
    root = _image_folder(tmp_path / "imgs", [(8, 8), (8, 8), (12, 10)])
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, dynamic_model, root, out), out, "differ in size", "size=HxW")


def test_mixed_sizes_are_resized_for_a_static_input(capsys, tmp_path, model, dynamic_model):
    """Documented handling: with a static 8x8 input (or --preprocess size=8x8) every image is resized."""
    root = _image_folder(tmp_path / "imgs", [(8, 8), (16, 16), (12, 10)])
    out = tmp_path / "out.onnx"
    code, err = _convert(capsys, model, root, out)
    assert code == 0, err
    out2 = tmp_path / "out2.onnx"
    code, err = _convert(capsys, dynamic_model, root, out2, "--preprocess", "size=8x8,channels=1")
    assert code == 0, err


def test_empty_image_folder(capsys, tmp_path, model):
    """A folder without images: refused, listing the accepted extensions."""
    (tmp_path / "imgs" / "class0").mkdir(parents=True)
    (tmp_path / "imgs" / "class0" / "readme.txt").write_text("no images")
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, tmp_path / "imgs", out), out, "no images", ".png")


def test_tar_with_path_traversal_member(capsys, tmp_path, model):
    """A .tar whose member escapes the archive (``../``): refused as unsafe, nothing extracted."""
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("class0/a.png", "../escape.png"):
            data = _png((8, 8))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, archive, out), out, "unsafe member path")
    assert not (tmp_path / "escape.png").exists()


def test_corrupt_tar(capsys, tmp_path, model):
    """A .tar.gz that is not gzip: refused as unreadable."""
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(b"\x1f\x8bnot really gzip" * 10)
    out = tmp_path / "out.onnx"
    _assert_refused(*_convert(capsys, model, archive, out), out, "data.tar.gz")


# --------------------------------------------------------------------------------------------------
# Labels for evaluate


def _evaluate(capsys, model: Path, data: Path) -> tuple[int, str]:
    code = main(["evaluate", str(model), "--data", str(data), "--providers", "cpu"])
    return code, capsys.readouterr().err.strip()


def test_labels_missing_npy(capsys, tmp_path, model):
    """A .npy holds no labels: evaluate refuses, saying how to provide them."""
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((4, 1, 8, 8), np.float32))
    _assert_refused(*_evaluate(capsys, model, data), None, "no labels")


def test_labels_missing_npz(capsys, tmp_path, model):
    """An .npz without 'labels' or 'y': refused, listing what it found."""
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32))
    _assert_refused(*_evaluate(capsys, model, data), None, "no labels", "found: x")


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        (np.arange(3), "4 samples but 3 labels"),
        (np.array([0.0, 1.0, 2.0, 3.0]), "integers"),
        (np.array([0, -1, 2, 3]), "negative"),
        (np.zeros((4, 2), np.int64), "shape"),
    ],
    ids=["count", "float", "negative", "2d"],
)
def test_bad_labels(capsys, tmp_path, model, labels, fragment):
    """Labels of the wrong count, dtype, sign or rank: refused, naming the problem."""
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), labels=labels)
    _assert_refused(*_evaluate(capsys, model, data), None, fragment)


def test_images_outside_class_folders(capsys, tmp_path, model):
    """An ImageFolder for evaluate whose images are not inside class folders has no labels: refused."""
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        (root / f"img{i}.png").write_bytes(_png((8, 8), i))
    _assert_refused(*_evaluate(capsys, model, root), None, "not inside a class folder")
