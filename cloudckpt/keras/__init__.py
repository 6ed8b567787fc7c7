"""Keras 3 callbacks that commit to S3, GCS or any fsspec URL: ``BackupAndRestore`` and ``ModelCheckpoint``.

Drop-ins for ``keras.callbacks.BackupAndRestore`` and ``keras.callbacks.ModelCheckpoint``
(same arguments first, then cloudckpt's keyword-only ones) built on
``cloudckpt.engine.CheckpointEngine``: files are written locally, then
committed in the background with a checksummed manifest and a commit-log entry
as the commit point; restores are verified. Importing this module imports
Keras (and its backend); ``import cloudckpt`` alone imports neither.

Raises ImportError on import when Keras 3 is not installed.
"""

from __future__ import annotations

try:
    import keras as _keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("cloudckpt.keras needs Keras 3: pip install 'keras>=3'") from exc

if int(_keras.__version__.split(".", 1)[0]) < 3:  # pragma: no cover - depends on the environment
    raise ImportError(f"cloudckpt.keras needs Keras 3, found Keras {_keras.__version__}: pip install 'keras>=3'")

from .backup import BackupAndRestore  # noqa: E402
from .checkpoint import ModelCheckpoint  # noqa: E402

__all__ = ["BackupAndRestore", "ModelCheckpoint"]
