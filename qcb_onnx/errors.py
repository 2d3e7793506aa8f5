"""User-facing errors.

Every mistake a user can make (bad file, unsupported op, broken calibration data) is raised as a
`QcbError` subclass.  The CLI prints ``error: <message>`` on one line and exits with the class's
code, so scripts can tell the failure classes apart without parsing text.  Anything else that
escapes is a bug in qcb-onnx and keeps its traceback.
"""

from __future__ import annotations


class QcbError(Exception):
    """Base class: a one-line message meant for the user, and a process exit code."""

    exit_code = 1


class UsageError(QcbError):
    """Bad command-line options or API arguments."""

    exit_code = 2


class UnsupportedModelError(QcbError):
    """The model is valid ONNX but uses something qcb-onnx cannot quantize (op type, dtype, ...)."""

    exit_code = 2


class ModelFileError(QcbError):
    """The model file is missing, not ONNX, truncated, or structurally invalid."""

    exit_code = 3


class CalibrationDataError(QcbError):
    """Calibration or evaluation data is missing, empty, non-finite or does not fit the model."""

    exit_code = 4


class OutputExistsError(QcbError):
    """The output path exists and ``--force`` was not given."""

    exit_code = 5


class VerificationError(QcbError):
    """The written model failed a post-write check (ONNX checker, ORT load, integer weights)."""

    exit_code = 6
