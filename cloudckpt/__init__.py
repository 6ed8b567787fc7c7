"""cloudckpt: TensorFlow checkpoints committed to S3, GCS or any fsspec URL, without stalling training.

The TensorFlow-facing names (``CheckpointSaverHook``, ``UploadListener``,
``CheckpointManager``) are imported lazily: the CLI and the catalog functions neither pay for importing
TensorFlow nor need it installed. Without TensorFlow, those names raise a
``ModuleNotFoundError`` (an ``ImportError``) naming
``pip install 'cloudckpt[tensorflow]'`` (``_frameworks.py``). The other public names are imported at
first use as well (``cloudckpt.list_checkpoints`` loads ``cloudckpt.catalog`` and the storage stack), so that
``import cloudckpt`` is quick; the exceptions are loaded with the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (CloudCkptError, ConfigError, FencedError, IntegrityError, ManifestError, RemoteError, UploadError,
                     WorkerFailedError)

if TYPE_CHECKING:
    from .catalog import CheckpointInfo, latest_checkpoint, list_checkpoints
    from .engine import CheckpointEngine
    from .hook import CheckpointSaverHook
    from .layout import PrefixLayout
    from .listener import UploadListener
    from .manifest import FileEntry, Manifest
    from .preemption import PreemptionNotice, PreemptionWatcher, was_preempted
    from .push import PushReport, PushResult, push_checkpoints
    from .restore import (CheckpointNotFoundError, FileCheck, PullResult, VerifyReport, VerifyResult,
                          download_checkpoint, pull_checkpoint, verify, verify_checkpoints)
    from .retention import GcResult, RetentionPlan, gc
    from .retry import RetryPolicy
    from .rollback import RollbackResult, rollback
    from .tf2 import CheckpointManager
    from .transfer import TransferOptions
    from .uploader import UploadStats

# No NullHandler on "cloudckpt": with no logging configured, Python's last-resort handler prints WARNING and
# above to stderr (a failed intermediate commit with on_error="warn", a preemption stop, uploads abandoned
# at Ctrl-C), as TF's and absl's loggers do; configured logging (the root's handlers) takes them instead.

_LAZY = {"CheckpointSaverHook": "hook", "UploadListener": "listener", "CheckpointManager": "tf2"}

# The other public names, by the module defining them: imported at first use too (PEP 562), so that
# `import cloudckpt` (and the `cloudckpt` command's start, before its Ctrl-C handling) does not load the
# storage stack (fsspec, botocore: about 0.4 s); the exceptions above are plain Python and loaded at once.
_MODULES = {
    "CheckpointInfo": "catalog", "list_checkpoints": "catalog", "latest_checkpoint": "catalog",
    "CheckpointEngine": "engine",
    "PrefixLayout": "layout",
    "FileEntry": "manifest", "Manifest": "manifest",
    "PreemptionNotice": "preemption", "PreemptionWatcher": "preemption", "was_preempted": "preemption",
    "PushReport": "push", "PushResult": "push", "push_checkpoints": "push",
    "CheckpointNotFoundError": "restore", "FileCheck": "restore", "PullResult": "restore", "VerifyReport": "restore",
    "VerifyResult": "restore", "download_checkpoint": "restore", "pull_checkpoint": "restore", "verify": "restore",
    "verify_checkpoints": "restore",
    "GcResult": "retention", "RetentionPlan": "retention", "gc": "retention",
    "RetryPolicy": "retry",
    "RollbackResult": "rollback", "rollback": "rollback",
    "TransferOptions": "transfer",
    "UploadStats": "uploader",
}

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
    if name in _MODULES:
        value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # cloudckpt.catalog... after `import cloudckpt`
    raise AttributeError(f"module 'cloudckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The ``cloudckpt`` package: a submodule's import does not bind its module over the public name it shares
    (``cloudckpt.rollback`` stays the function after ``import cloudckpt.rollback``), as when every name was
    imported at once; the submodule is in ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULES and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
