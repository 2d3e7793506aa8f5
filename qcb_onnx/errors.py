"""User-facing errors.

Every mistake a user can make (bad file, unsupported op, broken calibration data) is raised as a
`QcbError` subclass.  The CLI prints ``error: <message>`` on one line and exits with the class's
code, so scripts can tell the failure classes apart without parsing text.  Anything else that
escapes is a bug in qcb-onnx and keeps its traceback.

Exit codes (also documented in SECURITY.md):

====  ======================================================================================
code  meaning
====  ======================================================================================
0     success
1     any other `QcbError` (not raised directly)
2     `UsageError` (bad options) and `UnsupportedModelError` (valid ONNX we cannot quantize)
3     `ModelFileError`: missing, empty, not ONNX, truncated or corrupt protobuf, checker failure
4     `CalibrationDataError`
5     `OutputExistsError`
6     `VerificationError`
7     `ExternalDataError`: external-data location escapes the model folder, missing or unreadable
8     `InvalidGraphError`: cycle, duplicate tensor name, undefined input, data/dims mismatch
9     `InvalidWeightsError`: NaN/Inf weights, zero-sized weights, huge or negative dims, magnitudes
      that overflow float32 arithmetic
10    not an error: ``scan --fail-on-suspicious`` found the model suspicious (`EXIT_SUSPICIOUS`)
11    `OutputError`: the output location is unusable (missing or read-only folder, a directory)
      or writing failed (disk full, I/O error)
130   interrupted (Ctrl-C)
====  ======================================================================================

`ExternalDataError`, `InvalidGraphError` and `InvalidWeightsError` subclass `ModelFileError`, so
``except ModelFileError`` still catches every "this model file is bad" case.
"""

from __future__ import annotations

EXIT_SUSPICIOUS = 10  # `scan --fail-on-suspicious` on a suspicious verdict: a result, so no QcbError


class QcbError(Exception):
    """Base class: a one-line message meant for the user, and a process exit code (`code=` of a subclass)."""

    exit_code = 1

    def __init_subclass__(cls, code: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.exit_code = code


class UsageError(QcbError, code=2):
    """Bad command-line options or API arguments."""


class UnsupportedModelError(QcbError, code=2):
    """The model is valid ONNX but uses something qcb-onnx cannot quantize (op type, dtype, ...)."""


class ModelFileError(QcbError, code=3):
    """The model file is missing, not ONNX, truncated, or structurally invalid."""


class CalibrationDataError(QcbError, code=4):
    """Calibration or evaluation data is missing, empty, non-finite or does not fit the model."""


class OutputExistsError(QcbError, code=5):
    """The output path exists and ``--force`` was not given."""


class VerificationError(QcbError, code=6):
    """The written model failed a post-write check (ONNX checker, ORT load, integer weights)."""


class ExternalDataError(ModelFileError, code=7):
    """External tensor data is unsafe or unusable: its location escapes the model folder (``../``,
    absolute path, symlink resolving outside), or the file is missing, not a regular file or too short."""


class InvalidGraphError(ModelFileError, code=8):
    """The graph is structurally broken: a cycle, a tensor name defined twice, an input nothing
    defines, or a tensor whose data does not match its declared dims."""


class InvalidWeightsError(ModelFileError, code=9):
    """Weights that cannot be quantized safely: NaN/Inf values, zero-sized weights, or dims that are
    negative or declare more than 2**31 elements."""


class OutputError(QcbError, code=11):
    """The output cannot be written: its folder is missing or not writable, the path is a directory,
    or the write itself failed (disk full, I/O error).  Checked before any work where possible."""


class QcbNote(UserWarning):
    """Something the user should know that is not an error (e.g. which array of an .npz was used);
    the CLI prints it as one ``note:`` line."""
