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

_SHORT = {"name-based": "TF1 Saver (name-based)", "object-based": "tf.train.Checkpoint (object-based)"}


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


def check_resume_name(local_dir: str, basename: str, *, argument: str, url: str, owner: str, kind: str) -> None:
    """Refuse a resume point whose checkpoint name is not ``basename``, or whose kind is not ``kind``.

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
        kind: the checkpoints the adapter writes and restores: ``"object-based"`` (``tf.train.Checkpoint``)
            or ``"name-based"`` (a TF1 Saver's). A resume point of the other kind is refused whatever its
            name: TF restores it by variable names only (the TF1 -> TF2 migration path, which belongs in a
            program of its own that then saves into a new directory), and following a "pass {argument}=..."
            hint would register this adapter as the writer, fencing the job that writes there, and then
            restore nothing.

    Raises:
        ConfigError: the resume point is ``<other name>-<step>`` or of the other kind; the files were
            downloaded into ``local_dir``, nothing was restored into the model, no writer registered.
    """
    prefix = state_file_prefix(local_dir)
    parsed = split_prefix(prefix) if prefix is not None else None
    if parsed is None or prefix not in TF.local_prefixes(local_dir):
        return
    name, step = parsed
    found = checkpoint_kind(os.path.join(local_dir, prefix))
    other_kind = found is not None and found != kind
    if name == basename and not other_kind:
        return
    if other_kind:
        mismatch = (f"but this {owner} continues {_SHORT[kind]} checkpoints only: the directory holds another "
                    "kind of program's checkpoints")
        fix = ("Continue them with the kind of program that wrote them, or migrate them in a program of your own "
               "(restore by variable names, save) into a new checkpoint directory; to start anew, use a new "
               "checkpoint directory")
    else:
        mismatch = (f"but this {owner} saves '{basename}-<step>' checkpoints ({argument}={basename!r}): the "
                    f"directory holds checkpoints of another program, or of another {argument}")
        fix = f"To continue them, pass {argument}={name!r}; otherwise use a new checkpoint directory"
    raise ConfigError(
        f"{url} resumes from checkpoint {prefix!r} (step {step}{describe_kind(os.path.join(local_dir, prefix))}), "
        f"{mismatch}. TF would restore {prefix!r} by variable names only (a tf.train.Checkpoint silently restores "
        "nothing that does not match, a TF1 Saver fails with NotFoundError), and training starting over would "
        f"supersede step {step}. Its files were downloaded into {local_dir}, nothing was restored into the model, "
        f"and this {owner} did not register as the directory's writer (a job writing there goes on). {fix} "
        f"(with another local_dir: {local_dir} now holds these files).")
