"""A regular (non-editable) install ships every subpackage, and `passes/` only as `qcb_onnx.passes`."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    """An editable install finds unlisted subpackages anyway; a wheel would silently drop them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "qcb_onnx").rglob("__init__.py")} | {
        "qcb_onnx.passes"
    }
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["qcb_onnx.passes"] == "passes"
    assert "passes" not in listed  # never a top-level `passes` module in site-packages


def test_every_data_file_is_shipped():
    """A data file inside a package (the scan's clean reference) must be in package-data, or a wheel
    install fails at the first scan."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {(pkg, name) for pkg, names in config.get("package-data", {}).items() for name in names}
    data = {
        (".".join(f.parent.relative_to(ROOT).parts), f.name)
        for f in (ROOT / "qcb_onnx").rglob("*")
        if f.is_file() and f.suffix in {".json", ".toml", ".txt", ".html", ".js", ".css"}
    }
    assert data <= shipped, f"missing from [tool.setuptools.package-data]: {sorted(data - shipped)}"
