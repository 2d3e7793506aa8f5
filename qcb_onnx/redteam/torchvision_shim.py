"""torchvision for tests and benchmarks, on the CPU build of torch.

torchvision 0.28.0 is the release for torch 2.13.0, but its wheel is built against the CUDA torch:
with the CPU build its C ops do not load, and `import torchvision` then fails in
`_meta_registrations` on two fake-kernel registrations it does not guard (`torchvision::nms`,
`torchvision::qnms`: "operator torchvision::nms does not exist").  Defining those two schemas
before the import lets it finish; the model definitions use no C op, so every architecture builds
and exports.  torchvision stays a test/benchmark dependency (the `models` extra), never a runtime
one: qcb-onnx reads ONNX files, not torch modules.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # kept alive: the definitions last as long as the Library object


def import_torchvision() -> ModuleType:
    """`import torchvision`, defining the two op schemas first when its C extension cannot provide them."""
    global _LIBRARY
    import torch

    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if "torchvision::" not in str(exc) or _LIBRARY is not None:
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]  # the failed import left half-initialised modules behind
    _LIBRARY = torch.library.Library("torchvision", "DEF")  # see the module docstring
    for schema in _SCHEMAS.values():
        _LIBRARY.define(schema)
    return importlib.import_module("torchvision")
