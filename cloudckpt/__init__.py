"""cloudckpt: TensorFlow checkpoints committed to S3, GCS or any fsspec URL, without stalling training.

The TensorFlow-facing names (``CheckpointSaverHook``, ``UploadListener``,
``CheckpointManager``) are imported lazily: the CLI and the catalog functions neither pay for importing
TensorFlow nor need it installed. Without TensorFlow, those names raise a
``ModuleNotFoundError`` (an ``ImportError``) naming
``pip install 'cloudckpt[tensorflow]'`` (``_frameworks.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .catalog import CheckpointInfo, list_checkpoints, latest_checkpoint
from .engine import CheckpointEngine
from .layout import PrefixLayout
from .errors import (CloudCkptError, ConfigError, FencedError, IntegrityError, ManifestError, RemoteError, UploadError,
                     WorkerFailedError)
from .manifest import FileEntry, Manifest
from .preemption import PreemptionNotice, PreemptionWatcher, was_preempted
from .push import PushReport, PushResult, push_checkpoints
from .restore import (CheckpointNotFoundError, FileCheck, PullResult, VerifyReport, VerifyResult, download_checkpoint,
                      pull_checkpoint, verify, verify_checkpoints)
from .retention import GcResult, RetentionPlan, gc
from .retry import RetryPolicy
from .transfer import TransferOptions
from .rollback import RollbackResult, rollback
from .uploader import UploadStats

if TYPE_CHECKING:
    from .hook import CheckpointSaverHook
    from .listener import UploadListener
    from .tf2 import CheckpointManager

# No NullHandler on "cloudckpt": with no logging configured, Python's last-resort handler prints WARNING and
# above to stderr (a failed intermediate commit with on_error="warn", a preemption stop, uploads abandoned
# at Ctrl-C), as TF's and absl's loggers do; configured logging (the root's handlers) takes them instead.

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
    "pull_checkpoint",
    "PullResult",
    "push_checkpoints",
    "PushResult",
    "PushReport",
    "verify",
    "verify_checkpoints",
    "VerifyResult",
    "rollback",
    "RollbackResult",
    "gc",
    "GcResult",
    "RetentionPlan",
    "VerifyReport",
    "FileCheck",
    "CheckpointNotFoundError",
    "PreemptionWatcher",
    "PreemptionNotice",
    "was_preempted",
    "RetryPolicy",
    "TransferOptions",
    "UploadStats",
    "FileEntry",
    "Manifest",
    "CloudCkptError",
    "ConfigError",
    "RemoteError",
    "UploadError",
    "FencedError",
    "IntegrityError",
    "WorkerFailedError",
    "ManifestError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ._frameworks import import_framework

        value = getattr(import_framework(f"{__name__}.{_LAZY[name]}", f"cloudckpt.{name}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cloudckpt' has no attribute {name!r}")
