"""``cloudckpt.keras.BackupAndRestore``: Keras 3's ``BackupAndRestore`` with committed, verified backups.

Keras' own callback overwrites ``latest.weights.h5`` and ``training_metadata.json``
in place, synchronously: a save interrupted half-way leaves a backup that
restores wrong, or not at all. Here every save is a new checkpoint of the
``keras-backup`` layout (``layout.py``), committed in the background by the
``CheckpointEngine`` with a checksummed manifest and a commit-log entry as the
commit point:

* ``backup-<step>.weights.h5``: ``model.save_weights`` -- the model's weights
  and the optimizer's variables (``optimizer.iterations`` among them);
* ``backup-<step>.state.json``: the epoch to resume at and the batch of the
  save (Keras' ``training_metadata.json``), written last.

``<step>`` is ``optimizer.iterations`` at the save. Only Keras' public API is
used to save and load (any backend), except ``model._initial_epoch``: the
attribute Keras' own ``BackupAndRestore`` sets so that ``fit`` starts at the
restored epoch (every Keras 3 trainer reads it).

Source of the semantics: ``keras.callbacks.BackupAndRestore`` (Keras 3,
https://keras.io/api/callbacks/backup_and_restore/ and
``keras/src/callbacks/backup_and_restore.py``).

Under ``MultiWorkerMirroredStrategy`` (tf-keras: ``TF_USE_LEGACY_KERAS=1``;
``distributed.py``) every worker runs the callback: only the chief commits;
the other workers save to a temporary directory that is removed, restore the
backup the chief restores (its step sent as an all-reduce of the strategy),
and a preemption notice on any worker stops all of them at the same batch
(an all-reduce of "a notice reached me", about once a second of batches).
A failed commit of the chief, or a failed download on another worker during the
restore, travels in the same all-reduces: every worker raises at the same batch
(``WorkerFailedError`` on the workers that did not fail).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Mapping

from ..catalog import CheckpointInfo
from ..distributed import (TaskRole, WorkerAgreement, name_task_in_logs, restore_as_the_chief_does, role_of_strategy,
                           worker_temp_dir)
from ..engine import CheckpointEngine, default_local_dir, ensure_writable
from ..errors import ConfigError, IntegrityError, integer_option
from ..layout import KERAS_BACKUP
from ..preemption import PreemptionWatcher
from ..retention import RetentionPolicy
from ..retry import RetryPolicy
from ..transfer import TransferOptions
from ..urls import as_url, is_local_path
from ._backend import keras, optimizer_built, set_initial_epoch
from ._lifecycle import EngineLifecycle, check_positive_int_or_epoch, iterations

log = logging.getLogger("cloudckpt")

BASENAME = "backup"
STATE_FORMAT = "cloudckpt.keras.backup"
STATE_VERSION = 1


class BackupAndRestore(EngineLifecycle, keras.callbacks.Callback):
    """Backs up the training state to a URL and restores it when ``fit`` starts again (Keras 3).

    Keras' ``BackupAndRestore`` semantics (``keras.callbacks.BackupAndRestore``):
    when training begins, the newest backup is restored -- the model's weights,
    the optimizer's state including ``optimizer.iterations``, and the epoch, so
    a resumed ``fit(epochs=N)`` runs only the epochs left. A backup saved in the
    middle of an epoch (an integer ``save_freq``, or a preemption) resumes at
    the start of that epoch, with the weights and optimizer state of the batch
    it was saved at (Keras records the batch but restarts the epoch).

    In addition:

    * **Committed, never overwritten.** Each save is written to ``local_dir``,
      then committed to ``backup_dir`` in the background (files create-only, a
      checksummed manifest, a commit-log entry as the commit point): ``fit``
      never waits on the network; at most ``max_pending`` backups wait behind the
      one uploading (the oldest waiting one is dropped first). An interrupted
      save never leaves a backup that restores wrong.
    * **Verified restore.** The newest committed backup is downloaded and checked
      (size and crc32c of every file); one that fails is logged at ERROR and the
      next older one is tried. If backups are committed but none verifies,
      ``IntegrityError`` is raised rather than silently starting at epoch 0.
    * **One writer.** Training begins by registering as the directory's writer:
      any older writer still running (a VM being replaced, a job launched twice)
      is fenced and gets ``FencedError`` at its next commit.
    * **Preemption.** With ``preemption``, a notice (SIGTERM, or GCE / AWS /
      Azure metadata with ``"auto"``) makes the callback save at the current batch, set
      ``model.stop_training`` and wait for that backup to commit until the
      deadline; ``preempted`` is then True and the backup is kept.
    * **Honest errors.** A backup that cannot be committed raises ``UploadError``
      in ``fit`` at the next batch (``FencedError`` when a newer writer took over);
      multi-worker, at the next stop agreement (within about a second), on every worker.
    * **Multi-worker** (``MultiWorkerMirroredStrategy``, with tf-keras:
      ``TF_USE_LEGACY_KERAS=1``): only the chief commits; the other workers' saves go
      to a temporary directory that is removed; every worker restores the backup the
      chief restores; a notice on any worker stops all of them at the same batch,
      and the chief commits that backup.

    Args:
        backup_dir: the backup directory URL (``s3://bucket/run/backup``, ``gs://``,
            any fsspec URL, or a local path). Use it for this run's backups only.
        save_freq: ``"epoch"`` (after every epoch), an integer N >= 1: after every N
            batches (counting ``steps_per_execution``, as Keras does), or ``False`` (Keras 3's
            "only with preemption checkpointing"): no periodic backups, only the one saved when a
            preemption notice comes; requires ``preemption`` (else ``ConfigError``).
        double_checkpoint: Keras 3's argument, accepted by keyword (here the third positional argument is
            ``delete_checkpoint``, as in tf-keras): the previous backup is always kept as the fallback of a
            newest one that fails verification while ``max_to_keep`` >= 2 (the default); True with
            ``max_to_keep=1`` is refused (``ConfigError``).
        delete_checkpoint: when ``fit`` ends normally (not preempted, not raising),
            delete every backup: each is un-committed first (a ``delete`` entry in
            the commit log, then its manifest), then its files, so no manifest ever
            vouches for missing files. ``False`` keeps them: a later ``fit`` resumes.
        storage_options: fsspec options for the store (``endpoint_url``, ``key``...);
            never logged.
        local_dir: where backups are written before they are committed and
            downloaded before they are restored (default: a per-URL cache directory,
            ``$CLOUDCKPT_CACHE_DIR`` or ``~/.cache/cloudckpt/<hash>``). Must differ
            from ``backup_dir``.
        max_to_keep: committed backups kept while ``fit`` runs: after each commit the
            older ones are deleted (the newest is never deleted; the one before it is the
            fallback if the newest fails verification). None keeps every backup.
        max_pending: backups allowed to wait behind the one uploading (>= 1).
        upload_timeout: seconds ``on_train_end`` / ``close()`` wait for backups
            still uploading (None: until they are committed).
        retry: ``cloudckpt.RetryPolicy`` for transient storage errors.
        preemption: None, ``"sigterm"``, ``"auto"`` or a ``cloudckpt.PreemptionWatcher``.
        preemption_deadline: seconds after the first notice by which the final
            backup must be committed (default: the platform's hard stop: 25 s after
            SIGTERM or a GCE notice, 100 s after an AWS notice, an Azure event's
            ``NotBefore`` less 5 s); capped by a hard stop a GCE / AWS / Azure
            metadata notice announces (not SIGTERM's 25 s, a guess).
        transfer: part size, files and parts in flight (``cloudckpt.TransferOptions``).
        summary_dir: write commit lag, throughput, queue depth, retries, drops and failures
            as TensorBoard scalars there after each commit (None: off).

    Raises:
        ConfigError: (a ``ValueError``) an empty ``backup_dir``, an invalid
            ``save_freq`` (``False`` without ``preemption``) or other argument, an unusable URL or ``local_dir``;
            when training begins: an unbuilt model, a missing bucket, or a backup
            that does not fit the model.
        IntegrityError: when training begins, backups are committed but none verifies.
        UploadError / FencedError: during ``fit``, a backup could not be committed.
        WorkerFailedError: multi-worker, another worker failed (a commit on the chief, a download
            during the restore); raised on every worker at the same batch (or in the restore).

    Attributes:
        restored: the committed backup restored when training began (``CheckpointInfo``), or None.
        preempted: True once ``fit`` ended because of a preemption notice.
    """

    def __init__(
        self,
        backup_dir: str,
        save_freq: str | int | bool = "epoch",
        delete_checkpoint: bool = True,
        *,
        double_checkpoint: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        local_dir: str | None = None,
        max_to_keep: int | None = 2,
        max_pending: int = 2,
        upload_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        preemption: PreemptionWatcher | str | None = None,
        preemption_deadline: float | None = None,
        transfer: TransferOptions | None = None,
        summary_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ConfigError("Empty backup_dir: pass the URL of a directory for this run's backups.")
        if save_freq is False:  # Keras 3's "only if using preemption checkpointing"
            if preemption is None:
                raise ConfigError("save_freq=False saves no periodic backups, only one when a preemption notice "
                                  "comes, but preemption is None: pass preemption=\"sigterm\", \"auto\" or a "
                                  "PreemptionWatcher, or a save_freq of 'epoch' or an integer >= 1.")
        else:
            save_freq = check_positive_int_or_epoch("save_freq", save_freq)
        self.backup_dir = as_url(backup_dir, "backup_dir")
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        local = os.path.abspath(local_dir if local_dir is not None
                                else default_local_dir(self.backup_dir, storage_options))
        if is_local_path(self.backup_dir) and os.path.abspath(self.backup_dir) == local:
            raise ConfigError(f"local_dir {local!r} is backup_dir itself: backups are written to local_dir and "
                              "then committed to backup_dir; pass another local_dir (or none).")
        if max_to_keep is not None and ((keep := integer_option(max_to_keep)) is None or keep < 1):
            raise ConfigError(f"max_to_keep must be an integer >= 1 or None (keep every backup), got {max_to_keep!r}.")
        if double_checkpoint and max_to_keep is not None and max_to_keep < 2:
            raise ConfigError(f"double_checkpoint=True keeps the previous backup as a fallback, but max_to_keep="
                              f"{max_to_keep!r} keeps only the newest: pass max_to_keep >= 2 (the default) or None.")
        ensure_writable(local)
        self._init_lifecycle(CheckpointEngine(
            self.backup_dir, local, layout=KERAS_BACKUP, storage_options=storage_options, max_pending=max_pending,
            retry=retry, retention=RetentionPolicy(max_to_keep), upload_timeout=upload_timeout, preemption=preemption,
            preemption_deadline=preemption_deadline, transfer=transfer, summary_dir=summary_dir))
        self.restored: CheckpointInfo | None = None
        self.preempted = False
        self._agreement: WorkerAgreement | None = None  # multi-worker, from on_train_begin
        self._worker_temp: str | None = None  # a non-chief worker's temporary directory
        self._stop_agreed = False
        self._reset_counters(epoch=0)

    @property
    def url(self) -> str:
        """The backup directory, in display form (credentials masked)."""
        return self._engine.url

    # -- Keras callback hooks -------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        """Restore the newest verified committed backup (weights, optimizer state, epoch); register as the
        directory's writer; start watching for preemption."""
        if not self.model.built:
            raise ConfigError(f"To use cloudckpt.keras.BackupAndRestore, the model must be built before fit(): "
                              f"{self.model} is not. Build it by calling it on a batch of data, or give it an "
                              "Input.")
        self.preempted = False
        self._stop_agreed = False
        role, self._agreement = _workers_of(self.model)
        if role is not None:
            self._engine.task = role.name
            name_task_in_logs(role.name)
        if self._agreement is not None:
            self._agreement.context = f"cloudckpt.keras.BackupAndRestore ({self.url})"
        self._open(writes_local_dir=self._is_chief)  # a non-chief worker writes its temporary directory only
        try:
            self._engine.start_watching()  # a notice during the restore is kept: training stops at batch 1
            if self._agreement is None:
                _, epoch = self._restore_newest()
            else:
                epoch = self._restore_multi_worker(self._agreement)
        except BaseException:
            self.close()
            raise
        self._reset_counters(epoch=epoch or 0)
        # What Keras' own BackupAndRestore does: fit() starts at this epoch (None: fit's initial_epoch).
        set_initial_epoch(self.model, epoch)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Remember the epoch in progress (a save within it resumes at its start) and the step it begins at."""
        self._epoch = epoch
        self._count_steps_from(self.model)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Raise a failed commit; save at a preemption notice or every ``save_freq`` batches."""
        self._count_batch(batch)
        if self._stopping:
            return
        if self._agreement is None:
            self._engine.raise_if_failed()  # multi-worker: raised by the stop agreement, on every worker
        if self._should_stop(collective=True):
            self._final_save(self._epoch, batch)
        elif self._should_save_on_batch(batch):
            self._save(self._epoch, batch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Save (``save_freq="epoch"``, or a preemption notice that came after the last batch)."""
        self._last_batch_seen = 0
        if self._stopping:
            return  # preempted in this epoch: its backup is the batch it stopped at
        if self._should_stop(collective=False):
            self._final_save(epoch + 1, None)
            return
        if self.save_freq == "epoch":
            self._save(epoch + 1, None)
        if self._agreement is None:
            self._engine.raise_if_failed()  # multi-worker: at the next batch's stop agreement, on every worker

    def on_train_end(self, logs: dict | None = None) -> None:
        """Wait for the backups to commit; then, after a normal end with ``delete_checkpoint``, delete them.

        After a preemption the wait ends at the deadline and is not raised past it
        (the previous committed backup stays the newest); the backups are kept.

        Multi-worker, the other workers wait here for the chief's final commit; if it failed, the chief
        raises its error and every other worker ``WorkerFailedError``.

        Raises:
            UploadError: a backup was not committed (``FencedError``: a newer writer took over).
            WorkerFailedError: (multi-worker, not the chief) the chief's final commit failed.
        """
        try:
            failure: Exception | None = None
            try:
                if not self._is_chief:
                    self.preempted = self._stopping
                elif self._stopping:
                    self._engine.finish()
                    self.preempted = self._engine.preempted or self._stop_agreed
                elif self.delete_checkpoint:
                    self._engine.wait(self._engine.upload_timeout)
                    self._engine.stop_uploads()
                    deleted = self._engine.delete_committed(
                        debris=True, reason="Training finished (delete_checkpoint=True)")
                    log.info("Training finished: deleted %d backup(s) from %s (delete_checkpoint=True).",
                             len(deleted), self.url)
                else:
                    self._engine.finish()
            except Exception as exc:  # noqa: BLE001 - multi-worker: raised by the agreement, on every worker
                if self._agreement is None:
                    raise
                failure = exc
            if self._agreement is not None:
                self._agreement.agree_on_failure(failure)
        except KeyboardInterrupt:  # Ctrl-C while fit() waits for the last backup: not waited for again in close()
            self._abandon("Training ended with KeyboardInterrupt")
            raise
        finally:
            set_initial_epoch(self.model, None)  # a later fit() without this callback starts where it is told
            self.close()
        if self.preempted and self._engine.notice is not None:
            self._engine.call_replaced_sigterm_handler()

    def close(self) -> None:
        """Stop the background uploads and the preemption watcher (``EngineLifecycle.close``); a non-chief
        worker's temporary directory is removed."""
        try:
            super().close()
        finally:
            if self._worker_temp is not None:
                shutil.rmtree(self._worker_temp, ignore_errors=True)
                self._worker_temp = None

    # -- internals --------------------------------------------------------------------------------------------
    def _epochs(self) -> int | None:
        """fit()'s ``epochs`` (Keras sets ``params`` on its callbacks), for messages; None when unknown."""
        epochs = (getattr(self, "params", None) or {}).get("epochs")
        return epochs if isinstance(epochs, int) else None

    @property
    def _is_chief(self) -> bool:
        return self._agreement is None or self._agreement.role.is_chief

    def _should_stop(self, *, collective: bool) -> bool:
        """A preemption notice here; multi-worker, a notice on any worker, agreed by an all-reduce about once a
        second of batches (``collective``; every worker runs the same batches) and remembered."""
        if self._agreement is None:
            return self._engine.should_stop()
        if collective and not self._stop_agreed:
            here = self._engine.should_stop()
            noticed = self._agreement.stop_agreed(self._engine)
            if noticed:
                self._stop_agreed = True
                log.warning("Preemption notice on %d of %d workers (%s): every worker stops at this batch; the "
                            "chief commits the backup.", noticed, self._agreement.role.workers,
                            "this one among them" if here else "not this one")
        return self._stop_agreed

    def _restore_multi_worker(self, agreement: WorkerAgreement) -> int | None:
        """The chief restores as on one machine; each other worker downloads and restores the backup of the
        chief's step (``restore_as_the_chief_does``, all-reduces; a failure on any worker raises on all
        of them, ``WorkerFailedError`` on the others). Returns the epoch to resume at (None: nothing restored)."""
        # Creating variables under the strategy is a collective (their initial values are broadcast): every
        # worker builds the optimizer now, before the agreement, not only those that restore.
        self._build_optimizer()
        directory = self.local_dir
        if not agreement.role.is_chief:
            directory = self._worker_temp = worker_temp_dir(agreement.role, self.local_dir)
        return restore_as_the_chief_does(agreement, self._engine.store, directory, self._restore_newest,
                                         lambda info: self._restore_downloaded(info, directory))

    def _restore_newest(self) -> tuple[int | None, int | None]:
        """Restore the newest verified committed backup, as on one machine (multi-worker: the chief's part of
        the restore): its step and the epoch to resume at, (None, None) when there is none."""
        epochs: dict[str, int] = {}

        def load(downloaded: CheckpointInfo | None) -> None:
            # Before registering: a backup that does not fit this model (ConfigError) fences no job writing there.
            epochs.pop("epoch", None)
            if downloaded is not None:
                epochs["epoch"] = self._restore(downloaded, self.local_dir)
        self.restored = self._engine.resume(check=load)
        if self.restored is None:
            return None, None
        return self.restored.step, epochs["epoch"]

    def _restore_downloaded(self, info: CheckpointInfo, directory: str) -> int:
        """A non-chief worker's part: the chief's backup ``info``, downloaded into ``directory``, is restored."""
        self.restored = info
        return self._restore(info, directory)

    def _build_optimizer(self) -> None:
        """Create the optimizer's variables if they do not exist yet."""
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer_built(optimizer):
            optimizer.build(self.model.trainable_variables)

    def _reset_counters(self, epoch: int) -> None:
        self._epoch = epoch
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0
        self._last_saved_step: int | None = None
        self._stopping = False

    def _should_save_on_batch(self, batch: int) -> bool:
        """Keras' batch counting (``steps_per_execution`` aware): True every ``save_freq`` batches (never with
        ``"epoch"`` or ``False``)."""
        if self.save_freq == "epoch" or self.save_freq is False:
            return False
        added = batch + 1 if batch <= self._last_batch_seen else batch - self._last_batch_seen
        self._batches_seen_since_last_saving += added
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:  # type: ignore[operator]
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _final_save(self, epoch: int, batch: int | None) -> None:
        """A preemption notice: save now, stop training, and make this backup the one that must commit."""
        notice = self._engine.notice
        step = iterations(self.model)
        self._stopping = True
        self.model.stop_training = True
        log.warning("Preemption notice (%s: %s): saving a backup %s (step %d) and stopping training.",
                    notice.source if notice else "another worker", notice.detail if notice else "",
                    _position(epoch, batch, self._epochs()), step)
        self._engine.prepare_final_save(step)
        self._save(epoch, batch)

    def _save(self, epoch: int, batch: int | None) -> None:
        """Write ``backup-<step>.weights.h5`` and ``.state.json`` to ``local_dir`` and queue them for commit."""
        step = iterations(self.model)
        if step == self._last_saved_step:
            return  # nothing trained since the last backup
        prefix = os.path.join(self._worker_temp or self.local_dir, f"{BASENAME}-{step}")
        weights, state = prefix + ".weights.h5", prefix + ".state.json"
        self.model.save_weights(weights, overwrite=True)
        _write_json(state, {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "batch": batch,
                            "iterations": step, "keras": keras.__version__, "backend": keras.backend.backend()})
        try:
            if self._is_chief:  # a non-chief worker's save only took part in the job's save: deleted
                self._engine.submit(step, [weights, state])
        finally:
            for path in (weights, state):  # the engine snapshotted them (hard links)
                _remove(path)
        self._last_saved_step = step

    def _restore(self, info: CheckpointInfo, directory: str) -> int:
        """Load the backup ``info``, downloaded into ``directory``, into the model; returns the epoch to resume at.

        Raises:
            ConfigError: the backup does not fit this model.
            IntegrityError: its state file is not what this callback writes, or the optimizer
                state did not load.
        """
        prefix = os.path.join(directory, info.name)
        weights, state_path = prefix + ".weights.h5", prefix + ".state.json"
        try:
            state = _read_state(state_path, f"{info.prefix}.state.json")
            self._build_optimizer()  # so load_weights restores its variables
            try:
                self.model.load_weights(weights)
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"Backup step {info.step} in {self.url} does not fit this model ({_load_failure(exc)}; "
                    "Keras' full error is chained to this one). A backup restores "
                    "only into the model (and optimizer) that wrote it: fix the model, or use a new backup_dir "
                    "to start over.") from exc
            restored_iterations = iterations(self.model)
            if restored_iterations != state["iterations"]:
                raise IntegrityError(
                    f"Backup step {info.step} in {self.url} restored optimizer.iterations={restored_iterations}, "
                    f"not {state['iterations']}: the optimizer state was not loaded (was the model compiled "
                    "with the optimizer it was trained with?).")
        finally:
            _remove(weights)
            _remove(state_path)
        log.info("Restored backup step %d (saved %s) from %s; training resumes at epoch %d.", info.step,
                 _position(int(state["epoch"]), state["batch"], self._epochs()), self.url, int(state["epoch"]) + 1)
        return int(state["epoch"])


def _position(epoch: int, batch: int | None, epochs: int | None = None) -> str:
    """Where a backup was saved, for messages, numbered as Keras shows it (1-based: "Epoch 4/8", batch "2/100";
    ``ModelCheckpoint`` names epoch 4 ``model-04``). ``epoch`` and ``batch`` are as the state file stores
    them (0-based): with a ``batch`` the epoch in progress; without, at an epoch's end, the number of epochs
    completed. ``epochs``: fit()'s, shown as "epoch 4/8" when known."""
    of = f"/{epochs}" if epochs else ""
    if batch is None:
        return f"at the end of epoch {epoch}{of}"
    return f"in epoch {epoch + 1}{of}, after batch {batch + 1}"


def _workers_of(model: Any) -> tuple[TaskRole | None, WorkerAgreement | None]:
    """This process's task when ``model`` trains under a strategy with a cluster, and the agreement of the
    workers for a multi-worker ``MultiWorkerMirroredStrategy`` (else None)."""
    strategy = getattr(model, "distribute_strategy", None)
    role = role_of_strategy(strategy) if strategy is not None else None
    if role is None or not role.multi_worker:
        return role, None
    import tensorflow as tf  # noqa: PLC0415 - a strategy with a cluster resolver: TF is the backend

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return role, None
    return role, WorkerAgreement(strategy, role)


def _load_failure(exc: BaseException, limit: int = 400) -> str:
    """What of Keras' ``load_weights`` error to put in a message: its first sentence, the first variable
    whose shape differs (``sequential/dense/kernel: (8, 32) in the model, (8, 16) in the backup``) and the
    objects that could not be loaded, at most ``limit`` characters. Keras' whole text also dumps every
    value of the variable (kilobytes); it stays the cause."""
    text = str(exc)
    first = text.strip().split("\n", 1)[0]
    first = first.split(" Example error message", 1)[0].strip()
    parts = [first]
    variable = re.search(r"Target variable: <Variable path=([^,>\s]+), shape=(\([^)]*\))", text)
    value = re.search(r"value\.shape=(\([^)]*\))", text)
    if variable is not None and value is not None:
        parts.append(f"e.g. {variable.group(1)}: shape {variable.group(2)} in the model, {value.group(1)} in the "
                     "backup")
    listed = re.search(r"List of objects that could not be loaded:\s*\[(.*)\]", text, re.S)
    if listed is not None:
        names = [name or kind for kind, name in re.findall(r"<(?:[\w.]+\.)?(\w+)(?: name=([^,>\s]+))?", listed.group(1))]
        if names:
            parts.append("not loaded: " + ", ".join(names))
    summary = "; ".join(p.rstrip(".") for p in parts if p)
    return summary if len(summary) <= limit else summary[:limit - 3].rstrip() + "..."


def _read_state(path: str, url: str) -> dict:
    """The backup's ``.state.json``, validated.

    Raises:
        IntegrityError: not JSON, or not a state file of this format version.
    """
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"Backup state file {url} cannot be read ({exc}).") from None
    ok = (isinstance(state, dict) and state.get("format") == STATE_FORMAT
          and isinstance(state.get("version"), int) and isinstance(state.get("epoch"), int)
          and isinstance(state.get("iterations"), int)
          and (state.get("batch") is None or isinstance(state.get("batch"), int)))
    if not ok:
        raise IntegrityError(f"{url} is not a cloudckpt Keras backup state file (format {STATE_FORMAT!r}).")
    if state["version"] > STATE_VERSION:
        raise IntegrityError(f"Backup state file {url} has version {state['version']}; this cloudckpt reads up to "
                             f"{STATE_VERSION}: upgrade cloudckpt.")
    return state


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
