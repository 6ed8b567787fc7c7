"""``UploadListener``: the TensorFlow ``CheckpointSaverListener`` that syncs saves to a URL.

A thin adapter over ``CheckpointEngine`` (``engine.py``), which does the
work: in ``after_save`` the checkpoint the Saver just wrote is found in
``local_dir`` (``layout.TF``), hard-linked into a private snapshot (so the
Saver's ``max_to_keep`` can delete the originals without racing an upload) and
queued for the background commit. When the URL is the local directory itself
(a plain path), the checkpoint is committed in place, synchronously, like TF's
own hook.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import tensorflow as tf

from .catalog import CheckpointInfo
from .commit import GRAPH_FILE, CommitResult
from .engine import STAGING_DIR, CheckpointEngine
from .preemption import PreemptionWatcher
from .remote import RemoteStore
from .retention import RetentionPolicy
from .retry import RetryPolicy
from .transfer import TransferOptions
from .uploader import UploadStats
from .errors import UploadError

log = logging.getLogger("cloudckpt")

__all__ = ["UploadListener", "STAGING_DIR"]


class UploadListener(tf.compat.v1.train.CheckpointSaverListener):
    """Commits every checkpoint the Saver writes in ``local_dir`` to ``checkpoint_dir``.

    Usable with TF's stock ``CheckpointSaverHook`` as well as cloudckpt's.
    With the stock hook, ``begin()`` brings ``local_dir`` to the directory's
    head (downloading it, verified, unless an intact copy is there), so
    ``MonitoredTrainingSession(checkpoint_dir=local_dir)`` resumes from it.
    Upload failures are re-raised as ``UploadError`` at the next save, in
    ``end()`` and in ``wait()`` (unless ``on_error="warn"``).

    Args:
        checkpoint_dir: remote directory URL (or a local path, committed in place).
        local_dir: the directory the Saver writes to.
        storage_options: fsspec options for the remote filesystem.
        max_pending: checkpoints allowed to wait behind the one uploading.
        retry: retry policy for storage operations.
        on_error: ``"raise"`` (default) or ``"warn"``.
        upload_timeout: seconds ``end()`` waits for pending uploads; None waits until done.
        retention: which committed checkpoints to keep remotely, applied after
            each commit (None keeps everything).
        preemption, preemption_deadline: as for ``CheckpointEngine`` (the watcher is
            started and stopped by whoever drives the listener: cloudckpt's hook).
        transfer: part size, files and parts in flight (``cloudckpt.TransferOptions``).
        summary_dir: write commit lag, throughput, queue depth, retries, drops and failures
            as TensorBoard scalars there after each commit (None: off).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        local_dir: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int = 2,
        retry: RetryPolicy | None = None,
        on_error: str = "raise",
        upload_timeout: float | None = None,
        retention: RetentionPolicy | None = None,
        preemption: PreemptionWatcher | str | None = None,
        preemption_deadline: float | None = None,
        transfer: TransferOptions | None = None,
        summary_dir: str | None = None,
    ) -> None:
        self._engine = CheckpointEngine(checkpoint_dir, local_dir, storage_options=storage_options,
                                        max_pending=max_pending, retry=retry, on_error=on_error,
                                        upload_timeout=upload_timeout, retention=retention,
                                        preemption=preemption, preemption_deadline=preemption_deadline,
                                        transfer=transfer, summary_dir=summary_dir)
        self._graph_signature: tuple[int, int] | None = None
        self.registers_in_begin = True  # False when a CheckpointSaverHook registers (after restoring) itself
        self._check_first_save = False  # begin() sets it: the first save checks the session's step

    @property
    def engine(self) -> CheckpointEngine:
        """The engine doing the work."""
        return self._engine

    @property
    def retention(self) -> RetentionPolicy | None:
        """Remote retention applied after each commit (None keeps everything)."""
        return self._engine.retention

    @retention.setter
    def retention(self, policy: RetentionPolicy | None) -> None:
        self._engine.retention = policy

    @property
    def url(self) -> str:
        """The remote checkpoint directory, in display form (credentials masked)."""
        return self._engine.url

    @property
    def store(self) -> RemoteStore:
        """The remote checkpoint directory's store."""
        return self._engine.store

    @property
    def writer_id(self) -> str:
        """This writer's id in the directory's commit log (changes when ``resume`` registers again)."""
        return self._engine.writer_id

    @property
    def in_place(self) -> bool:
        """True when the checkpoint directory is the local directory itself (nothing to upload)."""
        return self._engine.in_place

    @property
    def local_dir(self) -> str:
        """The directory the Saver writes to."""
        return self._engine.local_dir

    # -- CheckpointSaverListener ------------------------------------------------------------------
    def begin(self) -> None:
        """Check the remote directory is usable (the background uploader starts with the first save)."""
        self._engine.open()
        self._check_first_save = True
        if self.registers_in_begin:  # TF's stock hook: bring local_dir to the head, which the session restores
            self.resume(download=not self.in_place)
        # The uploader thread starts with the first checkpoint: a session that fails to be created
        # (after begin(), before any hook hears of it) leaves no thread behind.

    def before_save(self, session: Any, global_step_value: int) -> None:
        """The first save after ``begin()`` checks that the session restored ``local_dir``'s checkpoint
        (``check_session_step``). Upload failures surface after the save, so an upload problem never
        prevents a local save.

        Raises:
            ConfigError: see ``check_session_step``.
        """
        if self._check_first_save:
            self.check_session_step(int(global_step_value))
            self._check_first_save = False

    def after_save(self, session: Any, global_step_value: int) -> bool:
        """Snapshot the checkpoint just written and queue it for commit (never waits on the network)."""
        step = int(global_step_value)
        ckpt = self._engine.find_saved(step)
        if ckpt is None:
            log.warning("No checkpoint files for step %d found in %s; nothing to upload.", step, self.local_dir)
            return False
        extras, signature = {}, _signature(os.path.join(self.local_dir, GRAPH_FILE))
        if signature is not None and signature != self._graph_signature:
            extras[GRAPH_FILE] = os.path.join(self.local_dir, GRAPH_FILE)

        def committed(result: CommitResult) -> None:
            if GRAPH_FILE in extras:
                self._graph_signature = signature

        self._engine.submit(step, ckpt.files, extras=extras, on_committed=committed)
        if not self._engine.ending:  # in end(), failures are raised once everything else is done
            self._engine.raise_if_failed()
        return False

    def end(self, session: Any, global_step_value: int) -> None:
        """Wait (up to ``upload_timeout``, or the preemption deadline) until every checkpoint is
        committed, then stop the worker (``CheckpointEngine.finish``).

        The final checkpoint must reach the store whatever ``on_error`` says: when TF did not save
        again in ``end()`` (the last save was at this very step) and that save was not committed,
        it is submitted once more; its failure raises ``UploadError``.
        """
        self._engine.finish(int(global_step_value))

    def close(self, timeout: float | None = None) -> None:
        """Stop the background uploader; checkpoints still uploading get ``timeout`` seconds
        (None: until done), then they are abandoned (the previous committed checkpoint stays the
        latest); then let go of ``local_dir`` (another process may write it). Idempotent; ``begin()``
        starts it again."""
        try:
            self._engine.stop_uploads(timeout=timeout)
        finally:
            self._engine.release_local_dir()

    # -- public helpers ----------------------------------------------------------------------------
    def resume(self, *, download: bool,
               check: Callable[[CheckpointInfo | None], None] | None = None) -> CheckpointInfo | None:
        """Become the directory's writer, resuming from what ``local_dir`` holds (``CheckpointEngine.resume``).

        With ``download``, ``local_dir`` is first brought to the resume point:
        the head of the directory's lineage, unless the local state file was
        pointed back on purpose; local copies are checked against their
        manifests. ``check(downloaded)`` runs then, before registering (what it raises
        propagates, nobody is fenced). Registering fences every older writer of
        the directory. Returns the checkpoint downloaded, if any.
        """
        return self._engine.resume(download=download, check=check)

    def check_session_step(self, step: int) -> None:
        """Refuse a session that starts at global step ``step`` below the checkpoint ``local_dir`` holds.

        ``local_dir``'s TF state file names the checkpoint a session created with
        ``MonitoredTrainingSession(checkpoint_dir=local_dir)`` restores: the resume point
        ``resume()`` brought there (downloaded, or the local copy), or the newest save of this
        run. A session below it did not restore it (``checkpoint_dir`` not passed, or another
        directory): its first commit would continue the directory from that older step, and
        every newer checkpoint would become superseded (never restored; deleted first by
        retention). A rollback on purpose points the state file back first
        (``tf.compat.v1.train.update_checkpoint_state``): the session then starts at the step it
        names, which passes. Reads one small local file; nothing when the state file names no
        checkpoint that is there.

        The check is the engine's (``CheckpointEngine.check_start_step``), shared with
        ``cloudckpt.CheckpointManager``.

        Raises:
            ConfigError: ``step`` is below the step of the checkpoint the state file names; nothing
                has been saved or committed at ``step``.
        """
        local = self.local_dir
        self._engine.check_start_step(
            step, starts=f"The training session starts at global step {step}",
            fix=f"Pass checkpoint_dir={local!r} (the hook's local_dir) to tf.compat.v1.train.MonitoredTrainingSession, "
                f"or restore from tf.train.latest_checkpoint({local!r}) with your Scaffold or Saver. To go back to an "
                f"older step on purpose, point that state file at it first "
                f"(tf.compat.v1.train.update_checkpoint_state); to start a new lineage, use a new checkpoint "
                f"directory (or restore=False with an empty local_dir).")

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint saved so far is committed or dropped.

        Raises:
            UploadError: a checkpoint failed to commit, or ``timeout`` passed first.
        """
        self._engine.wait(timeout)

    def prepare_final_save(self, step: int, deadline: Callable[[], float | None] | None = None) -> None:
        """Called before the final save of ``end()``: see ``CheckpointEngine.prepare_final_save``."""
        self._engine.prepare_final_save(step, deadline)

    def pending_steps(self) -> list[int]:
        """Steps uploading or waiting, oldest first."""
        return self._engine.pending_steps()

    def take_failure(self) -> UploadError | None:
        """The upload failures not yet reported, as one error (None if none); they are then cleared."""
        return self._engine.take_failure()

    def raise_if_failed(self) -> None:
        """Raise the oldest unreported upload failure, if any."""
        self._engine.raise_if_failed()

    def stats(self) -> UploadStats:
        """Counters: committed, dropped, failed, bytes, retries (with causes), last step and duration.

        A listener sees the global step only at saves, so on its own (with TF's stock hook) the commit lag in
        steps (``last_commit_lag_steps``) is the newest step saved by the commit minus the committed one: whole
        save intervals, 0 while uploads keep up. ``cloudckpt.CheckpointSaverHook`` reports the training steps
        run in between (``CheckpointEngine.step_source``)."""
        return self._engine.stats()


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size
