"""Optional frameworks: TensorFlow is an extra of cloudckpt, not a requirement.

``pip install cloudckpt`` brings what listing, verifying, downloading, uploading,
rolling back and pruning checkpoints need (fsspec and its backends), and the CLI.
The TensorFlow adapters (``CheckpointSaverHook``, ``UploadListener``,
``CheckpointManager``) need TensorFlow; imported without it they raise a ``ModuleNotFoundError`` (an
``ImportError``) that names the pip command, instead of Python's bare "No
module named 'tensorflow'". A requirement on ``tensorflow-cpu`` would install it
next to (and over) a GPU build of ``tensorflow``, so none is declared: any
installed TensorFlow >= 2.16 serves (``pyproject.toml``, extra ``tensorflow``).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Framework:
    """An optional framework: its display name and how to install it."""

    title: str
    install: str  # the command, e.g. pip install 'cloudckpt[tensorflow]'
    hint: str = ""  # appended to the command: what it installs, alternatives


# Top-level module name -> the framework it belongs to.
FRAMEWORKS: dict[str, Framework] = {
    "tensorflow": Framework(
        "TensorFlow", "pip install 'cloudckpt[tensorflow]'",
        " (tensorflow-cpu on x86_64), or any TensorFlow >= 2.16 of your choice, e.g. "
        "pip install 'tensorflow[and-cuda]' for GPUs"),
}


def missing_framework(feature: str, exc: ModuleNotFoundError, *, install: str | None = None
                      ) -> ModuleNotFoundError | None:
    """The error to raise when ``feature`` failed to import with ``exc``, or None.

    Only a framework that is absent altogether is translated (``exc.name`` is
    exactly its top-level module); a broken installation (a missing submodule
    or shared library) keeps its own error. ``install`` replaces the
    framework's own install command (``cloudckpt demo`` needs the demo extra).
    """
    framework = FRAMEWORKS.get(exc.name or "")
    if framework is None:
        return None
    how = install or framework.install + framework.hint
    return ModuleNotFoundError(
        f"{feature} needs {framework.title}, which is not installed in this Python environment ({sys.executable}). "
        f"Install it with: {how}.", name=exc.name)


def import_framework(module: str, feature: str, *, install: str | None = None) -> ModuleType:
    """Import ``module`` (a framework, or a cloudckpt module that imports one) for ``feature``.

    If the framework is not installed, the error raised says how to install it.

    Raises:
        ModuleNotFoundError: the framework is not installed (the message names the pip command).
        ImportError: anything else the import raises, unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        error = missing_framework(feature, exc, install=install)
        if error is None:
            raise
        raise error from exc
