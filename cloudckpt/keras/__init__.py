"""Keras 3 callbacks that commit to S3, GCS or any fsspec URL: ``BackupAndRestore`` and ``ModelCheckpoint``.

Drop-ins for ``keras.callbacks.BackupAndRestore`` and ``keras.callbacks.ModelCheckpoint``
(same arguments first, then cloudckpt's keyword-only ones) built on
``cloudckpt.engine.CheckpointEngine``: files are written locally, then
committed in the background with a checksummed manifest and a commit-log entry
as the commit point; restores are verified. Importing this module imports
Keras (and its backend); ``import cloudckpt`` alone imports neither.

With ``TF_USE_LEGACY_KERAS=1`` (TensorFlow's switch to tf-keras) the callbacks
are tf-keras callbacks, for models built with ``tf.keras`` = tf-keras
(``BackupAndRestore`` only: ``ModelCheckpoint`` needs Keras 3).

Raises ImportError on import when Keras 3 (or, with the switch, tf-keras) is not installed.
"""

from __future__ import annotations

from .backup import BackupAndRestore
from .checkpoint import ModelCheckpoint

__all__ = ["BackupAndRestore", "ModelCheckpoint"]
