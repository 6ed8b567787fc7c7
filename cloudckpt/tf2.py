"""``cloudckpt.CheckpointManager``: ``tf.train.CheckpointManager`` whose checkpoints are committed to a URL.

A real ``tf.train.CheckpointManager`` manages ``local_dir`` (its numbering,
``checkpoint_interval``, ``max_to_keep`` sweep and its ``checkpoint`` state
file with timestamps are TF's own); a ``CheckpointEngine`` commits each save
to ``directory`` in the background.

How a save reaches the engine: ``save()`` adds a write callback to the
``tf.train.CheckpointOptions`` it passes to TF (``experimental_write_callbacks``;
TF runs them once the checkpoint's files are written, before its own
bookkeeping). With ``enable_async=True`` TF writes in its async-checkpoint
thread (``tensorflow/python/checkpoint/async_checkpoint_helper.py``) and runs
the callbacks there when the write has finished, so the commit starts exactly
then, and ``save()`` returns without waiting for the write or the upload. A
synchronous save is queued when TF's ``save()`` returns. Either way the
checkpoint is only hard-linked and queued (``CheckpointEngine.submit``).

The remote ``checkpoint`` state file lists the committed checkpoints of the
current lineage with relative paths and TF's timestamps
(``all_model_checkpoint_timestamps``: each save's time, recorded in the commit
log; ``last_preserved_timestamp``), so ``tf.train.CheckpointManager`` works on
a copy of the directory.

Under ``tf.distribute.MultiWorkerMirroredStrategy`` (``distributed.py``) every
worker calls ``save()`` (TF's collectives need all of them); only the chief's
manager writes to ``local_dir`` and commits. The others write to a temporary
directory inside it, and each of their checkpoints is deleted once written
(TF's multi-worker pattern). ``restore_or_initialize()`` makes every worker
restore the step the chief restores (sent as an all-reduce); ``should_stop()``
is an all-reduce of "a preemption notice reached me", so all workers stop at
the same step. The same all-reduces (and one in ``close()``) carry "cloudckpt
failed here", so a failure on one worker raises on all of them at the same call
instead of leaving the others blocked in the next collective.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import threading
import time
import weakref
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from .catalog import CheckpointInfo, scan_directory
from .distributed import (TaskRole, WorkerAgreement, name_task_in_logs, restore_as_the_chief_does, role_from_tf_config,
                          role_of_strategy, worker_temp_dir)
from .engine import CheckpointEngine, ensure_writable, resolve_local_dir
from .errors import CloudCkptError, ConfigError, WorkerFailedError, integer_option
from .layout import TF, check_basename, split_prefix, state_file_prefix, write_local_state_file
from ._tfnames import check_resume_name, checkpoint_kind
from .remote import is_local_path
from .urls import as_url
from .preemption import PreemptionNotice, PreemptionWatcher
from .retention import RetentionPolicy
from .retry import RetryPolicy
from .shutdown import call_at_exit, interrupted_exit
from .transfer import TransferOptions
from .uploader import UploadStats

log = logging.getLogger("cloudckpt")

__all__ = ["CheckpointManager"]


def _checked_number(checkpoint_number: Any) -> Any:
    """``checkpoint_number`` as passed to TF, after raising ConfigError (before TF writes) for:

    * one that is not an integer, nor a tensor or variable holding one (TF's contract): TF fails on a Python
      or numpy float, a string or a 0-d numpy array (``AttributeError: 'float' object has no attribute
      'numpy'``) and truncates a float tensor (3.7 written as ``ckpt-3``); a float tensor holding a whole
      number passes (TF writes it exactly);
    * a negative one: TF saves ``-2`` as ``<checkpoint_name>--2``, whose name reads as step 2 of the basename
      ``<checkpoint_name>-``; it was committed as a second checkpoint of step 2.

    A Python bool passes as TF takes it (``True``: 1). Returns a plain ``int`` for an integer that is not a
    tensor (a numpy integer or 0-d array), else the tensor or variable itself."""
    if checkpoint_number is None or isinstance(checkpoint_number, bool):
        return checkpoint_number
    tensor = hasattr(checkpoint_number, "numpy")
    value = checkpoint_number.numpy() if tensor else checkpoint_number
    number = None
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if tensor and kind in ("i", "u") and getattr(value, "size", 0) == 1:
        number = int(value.reshape(()))  # an integer-dtype tensor (TF also takes shape [1])
    elif tensor and kind == "f" and getattr(value, "size", 0) == 1 and float(value.reshape(())).is_integer():
        number = int(value.reshape(()))  # a float step variable holding a whole number: TF writes it exactly
    elif not tensor:
        number = integer_option(value)
    if number is None:
        raise ConfigError(f"checkpoint_number must be an integer >= 0 (the checkpoint's step) or an integer tensor "
                          f"holding one, got {checkpoint_number!r} ({type(checkpoint_number).__name__}); "
                          "nothing was saved.")
    if number < 0:
        raise ConfigError(f"checkpoint_number must be an integer >= 0 (the checkpoint's step), got {number}; "
                          "nothing was saved.")
    return checkpoint_number if tensor else number


def _step_variable(value: Any) -> bool:
    """True for a variable (``tf.Variable``, a Keras variable) the uploader thread may read for the commit lag:
    not one synchronized on read, whose read under a ``tf.distribute`` strategy may be a collective."""
    return (callable(getattr(value, "assign", None)) and callable(getattr(value, "numpy", None))
            and getattr(value, "synchronization", None) != tf.VariableSynchronization.ON_READ)


def _read_step(value: Any) -> int:
    """An int, or a variable or tensor holding one (a float holding a whole number too), as an int."""
    if not hasattr(value, "numpy"):
        return int(value)
    return int(np.asarray(value.numpy()).reshape(()))


class CheckpointManager:
    """``tf.train.CheckpointManager`` for a URL: every save is committed in the background.

    Same arguments, methods and semantics as ``tf.train.CheckpointManager``
    (``save``, ``restore_or_initialize``, ``latest_checkpoint``, ``checkpoints``,
    ``checkpoint``, ``checkpoint_interval``, ``sync``); paths it returns are local
    (in ``local_dir``), ready for ``tf.train.Checkpoint.restore``. In addition:

    * ``restore_or_initialize()`` first brings ``local_dir`` to the newest
      committed checkpoint that verifies (sizes and crc32c against its
      manifest), when it is newer than the local one or the local copy is
      damaged, falling back past corrupt ones; then it registers as the
      directory's writer, which fences any older writer (``FencedError`` at its
      next save). A resume point that is not ``<checkpoint_name>-<step>`` (a TF1 Saver's
      ``model.ckpt-*``) is refused first (``ConfigError``): TF would restore it by
      variable names, silently restoring nothing that does not match.
    * a first ``save()`` whose ``tf.train.Checkpoint`` was not restored is refused
      (``ConfigError``): it would write a step below the resume point (the newest
      committed checkpoint, or a rollback's step), and committing it would supersede
      that checkpoint (then deleted first by retention). Nothing is written.
    * each save is committed in the background (files create-only, a manifest,
      a commit-log entry as the commit point); ``save()`` never waits on the
      network; a failed commit raises ``UploadError`` at the next ``save()``
      (``on_error="raise"``) or is logged and counted (``"warn"``).
    * remote retention follows ``max_to_keep`` / ``keep_checkpoint_every_n_hours``
      (the latest committed checkpoint is never deleted).
    * ``should_stop()`` turns True on a preemption notice (``preemption=``): save
      and break; ``close()`` then commits the final checkpoint within the deadline.
    * ``wait()``, ``stats()``, ``close()``; a context manager (``close()`` on a clean
      exit; on an exception, pending uploads get ``upload_timeout`` and nothing is raised).
    * under ``MultiWorkerMirroredStrategy`` (the one in scope, or ``strategy=``): every
      worker calls ``save()``, ``restore_or_initialize()`` and ``should_stop()`` at the same
      points of the loop (each may be a collective); only the chief commits, the others'
      saves go to a temporary directory and are deleted; every worker restores the step
      the chief restores; a notice on any worker makes ``should_stop()`` True on all of them
      at the same call. A cloudckpt failure on one worker (a commit of the chief, a download
      during the restore, the final commit) raises on every worker at the same call
      (``should_stop()``, ``restore_or_initialize()``, ``close()``): the failed worker its own
      error, the others ``WorkerFailedError`` naming it.

    Args:
        checkpoint: a ``tf.train.Checkpoint``.
        directory: where checkpoints are committed: any fsspec URL (``s3://``, ``gs://``,
            ``memory://``, ``file://``...) or a local path (committed in place: TF writes
            there directly, like ``tf.train.CheckpointManager``).
        max_to_keep, keep_checkpoint_every_n_hours, checkpoint_name, step_counter,
            checkpoint_interval, init_fn: as for ``tf.train.CheckpointManager``; the
            first two apply locally (TF) and remotely (cloudckpt's retention). A
            ``step_counter`` that numbers the checkpoints (``save(checkpoint_number=)`` of its
            value), or a variable passed as ``checkpoint_number``, also gives the commit lag
            in training steps (see ``stats``).
        local_dir: where TF writes before upload; default: a stable per-URL directory
            under ``~/.cache/cloudckpt`` (``$CLOUDCKPT_CACHE_DIR``).
        storage_options: fsspec options (``endpoint_url``, ``key``, ``token``...); never logged.
        max_pending: checkpoints allowed to wait behind the one uploading; past that the
            oldest waiting one is dropped (logged, counted).
        upload_timeout: seconds ``close()`` waits for uploads; None waits until done.
        retry: ``RetryPolicy`` for transient storage errors.
        on_error: ``"raise"`` or ``"warn"`` (see above); the final checkpoint of
            ``close()`` and fencing raise either way.
        preemption: None, ``"sigterm"``, ``"auto"`` (SIGTERM + GCE, AWS and Azure metadata) or a
            ``PreemptionWatcher``; watched from construction to ``close()``.
        preemption_deadline: seconds from the notice to commit the final checkpoint;
            default: the platform's (25 s after SIGTERM or a GCE notice, 100 s on AWS,
            on Azure until the event's ``NotBefore`` less 5 s). A hard stop announced
            by a GCE / AWS / Azure metadata notice caps it (not
            SIGTERM's 25 s, a guess); see ``CheckpointEngine``.
        strategy: the ``tf.distribute`` strategy training runs under (default: the one in
            scope when the manager is created). A ``MultiWorkerMirroredStrategy`` whose
            cluster has several workers turns on the chief-only rule above.
        transfer: part size, files and parts in flight (``cloudckpt.TransferOptions``).
        summary_dir: write commit lag, throughput, queue depth, retries, drops and failures
            as TensorBoard scalars there after each commit (None: off).

    Raises:
        ValueError: ``max_to_keep`` not a positive integer or None; ``checkpoint_interval``
            without ``step_counter`` (TF's messages).
        ConfigError: (a ``ValueError``) ``checkpoint`` not a ``tf.train.Checkpoint``, a
            ``checkpoint_name`` that is no plain file name, an unusable
            URL or ``local_dir``, a ``local_dir`` differing from a local-path ``directory``, or
            invalid cloudckpt options;
            ``TF_CONFIG`` names several workers (and no parameter servers) but no
            ``MultiWorkerMirroredStrategy`` is in scope or given.
        RemoteError: the store cannot be reached.
    """

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        directory: str,
        max_to_keep: int | None,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        step_counter: Any = None,
        checkpoint_interval: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        *,
        local_dir: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int = 2,
        upload_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        on_error: str = "raise",
        preemption: PreemptionWatcher | str | None = None,
        preemption_deadline: float | None = None,
        strategy: Any = None,
        transfer: TransferOptions | None = None,
        summary_dir: str | None = None,
    ) -> None:
        if not isinstance(checkpoint, (tf.train.Checkpoint, tf.compat.v1.train.Checkpoint)):
            # TF's manager takes anything and fails at the first save (or at exit, in our close)
            raise ConfigError(f"checkpoint must be a tf.train.Checkpoint, got a value of type "
                              f"{type(checkpoint).__name__}.")
        check_basename(checkpoint_name, "checkpoint_name")
        directory = as_url(directory, "directory")
        local_dir = resolve_local_dir(directory, local_dir, storage_options, url_arg="directory", writer="TF")
        self._role, self._agreement = _worker_role(strategy, directory)
        self._worker_temp: str | None = None
        if self._role is not None:
            name_task_in_logs(self._role.name)
        if self._agreement is not None and not self._role.is_chief:  # type: ignore[union-attr]
            # TF's pattern: a non-chief worker writes its checkpoints to a temporary directory, removed. Not
            # inside a local-path directory: that is the committed directory itself.
            parent = None if is_local_path(directory) else local_dir
            if parent is not None:
                ensure_writable(parent)
            local_dir = self._worker_temp = worker_temp_dir(self._role, parent)  # type: ignore[arg-type]
        if max_to_keep is not None:
            keep = integer_option(max_to_keep)
            if keep is None:
                raise ConfigError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}.")
            max_to_keep = keep  # a numpy integer as the int
        ensure_writable(local_dir)
        self._tf_args = dict(checkpoint=checkpoint, directory=local_dir, max_to_keep=max_to_keep,
                             keep_checkpoint_every_n_hours=keep_checkpoint_every_n_hours,
                             checkpoint_name=checkpoint_name, step_counter=step_counter,
                             checkpoint_interval=checkpoint_interval, init_fn=init_fn)
        self._manager = tf.train.CheckpointManager(**self._tf_args)  # TF validates its own arguments
        self._engine = CheckpointEngine(
            directory, local_dir, layout=TF, storage_options=storage_options, max_pending=max_pending, retry=retry,
            on_error=on_error, upload_timeout=upload_timeout,
            retention=RetentionPolicy(max_to_keep, keep_checkpoint_every_n_hours),
            preemption=preemption, preemption_deadline=preemption_deadline, transfer=transfer,
            summary_dir=summary_dir, task=self._role.name if self._role is not None else None)
        self._url = directory
        if self._agreement is not None:
            self._agreement.context = f"cloudckpt ({self._engine.url})"
        self._engine.open()
        self._step_variable: Any = None  # what the commit lag in steps reads (_track_steps)
        self._last_saved_step: int | None = None
        self._saving_thread: int | None = None  # the thread inside save(), while it is
        self._written_here: list[tuple[str, float]] = []
        self._closed = False
        self._resumed = False  # by restore_or_initialize(), the first latest_checkpoint / checkpoints, or save()
        self._stop_agreed = False  # multi-worker: the workers agreed to stop (a notice reached one of them)
        self.restored: CheckpointInfo | None = None
        self._engine.start_watching()
        call_at_exit(_close_at_exit, weakref.ref(self))

    # -- tf.train.CheckpointManager's API ---------------------------------------------------------
    @property
    def directory(self) -> str:
        """The checkpoint directory URL, in display form (credentials masked)."""
        return self._engine.url

    @property
    def local_dir(self) -> str:
        """Where TF writes checkpoints before they are committed."""
        return self._engine.local_dir

    @property
    def checkpoint(self) -> tf.train.Checkpoint:
        """The ``tf.train.Checkpoint`` object."""
        return self._manager.checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        """``checkpoint_interval`` as given (steps of ``step_counter`` between saves)."""
        return self._manager.checkpoint_interval

    @property
    def latest_checkpoint(self) -> str | None:
        """The local prefix of the most recent checkpoint (``tf.train.CheckpointManager.latest_checkpoint``),
        for ``tf.train.Checkpoint.restore``; None if there is none. Not necessarily committed yet.

        Read before ``restore_or_initialize()`` and ``save()``, it first brings ``local_dir`` to the
        resume point as ``restore_or_initialize()`` does (downloading the newest committed checkpoint
        when the local one is older or missing, registering as the directory's writer), so TF's own
        pattern ``ckpt.restore(manager.latest_checkpoint)`` resumes on a fresh VM too.

        Raises:
            IntegrityError / RemoteError / FencedError / ConfigError: as ``restore_or_initialize()``, on
                that first read (ConfigError: the resume point is another ``checkpoint_name``'s).
        """
        self._ensure_resumed()
        return self._manager.latest_checkpoint

    @property
    def checkpoints(self) -> list[str]:
        """Local prefixes of the managed checkpoints, oldest first (TF's semantics: checkpoints kept by
        ``keep_checkpoint_every_n_hours`` are not listed). The first read resumes as ``latest_checkpoint``."""
        self._ensure_resumed()
        return self._manager.checkpoints

    def save(self, checkpoint_number: Any = None, check_interval: bool = True,
             options: tf.train.CheckpointOptions | None = None) -> str | None:
        """Save a checkpoint locally (``tf.train.CheckpointManager.save``) and queue it for commit.

        Returns at once with ``options=tf.train.CheckpointOptions(enable_async=True)``
        (TF writes in the background; the commit starts when the write has
        finished); otherwise after TF's write, never waiting on the network.

        Args:
            checkpoint_number, check_interval, options: as for ``tf.train.CheckpointManager.save``
                (a copy of ``options`` is used: the caller's object is not changed).

        Returns:
            The local path saved (``<local_dir>/<checkpoint_name>-<number>``), or None when
            ``checkpoint_interval`` says no checkpoint is due (TF's rule).

        The first save of a manager before ``restore_or_initialize()`` (or a read of
        ``latest_checkpoint`` / ``checkpoints``) first brings ``local_dir`` to the resume point
        as they do. The first save is held to that resume point: the checkpoint it would write
        (``checkpoint_number``, else ``checkpoint.save_counter + 1``) must not be below the step
        ``local_dir``'s state file names (``CheckpointEngine.check_start_step``).

        Raises:
            UploadError: an earlier checkpoint failed to commit (``on_error="raise"``), or
                ``FencedError``: a newer writer took over the directory (either setting). The
                checkpoint of this call is saved and queued first. Multi-worker, these are raised
                on every worker at the same call (``WorkerFailedError`` on the others): here when
                this call wrote a checkpoint, or by ``should_stop()``.
            ConfigError: the manager is closed; ``checkpoint_number`` is negative (nothing is
                written: TF's ``ckpt--2`` would read as step 2) or not an integer or an integer
                tensor (a float or a string: TF fails with AttributeError; a float tensor: TF
                truncates it); or, at the first save, the
                ``tf.train.Checkpoint`` was not restored from the resume point (it would write a
                lower step, which would supersede the newest committed checkpoint): nothing is
                written or committed; call ``restore_or_initialize()`` first.
            IntegrityError / RemoteError: as ``restore_or_initialize()``, at the first save before it;
                ``ConfigError`` too, for a resume point of another ``checkpoint_name``.
        """
        if self._closed:
            raise ConfigError(f"CheckpointManager for {self.directory} is closed; create a new one to save.")
        checkpoint_number = _checked_number(checkpoint_number)
        self._ensure_resumed()
        if self._last_saved_step is None:
            self._check_restored(checkpoint_number)
        self._track_steps(checkpoint_number)
        options = copy.copy(options) if options is not None else tf.train.CheckpointOptions()
        callbacks = list(options.experimental_write_callbacks or [])
        callbacks.append(self._written)  # TF appends its own bookkeeping after it, on its own copy
        options.experimental_write_callbacks = callbacks
        self._saving_thread = threading.get_ident()
        try:
            path = self._manager.save(checkpoint_number=checkpoint_number, check_interval=check_interval,
                                      options=options)
        finally:
            self._saving_thread = None
            written, self._written_here = self._written_here, []
        for prefix, saved_at in written:  # a synchronous write: queued once TF's bookkeeping and sweep are done
            self._submit(prefix, saved_at)
        if path is not None:
            parsed = split_prefix(os.path.basename(path))
            if parsed is not None:
                self._last_saved_step = parsed[1]
        if self._agreement is not None:
            # Multi-worker: a failure (the chief's commits) is raised on every worker at the same call, by
            # should_stop() or by the next save() that writes a checkpoint (TF's decision to write one is the
            # same on every worker: the step counter is mirrored), so a loop without should_stop() learns it
            # at its next checkpoint too, not only at close().
            if path is not None:
                self._agreement.agree_on_failure(self._engine.take_failure() if self.is_chief else None)
            return path
        self._engine.raise_if_failed()
        fenced = self._engine.fenced
        if fenced is not None:  # a fenced writer's saves are never committed again: say so at every one
            raise fenced
        return path

    def restore_or_initialize(self) -> str | None:
        """Restore the newest checkpoint, fetching it first when the store has a newer one; else ``init_fn``.

        ``local_dir`` is brought to the resume point (``CheckpointEngine.resume``):
        the newest committed checkpoint that verifies is downloaded unless the
        local one is the same and intact (sizes and crc32c), newer (its upload
        never finished) or pointed back on purpose; corrupt committed ones are
        skipped (logged at ERROR). TF restores it from ``local_dir`` (its
        ``restore_or_initialize``); then this manager registers as the directory's
        writer (fencing older ones), and ``init_fn`` runs when there was nothing to
        restore. A checkpoint TF cannot restore into this ``tf.train.Checkpoint`` (a
        variable of another shape: another model under the same ``checkpoint_name``)
        raises ``ConfigError`` before registering, so a job still writing there is not
        fenced.

        A resume point named otherwise than ``checkpoint_name`` is refused before it is
        restored and before registering (no writer is fenced): ``model.ckpt-60`` of a TF1
        ``CheckpointSaverHook``/Saver, which TF would restore into a ``tf.train.Checkpoint``
        by variable names only, silently restoring nothing that does not match (the first
        ``save()`` would then start over), or this program's own checkpoints under an earlier
        ``checkpoint_name``. Pass the directory's name as ``checkpoint_name``, or use a new
        directory.

        Returns:
            The local path restored, or None (``init_fn`` was called, if given).

        Multi-worker (a collective: every worker calls it): the chief does the
        above; a local checkpoint newer than anything committed is committed
        first. Every other worker then downloads and verifies the step the chief
        restores into its temporary directory and restores it.

        Raises:
            IntegrityError: checkpoints are committed but none verifies and there is no
                local checkpoint (training must not silently start from scratch).
            ConfigError: the resume point is not a ``<checkpoint_name>-<step>`` checkpoint (see
                above), or TF could not restore it into this checkpoint's objects (TF's
                ``ValueError`` chained); no writer registered.
            RemoteError / FencedError: the store could not be read or written.
            WorkerFailedError: (multi-worker) another worker failed to restore: the chief, or a
                worker whose download of the chief's step failed (that worker raises its own error,
                e.g. ``IntegrityError``); every worker raises in the same call.
        """
        self._manager.sync()
        if self._agreement is not None:
            self._resume(download=True)
            return self._manager.restore_or_initialize()
        # The last check's (it runs again when registering decides again): TF's manager over local_dir at the
        # resume point, and the path it restored (absent: nothing to restore).
        resumed: dict[str, Any] = {}

        def restore(downloaded: CheckpointInfo | None) -> None:
            # Before registering (CheckpointEngine.resume's check): a checkpoint this model cannot take
            # must not fence the job that wrote it.
            self._check_resume_name(downloaded)
            if downloaded is not None:
                _write_local_state(self.local_dir)
            manager = tf.train.CheckpointManager(**self._tf_args)  # reads the state file at the resume point
            resumed.clear()
            resumed["manager"] = manager
            if manager.latest_checkpoint:
                try:
                    resumed["path"] = manager.restore_or_initialize()
                except (ValueError, tf.errors.OpError) as exc:
                    raise self._not_restorable(manager.latest_checkpoint, downloaded, exc) from exc

        self._resume_local_dir(download=True, check=restore)
        # Registering changes nothing in local_dir: the check's manager is TF's view of it (its interval
        # bookkeeping too, when it restored), so TF's manager is built once here, not again.
        self._manager = resumed["manager"] if "manager" in resumed else tf.train.CheckpointManager(**self._tf_args)
        if "path" in resumed:
            return resumed["path"]
        return self._manager.restore_or_initialize()  # nothing to restore: init_fn

    def _not_restorable(self, path: str, downloaded: CheckpointInfo | None, exc: BaseException) -> ConfigError:
        """The error for a checkpoint TF refused to restore into this manager's checkpoint."""
        what = (f"Checkpoint step {downloaded.step} of {self.directory} (downloaded into {self.local_dir})"
                if downloaded is not None else f"Checkpoint {path} (in local_dir, resuming {self.directory})")
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(detail) > 300:
            detail = detail[:300] + "..."
        return ConfigError(
            f"{what} could not be restored into this tf.train.Checkpoint: {detail} (another model's checkpoint "
            f"under the same checkpoint_name?). Nothing was registered: a job writing to {self.directory} is not "
            "fenced. Restore it with the model that wrote it, or use a new directory.")

    def sync(self) -> None:
        """Wait for TF's async checkpoint write (``tf.train.CheckpointManager.sync``); uploads go on."""
        self._manager.sync()

    # -- cloudckpt's additions -------------------------------------------------------------------
    @property
    def writer_id(self) -> str:
        """This manager's writer id in the directory's commit log (``FencedError`` names the newer one)."""
        return self._engine.writer_id

    @property
    def preempted(self) -> bool:
        """True once ``close()`` ended a run stopped by a preemption notice (multi-worker: a notice
        that reached any worker)."""
        return self._engine.preempted or (self._closed and self._stop_agreed)

    @property
    def task(self) -> str | None:
        """The TF cluster task this manager runs in (``worker:1``), from the strategy or ``TF_CONFIG``."""
        return self._role.name if self._role is not None else None

    @property
    def is_chief(self) -> bool:
        """True when this process commits checkpoints (not a non-chief worker of a multi-worker job)."""
        return self._agreement is None or self._role.is_chief  # type: ignore[union-attr]

    @property
    def notice(self) -> PreemptionNotice | None:
        """The first preemption notice received, if any."""
        return self._engine.notice

    def should_stop(self) -> bool:
        """True once a preemption notice was received: save a final checkpoint, leave the loop, ``close()``.

        Multi-worker, a collective until it turns True: every worker calls it once per
        step (at the same points of the loop), and it turns True on all of them at the
        same call once a notice reached any one of them (an all-reduce of that flag,
        run about once a second of training: ``WorkerAgreement.stop_agreed``). The same
        all-reduce carries a failed commit of the chief: it raises on every worker at
        that call, instead of ``save()`` raising on the chief alone.

        Raises:
            UploadError / FencedError: (multi-worker, the chief) a checkpoint failed to commit
                (``on_error="raise"``; ``FencedError`` either way).
            WorkerFailedError: (multi-worker, the other workers) the chief's commit failed.
        """
        if self._agreement is None:
            return self._engine.should_stop()
        if not self._stop_agreed:
            here = self._engine.should_stop()
            noticed = self._agreement.stop_agreed(self._engine)
            if noticed:
                self._stop_agreed = True
                log.warning("Preemption notice on %d of %d workers (%s): every worker stops at this step; the "
                            "chief commits the final checkpoint.", noticed, self._role.workers,  # type: ignore[union-attr]
                            "this one among them" if here else "not this one")
        return self._stop_agreed

    def wait(self, timeout: float | None = None) -> None:
        """Block until TF's async write has finished and every checkpoint saved so far is committed or dropped.

        Args:
            timeout: seconds to wait for the uploads (None: until done).

        Raises:
            UploadError: a checkpoint failed to commit, or ``timeout`` passed first.
        """
        self._manager.sync()
        self._engine.wait(timeout)

    def stats(self) -> UploadStats:
        """Commit counters (``UploadStats``): outcomes, dropped, failed, bytes, retries by cause, last step.

        The commit lag in steps (``last_commit_lag_steps``) of the newest committed checkpoint counts in the
        unit of its number. When ``save()`` numbers checkpoints by a variable -- ``checkpoint_number`` is a
        ``tf.Variable`` (or Keras variable), or equals the value of ``step_counter`` at the save -- that
        variable is read (from the uploader thread) when the commit completes, and the lag is the steps it
        advanced since the save: what a preemption at that moment would lose. Otherwise (numbering by
        ``save_counter``: the lag counts saves; or a plain int ``checkpoint_number`` without a matching
        ``step_counter``) the newest number saved by then stands in: whole save intervals, 0 while uploads
        keep up. A variable synchronized on read (``tf.VariableSynchronization.ON_READ``) is never read there
        (under a ``tf.distribute`` strategy the read could be a collective)."""
        return self._engine.stats()

    def close(self) -> None:
        """Commit the last checkpoint saved, then stop; idempotent.

        Waits for TF's async write, then up to ``upload_timeout`` (after a preemption
        notice: until the deadline) for every pending checkpoint; stops the preemption
        watcher (after a notice its SIGTERM handler stays until the process exits)
        and the uploader, and no cloudckpt thread is left. After a preemption, a
        SIGTERM handler of yours that the watcher deferred is called now.

        Multi-worker, a collective (every worker calls it, as TF's multi-worker loops do at the
        end): the other workers return once the chief's final commit is done; if it failed, the
        chief raises its error and every other worker ``WorkerFailedError``. (When the interpreter
        exits with a manager not closed, the close at exit is not a collective.)

        Raises:
            UploadError: the last checkpoint saved could not be committed (also with
                ``on_error="warn"``), or a newer writer took over (``FencedError``).
                After a preemption notice a missed deadline is logged, not raised.
            WorkerFailedError: (multi-worker, not the chief) the chief's final commit failed; or
                (any worker) TF's collective failed: another worker exited or stopped without
                calling ``close()``.
        """
        self._close(agree=True)

    def _close(self, *, agree: bool) -> None:
        """``close()``; ``agree``: multi-worker, agree on a failure of the chief's final commit (a collective)."""
        if self._closed:
            return
        self._closed = True
        failure: Exception | None = None
        if not self.is_chief:
            try:
                self._manager.sync()
            finally:
                self._close_worker()
        else:
            try:
                self._manager.sync()
                if self._last_saved_step is not None:
                    self._engine.prepare_final_save(self._last_saved_step)
                self._engine.finish(self._last_saved_step)
            except Exception as exc:  # noqa: BLE001 - raised below, by the agreement when there is one
                failure = exc
            finally:
                self._engine.close(timeout=0, reason="close()")
        if self._agreement is not None and agree:
            try:
                self._agreement.agree_on_failure(failure)
            except tf.errors.OpError as exc:  # TF's collective itself: a worker left without its close()
                done = "was committed" if failure is None else f"failed ({type(failure).__name__}: {failure})"
                raise WorkerFailedError(
                    f"close() of the CheckpointManager for {self.directory} on {self.task} could not agree with "
                    f"the other workers: TF's collective failed ({type(exc).__name__}), so another worker exited "
                    f"or stopped without calling close(). close() is a collective: call it on every worker, at "
                    f"the end of the loop. This worker's final checkpoint {done}.",
                    workers=(), errors=(type(exc).__name__,)) from exc
        elif failure is not None:
            raise failure
        if self._engine.preempted:
            self._engine.call_replaced_sigterm_handler()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.sync()
        except Exception as sync_error:  # noqa: BLE001 - the exception in flight is the one to report
            log.error("TF's async checkpoint write failed while closing: %s", sync_error)
        timeout = 0 if issubclass(exc_type, KeyboardInterrupt) else self._engine.upload_timeout
        # What close() does with the pending checkpoints: abandoned (KeyboardInterrupt), skipped (fenced), committed.
        # (timeout 0: the engine's close says what it abandoned and what a restart resumes from)
        log.warning("Training ended with %s; closing cloudckpt%s.", exc_type.__name__,
                    self._engine.closing_note(timeout) if self.is_chief and timeout != 0 else "")
        if not self.is_chief:
            self._close_worker()
            return
        self._engine.close(timeout=timeout, reason=f"Training ended with {exc_type.__name__}")

    # -- internals -----------------------------------------------------------------------------------
    def _ensure_resumed(self) -> None:
        """Resume once per manager, before TF's view of ``local_dir`` is used (see ``latest_checkpoint``);
        also before a ``save()`` that comes first, which ``_check_restored`` then holds to the resume point."""
        if not self._resumed:
            self._resume(download=True)

    def _track_steps(self, checkpoint_number: Any) -> None:
        """Before a save numbered ``checkpoint_number`` (checked): give the engine the variable that numbers the
        checkpoints, for the commit lag in steps (see ``stats``), or none. ``checkpoint_number`` itself when it
        is a variable; else ``step_counter`` when it holds that number now (one read of it per save, on the
        saving thread, as TF's ``checkpoint_interval`` does); else none: the engine's fallback."""
        variable = None
        if checkpoint_number is not None:
            counter = self._tf_args["step_counter"]
            if _step_variable(checkpoint_number):
                variable = checkpoint_number
            elif _step_variable(counter):
                try:
                    if _read_step(counter) == _read_step(checkpoint_number):
                        variable = counter
                except Exception as exc:  # noqa: BLE001 - a statistic never fails a save
                    log.debug("Could not compare step_counter with checkpoint_number: %s", exc)
        if variable is self._step_variable:
            return
        self._step_variable = variable
        self._engine.step_source = None if variable is None else functools.partial(_read_step, variable)

    def _check_restored(self, checkpoint_number: Any) -> None:
        """Before this manager's first save reaches TF: refuse it when the checkpoint it would write is
        below the resume point that ``local_dir``'s state file names (``CheckpointEngine.check_start_step``):
        the ``tf.train.Checkpoint`` was not restored from it, and committing the save would supersede it.
        TF's number, read without changing anything: ``checkpoint_number``, else ``save_counter + 1``.

        Raises:
            ConfigError: the checkpoint was not restored; TF has written nothing.
        """
        if checkpoint_number is not None:
            number, how = checkpoint_number, "checkpoint_number"
        else:
            number, how = self._manager.checkpoint.save_counter + 1, "checkpoint.save_counter + 1"
        step = int(number.numpy()) if hasattr(number, "numpy") else int(number)
        url, local = self.directory, self.local_dir
        # A non-chief worker's local_dir is a temporary copy of the chief's resume point: name the job's.
        temporary = self._agreement is not None and not self.is_chief
        back = f"To go back to an older step on purpose, run `cloudckpt rollback {url} --step N` first" + (
            "" if temporary else f" (or point the state file in {local} at it with "
                                 "tf.compat.v1.train.update_checkpoint_state)")
        new_lineage = "to start a new lineage, use a new checkpoint directory."
        pointed = state_file_prefix(local)
        if pointed is not None and checkpoint_kind(os.path.join(local, pointed)) == "name-based":
            # A TF1 Saver's checkpoint of this checkpoint_name: TF restored it by variable names, matching none.
            back = (f"{pointed!r} is a TF1 tf.compat.v1.train.Saver checkpoint (name-based): TF restores it into a "
                    "tf.train.Checkpoint by global variable names only, and silently restores nothing that does "
                    "not match, so restore_or_initialize() may have restored nothing; it continues only "
                    f"with a program whose variables have the same names. {back}")
        if checkpoint_number is None and step > 1:
            # save_counter came back from a checkpoint: it was restored, but this run numbers by save count
            # where the directory's checkpoints are numbered otherwise (checkpoint_number=step in earlier runs).
            self._engine.check_start_step(
                step, restored=True,
                starts=f"The first save() of this CheckpointManager would write checkpoint step {step} ({how})",
                fix="Number this run's checkpoints as the earlier ones were: pass checkpoint_number= (e.g. your "
                    f"step counter) to save(); save_counter counts saves, not steps. {back}; {new_lineage}")
            return
        self._engine.check_start_step(
            step, starts=f"The first save() of this CheckpointManager would write checkpoint step {step} ({how}) "
                         "from its tf.train.Checkpoint",
            source=f"that every worker of the job resumes from (the chief's, from {url})" if temporary else None,
            fix="Restore before the first save(): call manager.restore_or_initialize(), or "
                f"checkpoint.restore(manager.latest_checkpoint), on every worker. {back}, then restore; {new_lineage}")

    def _resume(self, *, download: bool, check: Callable[[CheckpointInfo | None], None] | None = None) -> None:
        """``_resume_local_dir``, then a new ``tf.train.CheckpointManager`` over ``local_dir``.

        Raises:
            ConfigError: as ``_resume_local_dir``.
        """
        self._resume_local_dir(download=download, check=check)
        # TF reads the state file when the manager is created: a new one sees what was fetched.
        self._manager = tf.train.CheckpointManager(**self._tf_args)

    def _resume_local_dir(self, *, download: bool,
                          check: Callable[[CheckpointInfo | None], None] | None = None) -> None:
        """Bring ``local_dir`` to the resume point and register (``CheckpointEngine.resume``; ``check`` runs
        before registering, default ``_check_resume_name``); ``self._manager`` is left as it was (the caller
        points it at a TF manager that has read the state file since). Multi-worker: a collective (every
        worker resumes in the same call, to the chief's step).

        Raises:
            ConfigError: the resume point is another checkpoint name's (``_check_resume_name``); the next
                ``restore_or_initialize()``, ``latest_checkpoint`` or ``save()`` tries again.
        """
        self._resumed = True
        try:
            if self._agreement is None:
                self.restored = self._engine.resume(download=download, check=check or self._check_resume_name)
            else:
                self.restored = self._restore_multi_worker(self._agreement)
        except ConfigError:
            self._resumed = False
            raise
        if self.restored is not None:
            _write_local_state(self.local_dir)
        if self._agreement is None and self._engine.in_place:
            self._commit_resume_point()

    def _commit_resume_point(self) -> None:
        """In place, after resuming: queue the commit of the checkpoint TF's state file names when it is newer
        than anything committed (a crash between its save and its commit; TF's manager resumes from it). The
        TF1 hook commits it at its first save (TF saves the restored step again); TF2's manager does not save
        it again, so without this it stayed uncommitted (``incomplete`` in ``cloudckpt ls``) while TF resumed
        from it. Asynchronous, like a ``save()``'s commit; its parent is the committed head registered from."""
        prefix = state_file_prefix(self.local_dir)
        parsed = split_prefix(prefix) if prefix else None
        if parsed is None:
            return
        step = parsed[1]
        if any(c.step >= step for c in scan_directory(self._engine.store).committed):
            return
        ckpt = TF.find_local(self.local_dir, prefix)  # type: ignore[arg-type]
        if ckpt is None:
            return
        marker = TF.marker_path(self.local_dir, prefix)  # type: ignore[arg-type]
        saved_at = os.path.getmtime(marker) if marker is not None else None
        log.info("Committing checkpoint step %d in %s: TF resumes from it, and it was never committed (a crash "
                 "between its save and its commit).", step, self.directory)
        self._engine.submit(step, ckpt.files, saved_at=saved_at)

    def _check_resume_name(self, downloaded: CheckpointInfo | None = None) -> None:
        """Before registering: refuse a resume point that is not ``<checkpoint_name>-<step>`` (``check_resume_name``:
        a TF1 Saver's ``model.ckpt-*``, restored by variable names, would silently restore nothing)."""
        check_resume_name(self.local_dir, self._tf_args["checkpoint_name"], argument="checkpoint_name",
                          url=self.directory, owner="cloudckpt.CheckpointManager", kind="object-based")

    def _written(self, save_path: str) -> None:
        """TF's write callback: the files of ``save_path`` are complete on disk.

        In TF's async-checkpoint thread (``enable_async``) the checkpoint is snapshotted and queued now;
        in the thread calling ``save()`` that is left until ``save()`` has returned from TF, after TF's
        own callback (state file, ``max_to_keep`` sweep), so the upload starting does not compete with
        the rest of the saving step, and a sweep in place is retired by the same commit.
        """
        prefix = os.path.basename(os.fspath(save_path))
        if threading.get_ident() == self._saving_thread:
            self._written_here.append((prefix, time.time()))
        else:
            self._submit(prefix, time.time())

    def _submit(self, prefix: str, saved_at: float) -> None:
        """Snapshot and queue checkpoint ``prefix`` of ``local_dir``; never touches the network. A non-chief
        worker deletes it instead (its save only took part in TF's collectives)."""
        ckpt = TF.find_local(self.local_dir, prefix)
        if ckpt is None:
            log.warning("No checkpoint files for %s found in %s; nothing to commit.", prefix, self.local_dir)
            return
        if not self.is_chief:
            for path in ckpt.files.values():
                _remove(path)
            return
        self._engine.submit(ckpt.step, ckpt.files, saved_at=saved_at)

    def _restore_multi_worker(self, agreement: WorkerAgreement) -> CheckpointInfo | None:
        """Every worker restores the step the chief restores (``restore_as_the_chief_does``, all-reduces;
        a failure on any worker raises on all of them). The chief's step is its local head, committed first."""
        restored = restore_as_the_chief_does(agreement, self._engine.store, self.local_dir, self._restore_chief,
                                             lambda info: info)
        if restored is not None and not agreement.role.is_chief:
            log.info("Restoring checkpoint step %d, as the chief does.", restored.step)
        return restored

    def _restore_chief(self) -> tuple[int | None, CheckpointInfo | None]:
        """The chief's part of the restore: as on one machine; then the step the other workers restore."""
        restored = self._engine.resume(download=True, check=self._check_resume_name)
        return self._commit_local_head(), restored

    def _commit_local_head(self) -> int | None:
        """The chief's resume point (the step the local state file names); a local checkpoint newer than
        anything committed is committed first, so that the other workers can download it."""
        prefix = state_file_prefix(self.local_dir)
        parsed = split_prefix(prefix) if prefix else None
        if parsed is None:
            return None
        step = parsed[1]
        if any(c.step == step for c in scan_directory(self._engine.store).committed):
            return step
        ckpt = TF.find_local(self.local_dir, prefix)  # type: ignore[arg-type]
        if ckpt is None:
            return None
        log.info("Committing local checkpoint step %d (newer than %s) before the other workers restore it.",
                 step, self.directory)
        self._engine.submit(step, ckpt.files, required=True)
        self._engine.wait(self._engine.upload_timeout)
        return step

    def _close_worker(self) -> None:
        """A non-chief worker: stop watching, remove the temporary directory."""
        if self._engine.notice is not None or self._stop_agreed:
            self._engine.preempted = self._engine.notice is not None
        try:
            self._engine.close(timeout=0, reason="close()")
        finally:
            if self._worker_temp is not None:
                shutil.rmtree(self._worker_temp, ignore_errors=True)


def _worker_role(strategy: Any, url: str) -> tuple[TaskRole | None, WorkerAgreement | None]:
    """This process's task, and the agreement of a multi-worker ``MultiWorkerMirroredStrategy`` (None on
    one machine, or for a strategy with a single process running the loop, e.g. parameter-server
    training's coordinator)."""
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        role = role_of_strategy(strategy)
        if role is not None and role.multi_worker:
            return role, WorkerAgreement(strategy, role)
        return role, None
    role = role_from_tf_config()
    if role is not None and role.multi_worker and not role.parameter_servers:
        raise ConfigError(
            f"TF_CONFIG describes {role.workers} workers ({role.name} here) but no MultiWorkerMirroredStrategy is "
            f"in scope: create cloudckpt.CheckpointManager for {url} inside strategy.scope(), or pass strategy=, "
            "so that only the chief commits (every worker committing would fence the others).")
    return role, None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _close_at_exit(ref: "weakref.ref[CheckpointManager]") -> None:
    """At interpreter exit, close a manager the program did not close: its last save is committed
    (waiting up to ``upload_timeout``), or the failure logged at ERROR; no cloudckpt thread is left.
    After Ctrl-C (``shutdown.interrupted_exit``), or at a second one while waiting, what is still
    uploading is abandoned instead, as ``with`` does."""
    manager = ref()
    if manager is None or manager._closed:
        return
    interrupt = interrupted_exit()
    if interrupt is not None:  # Ctrl-C ended the program: not waited for, as in a `with` block
        manager.__exit__(type(interrupt), interrupt, None)
        return
    pending = manager._engine.pending_steps()
    try:  # the warning too: a Ctrl-C right after it is written (still in logging) is not lost either
        log.warning("Interpreter exit with an open cloudckpt.CheckpointManager for %s: closing it%s. Call close() "
                    "(or use `with CheckpointManager(...)`) when training ends.", manager.directory,
                    f" after checkpoint step(s) {pending} commit (upload_timeout={manager._engine.upload_timeout}; "
                    "Ctrl-C abandons them)" if pending else "")
        manager._close(agree=False)  # the other workers may be gone, or not closing: no collective
    except CloudCkptError as error:
        log.error("%s", error)
    except KeyboardInterrupt:  # raised in the wait (whose close(timeout=0) abandoned the upload), or before it
        # idempotent; the close that abandoned the upload said so, with what a restart resumes from
        manager._engine.close(timeout=0, reason="KeyboardInterrupt at exit")
        log.warning("KeyboardInterrupt while waiting at interpreter exit: cloudckpt closed without waiting.")


def _write_local_state(local_dir: str) -> None:
    """After a download, rewrite the local state file with ``tf.train.CheckpointManager``'s timestamps, so the
    manager keeps managing (and sweeping) every local checkpoint (``layout.write_local_state_file``)."""
    write_local_state_file(local_dir)
