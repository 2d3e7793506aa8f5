"""Tests for qcb_onnx.data: calibration / evaluation data loading, preprocessing and validation."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from qcb_onnx import data as data_mod
from qcb_onnx.data import (
    InputSpec,
    Preprocess,
    batches,
    input_specs,
    load_calibration,
    load_labelled,
)
from qcb_onnx.errors import CalibrationDataError, UsageError

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("cat", "dog", "frog")  # sorted: cat=0, dog=1, frog=2

SPEC_X = [InputSpec("x", (None, 1, 8, 8), np.dtype(np.float32))]
SPEC_IMG = [InputSpec("img", (None, 3, 4, 4), np.dtype(np.float32))]


def _error(exc_info) -> str:
    """The message of a caught error, asserting it is a single line."""
    message = str(exc_info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def _png_bytes(value: int, size=(4, 4), mode="RGB") -> bytes:
    """A solid-colour image whose channel c holds value + c (for RGB)."""
    h, w = size
    if mode == "RGB":
        pixels = np.stack([np.full((h, w), value + c, np.uint8) for c in range(3)], axis=-1)
    else:
        pixels = np.full((h, w), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: Path, per_class: int = 2, size=(4, 4)) -> dict[str, int]:
    """ImageFolder root/<class>/<i>.png; returns {relative path: pixel value} for each image."""
    values = {}
    for ci, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            value = 10 * ci + i
            rel = f"{cls}/{i}.png"
            (root / rel).write_bytes(_png_bytes(value, size))
            values[rel] = value
    return values


def _tar_of_splits(path: Path, top: str | None = "cifarish") -> Path:
    """A .tar.gz of [top/]train/<class>/*.png (2 per class) and [top/]test/<class>/*.png (1 per class)."""
    prefix = f"{top}/" if top else ""
    with tarfile.open(path, "w:gz") as tar:
        for split, per_class, offset in (("train", 2, 0), ("test", 1, 100)):
            for ci, cls in enumerate(CLASSES):
                for i in range(per_class):
                    payload = _png_bytes(offset + 10 * ci + i)
                    info = tarfile.TarInfo(f"{prefix}{split}/{cls}/{i}.png")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        readme = b"not an image"
        info = tarfile.TarInfo(f"{prefix}README.txt")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
        link = tarfile.TarInfo(f"{prefix}train/cat/link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "0.png"
        tar.addfile(link)
    return path


# ------------------------------------------------------------------------------------------------
# input_specs


def test_input_specs_symbolic_batch_and_initializer_inputs():
    """input_specs returns only real graph inputs, with None for the symbolic batch and numpy dtype."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 8, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x, w_info], [y], [w])
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    specs = input_specs(model)
    assert specs == [InputSpec("x", (None, 1, 8, 8), np.dtype(np.float32))]
    arrays = load_calibration(np.zeros((2, 1, 8, 8), np.float32), specs)
    assert arrays["x"].shape == (2, 1, 8, 8)


# ------------------------------------------------------------------------------------------------
# array sources


def test_npy_source_float64_is_cast_to_contiguous_float32(tmp_path):
    """A .npy of float64 loads as a float32 C-contiguous array with the same values."""
    arr = np.random.default_rng(0).normal(size=(5, 1, 8, 8))
    np.save(tmp_path / "calib.npy", arr)
    out = load_calibration(tmp_path / "calib.npy", SPEC_X)
    assert list(out) == ["x"]
    assert out["x"].dtype == np.float32 and out["x"].flags.c_contiguous
    np.testing.assert_allclose(out["x"], arr.astype(np.float32))
    # str paths work too, and a Fortran-ordered array comes back C-contiguous
    np.save(tmp_path / "f.npy", np.asfortranarray(arr.astype(np.float32)))
    assert load_calibration(str(tmp_path / "f.npy"), SPEC_X)["x"].flags.c_contiguous


def test_npz_multi_input_and_single_input_any_name(tmp_path):
    """An .npz maps arrays by input name; a single-input model accepts a lone array under any name."""
    specs = [InputSpec("a", (None, 2), np.dtype(np.float32)), InputSpec("b", (None, 3), np.dtype(np.float32))]
    np.savez(tmp_path / "two.npz", a=np.ones((4, 2), np.float32), b=np.zeros((4, 3)), extra=np.ones(1))
    out = load_calibration(tmp_path / "two.npz", specs)
    assert out["a"].shape == (4, 2) and out["b"].shape == (4, 3) and out["b"].dtype == np.float32
    np.savez(tmp_path / "one.npz", whatever=np.ones((3, 1, 8, 8), np.float32))
    assert load_calibration(tmp_path / "one.npz", SPEC_X)["x"].shape == (3, 1, 8, 8)
    # an evaluation npz with x and labels can also serve as calibration data
    np.savez(tmp_path / "xy.npz", inp=np.ones((3, 1, 8, 8), np.float32), labels=np.arange(3))
    assert load_calibration(tmp_path / "xy.npz", SPEC_X)["x"].shape == (3, 1, 8, 8)


def test_numpy_array_and_dict_sources():
    """In-memory sources: a bare array (single input) and a dict name -> array."""
    arr = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    np.testing.assert_array_equal(load_calibration(arr, SPEC_X)["x"], arr)
    np.testing.assert_array_equal(load_calibration({"x": arr}, SPEC_X)["x"], arr)


def test_calibration_data_reader_protocol():
    """An object with get_next() -> dict | None is drained and its batches concatenated on axis 0."""

    class Reader:
        def __init__(self):
            self.batches = iter([{"x": np.full((2, 1, 8, 8), i, np.float32)} for i in range(3)])

        def get_next(self):
            return next(self.batches, None)

    out = load_calibration(Reader(), SPEC_X)
    assert out["x"].shape == (6, 1, 8, 8)
    assert out["x"][:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    out = load_calibration(Reader(), SPEC_X, limit=3, seed=1)
    assert out["x"].shape == (3, 1, 8, 8)

    class Empty:
        def get_next(self):
            return None

    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(Empty(), SPEC_X)
    assert "0 samples" in _error(exc)


def test_onnxruntime_calibration_data_reader_subclass():
    """A real onnxruntime.quantization.CalibrationDataReader subclass is accepted."""
    quant = pytest.importorskip("onnxruntime.quantization")

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": np.ones((1, 1, 8, 8), np.float32)}] * 4)

        def get_next(self):
            return next(self.items, None)

    assert load_calibration(Reader(), SPEC_X)["x"].shape == (4, 1, 8, 8)


def test_labelled_npz_and_tuple_sources(tmp_path):
    """load_labelled reads 'labels' or 'y' from an npz (x/y accepted for any single input name)."""
    x = np.random.default_rng(1).random((6, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2], np.int32)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    arrays, labels = load_labelled(tmp_path / "xy.npz", [InputSpec("input", (None, 1, 8, 8), np.float32)])
    np.testing.assert_array_equal(arrays["input"], x)
    assert labels.dtype == np.int64 and labels.shape == (6,) and labels.tolist() == y.tolist()
    np.savez(tmp_path / "named.npz", x=x, labels=y)
    assert load_labelled(tmp_path / "named.npz", SPEC_X)[1].tolist() == y.tolist()
    arrays, labels = load_labelled((x, y), SPEC_X, limit=2, seed=0)
    assert arrays["x"].shape == (2, 1, 8, 8) and labels.shape == (2,)


# ------------------------------------------------------------------------------------------------
# images


def test_image_folder_values_layout_and_labels(tmp_path):
    """An ImageFolder decodes to pixel*scale in NCHW, sorted file order, labels = sorted class index."""
    values = _image_folder(tmp_path / "imgs")
    arrays, labels = load_labelled(tmp_path / "imgs", SPEC_IMG)
    x = arrays["img"]
    assert x.shape == (6, 3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = [values[k] for k in sorted(values)]
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array(expected) / 255, rtol=1e-6)
    np.testing.assert_allclose(x[:, 2, 3, 3], (np.array(expected) + 2) / 255, rtol=1e-6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_preprocess_nhwc_grayscale_resize_and_normalise(tmp_path):
    """Preprocess controls resize, mean/std, NHWC layout and grayscale conversion."""
    _image_folder(tmp_path / "imgs", size=(6, 5))
    pre = Preprocess(size=(4, 4), scale=1.0, mean=(10.0,), std=(2.0,), layout="NHWC", channels=1)
    spec = [InputSpec("x", (None, 4, 4, 1), np.float32)]
    x = load_calibration(tmp_path / "imgs", spec, preprocess=pre)["x"]
    assert x.shape == (6, 4, 4, 1)
    rgb = np.full((6, 5, 3), [0, 1, 2], np.uint8)
    gray_cat0 = float(np.asarray(Image.fromarray(rgb).convert("L"))[0, 0])
    assert x[0, 0, 0, 0] == pytest.approx((gray_cat0 - 10.0) / 2.0)
    # per-channel mean/std on RGB
    pre = Preprocess(size=(4, 4), mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 0.25))
    x = load_calibration(tmp_path / "imgs", SPEC_IMG, preprocess=pre)["img"]
    assert x[0, 1, 0, 0] == pytest.approx((1 / 255 - 0.25) / 0.5)
    # without a preprocess, size / layout / channels are inferred from the input shape
    x = load_calibration(tmp_path / "imgs", [InputSpec("x", (None, 3, 4, 4), np.float32)])["x"]
    assert x.shape == (6, 3, 4, 4)


def test_tar_gz_with_top_dir_and_splits(tmp_path):
    """A .tar.gz with top/train and top/test ImageFolders loads each split via ':split'; links ignored."""
    tar = _tar_of_splits(tmp_path / "data.tar.gz")
    arrays, labels = load_labelled(f"{tar}:train", SPEC_IMG)
    assert arrays["img"].shape == (6, 3, 4, 4)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(arrays["img"][:, 0, 0, 0] * 255, [0, 1, 10, 11, 20, 21], atol=1e-4)
    arrays, labels = load_labelled(f"{tar}:test", SPEC_IMG)
    assert labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(arrays["img"][:, 0, 0, 0] * 255, [100, 110, 120], atol=1e-4)
    assert load_calibration(f"{tar}:test", SPEC_IMG)["img"].shape == (3, 3, 4, 4)
    # a plain .tar without a top-level folder, and a .tgz
    for name, mode in (("plain.tar", "w"), ("d.tgz", "w:gz")):
        path = tmp_path / name
        with tarfile.open(path, mode) as out, tarfile.open(tar) as src:
            for member in src.getmembers():
                if member.isreg():
                    payload = src.extractfile(member).read()
                    member.name = member.name.split("/", 1)[1]
                    out.addfile(member, io.BytesIO(payload))
        assert load_labelled(f"{path}:test", SPEC_IMG)[1].tolist() == [0, 1, 2]


def test_directory_split_suffix(tmp_path):
    """'dir:test' means the test/ sub-folder of an image directory."""
    _image_folder(tmp_path / "root" / "train", per_class=2)
    _image_folder(tmp_path / "root" / "test", per_class=1)
    arrays, labels = load_labelled(f"{tmp_path / 'root'}:test", SPEC_IMG)
    assert arrays["img"].shape == (3, 3, 4, 4) and labels.tolist() == [0, 1, 2]
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "root", SPEC_IMG)
    assert "split folders (test, train)" in _error(exc)
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(f"{tmp_path / 'root'}:val", SPEC_IMG)
    assert "'val'" in _error(exc)


def test_tar_without_split_is_refused(tmp_path):
    """A tar holding train/ and test/ without ':split' is an error asking to choose one."""
    tar = _tar_of_splits(tmp_path / "data.tar.gz")
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tar, SPEC_IMG)
    assert "':split'" in _error(exc) and "data.tar.gz" in str(exc.value)


@pytest.mark.parametrize("bad_name", ["../evil/cat/x.png", "/abs/cat/x.png", "train/../../x.png"])
def test_tar_unsafe_member_paths_refused(tmp_path, bad_name):
    """Tar members with absolute paths or '..' components are refused, naming the member."""
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        payload = _png_bytes(1)
        for name in ("train/cat/ok.png", bad_name):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(f"{path}:train", SPEC_IMG)
    message = _error(exc)
    assert "unsafe member path" in message and bad_name in message


# ------------------------------------------------------------------------------------------------
# limit / seed


def test_limit_seed_reproducible_sorted_subset(tmp_path):
    """limit draws sorted indices with default_rng(seed) without replacement, identically every time."""
    arr = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1) * np.ones((1, 1, 8, 8), np.float32)
    np.save(tmp_path / "a.npy", arr)
    first = load_calibration(tmp_path / "a.npy", SPEC_X, limit=5, seed=7)["x"][:, 0, 0, 0]
    again = load_calibration(tmp_path / "a.npy", SPEC_X, limit=5, seed=7)["x"][:, 0, 0, 0]
    other = load_calibration(tmp_path / "a.npy", SPEC_X, limit=5, seed=8)["x"][:, 0, 0, 0]
    expected = np.sort(np.random.default_rng(7).choice(20, size=5, replace=False))
    assert first.tolist() == again.tolist() == expected.tolist()
    assert other.tolist() != first.tolist()
    assert load_calibration(arr, SPEC_X, limit=100)["x"].shape[0] == 20  # limit above N keeps all
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError):
            load_calibration(arr, SPEC_X, limit=bad)


def test_limit_on_images_decodes_only_selected_files(tmp_path, monkeypatch):
    """With limit, only the chosen images are decoded, and they match the same rows of a full load."""
    tar = _tar_of_splits(tmp_path / "data.tar.gz")
    full_x, full_y = load_labelled(f"{tar}:train", SPEC_IMG)
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    x, y = load_labelled(f"{tar}:train", SPEC_IMG, limit=2, seed=3)
    assert len(opened) == 2
    index = np.sort(np.random.default_rng(3).choice(6, size=2, replace=False))
    np.testing.assert_array_equal(x["img"], full_x["img"][index])
    assert y.tolist() == full_y[index].tolist()


# ------------------------------------------------------------------------------------------------
# Preprocess


def test_preprocess_parse_round_trip():
    """parse reads the CLI form and to_metadata writes text that parses back to an equal object."""
    text = "size=32x32,scale=0.00392156862745098,mean=0.4914/0.4822/0.4465,std=0.247/0.243/0.261,layout=NCHW,channels=3"
    pre = Preprocess.parse(text)
    assert pre.size == (32, 32) and pre.scale == 1 / 255 and pre.mean == (0.4914, 0.4822, 0.4465)
    assert pre.std == (0.247, 0.243, 0.261) and pre.layout == "NCHW" and pre.channels == 3
    assert pre.to_metadata() == text
    assert Preprocess.parse(pre.to_metadata()) == pre
    for other in (Preprocess(), Preprocess(size=(28, 24), scale=2.0, layout="NHWC", channels=1)):
        assert Preprocess.parse(other.to_metadata()) == other
    assert Preprocess.parse("") == Preprocess()
    assert Preprocess.parse("layout=nhwc, size=16").size == (16, 16)
    assert Preprocess.parse("scale=1/255").scale == pytest.approx(1 / 255)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("sise=32x32", "sise"),
        ("size=32by32", "size"),
        ("size=0x4", "size"),
        ("scale=abc", "scale"),
        ("scale=nan", "scale"),
        ("mean=0.5/x/0.5", "mean"),
        ("mean=0.5/0.5", "mean"),
        ("std=0/1/1", "std"),
        ("layout=CHW", "layout"),
        ("channels=2", "channels"),
        ("size", "size"),
        ("scale=1,scale=2", "scale"),
    ],
)
def test_preprocess_parse_errors(text, named):
    """Unknown keys and bad values raise a one-line UsageError naming the option."""
    with pytest.raises(UsageError) as exc:
        Preprocess.parse(text)
    assert named in _error(exc)


# ------------------------------------------------------------------------------------------------
# errors


def test_missing_file_and_unknown_extension(tmp_path):
    """A missing path and an unsupported file type are one-line errors naming the file."""
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "nope.npy", SPEC_X)
    assert "nope.npy" in _error(exc) and "not found" in str(exc.value)
    (tmp_path / "calib.csv").write_text("1,2,3\n")
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "calib.csv", SPEC_X)
    assert "calib.csv" in _error(exc) and ".npz" in str(exc.value)
    with pytest.raises(UsageError):
        load_calibration(42, SPEC_X)


def test_empty_data(tmp_path):
    """Zero samples is refused, naming the input."""
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "empty.npy", SPEC_X)
    assert "input 'x' is empty (0 samples)" in _error(exc) and "empty.npy" in str(exc.value)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_, np.complex64])
def test_non_float_dtypes_refused(tmp_path, dtype):
    """Integer, bool and complex arrays are refused for float inputs, naming tensor and dtype."""
    np.save(tmp_path / "ints.npy", np.zeros((2, 1, 8, 8), dtype))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "ints.npy", SPEC_X)
    message = _error(exc)
    assert "input 'x'" in message and str(np.dtype(dtype)) in message and "ints.npy" in message


def test_object_npy_refused_without_pickle(tmp_path):
    """.npy files are loaded with allow_pickle=False, so an object array is a data error."""
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "obj.npy", SPEC_X)
    assert "obj.npy" in _error(exc)


def test_shape_mismatch_messages(tmp_path):
    """Static-dim and rank mismatches name the input, the actual shape and the expected shape."""
    np.save(tmp_path / "c.npy", np.zeros((10, 1, 8, 9), np.float32))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "c.npy", SPEC_X)
    message = _error(exc)
    assert "calibration array for input 'x' has shape (10, 1, 8, 9) but the model expects (N, 1, 8, 8)" in message
    assert "c.npy" in message
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(np.zeros((1, 8, 8), np.float32), SPEC_X)
    assert "has shape (1, 8, 8) but the model expects (N, 1, 8, 8)" in _error(exc)
    spec = [InputSpec("x", (None, 3, None, None), np.float32)]
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(np.zeros((2, 1, 5, 5), np.float32), spec)
    assert "expects (N, 3, ?, ?)" in _error(exc)


def test_image_shape_mismatch_mentions_preprocess(tmp_path):
    """Images that decode to the wrong size report the shape and the preprocess used."""
    _image_folder(tmp_path / "imgs", size=(5, 5))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "imgs", SPEC_IMG, preprocess=Preprocess())
    message = _error(exc)
    assert "has shape (6, 3, 5, 5) but the model expects (N, 3, 4, 4)" in message and "preprocess" in message


def test_nan_inf_counted(tmp_path):
    """Non-finite values are counted and reported for the named input."""
    arr = np.zeros((4, 1, 8, 8), np.float32)
    arr[0, 0, 0, :2] = np.nan
    arr[3, 0, 1, 1] = np.inf
    np.savez(tmp_path / "bad.npz", x=arr)
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "bad.npz", SPEC_X)
    message = _error(exc)
    assert "calibration data for input 'x' contains 3 NaN/Inf values" in message and "bad.npz" in message


def test_different_sample_counts_and_missing_npz_inputs(tmp_path):
    """Inputs with different N, and npz files lacking an input name, are refused with the names."""
    specs = [InputSpec("a", (None, 2), np.float32), InputSpec("b", (None, 2), np.float32)]
    np.savez(tmp_path / "n.npz", a=np.zeros((4, 2), np.float32), b=np.zeros((3, 2), np.float32))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "n.npz", specs)
    assert "'a' has 4, 'b' has 3" in _error(exc)
    np.savez(tmp_path / "m.npz", a=np.zeros((4, 2), np.float32), c=np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "m.npz", specs)
    message = _error(exc)
    assert "'b'" in message and "found: a, c" in message and "m.npz" in message
    np.savez(tmp_path / "amb.npz", p=np.zeros((4, 1, 8, 8)), q=np.zeros((4, 1, 8, 8)))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "amb.npz", SPEC_X)
    assert "input 'x'" in _error(exc) and "p, q" in str(exc.value)
    np.save(tmp_path / "one.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "one.npy", specs)
    assert ".npz" in _error(exc)


def test_broken_image_named(tmp_path):
    """An image that fails to decode is reported with its file name."""
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "imgs", SPEC_IMG)
    assert "broken.jpg" in _error(exc) and "cannot decode" in str(exc.value)


def test_no_images_found(tmp_path):
    """A directory or tar without image files is refused, naming it."""
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "empty", SPEC_IMG)
    assert "no images found" in _error(exc) and "empty" in str(exc.value)
    with tarfile.open(tmp_path / "e.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "empty" / "cat" / "notes.txt", arcname="cat/notes.txt")
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "e.tar.gz", SPEC_IMG)
    assert "no images found" in _error(exc) and "e.tar.gz" in str(exc.value)


def test_differing_image_sizes_without_resize(tmp_path):
    """With size=None, images of different sizes are refused naming two files and their sizes."""
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "frog" / "big.png").write_bytes(_png_bytes(5, size=(6, 7)))
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(tmp_path / "imgs", SPEC_IMG, preprocess=Preprocess())
    message = _error(exc)
    assert "cat/0.png" in message and "4x4" in message and "big.png" in message and "7x6" in message


def test_missing_labels(tmp_path):
    """Evaluation data without usable labels (npz without labels/y, .npy, bare array, loose images) fails."""
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError) as exc:
        load_labelled(tmp_path / "x.npz", SPEC_X)
    assert "'labels' or 'y'" in _error(exc) and "x.npz" in str(exc.value)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError):
        load_labelled(tmp_path / "x.npy", SPEC_X)
    with pytest.raises(CalibrationDataError):
        load_labelled(np.zeros((2, 1, 8, 8), np.float32), SPEC_X)
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 1, 8, 8), np.float32), labels=np.array([0.0, 1.0]))
    with pytest.raises(CalibrationDataError) as exc:
        load_labelled(tmp_path / "f.npz", SPEC_X)
    assert "integers" in _error(exc)
    np.savez(tmp_path / "n.npz", x=np.zeros((2, 1, 8, 8), np.float32), labels=np.array([0, 1, 2]))
    with pytest.raises(CalibrationDataError) as exc:
        load_labelled(tmp_path / "n.npz", SPEC_X)
    assert "2 samples but 3 labels" in _error(exc)
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(_png_bytes(1))
    assert load_calibration(tmp_path / "loose", SPEC_IMG)["img"].shape == (1, 3, 4, 4)
    with pytest.raises(CalibrationDataError) as exc:
        load_labelled(tmp_path / "loose", SPEC_IMG)
    assert "a.png" in _error(exc) and "class folder" in str(exc.value)


# ------------------------------------------------------------------------------------------------
# batches


def test_batches_contiguous_slices():
    """batches yields consecutive slices over every input; the last one is smaller."""
    arrays = {"a": np.arange(10.0).reshape(10, 1), "b": np.arange(20.0).reshape(10, 2)}
    out = list(batches(arrays, 4))
    assert [len(b["a"]) for b in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["b"] for b in out]), arrays["b"])
    assert out[1]["a"][:, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(UsageError):
        list(batches(arrays, 0))


# ------------------------------------------------------------------------------------------------
# real data (optional)


@pytest.mark.skipif(not CIFAR.exists(), reason="../shared/data/cifar10-jpeg.tar.gz is absent")
def test_cifar10_tar_limit_64(monkeypatch):
    """64 labelled CIFAR-10 test images load from the shared tar.gz, decoding only those 64."""
    decoded = []
    real = data_mod._decode_images

    def spy(images, indices, pre, ctx):
        decoded.append(len(indices))
        return real(images, indices, pre, ctx)

    monkeypatch.setattr(data_mod, "_decode_images", spy)
    spec = [InputSpec("input", (None, 3, 32, 32), np.float32)]
    arrays, labels = load_labelled(f"{CIFAR}:test", spec, limit=64)
    assert arrays["input"].shape == (64, 3, 32, 32) and arrays["input"].dtype == np.float32
    assert labels.shape == (64,) and labels.min() >= 0 and labels.max() <= 9
    assert arrays["input"].min() >= 0.0 and arrays["input"].max() <= 1.0
    assert decoded == [64]


def test_red_team_reads_cifar10_from_beside_the_checkout():
    """The red team's CIFAR-10 loader looks for the archive where the project keeps it, ../shared/data
    beside the checkout (it once looked inside the package folder and found nothing on a fresh machine)."""
    from qcb_onnx.redteam import cifar

    assert cifar.ARCHIVE == CIFAR
