"""The exceptions cloudckpt raises.

Every error names what failed, where (URL and file) and what to do about it.
Errors from storage backends (botocore, gcsfs, OSError) are wrapped so that a
user never has to read a traceback from deep inside a client library; the
original exception stays available as ``__cause__``, unless its text held a
credential: then a ``RedactedError`` with its type name and redacted text
stands in for it. Every URL in a message is in its display form
(``cloudckpt.urls.display_url``): credentials masked.
"""

from __future__ import annotations

import operator
from typing import Any

__all__ = [
    "CloudCkptError",
    "ConfigError",
    "RemoteError",
    "UploadError",
    "FencedError",
    "IntegrityError",
    "ManifestError",
    "RedactedError",
    "WorkerFailedError",
]


class CloudCkptError(Exception):
    """Base class of every error raised by cloudckpt.

    Every one pickles with its attributes (``multiprocessing``, Ray), although some take keyword-only
    arguments, which ``Exception``'s own pickling (the positional ``args`` only) cannot rebuild.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[CloudCkptError], args: tuple[Any, ...], state: dict[str, Any]) -> CloudCkptError:
    """An unpickled ``CloudCkptError``: its ``args`` and attributes as pickled, without calling its ``__init__``."""
    error = cls.__new__(cls, *args)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(CloudCkptError, ValueError):
    """Bad configuration: an unusable URL, directory or argument.

    Also a ``ValueError``, so code written against TensorFlow's hook that
    catches ``ValueError`` for bad arguments keeps working.
    """


def integer_option(value: object) -> int | None:
    """``value`` as a plain ``int`` when it is an integer other than a bool (anything ``operator.index``
    takes: an ``int``, a numpy integer...), else None (a float, a bool, a string...).

    How the options objects validate their integer fields (``TransferOptions``, ``RetentionPolicy``,
    ``RetryPolicy``): they store the plain ``int``, so a numpy integer never reaches JSON or ``random``.
    """
    if isinstance(value, bool):
        return None
    try:
        return int(operator.index(value))  # type: ignore[arg-type]
    except TypeError:
        return None


def bool_option(value: object) -> bool | None:
    """``value`` as a plain ``bool`` when it is one or a numpy bool (``np.True_``, what a comparison of numpy
    values gives), else None (an int, a string, None...)."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # numpy 2 and 1
        return bool(value)
    return None


def number_option(value: object) -> float | None:
    """``value`` as a ``float`` when it is a real number other than a bool or NaN (an ``int``, a ``float``,
    a numpy scalar...), else None (a string, a bool, None...). How the options objects validate their
    seconds and hours fields (``RetryPolicy``, ``RetentionPolicy``)."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return None if math.isnan(number) else number


# The hint of an error whose cause has no specific advice (remote.storage_error): a library user configures
# logging; the command line says "--debug" instead (cli.CLI_DEBUG_HINT replaces it in what it prints).
DEBUG_HINT = "rerun with logging at DEBUG for details"


def human_size(n: int) -> str:
    """``n`` bytes in binary units for messages and CLI output, as the options take sizes (``16MiB``):
    ``"307 B"`` below 1 KiB, else one decimal in the largest unit it reaches: ``"12.3 KiB"``, ``"262.1 MiB"``,
    ``"2.0 GiB"`` (1 KiB = 1024 bytes; TiB is the largest unit). A value that would round to 1024.0 of a unit
    is shown in the next one (``"1.0 MiB"``, not ``"1024.0 KiB"``)."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class RemoteError(CloudCkptError):
    """A storage operation failed.

    Attributes:
        url: the object or directory URL the operation was on.
        transient: True when retrying may succeed (throttling, 5xx, resets).
    """

    def __init__(self, message: str, *, url: str, transient: bool) -> None:
        super().__init__(message)
        self.url = url
        self.transient = transient


class UploadError(CloudCkptError):
    """A checkpoint could not be committed to the remote directory.

    Attributes:
        url: the remote checkpoint directory.
        step: the global step of the checkpoint that failed, if known.
    """

    def __init__(self, message: str, *, url: str, step: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.step = step


class FencedError(UploadError):
    """A newer writer registered on the checkpoint directory: this one commits nothing more.

    Raised by the next commit of a writer (a hook, ``cloudckpt push``...) after
    another writer has started on the same directory (the newest writer wins).
    Nothing this writer uploaded after that can become part of a committed
    checkpoint.

    Attributes:
        url: the remote checkpoint directory (display form).
        step: the step whose commit was refused, if any.
        newer_writer: a description of the newer writer (id, host, pid, start time).
    """

    def __init__(self, message: str, *, url: str, step: int | None = None, newer_writer: str = "") -> None:
        super().__init__(message, url=url, step=step)
        self.newer_writer = newer_writer


class IntegrityError(CloudCkptError):
    """Checkpoint bytes do not match their manifest (size, crc32c or a missing file)."""


class ManifestError(IntegrityError):
    """A manifest cannot be read: malformed JSON, wrong schema or a newer format version."""


class WorkerFailedError(CloudCkptError):
    """Another worker of a multi-worker job failed in cloudckpt; this worker stops too, at the same step.

    Raised on every other worker at the call where the workers agreed on the failure
    (``CheckpointManager.should_stop()``, ``restore_or_initialize()``; the batch end of
    ``cloudckpt.keras.BackupAndRestore``), while the failed worker raises its own error
    there (e.g. ``UploadError``). Its cause is in that worker's log.

    Attributes:
        workers: the failed tasks (``("worker:0",)``).
        errors: the type name of each one's error (``("UploadError",)``), in the same order.
    """

    def __init__(self, message: str, *, workers: tuple[str, ...], errors: tuple[str, ...]) -> None:
        super().__init__(message)
        self.workers = workers
        self.errors = errors


class RedactedError(Exception):
    """Stands in, as ``__cause__``, for a backend exception whose text held a credential.

    Its message is ``<original type>: <original message, redacted>``; its
    traceback is the original's (code locations only, no values).

    Attributes:
        original_type: the qualified name of the exception it replaces.
    """

    def __init__(self, message: str, *, original_type: str) -> None:
        super().__init__(message)
        self.original_type = original_type
