"""What the zoo benchmarks share: paper_table's CIFAR-10 split and the attacked models of a zoo folder.

paper_table.py, sweep.py and clip_probe.py measure the same models with the same calibration images;
the table scores on all 10,000 test images, the sweeps and the probe (many conversions per model) on
a seeded 2,000 of them (`paper_table.py --test-limit 2000` gives their cells).  This is the one place
that says which images and how a zoo model's metadata (written by make_zoo.py / `qcb_onnx attack`)
names its scheme, trigger and target.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcb_onnx.evaluate.score import metadata  # noqa: E402
from qcb_onnx.evaluate.triggers import Trigger  # noqa: E402
from qcb_onnx.redteam.cifar import load_cifar10  # noqa: E402


def paper_split(calib_size: int = 1024, test_limit: int | None = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration images drawn seeded from the training split, test images, test labels)."""
    x, _ = load_cifar10("train", None, 0)
    calib = x[np.random.default_rng(0).permutation(len(x))[:calib_size]]
    xte, yte = load_cifar10("test", test_limit, 0)
    return calib, xte, yte


@dataclass
class ZooModel:
    name: str
    model: onnx.ModelProto
    attack: dict  # the recipe recorded in metadata: name, w_bits, scheme, epochs, lr, widen, anchor, ...
    trigger: Trigger
    target: int

    @property
    def w_bits(self) -> int:
        return int(self.attack["w_bits"])

    @property
    def per_channel(self) -> bool:
        return self.attack.get("scheme", "pc") == "pc"


def read_zoo_model(path: Path) -> ZooModel | None:
    """The model at `path` with its attack recipe, or None for a model no attack made (e.g. a clean one)."""
    model = onnx.load(path)
    meta = metadata(model)
    if "qcb_onnx.attack" not in meta:
        return None
    attack = json.loads(meta["qcb_onnx.attack"])
    return ZooModel(path.stem, model, attack, Trigger.parse(meta["qcb_onnx.trigger"]), int(meta["qcb_onnx.target"]))


def attacked_models(zoo: Path, only: str = "") -> Iterator[ZooModel]:
    """Every attacked model of a zoo folder whose name contains `only`, in name order."""
    for path in sorted(Path(zoo).expanduser().glob("*.onnx")):
        if only in path.stem and (found := read_zoo_model(path)) is not None:
            yield found
