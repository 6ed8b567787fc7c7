"""``UploadListener``: the TensorFlow ``CheckpointSaverListener`` that syncs saves to a URL.

In ``after_save`` it hard-links the checkpoint's files into a private staging
directory (so the Saver's ``max_to_keep`` can delete the originals without
racing an upload) and hands the snapshot to the background ``Uploader``.
When the URL is the local directory itself (a plain path), nothing is copied:
the checkpoint is committed in place, synchronously, like TF's own hook.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
import uuid
from typing import Any, Callable, Mapping

import tensorflow as tf

from .commit import GRAPH_FILE, CommitResult, LocalCheckpoint, find_local_checkpoint
from .catalog import CheckpointInfo, scan_directory
from .errors import ConfigError, UploadError
from .remote import RemoteStore
from .restore import DOWNLOAD_STAGING_PREFIX
from .resume import resume_and_register
from .retention import RetentionPlan, RetentionPolicy, apply_retention, plan_retention
from .retry import RetryPolicy
from .uploader import Uploader, UploadJob, UploadStats
from .writers import Writer

log = logging.getLogger("cloudckpt")

STAGING_DIR = ".cloudckpt-staging"


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
    ) -> None:
        if upload_timeout is not None and upload_timeout <= 0:
            raise ConfigError(f"upload_timeout must be > 0 seconds or None, got {upload_timeout!r}.")
        self._local_dir = os.path.abspath(os.fspath(local_dir))
        self._store = RemoteStore(checkpoint_dir, storage_options, retry=retry, on_retry=self._count_retry)
        self._uploader = Uploader(self._store, max_pending=max_pending, on_error=on_error)
        self._in_place = self._store.is_local and os.path.abspath(self._store.root) == self._local_dir
        self._upload_timeout = upload_timeout
        self._graph_signature: tuple[int, int] | None = None
        self._ending = False
        self._final_step: int | None = None
        self._final_submitted = False
        self._upload_timeout_at: float | None = None
        self.retention = retention
        self._end_deadline: Callable[[], float | None] = lambda: None
        self.registers_in_begin = True  # False when a CheckpointSaverHook registers (after restoring) itself

    @property
    def url(self) -> str:
        """The remote checkpoint directory, in display form (credentials masked)."""
        return self._store.url

    @property
    def store(self) -> RemoteStore:
        """The remote checkpoint directory's store."""
        return self._store

    @property
    def writer_id(self) -> str:
        """This writer's id in the directory's commit log (changes when ``resume`` registers again)."""
        return self._uploader.writer.writer_id

    @property
    def in_place(self) -> bool:
        """True when the checkpoint directory is the local directory itself (nothing to upload)."""
        return self._in_place

    @property
    def local_dir(self) -> str:
        """The directory the Saver writes to."""
        return self._local_dir

    # -- CheckpointSaverListener ------------------------------------------------------------------
    def begin(self) -> None:
        """Check the remote directory is usable (the background uploader starts with the first save)."""
        self._store.check_usable()
        self._ending = False
        self._final_step = None
        self._final_submitted = False
        self._end_deadline = lambda: None
        # Snapshots and half-finished downloads of a crashed run.
        for leftover in [STAGING_DIR, *(os.path.basename(p) for p in glob.glob(
                os.path.join(glob.escape(self._local_dir), DOWNLOAD_STAGING_PREFIX + "*")))]:
            shutil.rmtree(os.path.join(self._local_dir, leftover), ignore_errors=True)
        if self.registers_in_begin:  # TF's stock hook: bring local_dir to the head, which the session restores
            self.resume(download=not self._in_place)
        # The uploader thread starts with the first checkpoint: a session that fails to be created
        # (after begin(), before any hook hears of it) leaves no thread behind.

    def before_save(self, session: Any, global_step_value: int) -> None:
        """Nothing: failures surface after the save, so an upload problem never prevents a local save."""

    def after_save(self, session: Any, global_step_value: int) -> bool:
        """Snapshot the checkpoint just written and queue it for commit (never waits on the network)."""
        step = int(global_step_value)
        ckpt = self._saved_checkpoint(step)
        if ckpt is None:
            log.warning("No checkpoint files for step %d found in %s; nothing to upload.", step, self._local_dir)
            return False
        self._submit(ckpt, required=self._ending and step == self._final_step)
        if not self._ending:  # in end(), failures are raised once everything else is done
            self.raise_if_failed()
        return False

    def end(self, session: Any, global_step_value: int) -> None:
        """Wait (up to ``upload_timeout``, or the preemption deadline) until every checkpoint is
        committed, then stop the worker.

        The final checkpoint must reach the store whatever ``on_error`` says: when TF did not save
        again in ``end()`` (the last save was at this very step) and that save was not committed,
        it is submitted once more; its failure raises ``UploadError``.
        """
        step = int(global_step_value) if self._final_step is None else self._final_step
        if not self._final_submitted and not self._uploader.require(step) \
                and self._uploader.stats().last_committed_step != step:
            ckpt = self._saved_checkpoint(step)
            if ckpt is not None:
                self._submit(ckpt, required=True)
        timeout_at = self._upload_timeout_at if self._ending else (
            None if self._upload_timeout is None else time.monotonic() + self._upload_timeout)
        try:
            self._wait_until(lambda: _min(timeout_at, self._end_deadline()))
        finally:
            self.close(timeout=0 if self._uploader.pending_steps() else None)

    def close(self, timeout: float | None = None) -> None:
        """Stop the background uploader; checkpoints still uploading get ``timeout`` seconds
        (None: until done), then they are abandoned (the previous committed checkpoint stays the
        latest). Idempotent; ``begin()`` starts it again."""
        self._uploader.close(timeout=timeout)

    # -- public helpers ----------------------------------------------------------------------------
    def resume(self, *, download: bool) -> CheckpointInfo | None:
        """Become the directory's writer, resuming from what ``local_dir`` holds (``resume.py``).

        With ``download``, ``local_dir`` is first brought to the resume point:
        the head of the directory's lineage, unless the local state file was
        pointed back on purpose; local copies are checked against their
        manifests. Registering fences every older writer of the directory.
        Returns the checkpoint downloaded, if any.
        """
        if self._uploader.writer.registered:  # a new session with the same hook: a new registration
            self._uploader.writer = Writer(self._store)
        return resume_and_register(self._store, self._uploader.writer, self._local_dir, download=download)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint saved so far is committed or dropped.

        Raises:
            UploadError: a checkpoint failed to commit, or ``timeout`` passed first.
        """
        started = time.monotonic()
        self._uploader.wait(timeout)
        self._raise_unless_done(time.monotonic() - started)

    def prepare_final_save(self, step: int, deadline: Callable[[], float | None] | None = None) -> None:
        """Called before the final save of ``end()``: from now on failures are held until ``end()``
        has waited for the uploads, so the final checkpoint is always saved and queued, and the
        final checkpoint's failure is raised even with ``on_error="warn"``.

        ``deadline`` is a function returning a ``time.monotonic()`` time or None (no preemption),
        re-read while waiting so a notice arriving later can set or tighten it; ``end()``'s wait
        stops at the deadline. If a deadline is set already, waiting uploads of older steps are
        dropped (the final one supersedes them).
        """
        self._ending = True
        self._final_step = step
        self._upload_timeout_at = None if self._upload_timeout is None else time.monotonic() + self._upload_timeout
        if deadline is not None:
            self._end_deadline = deadline
            if deadline() is not None:  # a preemption is under way: only the final checkpoint matters
                self._uploader.drop_waiting(step, f"superseded by the final checkpoint (step {step}) before "
                                                  "preemption")

    def pending_steps(self) -> list[int]:
        """Steps uploading or waiting, oldest first."""
        return self._uploader.pending_steps()

    def take_failure(self) -> UploadError | None:
        """The upload failures not yet reported, as one error (None if none); they are then cleared."""
        return self._uploader.take_failure()

    def raise_if_failed(self) -> None:
        """Raise the oldest unreported upload failure, if any."""
        failure = self._uploader.take_failure()
        if failure is not None:
            raise failure

    def stats(self) -> UploadStats:
        """Counters: committed, dropped, failed, bytes, retries (with causes), last step and duration."""
        return self._uploader.stats()

    # -- internals ----------------------------------------------------------------------------------
    def _submit(self, ckpt: LocalCheckpoint, *, required: bool) -> None:
        if required:
            self._final_submitted = True
        if self._in_place:
            self._uploader.commit_now(UploadJob(ckpt, on_committed=self._retire_deleted, required=required))
        else:
            self._uploader.start()
            job = self._snapshot(ckpt)
            job.required = required
            self._uploader.submit(job)

    def _wait_until(self, deadline: Callable[[], float | None]) -> None:
        """Wait until every upload is done or ``deadline()`` (a ``time.monotonic()`` time, None for
        no limit) passes; the deadline is re-read every half second, so a later notice can move it.

        Raises:
            UploadError: a checkpoint failed, or some were still uploading at the deadline.
        """
        started = time.monotonic()
        while True:
            at = deadline()
            remaining = None if at is None else at - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if self._uploader.wait(0.5 if remaining is None else min(0.5, remaining)):
                break
        self._raise_unless_done(time.monotonic() - started)

    def _raise_unless_done(self, waited: float) -> None:
        self.raise_if_failed()
        steps = self._uploader.pending_steps()
        if steps:
            raise UploadError(
                f"Timed out after {waited:.1f}s waiting for checkpoint step(s) {steps} to commit to {self.url}; "
                "the latest committed checkpoint is older. Raise upload_timeout or check the store's throughput.",
                url=self.url, step=steps[-1])

    def _count_retry(self, cause: str) -> None:
        self._uploader.count_retry(cause)

    def _saved_checkpoint(self, step: int) -> LocalCheckpoint | None:
        state = tf.compat.v1.train.get_checkpoint_state(self._local_dir)
        if state is not None and state.model_checkpoint_path:
            prefix = os.path.basename(state.model_checkpoint_path)
            if prefix.endswith(f"-{step}"):
                found = find_local_checkpoint(self._local_dir, prefix)
                if found is not None:
                    return found
        # No usable state file (a custom Saver): take the newest index file written for this step.
        candidates = glob.glob(os.path.join(glob.escape(self._local_dir), f"*-{step}.index"))
        if not candidates:
            return None
        newest = max(candidates, key=os.path.getmtime)
        return find_local_checkpoint(self._local_dir, os.path.basename(newest)[: -len(".index")])

    def _snapshot(self, ckpt: LocalCheckpoint) -> UploadJob:
        """Hard-link (or copy across devices) the checkpoint's files into a private directory."""
        staging = os.path.join(self._local_dir, STAGING_DIR, f"{ckpt.prefix}-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        files = {name: _link_or_copy(path, os.path.join(staging, name)) for name, path in ckpt.files.items()}
        extras: dict[str, str] = {}
        graph = os.path.join(self._local_dir, GRAPH_FILE)
        signature = _signature(graph)
        if signature is not None and signature != self._graph_signature:
            extras[GRAPH_FILE] = _link_or_copy(graph, os.path.join(staging, GRAPH_FILE))

        def committed(result: CommitResult) -> None:
            if GRAPH_FILE in extras:
                self._graph_signature = signature
            self._apply_retention(protect=result.manifest.step)

        return UploadJob(LocalCheckpoint(ckpt.step, ckpt.prefix, files, extras),
                         release=lambda: shutil.rmtree(staging, ignore_errors=True), on_committed=committed)

    def _apply_retention(self, protect: int) -> None:
        """Remote retention after a commit; ``protect`` (the step just committed) is never deleted, even
        when newer steps exist (a run that fell back past a corrupt checkpoint)."""
        if self.retention is None or not self.retention.deletes_checkpoints:
            return
        plan = plan_retention(scan_directory(self._store), self.retention, protect={protect}, debris=False)
        apply_retention(self._store, plan, self._uploader.writer)

    def _retire_deleted(self, _result: object) -> None:
        """In place, the Saver deletes old checkpoints itself (``max_to_keep``): retire their manifests
        too, so that no manifest vouches for files that are gone."""
        scan = scan_directory(self._store)
        present = {o.name for o in scan.objects}
        gone = [c for c in scan.committed + scan.superseded if not all(f.name in present for f in c.files)]
        if gone:
            apply_retention(self._store, RetentionPlan(keep=[], delete=gone, debris=[], log=scan.log),
                            self._uploader.writer)


def _min(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another device, or a filesystem without hard links
        shutil.copy2(src, dst)
    return dst
