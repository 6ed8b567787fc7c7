"""cloudckpt: TensorFlow checkpoints committed to S3, GCS or any fsspec URL, without stalling training.

The TensorFlow-facing names (``CheckpointSaverHook``, ``UploadListener``,
``CheckpointManager``) are imported lazily so that the CLI and the catalog functions do not pay for
importing TensorFlow.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .catalog import CheckpointInfo, list_checkpoints, latest_checkpoint
from .engine import CheckpointEngine
from .layout import PrefixLayout
from .errors import CloudCkptError, ConfigError, FencedError, IntegrityError, ManifestError, RemoteError, UploadError
from .manifest import FileEntry, Manifest
from .preemption import PreemptionNotice, PreemptionWatcher, was_preempted
from .restore import CheckpointNotFoundError, FileCheck, VerifyReport, download_checkpoint, verify
from .retry import RetryPolicy
from .rollback import RollbackResult, rollback
from .uploader import UploadStats

if TYPE_CHECKING:
    from .hook import CheckpointSaverHook
    from .listener import UploadListener
    from .tf2 import CheckpointManager

logging.getLogger("cloudckpt").addHandler(logging.NullHandler())

_LAZY = {"CheckpointSaverHook": "hook", "UploadListener": "listener", "CheckpointManager": "tf2"}

__all__ = [
    "__version__",
    "CheckpointSaverHook",
    "UploadListener",
    "CheckpointManager",
    "CheckpointEngine",
    "PrefixLayout",
    "CheckpointInfo",
    "list_checkpoints",
    "latest_checkpoint",
    "download_checkpoint",
    "verify",
    "rollback",
    "RollbackResult",
    "VerifyReport",
    "FileCheck",
    "CheckpointNotFoundError",
    "PreemptionWatcher",
    "PreemptionNotice",
    "was_preempted",
    "RetryPolicy",
    "UploadStats",
    "FileEntry",
    "Manifest",
    "CloudCkptError",
    "ConfigError",
    "RemoteError",
    "UploadError",
    "FencedError",
    "IntegrityError",
    "ManifestError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cloudckpt' has no attribute {name!r}")
