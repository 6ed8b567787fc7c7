"""``CheckpointSaverHook``: TF's checkpoint hook, committing every checkpoint to any fsspec URL.

The Saver writes to a local directory exactly as with TF's hook; an
``UploadListener`` appended after the user's listeners commits each save to
the remote URL in the background. The training thread only learns about the
network when an upload has failed (``UploadError`` at the next step).

Between-graph replication (``MonitoredTrainingSession(master=..., is_chief=...,
chief_only_hooks=[hook])``): the hook runs on the chief only. When variables
live on other tasks (parameter servers), TF's default ``Saver(sharded=True)``
would make each of them write its own shard on its own disk, which the
chief never sees; so ``begin()`` gives the session a non-sharded Saver whose
save and restore ops run on the chief (variables are sent over the network),
or, for a Saver of the user's that would write elsewhere, raises
``ConfigError`` naming the fix. A checkpoint with shards missing is never
committed.

Lifecycle: ``close()`` stops the preemption watcher (signal handlers restored)
and the uploader. It runs from ``end()`` and also when the session ends with an
exception, which ``MonitoredSession`` does not report to hooks (it calls
``end()`` only on a clean exit): the hook registers a probe with the session's
``Coordinator``, whose ``join()`` -- run by every ``MonitoredSession.close()``,
in the thread closing the session -- asks registered threads ``is_alive()``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

from .engine import default_local_dir, ensure_writable, resolve_local_dir  # noqa: F401 (re-exported)
from .errors import ConfigError, integer_option, number_option
from .layout import TF, check_basename, split_prefix, state_file_prefix
from ._saver_check import Mismatch, restore_mismatches, restoring_var_list
from ._tfnames import check_resume_name
from .catalog import CheckpointInfo
from .distributed import TaskRole, name_task_in_logs, role_from_tf_config
from .listener import UploadListener
from .preemption import PreemptionWatcher
from .retention import RetentionPolicy
from .retry import RetryPolicy
from .transfer import TransferOptions
from .urls import as_url
from .uploader import UploadStats

log = logging.getLogger("cloudckpt")

PREEMPTED_EXIT_CODE = 42  # what TF's failure handling exits with for a terminated worker
_MAX_LISTED = 5  # mismatched variables named in the error of a resume point the Saver cannot restore


def _check_schedule(save_secs: float | None, save_steps: int | None) -> None:
    # ConfigError is a ValueError: TF's exception type, in cloudckpt's hierarchy. TF's message ("One of
    # save_steps or save_secs should be set.") reads as if neither was set when both were: it opens ours (code
    # matching on it still matches), which then says exactly one must be set and which case this is.
    if save_secs is None and save_steps is None:
        raise ConfigError("One of save_steps or save_secs should be set: exactly one must be set, and neither "
                          "was given.")
    if save_secs is not None and save_steps is not None:
        raise ConfigError(f"One of save_steps or save_secs should be set, not both: exactly one must be set, "
                          f"but both were given (save_steps={save_steps!r}, save_secs={save_secs!r}).")
    if save_steps is not None and ((steps := integer_option(save_steps)) is None or steps <= 0):
        raise ConfigError(f"save_steps must be a positive integer, got {save_steps!r}.")
    if save_secs is not None and ((secs := number_option(save_secs)) is None or secs <= 0):
        raise ConfigError(f"save_secs must be a positive number of seconds, got {save_secs!r}.")


class CheckpointSaverHook(tf.compat.v1.train.CheckpointSaverHook):
    """Saves checkpoints every N steps or seconds and commits them to ``checkpoint_dir``.

    A drop-in for ``tf.compat.v1.train.CheckpointSaverHook``: same arguments,
    errors and listener semantics (save at session creation, on the timer and
    at ``end()``; listeners' ``before_save``/``after_save``/``end`` in order;
    ``after_save`` returning True requests stop). In addition:

    Args:
        checkpoint_dir: a local path (committed in place, like TF's hook) or any
            fsspec URL: ``s3://``, ``gs://``, ``memory://``, ``file://``...
        save_secs, save_steps, saver, checkpoint_basename, scaffold, listeners,
            save_graph_def: as for TF's hook.
        local_dir: where the Saver writes before upload; default: a stable
            per-URL directory under ``~/.cache/cloudckpt``.
        storage_options: fsspec options (``endpoint_url``, ``key``, ``token``...).
        max_pending: checkpoints allowed to wait behind the one uploading; past
            that the oldest waiting one is dropped (logged and counted).
        upload_timeout: seconds ``end()`` waits for uploads; None waits until done.
        retry: ``RetryPolicy`` for transient storage errors.
        on_error: ``"raise"``: a failed commit raises ``UploadError`` in the
            training thread; ``"warn"``: it is logged and counted, training goes on.
        restore: in ``begin()``, download the newest committed checkpoint that
            verifies if it is newer than what ``local_dir`` holds (the resume
            path of a preempted VM that comes back with an empty disk).
        remote_max_to_keep, keep_checkpoint_every_n_hours: remote retention,
            applied after each commit; None follows the Saver's own
            ``max_to_keep`` / ``keep_checkpoint_every_n_hours``, so the bucket
            keeps what the local directory keeps; ``remote_max_to_keep=0``
            keeps everything. The latest committed checkpoint is never deleted.
        preemption: watch for a spot / preemptible shutdown notice: None (off),
            ``"sigterm"``, ``"auto"`` (SIGTERM + GCE, AWS and Azure metadata) or a
            ``PreemptionWatcher``. On a notice, training stops at the next step
            and ``end()`` saves and commits a final checkpoint within the deadline.
        preemption_deadline: seconds from the notice to get the final
            checkpoint committed; default: the platform's (25 s GCE, 100 s AWS,
            Azure: until the event's ``NotBefore`` less 5 s). A hard stop
            announced by a GCE / AWS / Azure metadata notice caps it (not
            SIGTERM's 25 s, a guess); see ``CheckpointEngine``.
        exit_on_preemption: after a preemption stop, exit the process with
            TF's code for a terminated worker (42), or with the given int.
        transfer: part size, files and parts in flight (``cloudckpt.TransferOptions``).
        summary_dir: write commit lag, throughput, queue depth, retries, drops and failures
            as TensorBoard scalars there after each commit (None: off).

    Raises:
        ValueError: neither or both of ``save_steps`` and ``save_secs`` given (exactly one must be;
            the message opens with TF's "One of save_steps or save_secs should be set") /
            "At most one of saver or scaffold should be set." / non-positive schedule.
        ConfigError: unusable URL or ``local_dir``, a ``checkpoint_basename`` that is no plain file
            name; in ``begin()``, a resume point of another checkpoint name (another program's
            directory, e.g. a TF2 ``CheckpointManager``'s ``ckpt-*``) or one the session's Saver
            cannot restore (a variable it lacks or holds with another shape or dtype: another model's
            checkpoint), both before registering as the directory's writer; a Saver (``saver=``,
            ``scaffold=`` or the graph's ``SAVERS`` collection) that would write part of
            the checkpoint on another task (a sharded Saver with variables on parameter
            servers); in ``after_create_session()``, a session that did not restore the
            checkpoint in ``local_dir`` (not created with ``checkpoint_dir=hook.local_dir``).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        save_secs: float | None = None,
        save_steps: int | None = None,
        saver: Any = None,
        checkpoint_basename: str = "model.ckpt",
        scaffold: Any = None,
        listeners: Sequence[tf.compat.v1.train.CheckpointSaverListener] | None = None,
        save_graph_def: bool = True,
        *,
        local_dir: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int = 2,
        upload_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        on_error: str = "raise",
        restore: bool = True,
        remote_max_to_keep: int | None = None,
        keep_checkpoint_every_n_hours: float | None = None,
        preemption: PreemptionWatcher | str | None = None,
        preemption_deadline: float | None = None,
        exit_on_preemption: bool | int = False,
        transfer: TransferOptions | None = None,
        summary_dir: str | None = None,
    ) -> None:
        _check_schedule(save_secs, save_steps)
        check_basename(checkpoint_basename, "checkpoint_basename")
        if not isinstance(exit_on_preemption, int) or not 0 <= exit_on_preemption <= 255:  # bool is an int
            raise ConfigError(f"exit_on_preemption must be True (exit code {PREEMPTED_EXIT_CODE}), False or an exit "
                              f"code in [0, 255], got {exit_on_preemption!r}.")
        if saver is not None and scaffold is not None:
            raise ConfigError("At most one of saver or scaffold should be set.")
        checkpoint_dir = as_url(checkpoint_dir, "checkpoint_dir")
        local_dir = resolve_local_dir(checkpoint_dir, local_dir, storage_options, writer="the Saver")
        try:  # validate now, not mid-run
            RetentionPolicy(remote_max_to_keep, keep_checkpoint_every_n_hours)
        except ConfigError as exc:  # the hook's argument is remote_max_to_keep
            raise ConfigError(str(exc).replace("max_to_keep", "remote_max_to_keep", 1)) from None
        self._upload = UploadListener(checkpoint_dir, local_dir, storage_options=storage_options,
                                      max_pending=max_pending, retry=retry, on_error=on_error,
                                      upload_timeout=upload_timeout, preemption=preemption,
                                      preemption_deadline=preemption_deadline, transfer=transfer,
                                      summary_dir=summary_dir)
        self._engine = self._upload.engine
        self._role: TaskRole | None = role_from_tf_config()
        if self._role is not None:
            self._engine.task = self._role.name
            name_task_in_logs(self._role.name)
        self._upload.registers_in_begin = False  # begin() registers once the resume point is in local_dir
        ensure_writable(local_dir)
        super().__init__(local_dir, save_secs=save_secs, save_steps=save_steps, saver=saver,
                         checkpoint_basename=checkpoint_basename, scaffold=scaffold,
                         listeners=[*(listeners or []), self._upload], save_graph_def=save_graph_def)
        self._restore = restore
        self._basename = checkpoint_basename
        self._retention_args = (remote_max_to_keep, keep_checkpoint_every_n_hours)
        self._watcher = self._engine.watcher
        self._exit_code = (PREEMPTED_EXIT_CODE if exit_on_preemption is True
                           else (int(exit_on_preemption) if exit_on_preemption else None))
        self._stop_requested = False
        self._upload_timeout = upload_timeout
        self._open = False
        self._close_lock = threading.Lock()
        self.preempted = False
        self.restored: CheckpointInfo | None = None
        # The global step for the commit lag in steps (_training_step): the session's first, then the value TF's
        # hook fetches with every run (after_run's run_values), stored as is.
        self._session_step: int | None = None
        self._run_step: Any = None
        self._engine.step_source = self._training_step

    def begin(self) -> None:
        """Check the remote directory, bring ``local_dir`` to the resume point, and become its writer.

        With ``restore=True`` the head of the directory's lineage is downloaded
        (verified) unless ``local_dir`` already holds it intact, or its state
        file was pointed at an older checkpoint on purpose (a rollback);
        see ``resume.py``. Registering as the directory's writer fences any
        older writer still running (``FencedError`` at its next commit). Runs
        before the session is created, so ``MonitoredTrainingSession``
        restores from ``local_dir`` and the global step continues.

        Before registering, the resume point is checked against the Saver the session will restore
        it with (``saver=``, the scaffold's, the graph's ``SAVERS``, else the default one): every
        variable that Saver restores must be in the checkpoint with the same dtype and shape
        (compared with the checkpoint's index, no value read). A graph the checkpoint does not fit
        -- typically another model pointed at the same ``checkpoint_dir`` -- would otherwise fail in
        TF's restore only after this hook had fenced the job writing the directory.

        Raises:
            ConfigError: the resume point is not a ``<checkpoint_basename>-<step>`` checkpoint (a TF2
                ``tf.train.CheckpointManager``'s ``ckpt-*``, which the session's Saver could not restore),
                or the session's Saver cannot restore it (variables it lacks, or holds with another shape
                or dtype: named, graph vs checkpoint); both checked before registering, so no writer of the
                directory is fenced; its files stay in ``local_dir``. Or a Saver that would write on
                another task (see the class docstring).
        """
        # Watch during the restore too: a notice then is kept, and training stops at its first step.
        # Nothing keeps running after begin(): TF tells hooks nothing when creating the session fails
        # after it (a failed restore, an init_fn, another hook's begin()), so the watcher starts again,
        # and the uploader starts, only once the session exists (after_create_session).
        self._open = False
        self._stop_requested = False
        if self._role is not None and self._role.multi_worker and not self._role.is_chief:
            raise ConfigError(
                f"CheckpointSaverHook for {self.checkpoint_url} runs on {self._role.name}, not the chief: every "
                "worker with the hook would register as the directory's writer and fence the others. Pass it in "
                "MonitoredTrainingSession(chief_only_hooks=[hook]) (the chief: TF_CONFIG's 'chief' task, else "
                "worker 0).")
        self._place_saver_on_chief()
        if self._watcher is not None:
            self._watcher.start()
        try:
            super().begin()
            self.restored = self._upload.resume(download=self._restore and not self._upload.in_place,
                                                check=self._check_resume_point)
        finally:
            if self._watcher is not None:
                self._watcher.stop()

    def _check_resume_point(self, downloaded: CheckpointInfo | None = None) -> None:
        """In ``begin()``, once ``local_dir`` holds the resume point and before registering: refuse one
        the session's Saver would fail to restore, so that a job writing the directory is not fenced.

        First its name (``check_resume_name``: e.g. ``ckpt-*`` of a TF2 ``tf.train.Checkpoint``, which
        the Saver would fail to restore with a bare ``NotFoundError``), then its variables against the
        Saver's (``_check_saver_fits``).
        """
        check_resume_name(self.local_dir, self._basename, argument="checkpoint_basename", url=self.checkpoint_url,
                          owner="cloudckpt.CheckpointSaverHook", kind="name-based")
        self._check_saver_fits(downloaded)

    def _check_saver_fits(self, downloaded: CheckpointInfo | None) -> None:
        """Refuse a resume point the session's Saver cannot restore: a variable it restores that the
        checkpoint lacks, or holds with another dtype or shape (``restore_mismatches``; the ``.index``
        file only, no value read).

        The Saver is the one the session restores with: ``saver=``, the scaffold's, the graph's
        ``SAVERS`` collection, else the default one ``Scaffold.finalize`` builds (global variables and
        ``SAVEABLE_OBJECTS`` as they are now; variables created later, e.g. by a hook after this one,
        are not checked). With ``saver=`` and no ``scaffold=``, the session's own Scaffold (which this
        hook cannot see) may restore with another Saver: when the default one would not fit, a WARNING
        says so (the session's Scaffold may have a saver of its own: not refused). Nothing is checked for a Saver made from a ``SaverDef`` (its variables are
        not known), for several Savers in ``SAVERS`` (TF refuses them itself), or when the checkpoint's
        index cannot be read (logged; TF's restore reports it).

        Raises:
            ConfigError: names the mismatched variables (at most ``_MAX_LISTED``), graph vs checkpoint.
        """
        prefix = state_file_prefix(self.local_dir)
        if prefix is None or prefix not in TF.local_prefixes(self.local_dir):
            return
        graph = tf.compat.v1.get_default_graph()
        path = os.path.join(self.local_dir, prefix)
        # The Saver a session restores with: its Scaffold's, else the graph's SAVERS one, else (None) the
        # default one Scaffold.finalize builds; several in SAVERS: unknown (TF refuses them itself).
        restoring = self._scaffold.saver if self._scaffold is not None else None
        savers = graph.get_collection(tf.compat.v1.GraphKeys.SAVERS) if restoring is None else []
        known = len(savers) <= 1
        restoring = restoring or (savers[0] if len(savers) == 1 else None)
        if self._saver is None and not known:
            return
        mismatches = _mismatches(self._saver or restoring, graph, path)
        if not mismatches:
            if mismatches is not None and self._saver is not None and self._saver is not restoring and known:
                # The session restores with its Scaffold's Saver, which this hook cannot see: the default
                # one unless the session was given a Scaffold with ``saver=``. Said, not refused.
                others = _mismatches(restoring, graph, path)
                if others:
                    log.warning(
                        "Checkpoint %s fits this hook's saver=, but not the Saver a session restores with by "
                        "default (%s%s): unless the session's Scaffold has that saver, TF's restore will fail "
                        "after this hook registered as the writer of %s (fencing a job writing there). Pass the "
                        "session's Scaffold to the hook too (scaffold=) so the Saver it restores with is checked.",
                        path, "; ".join(str(m) for m in others[:_MAX_LISTED]),
                        f"; and {len(others) - _MAX_LISTED} more" if len(others) > _MAX_LISTED else "",
                        self.checkpoint_url)
            return
        parsed = split_prefix(prefix)
        what = (f"Checkpoint step {downloaded.step} of {self.checkpoint_url} (downloaded into {self.local_dir})"
                if downloaded is not None else
                f"Checkpoint {prefix!r} in {self.local_dir} (the resume point of {self.checkpoint_url}"
                + (f", step {parsed[1]})" if parsed is not None else ")"))
        listed = "; ".join(str(m) for m in mismatches[:_MAX_LISTED])
        if len(mismatches) > _MAX_LISTED:
            listed += f"; and {len(mismatches) - _MAX_LISTED} more"
        raise ConfigError(
            f"{what} cannot be restored by this session's Saver: {listed}. TF's restore would fail "
            "(NotFoundError / InvalidArgumentError) or, for a resource variable of another shape, give it a value "
            "of that shape. Another model's checkpoint in this checkpoint_dir, or this model changed? Nothing was "
            "restored, and this cloudckpt.CheckpointSaverHook did not register as the directory's writer: a job "
            f"writing to {self.checkpoint_url} is not fenced. Continue these checkpoints with the graph that wrote "
            "them, or train this model in a checkpoint_dir of its own (to start it from these weights, warm-start "
            "it there: tf.compat.v1.train.init_from_checkpoint)."
            + (" If this model only added variables (e.g. another optimizer's slots), restore the ones the "
               "checkpoint has with a Saver of those (a Scaffold(saver=tf.compat.v1.train.Saver(var_list=...)) "
               "given to the session and to this hook) and initialize the new ones in the Scaffold's "
               "local_init_op." if all(m.checkpoint is None for m in mismatches) else ""))

    @property
    def task(self) -> str | None:
        """The TF cluster task this hook runs in (``worker:0``), from ``TF_CONFIG``; None without one."""
        return self._role.name if self._role is not None else None

    def _place_saver_on_chief(self) -> None:
        """With variables on other tasks, make sure the whole checkpoint is written on this task (the chief).

        No Saver given and none in the graph: a non-sharded one is created with its ops on this task and
        added to the ``SAVERS`` collection, so the session's scaffold restores with it too. A Saver that
        is sharded, or whose save op runs on another task, is refused.

        Raises:
            ConfigError: the Saver in use would write (part of) the checkpoint on another task.
        """
        remote = _remote_variable_tasks(self._role)
        if not remote:
            return
        here = f"/job:{self._role.task_type}/task:{self._role.task_id}" if self._role is not None else None
        savers = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.SAVERS)
        saver = self._saver or (self._scaffold.saver if self._scaffold is not None else None) or \
            (savers[0] if len(savers) == 1 else None)
        if saver is None and not savers:
            with tf.device(here):  # None clears any device scope: the ops run on the session's master
                saver = tf.compat.v1.train.Saver(sharded=False, allow_empty=True)
            tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.SAVERS, saver)
            log.info("Variables live on %s: checkpoints are written whole on this task by a non-sharded Saver "
                     "(TF's default sharded Saver would write each shard on its own host).", ", ".join(remote))
            return
        saver_def = getattr(saver, "saver_def", None)
        save_device = ""
        if saver_def is not None and saver_def.save_tensor_name:
            save_device = tf.compat.v1.get_default_graph().get_tensor_by_name(saver_def.save_tensor_name).op.device
        save_task = _task_of(save_device)
        # Without TF_CONFIG this task's name is unknown: only a task known to hold variables is elsewhere.
        elsewhere = save_task is not None and (save_task in remote or (self.task is not None
                                                                       and save_task != self.task))
        if saver_def is not None and (saver_def.sharded or elsewhere):
            raise ConfigError(
                f"The Saver of this session would write checkpoint shards on other tasks ({', '.join(remote)} hold "
                "variables; " + ("the Saver is sharded" if saver_def.sharded else f"its save op runs on {save_device}")
                + f"), whose disks cloudckpt never sees, so {self.checkpoint_url} would get incomplete checkpoints. "
                "Pass no saver (cloudckpt then creates a non-sharded one on the chief), or "
                "saver=tf.compat.v1.train.Saver(sharded=False) created outside any device scope.")

    @property
    def local_dir(self) -> str:
        """The directory the Saver writes to: pass it as ``MonitoredTrainingSession(checkpoint_dir=...)``."""
        return self._upload.local_dir

    @property
    def writer_id(self) -> str:
        """This hook's writer id in the directory's commit log (``cloudckpt ls --json``, ``FencedError``)."""
        return self._upload.writer_id

    @property
    def checkpoint_url(self) -> str:
        """The remote checkpoint directory, in display form (credentials masked: ``s3://***@bucket/run``);
        not usable to reopen the store when the URL carries credentials."""
        return self._upload.url

    def after_create_session(self, session: Any, coord: Any) -> None:
        """Check the session restored ``local_dir``'s checkpoint, resolve remote retention from the Saver,
        then save the first checkpoint (TF semantics).

        Raises:
            ConfigError: the session starts at a global step below the checkpoint ``local_dir``'s state
                file names (the one ``begin()`` restored, or this run's newest save): it was not created
                with ``checkpoint_dir=hook.local_dir``. Nothing is saved or committed and nothing keeps
                running (``UploadListener.check_session_step``).
        """
        step = int(session.run(self._global_step_tensor))
        self._upload.check_session_step(step)
        self._session_step, self._run_step = step, None
        max_to_keep, every_n_hours = self._retention_args
        saver_def = getattr(self._get_saver(), "saver_def", None)
        if max_to_keep is None and saver_def is not None:
            max_to_keep = saver_def.max_to_keep or None
        if every_n_hours is None and saver_def is not None and 0 < saver_def.keep_checkpoint_every_n_hours < 10000:
            every_n_hours = saver_def.keep_checkpoint_every_n_hours  # TF's default 10000 h means "off"
        self._upload.retention = RetentionPolicy(max_to_keep, every_n_hours)
        if not self._open:
            self._open = True
            self._engine.start_watching()
        coord.register_thread(_SessionCloseProbe(self._on_session_close))
        super().after_create_session(session, coord)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        """Save when the timer says so (TF semantics), then re-raise any failed upload as ``UploadError``.

        The global step TF's hook fetched with this run (``run_values.results``) is kept as it is, for the
        commit lag in steps (``stats().last_commit_lag_steps``): nothing more is run or read per step.
        """
        self._run_step = run_values.results
        super().after_run(run_context, run_values)
        self._upload.raise_if_failed()
        notice = self._engine.notice
        if notice is not None and not self._stop_requested:
            self._stop_requested = True
            log.warning("Preemption notice (%s: %s): stopping training to save and commit a final checkpoint.",
                        notice.source, notice.detail)
            run_context.request_stop()

    def _training_step(self) -> int | None:
        """The global step training has reached, for the commit lag in steps (``CheckpointEngine.step_source``;
        called in the uploader thread): the value TF's hook fetched during the last ``session.run``, before the
        first run the session's initial step; None before a session. The fetch runs alongside the run's train
        op, so it reads the step before or after that run's increment: exact, or up to one run's steps fewer."""
        fetched = self._run_step
        return self._session_step if fetched is None else int(fetched)

    def _save(self, session: Any, step: int) -> bool:
        """TF's save, except that in place a step already on disk (TF saves the step it just restored
        again) keeps its ``.meta``: that file may be part of a committed checkpoint, which is never
        overwritten (the tensors TF writes again are the same bytes)."""
        rewrite_meta = self._save_graph_def
        if self._upload.in_place and os.path.exists(f"{self._save_path}-{int(step)}.meta"):
            self._save_graph_def = False
        try:
            return bool(super()._save(session, step))
        finally:
            self._save_graph_def = rewrite_meta

    def end(self, session: Any) -> None:
        """Save the final checkpoint (TF semantics), wait for every upload to commit, then ``close()``.

        The final checkpoint must reach the store: if it cannot be committed,
        ``UploadError`` is raised, also with ``on_error="warn"`` (which applies
        to intermediate checkpoints only).

        After a preemption notice, older uploads still waiting are dropped and
        the wait is bounded by the preemption deadline (a later notice, e.g. the
        shutdown's SIGTERM after a metadata notice, can only shorten it); if it
        passes, the previous committed checkpoint stays the latest, and that is
        logged, not raised: the process exits cleanly.
        """
        step = int(session.run(self._global_step_tensor))
        try:
            # The deadline is re-read while waiting: a notice arriving during the final commit of a
            # normal end bounds the wait too, and makes this a preemption stop (engine.finish).
            self._upload.prepare_final_save(step)
            super().end(session)
        finally:
            self.preempted = self._engine.preempted
            self._close(timeout=0, reason="end()")
        if self.preempted:
            self._engine.call_replaced_sigterm_handler()
            if self._exit_code is not None:
                log.warning("Exiting with code %d (preempted).", self._exit_code)
                sys.exit(self._exit_code)

    def close(self) -> None:
        """Stop watching for preemption and stop the uploader; idempotent.

        Signal handlers are restored (see ``PreemptionWatcher.stop``) -- unless a
        preemption notice was received: then the SIGTERM handler stays until the
        process exits, so the platform's shutdown SIGTERM cannot turn the clean
        exit into 143 (a second SIGTERM still terminates). Checkpoints
        still uploading get up to ``upload_timeout`` seconds to commit, and no
        cloudckpt thread is left afterwards. Runs from ``end()``, when the session
        ends with an exception, and on leaving ``with hook:``. Failures of
        intermediate uploads still pending are logged, not raised.
        """
        self._close(timeout=self._upload_timeout, reason="close()")

    def __enter__(self) -> "CheckpointSaverHook":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint saved so far is committed or dropped.

        Raises:
            UploadError: a checkpoint failed to commit, or ``timeout`` seconds passed first.
        """
        self._upload.wait(timeout)

    def stats(self) -> UploadStats:
        """Upload counters: each save's outcome (committed = uploaded, healed, already_committed, refused with
        last_refusal), dropped, failed, housekeeping failures with the last error, fenced_by, bytes, retries,
        last step and duration. Commit lag of the newest committed checkpoint: ``last_commit_lag_seconds``
        from its save to its commit, and ``last_commit_lag_steps`` the global steps training ran in between
        (the global step TF's hook fetched with the last ``session.run`` before the commit completed, minus
        the checkpoint's step: exact, or up to one run's steps fewer)."""
        return self._upload.stats()

    # -- internals ------------------------------------------------------------------------------
    def _on_session_close(self) -> None:
        """The session is closing; if ``end()`` did not run (an exception ended training), close now."""
        if not self._open:
            return
        error = sys.exc_info()[1]
        if isinstance(error, KeyboardInterrupt):
            # close(timeout=0) says what it abandons, with the latest committed step (one WARNING), if anything
            log.warning("Interrupted; closing cloudckpt.")
            self._close(timeout=0, reason="interrupted")
            return
        log.warning("The training session ended with %s; closing cloudckpt%s.",
                    f"an exception ({type(error).__name__})" if error is not None else "no end() call",
                    self._engine.closing_note(self._upload_timeout))
        self._close(timeout=self._upload_timeout, reason="session ended without end()")

    def _close(self, *, timeout: float | None, reason: str) -> None:
        with self._close_lock:
            if not self._open:
                return
            self._open = False
        # After a notice the watcher keeps its SIGTERM handler until the process exits (see
        # CheckpointEngine.stop_watching); pending failures are logged.
        self._engine.close(timeout=timeout, reason=reason)


def _task_of(device: str) -> str | None:
    """``/job:ps/task:1/device:CPU:0`` -> ``ps:1``; None when the device names no job."""
    spec = tf.DeviceSpec.from_string(device or "")
    return None if spec.job is None else f"{spec.job}:{spec.task or 0}"


def _remote_variable_tasks(role: TaskRole | None) -> list[str]:
    """The tasks other than this one holding global variables of the default graph (``ps:0``...). Without
    ``TF_CONFIG`` this task is not known: tasks of the ``ps`` job count then."""
    tasks = {_task_of(v.device) for v in tf.compat.v1.global_variables()}
    if role is None:
        return sorted(t for t in tasks if t is not None and t.startswith("ps:"))
    return sorted(t for t in tasks if t is not None and t != role.name)


class _SessionCloseProbe:
    """Registered with the session's ``tf.train.Coordinator`` as if it were a thread.

    ``Coordinator.join()`` (run by ``MonitoredSession.close()`` on every exit,
    clean or not, in the thread that closes the session) asks each registered
    thread ``is_alive()``; the first call runs ``on_close`` and the probe then
    reports itself finished. This is how the hook learns that a session ended
    with an exception, which TF does not report to hooks.
    """

    name = "cloudckpt-session-close-probe"

    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close: Callable[[], None] | None = on_close

    def is_alive(self) -> bool:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()
        return False


def _mismatches(saver: Any, graph: tf.Graph, path: str) -> list[Mismatch] | None:
    """What checkpoint ``path`` lacks or holds otherwise of what ``saver`` (None: the default Saver) restores
    (``restore_mismatches``); None when that is not known (``restoring_var_list``) or the checkpoint's index
    cannot be read (logged: TF's restore reports it)."""
    restoring = restoring_var_list(saver, graph)
    if restoring is None:
        log.debug("Not checking %s against the session's Saver: its variables are not known.", path)
        return None
    var_list, reshape = restoring
    try:
        return restore_mismatches(var_list, path, reshape=reshape)
    except (tf.errors.OpError, ValueError, TypeError) as exc:  # TF's Saver reports its own errors
        log.warning("Could not check checkpoint %s against the session's Saver before restoring it: %s", path, exc)
        return None
