"""A TF checkpoint directory holding another program's checkpoints: the resume point's name is not the adapter's.

``tf.train.CheckpointManager`` and a TF1 ``MonitoredTrainingSession`` restore whatever checkpoint the
``checkpoint`` state file names, whatever its name. A directory written by the other kind of program
(``model.ckpt-*`` of a TF1 Saver, ``ckpt-*`` of a TF2 ``tf.train.Checkpoint``) then restores by variable
names only: TF2 silently restores nothing that does not match and training starts over (superseding the
directory's checkpoints at the first save); TF1 fails with a bare ``NotFoundError: Key ... not found``.
The adapters (``cloudckpt.CheckpointManager``, ``cloudckpt.CheckpointSaverHook``) refuse such a resume
point before restoring it, and before registering as the directory's writer.
"""

from __future__ import annotations

import os

import tensorflow as tf

from .errors import ConfigError
from .layout import TF, split_prefix, state_file_prefix

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # in every object-based (tf.train.Checkpoint) checkpoint

_KINDS = {
    "name-based": "a TF1 tf.compat.v1.train.Saver checkpoint (name-based, as TF1 hooks and cloudckpt."
                  "CheckpointSaverHook write)",
    "object-based": "a TF2 tf.train.Checkpoint checkpoint (object-based, as tf.train.CheckpointManager and cloudckpt."
                    "CheckpointManager write)",
}


def checkpoint_kind(path_prefix: str) -> str | None:
    """``"object-based"`` (a ``tf.train.Checkpoint``'s, with an object graph), ``"name-based"`` (a TF1 Saver's),
    or None when the checkpoint cannot be read. Reads its ``.index`` file only."""
    try:
        reader = tf.train.load_checkpoint(path_prefix)
    except (tf.errors.OpError, ValueError):
        return None
    return "object-based" if reader.has_tensor(OBJECT_GRAPH_KEY) else "name-based"


def describe_kind(path_prefix: str) -> str:
    """``", a TF1 tf.compat.v1.train.Saver checkpoint (...)"`` for messages; "" when it cannot be read."""
    kind = checkpoint_kind(path_prefix)
    return f", {_KINDS[kind]}" if kind is not None else ""


def check_resume_name(local_dir: str, basename: str, *, argument: str, url: str, owner: str) -> None:
    """Refuse a resume point whose checkpoint name is not ``basename``.

    ``local_dir``'s TF state file names the checkpoint TF restores (the resume point, after
    ``CheckpointEngine.resume``'s download). A name other than the adapter's own means the directory
    holds another program's checkpoints (or this program's under another name): TF would restore it by
    variable names, silently partly or not at all (TF2), or fail with ``NotFoundError`` (TF1). Nothing
    when the state file names no checkpoint that ``local_dir`` holds.

    Args:
        local_dir: where TF restores from.
        basename: the adapter's checkpoint name (``checkpoint_name`` / ``checkpoint_basename``).
        argument: that argument's name, for the message.
        url: the checkpoint directory (display form), for the message.
        owner: the adapter, for the message (``"cloudckpt.CheckpointManager"``).

    Raises:
        ConfigError: the resume point is ``<other name>-<step>``; nothing was restored.
    """
    prefix = state_file_prefix(local_dir)
    parsed = split_prefix(prefix) if prefix is not None else None
    if parsed is None or parsed[0] == basename or prefix not in TF.local_prefixes(local_dir):
        return
    name, step = parsed
    raise ConfigError(
        f"{url} resumes from checkpoint {prefix!r} (step {step}{describe_kind(os.path.join(local_dir, prefix))}), "
        f"but this {owner} saves '{basename}-<step>' checkpoints ({argument}={basename!r}): the directory holds "
        f"checkpoints of another program, or of another {argument}. TF would restore {prefix!r} by variable names "
        "only (a tf.train.Checkpoint silently restores nothing that does not match, a TF1 Saver fails with "
        f"NotFoundError), and training starting over would supersede step {step}. Nothing was restored, and this "
        f"{owner} did not register as the directory's writer (a job writing there goes on). To continue these "
        f"checkpoints with a program that restores them, pass {argument}={name!r}; otherwise use a new checkpoint "
        "directory.")
