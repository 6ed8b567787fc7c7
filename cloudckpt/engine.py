"""``CheckpointEngine``: background commits of checkpoints, where a checkpoint is a step and a set of files.

The engine knows nothing about TensorFlow (nothing under this module imports
it). Framework adapters -- ``UploadListener`` / ``CheckpointSaverHook`` (TF1),
``cloudckpt.CheckpointManager`` (TF2), the Keras callbacks -- write a
checkpoint's files into ``local_dir`` and hand them over; the engine:

* **snapshots** the files (hard links into ``<local_dir>/.cloudckpt-staging``)
  so the framework may delete or overwrite its files at once, and **queues**
  the snapshot; ``submit`` never touches the network and never copies file
  data: where hard links fail (gcsfuse, some NFS; probed once in ``open()``)
  it only opens the files, which keeps them readable after the framework
  deletes them, and the uploader thread copies them into the snapshot. When
  the URL is ``local_dir`` itself (a plain path) the files are committed in
  place, also from the uploader thread;
* **commits** each snapshot from one background thread (``uploader.py`` ->
  ``commit.py``: files create-only, a manifest, a commit-log entry as the
  commit point), at most ``max_pending`` waiting behind the one in flight (the
  oldest waiting one is dropped first);
* applies **retention** after each commit (``RetentionPolicy``);
* **surfaces failures** at defined points in the caller's thread
  (``raise_if_failed``, ``wait``, ``finish``); housekeeping failures are
  counted in ``stats()``;
* **resumes**: ``resume()`` brings ``local_dir`` to the resume point (the
  newest verified committed checkpoint unless the local copy is intact or was
  rolled back on purpose; ``resume.py``) and registers this engine as the
  directory's writer, which fences every older writer (``FencedError``);
* handles **preemption** (``PreemptionWatcher``): ``should_stop()`` turns True
  on a notice; ``finish()`` then bounds the wait for the final checkpoint by
  the platform's hard stop and does not raise past it (the previous committed
  checkpoint stays the latest).

How files are named and recognised is the ``layout`` (``layout.py``); TF's
``prefix.index`` / ``prefix.data-*`` is the default.

Typical use by an adapter::

    engine = CheckpointEngine(url, local_dir, preemption="sigterm")
    engine.open()
    engine.resume()                       # download the newest committed checkpoint, become the writer
    engine.start_watching()
    while training:
        ...                               # the framework writes ckpt-<step>.* into local_dir
        engine.submit(step, [paths])      # returns at once
        engine.raise_if_failed()
        if engine.should_stop():
            break
    engine.prepare_final_save(step)       # from here on the final checkpoint must reach the store
    ...                                   # save the final checkpoint, submit it
    engine.finish(step)                   # wait (upload_timeout / preemption deadline), then close()
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping

from . import localdir
from .catalog import CheckpointInfo, DirectoryScan, scan_directory
from .commit import CommitResult, LocalCheckpoint, register_continuing
from .errors import ConfigError, FencedError, UploadError, integer_option
from .layout import TF, PrefixLayout, parse_manifest_name, parse_object_name, split_prefix, state_file_prefix
from .lineage import fold
from .preemption import PreemptionNotice, PreemptionWatcher
from .preemption.notice import deadline_at
from .remote import RemoteStore, is_local_path, refuse_mistyped_url
from .resume import resume_and_register
from .retention import RetentionPlan, RetentionPolicy, apply_retention, plan_retention
from .retry import RetryPolicy
from .staging import remove_stale_staging
from .summaries import CommitSummaryWriter, check_summary_dir
from .transfer import TransferOptions
from .uploader import Uploader, UploadJob, UploadStats
from .urls import as_url, check_storage_options, display_url
from .writers import Writer

log = logging.getLogger("cloudckpt")

STAGING_DIR = ".cloudckpt-staging"
UPLOAD_TIMEOUT: Any = object()  # close()'s default: the engine's upload_timeout
MAX_DELETE_ROUNDS = 5

__all__ = ["CheckpointEngine", "STAGING_DIR", "default_local_dir", "ensure_writable", "resolve_local_dir"]


class CheckpointEngine:
    """Commits checkpoints (a step and a set of files in ``local_dir``) to a URL in the background.

    Args:
        url: the remote checkpoint directory: any fsspec URL (``s3://``, ``gs://``,
            ``memory://``, ``file://``...) or a local path (then ``local_dir`` must be
            that path: checkpoints are committed in place, synchronously).
        local_dir: the directory the framework writes checkpoints to; snapshots,
            downloads and the resume point live there.
        layout: how a checkpoint's files are named (``layout.TF`` by default).
        storage_options: fsspec options for the store (``endpoint_url``, ``key``,
            ``token``...); never logged.
        max_pending: checkpoints allowed to wait behind the one uploading (>= 1); past
            that the oldest waiting one is dropped (logged, counted in ``stats().dropped``).
        retry: ``RetryPolicy`` for transient storage errors (default: ``RetryPolicy()``).
        on_error: ``"raise"``: a failed commit is raised as ``UploadError`` at the next
            ``raise_if_failed()``; ``"warn"``: logged and counted, the next checkpoint
            tries again. The final checkpoint (``finish``) and fencing raise either way.
        upload_timeout: seconds ``finish()`` and ``close()`` wait for uploads still
            pending; None waits until they are done.
        retention: which committed checkpoints to keep remotely, applied after each
            commit (None keeps everything); settable later (``engine.retention = ...``).
        preemption: None (off), ``"sigterm"``, ``"auto"`` (SIGTERM, GCE, AWS and
            Azure metadata) or a ``PreemptionWatcher``; watched between ``start_watching()``
            and ``stop_watching()`` / ``close()``.
        preemption_deadline: seconds from the first notice by which the final
            checkpoint must be committed; default: the platform's hard stop
            (25 s after SIGTERM or a GCE notice, 100 s after an AWS notice, an
            Azure event's ``NotBefore`` less 5 s). Capped by the hard stop a GCE,
            AWS or Azure metadata notice announces
            (logged once when it does); not by SIGTERM's 25 s, only a guess
            (a longer Kubernetes grace period, say): this value wins there.
        task: the TF cluster task this engine runs in (``worker:1``), named by ``stats().task``.
        transfer: part size, files and parts in flight (``TransferOptions``; default: its defaults).
        summary_dir: write commit lag, throughput, what a preemption would lose, queue depth, retries,
            drops and failures as TensorBoard scalars there after each checkpoint's outcome (committed,
            failed or dropped) (``summaries.py``; needs TensorFlow); None (default): off.

    Raises:
        ConfigError: (a ``ValueError``) an invalid argument or an unusable URL
            (unknown protocol, credentials in a query string).
    """

    def __init__(
        self,
        url: str,
        local_dir: str,
        *,
        layout: PrefixLayout = TF,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int = 2,
        retry: RetryPolicy | None = None,
        on_error: str = "raise",
        upload_timeout: float | None = None,
        retention: RetentionPolicy | None = None,
        preemption: PreemptionWatcher | str | None = None,
        preemption_deadline: float | None = None,
        task: str | None = None,
        transfer: TransferOptions | None = None,
        summary_dir: str | None = None,
    ) -> None:
        if upload_timeout is not None and not upload_timeout > 0:
            raise ConfigError(f"upload_timeout must be > 0 seconds or None, got {upload_timeout!r}.")
        if preemption_deadline is not None and not preemption_deadline > 0:
            raise ConfigError(f"preemption_deadline must be > 0 seconds, got {preemption_deadline!r}.")
        if not isinstance(layout, PrefixLayout):
            raise ConfigError(f"layout must be a cloudckpt.layout.PrefixLayout, got {layout!r}.")
        self._local_dir = os.path.abspath(os.fspath(local_dir))
        self._layout = layout
        self._store = RemoteStore(os.fspath(url), storage_options, retry=retry, on_retry=self._count_retry,
                                  transfer=transfer)
        self._summary_dir = None if summary_dir is None else check_summary_dir(summary_dir)
        self._summaries: CommitSummaryWriter | None = None
        self._uploader = Uploader(self._store, max_pending=max_pending, on_error=on_error,
                                  observer=self._record_summaries if summary_dir is not None else None)
        self._hard_links: bool | None = None  # probed in open()
        self._claim: localdir.LocalDirClaim | None = None  # local_dir held from open() to close()
        self._downloaded: CheckpointInfo | None = None  # what the last resume() downloaded into local_dir
        # the newest committed step the last resume()'s scan listed (None: none committed); unknown before a scan
        self._scanned_latest: int | None = None
        self._scanned = False
        self._in_place = self._store.is_local and os.path.abspath(self._store.root) == self._local_dir
        self._upload_timeout = upload_timeout
        self.retention = retention
        self._watcher = PreemptionWatcher.from_spec(preemption)
        self._preemption_deadline = preemption_deadline
        if self._watcher is not None and preemption_deadline is not None:
            self._watcher.deadline = float(preemption_deadline)  # the notice's log line quotes the one in use
        self.task = task
        self._watching = False
        self._replaced_handler_called = False
        self.preempted = False
        self._reset_final_save()

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The remote checkpoint directory, in display form (credentials masked: ``s3://***@bucket/run``)."""
        return self._store.url

    @property
    def store(self) -> RemoteStore:
        """The remote checkpoint directory's store."""
        return self._store

    @property
    def local_dir(self) -> str:
        """The local directory checkpoints are written to (absolute)."""
        return self._local_dir

    @property
    def layout(self) -> PrefixLayout:
        """How this engine's checkpoints name their files."""
        return self._layout

    @property
    def in_place(self) -> bool:
        """True when the checkpoint directory is ``local_dir`` itself (nothing is uploaded)."""
        return self._in_place

    @property
    def writer_id(self) -> str:
        """This engine's writer id in the directory's commit log (a new one after each ``resume``)."""
        return self._uploader.writer.writer_id

    @property
    def upload_timeout(self) -> float | None:
        """Seconds ``finish()``/``close()`` wait for pending uploads (None: until done)."""
        return self._upload_timeout

    @property
    def transfer(self) -> TransferOptions:
        """Part size, files and parts in flight of uploads."""
        return self._store.transfer

    @property
    def hard_links(self) -> bool | None:
        """Whether ``local_dir`` supports hard links (probed in ``open()``; None before). Without them a
        snapshot holds the files open and the uploader thread copies them."""
        return self._hard_links

    @property
    def step_source(self) -> Callable[[], int | None] | None:
        """The training step now, for the commit lag in steps (``stats().last_commit_lag_steps``, the
        ``commit_lag_steps`` summary): a call returning the step training has reached, in the unit of the
        checkpoints' steps, or None when it does not know.

        It is called in the uploader thread as each checkpoint's commit completes, and the lag is its value
        minus the checkpoint's step (never below 0): the training steps run between the save and its commit.
        ``stats()`` calls it too (in the caller's thread), for ``uncommitted_steps``: its value now minus the
        newest committed step, what a preemption right now would lose. So it must be cheap and thread-safe and
        never wait long: the adapters hand
        over an int the training thread stores anyway, or read a framework variable from the uploader thread.
        None (the default), or a call returning None or raising (logged at DEBUG once): the newest step
        submitted stands in, so the lag moves in whole save intervals and reads 0 while uploads keep up.

        What the adapters set: ``CheckpointSaverHook``: the global step TF's hook fetches with every
        ``session.run`` (as read during the run: exact, or up to that run's steps fewer); ``UploadListener``
        alone (TF's stock hook): none; ``CheckpointManager``: its step variable when the checkpoints are
        numbered by it (see its ``stats``); Keras callbacks: ``optimizer.iterations`` (batches), counted from
        the batches ``fit`` reports.

        Raises:
            ConfigError: (setting it) neither None nor callable.
        """
        return self._uploader.step_source

    @step_source.setter
    def step_source(self, source: Callable[[], int | None] | None) -> None:
        if source is not None and not callable(source):
            raise ConfigError(f"step_source must be a callable returning an int (or None), got {source!r}.")
        self._uploader.step_source = source

    @property
    def ending(self) -> bool:
        """True between ``prepare_final_save()`` and the next ``open()``."""
        return self._ending

    # -- lifecycle -------------------------------------------------------------------------------------
    def open(self, *, writes_local_dir: bool = True) -> None:
        """Check the store is usable, hold ``local_dir`` for this process and clear what a crashed run left
        there (snapshots, half-finished downloads). Resets the final-save state, so an engine can be opened
        again after ``finish``/``close``. The uploader thread starts with the first ``submit``.

        Holding ``local_dir`` (``localdir.py``, until ``close()``): an exclusive lock on
        ``<local_dir>/.cloudckpt-lock`` (re-entrant within this process; a killed holder's lock goes with
        it) and the checkpoint URL recorded in ``<local_dir>/.cloudckpt-url``. ``writes_local_dir=False``:
        this engine never writes or resumes into ``local_dir`` (a multi-worker job's non-chief, whose
        saves go to a temporary directory): nothing there is held, checked or cleared.

        Raises:
            ConfigError: the store cannot be used (no such bucket, a file as directory); another process is
                writing ``local_dir`` (the message names its pid); ``local_dir`` holds the local checkpoints of
                another URL; ``summary_dir`` cannot be created.
            RemoteError: the store rejected the credentials or may not be listed with them (not retried),
                or could not be reached after retries.
        """
        self._uploader.resume_transfers()  # a close() that abandoned uploads cancelled the store's transfers
        self._store.check_usable()
        self._reset_final_save()
        if writes_local_dir:
            self._hold_local_dir()
        if not self._in_place and writes_local_dir:
            self._hard_links = supports_hard_links(self._local_dir)
            if not self._hard_links:
                log.info("%s does not support hard links: snapshots hold the checkpoint files open and the "
                         "uploader thread copies them.", self._local_dir)
        if self._summary_dir is not None and self._summaries is None:
            self._summaries = CommitSummaryWriter(self._summary_dir)

    def _hold_local_dir(self) -> None:
        """Claim ``local_dir`` (once per open), check the URL recorded there; then, the only holder in this
        process, clear the snapshots and download staging a crashed run left."""
        claim = self._claim
        if claim is None:
            claim = localdir.claim(self._local_dir)
            try:
                localdir.check_url(self._local_dir, self.url, in_place=self._in_place)
            except BaseException:
                claim.release()
                raise
            self._claim = claim
        if claim.sole():  # another engine of this process may have snapshots there
            staging = os.path.join(self._local_dir, STAGING_DIR)
            # snapshots (``<prefix>-<8 hex>``) of a crashed run: their commits began, and may have left debris
            left = [entry.rsplit("-", 1)[0] for entry in _listdir(staging) if "-" in entry]
            if left:
                self._uploader.note_unfinished(left)
            shutil.rmtree(staging, ignore_errors=True)
            remove_stale_staging(self._local_dir)  # not the staging directory of a download running meanwhile

    def resume(self, *, download: bool = True,
               check: Callable[[CheckpointInfo | None], None] | None = None) -> CheckpointInfo | None:
        """Become the directory's writer, resuming from what ``local_dir`` holds (see ``resume.py``).

        With ``download``, ``local_dir`` is first brought to the resume point: the
        head of the directory's lineage (the newest committed checkpoint that
        verifies, falling back past corrupt ones), unless the local copy of it is
        intact, the local checkpoint is newer than anything committed, or the local
        TF state file was pointed back on purpose. Local copies are checked against
        their manifests (sizes and crc32c). Registering fences every older writer of
        the directory. Call it again for a new run of the same engine: it registers
        anew. ``check(downloaded)`` (an adapter's: ``check_resume_name``, the Keras backup's load) runs
        once ``local_dir`` holds the resume point, before registering: what it raises propagates, and no
        writer is fenced; it runs again if registering decides again (another writer appended meanwhile).

        Returns:
            The committed checkpoint downloaded into ``local_dir``, or None if the
            local directory was used as it is (or nothing is committed).

        Raises:
            IntegrityError: checkpoints are committed but none verifies, and there is
                no local checkpoint to fall back on (training must not silently restart).
            RemoteError / FencedError: the store could not be read or written.
        """
        if self._uploader.writer.registered:
            self._uploader.writer = Writer(self._store)
        self._downloaded = resume_and_register(self._store, self._uploader.writer, self._local_dir,
                                               download=download and not self._in_place, layout=self._layout,
                                               check=check, on_scan=self._note_debris)
        return self._downloaded

    def _note_debris(self, scan: DirectoryScan) -> None:
        """The checkpoints whose upload debris (files of a commit that never happened) the resume's scan found:
        a commit of one of them takes up an earlier attempt (``Uploader.note_unfinished``), and lists the
        directory before it sends anything, so the debris' names are cleared before their files go up once."""
        self._scanned, self._scanned_latest = True, scan.committed[-1].step if scan.committed else None
        prefixes = {parsed[0] for inc in scan.incomplete for o in inc.objects
                    if (parsed := parse_object_name(o.name)) is not None}
        if prefixes:
            log.debug("Upload debris of earlier runs in %s: %s; committing those lists the directory first.",
                      self.url, sorted(prefixes))
            self._uploader.note_unfinished(prefixes)

    def check_start_step(self, step: int, *, starts: str, fix: str, restored: bool = False,
                         source: str | None = None) -> None:
        """Refuse to save at ``step`` below the checkpoint ``local_dir``'s TF state file names: the
        framework's training state did not restore it.

        After ``resume()`` that state file names the resume point (downloaded, or the local
        copy; a rollback the TF way points it back on purpose), after a save that save. A
        framework that restored it saves at that step or above. A save below it would continue
        the directory from the older step: every newer checkpoint, the resume point among them,
        would become superseded (never restored again; deleted first by retention), and the
        latest checkpoint would go back. Adapters call it before the framework writes its first
        checkpoint of a run (the TF1 hook when the session is created, ``UploadListener`` at its
        first save, ``cloudckpt.CheckpointManager`` at its first ``save()``). Reads one small
        local file; passes when the state file names no checkpoint that ``local_dir`` holds
        (nothing to resume, a fresh start, layouts without a TF state file).

        Args:
            step: the step the framework would save (its global step, the checkpoint number).
            starts: what is at ``step``, first words of the message
                (``"The training session starts at global step 0"``).
            fix: how to restore it (and to go back or start over on purpose), last words of the message.
            restored: the framework did restore that checkpoint, but numbers this save below it (TF2's
                ``save_counter`` after checkpoints numbered by step): the message says so.
            source: where that checkpoint came from, for the message (default: ``local_dir``, or the
                download into it); e.g. a multi-worker job's non-chief, whose ``local_dir`` is temporary.

        Raises:
            ConfigError: ``step`` is below the step of the checkpoint the state file names;
                the caller has saved and committed nothing at ``step``.
        """
        prefix = state_file_prefix(self._local_dir)
        parsed = split_prefix(prefix) if prefix is not None else None
        if parsed is None or step >= parsed[1] or prefix not in self._layout.local_prefixes(self._local_dir):
            return
        held = parsed[1]
        downloaded = self._downloaded
        if source is None:
            source = (f"that cloudckpt downloaded from {self.url} into {self._local_dir}"
                      if downloaded is not None and downloaded.step == held
                      else f"that {self._local_dir} holds (its TF checkpoint state file names {prefix!r})")
        what = (f"below checkpoint step {held} {source}, which it restored" if restored
                else f"it did not restore checkpoint step {held} {source}")
        raise ConfigError(
            f"{starts}: {what}. Committing step {step} now would "
            f"continue {self.url} from step {step} instead: step {held} would become superseded (never restored "
            f"again, deleted first by retention), so nothing was saved or committed. {fix}")

    def register(self) -> None:
        """Become the directory's writer without restoring anything: continue its current head (a writer
        that only adds checkpoints, like Keras' ``ModelCheckpoint``). Fences every older writer.

        Raises:
            RemoteError / UploadError: the store could not be read or written.
        """
        if self._uploader.writer.registered:
            self._uploader.writer = Writer(self._store)
        register_continuing(self._uploader.writer)

    def delete_committed(self, select: Callable[[CheckpointInfo], bool] | None = None, *,
                         debris: bool = False, reason: str = "Deleting") -> list[CheckpointInfo]:
        """Delete, as this engine's registered writer, the committed checkpoints of this engine's layout
        (current or superseded) that ``select`` picks (all when None); with ``debris``, also the files of
        this layout's uploads that never committed. ``reason`` starts each INFO line about a deletion.

        Each checkpoint is un-committed first (a ``delete`` entry in the commit log retires it, then its
        manifest goes), then its files: a crash in between leaves uncommitted debris, never a manifest
        vouching for missing files. Runs in the calling thread; call it with no upload of the same
        checkpoints pending.

        Returns:
            The checkpoints deleted.

        Raises:
            FencedError: a newer writer registered on the directory (nothing more is deleted).
            RemoteError: the store could not be read or written after retries.
            UploadError: the directory kept changing (other parties committing) for every attempt.
        """
        writer = self._uploader.writer
        if not writer.registered:
            self.register()
        seen: dict[str, CheckpointInfo] = {}
        for _ in range(MAX_DELETE_ROUNDS):
            scan = scan_directory(self._store)
            doomed = [c for c in scan.committed + scan.superseded
                      if c.layout == self._layout.name and (select is None or select(c))]
            seen.update((c.manifest_url, c) for c in doomed)
            junk = [inc for inc in scan.incomplete if all(
                self._layout.parse_file(o.name) is not None or parse_manifest_name(o.name) is not None
                for o in inc.objects)] if debris else []
            if not doomed and not junk:
                return list(seen.values())
            apply_retention(self._store, RetentionPlan(keep=[], delete=doomed, debris=junk, log=scan.log), writer,
                            reason=reason)
        raise UploadError(f"Could not delete checkpoints {sorted(c.step for c in seen.values())} from {self.url}: "
                          f"the directory kept changing ({MAX_DELETE_ROUNDS} attempts).", url=self.url)

    # -- preemption ------------------------------------------------------------------------------------
    @property
    def watcher(self) -> PreemptionWatcher | None:
        """The preemption watcher (None when ``preemption=None``)."""
        return self._watcher

    @property
    def notice(self) -> PreemptionNotice | None:
        """The first preemption notice received, if any."""
        return self._watcher.notice if self._watcher is not None else None

    def start_watching(self) -> None:
        """Start the preemption watcher (SIGTERM handler from the main thread, metadata polling);
        idempotent, a no-op without one."""
        if self._watcher is not None and not self._watching:
            self._watcher.start()
            self._watching = True

    def stop_watching(self) -> None:
        """Stop watching. Without a notice the replaced SIGTERM disposition is restored. After a notice
        the process is being preempted: polling stops, but the SIGTERM handler stays until the process
        exits (from interpreter exit on SIGTERM is ignored), so the platform's shutdown SIGTERM cannot
        turn a clean exit into 143; a second SIGTERM still ends the process the replaced way."""
        watcher = self._watcher
        if watcher is None:
            return
        self._watching = False
        if watcher.notice is None:
            watcher.stop()
        else:
            watcher.stop_polling()
            _ignore_sigterm_at_exit()

    def should_stop(self) -> bool:
        """True once a preemption notice was received: save a final checkpoint and stop training."""
        return self.notice is not None

    def preemption_deadline_at(self) -> float | None:
        """``time.monotonic()`` by which the final checkpoint must be committed: ``preemption_deadline``
        after the first notice if given, capped by the earliest hard stop a ``"gce"`` / ``"aws"`` / ``"azure"``
        notice announced, or a ``"peer"`` notice relayed from another worker's platform (not by a ``"sigterm"`` notice's 25 s, a guess), else the platform's hard stop (the
        earliest over all notices); None before any notice. The same as the watcher's ``deadline_at``,
        which the notice's log line quotes."""
        watcher = self._watcher
        if watcher is None or watcher.notice is None:
            return None
        return deadline_at(watcher.notices, self._preemption_deadline)

    def call_replaced_sigterm_handler(self) -> None:
        """Call, once, the Python SIGTERM handler the watcher replaced and did not call for the SIGTERM
        taken as the notice (it might have ended training before the final save). Call it after the
        final checkpoint is committed; what it raises (``SystemExit``) propagates."""
        handler = self._watcher.replaced_sigterm_handler() if self._watcher is not None else None
        if handler is not None and not self._replaced_handler_called:
            self._replaced_handler_called = True
            log.info("Calling the SIGTERM handler cloudckpt deferred until the final checkpoint was committed.")
            handler(signal.SIGTERM, None)

    # -- checkpoints -----------------------------------------------------------------------------------
    def submit(
        self,
        step: int,
        files: Mapping[str, str] | Iterable[str],
        *,
        extras: Mapping[str, str] | None = None,
        saved_at: float | None = None,
        required: bool | None = None,
        on_committed: Callable[[CommitResult], None] | None = None,
        replace_committed: bool = False,
    ) -> None:
        """Queue the checkpoint of ``step`` for commit; returns without touching the network.

        The files are hard-linked into a private snapshot first (where ``local_dir`` has no
        hard links, held open and copied by the uploader thread), so the caller may
        delete or overwrite them as soon as this returns. In place (``in_place``) the
        files are not snapshotted: they are checksummed and committed in the uploader
        thread too (a checkpoint the framework deletes first is dropped, not failed).

        Args:
            step: the checkpoint's step (>= 0).
            files: the checkpoint's local files: paths (stored under their basenames)
                or a mapping ``{stored name: local path}``; the names must form one
                checkpoint of ``layout`` (TF: ``<basename>-<step>.index`` and its
                ``.data-*`` files).
            extras: files uploaded alongside when they differ from the stored ones,
                not part of the checkpoint (``graph.pbtxt``): ``{name: local path}``.
            saved_at: when the framework saved it (seconds since the epoch; default:
                now); recorded in the commit log and written to the remote TF state
                file as ``all_model_checkpoint_timestamps``.
            required: the checkpoint must not be lost silently: its failure is raised
                even with ``on_error="warn"``. Default: True for the final step
                announced by ``prepare_final_save``.
            on_committed: called in the uploader thread after the commit (not for a
                refused save), before retention.
            replace_committed: if a checkpoint of the same name (prefix) is already committed
                in this writer's lineage with other tensors, replace it, in the uploader thread
                in order with the other commits: it is un-committed through the commit log and
                its objects deleted, then this one is uploaded and committed under the same
                name (a crash in between leaves neither committed for that name). Default
                False: such a save is refused (``stats().refused``) and the committed one stays,
                which is right wherever a save at a committed step means a conflict (TF
                adapters, ``BackupAndRestore``). Identical content is "already committed" either way.

        Raises:
            ConfigError: the files are not one checkpoint of ``layout`` with step ``step``.
            OSError: a file could not be linked or copied into the snapshot.

        Upload failures are never raised here: see ``raise_if_failed``.
        """
        ckpt = self._local_checkpoint(step, files, extras, saved_at)
        self._submit(ckpt, required=required, on_committed=on_committed, replace_committed=replace_committed)

    def find_saved(self, step: int) -> LocalCheckpoint | None:
        """The checkpoint of ``step`` in ``local_dir`` per ``layout`` (TF: the state file's checkpoint if it
        has that step, else the newest ``*-<step>.index``); None if there is none."""
        return self._layout.find_saved(self._local_dir, step)

    def submit_saved(self, step: int, *, required: bool | None = None) -> bool:
        """``submit`` the checkpoint of ``step`` found in ``local_dir`` (``find_saved``); False if there is none."""
        ckpt = self.find_saved(step)
        if ckpt is None:
            return False
        self._submit(ckpt, required=required, on_committed=None)
        return True

    def prepare_final_save(self, step: int, deadline: Callable[[], float | None] | None = None) -> None:
        """Announce the final checkpoint (``step``), before it is saved.

        From now on ``raise_if_failed`` is left to ``finish``, so the final
        checkpoint is always saved and queued; its failure is raised even with
        ``on_error="warn"``. ``deadline`` (a function returning a
        ``time.monotonic()`` time or None) bounds ``finish``'s wait besides
        ``upload_timeout``; default: ``preemption_deadline_at`` (re-read while
        waiting, so a notice arriving later sets or tightens it). During a
        preemption, checkpoints of older steps still waiting are dropped now,
        and while ``finish`` waits, an older checkpoint whose upload is in
        flight is abandoned when only the final one can be committed by the
        deadline, from the measured throughput and sizes (``Uploader.favour_final``,
        ``uploader.plan_final_upload``); when even the final one alone would not
        make it, the older one is let finish.
        """
        self._ending = True
        self._final_step = int(step)
        self._upload_timeout_at = None if self._upload_timeout is None else time.monotonic() + self._upload_timeout
        self._end_deadline = deadline if deadline is not None else self.preemption_deadline_at
        if self._end_deadline() is not None:  # a preemption is under way: only the final checkpoint matters
            self._uploader.drop_waiting(self._final_step, f"superseded by the final checkpoint (step {step}) "
                                                          "before preemption")

    def finish(self, step: int | None = None) -> None:
        """Wait until the final checkpoint (and everything before it) is committed, then stop the uploader.

        ``step``: the final step (default: the one given to ``prepare_final_save``).
        If that checkpoint is not pending and not committed (its save was at this
        very step and failed with ``on_error="warn"``), it is submitted once more
        from ``local_dir``. The wait ends at ``upload_timeout`` (from
        ``prepare_final_save``, or now) or the preemption deadline, whichever is first.

        After a preemption notice, a final checkpoint not committed by the deadline is
        logged at ERROR and not raised (the machine is going away; the previous
        committed checkpoint stays the latest); ``preempted`` is set either way.

        Raises:
            UploadError: a checkpoint failed to commit (``FencedError`` if a newer
                writer took over), or some were still uploading at the deadline.
        """
        final = self._final_step if self._final_step is not None else (None if step is None else int(step))
        if final is not None and not self._final_submitted and not self._uploader.require(final) \
                and self._uploader.stats().last_committed_step != final:
            self.submit_saved(final, required=True)
        timeout_at = self._upload_timeout_at if self._ending else (
            None if self._upload_timeout is None else time.monotonic() + self._upload_timeout)
        end_deadline = self._end_deadline

        def favour_final(at: float | None) -> None:
            # a preemption is under way: an older upload in flight may have to make way for the final checkpoint
            if final is not None and at is not None and end_deadline() is not None:
                self._uploader.favour_final(final, at)
        try:
            self._wait_until(lambda: _min(timeout_at, end_deadline()), each=favour_final)
        except UploadError as exc:
            notice = self.notice
            if notice is None:
                raise
            self.preempted = True
            log.error("Preemption: the final checkpoint (step %s) was not committed %.1fs after the notice (%s); "
                      "the latest committed checkpoint is step %s. The process exits cleanly: the machine is "
                      "going away.", final, time.monotonic() - notice.received_at, exc,
                      self._uploader.stats().last_committed_step)
        else:
            notice = self.notice
            if notice is not None:
                self.preempted = True
                log.warning("Preemption: committed final checkpoint step %s to %s %.1fs after the notice.",
                            final, self.url, time.monotonic() - notice.received_at)
        finally:
            self.stop_uploads(timeout=0 if self._uploader.pending_steps() else None,
                              reason="Finishing (the wait for the final checkpoint is over)")
            if self._in_place:  # what the framework deleted after the last commit (TF2's sweep runs after it)
                try:
                    self._retire_deleted()
                except Exception as exc:  # noqa: BLE001 - housekeeping: counted, the next run retires them
                    self._uploader.count_housekeeping_failure(f"retiring deleted checkpoints: {exc}")

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint submitted so far is committed, dropped or failed.

        Raises:
            UploadError: a checkpoint failed to commit, or ``timeout`` seconds passed first.
        """
        started = time.monotonic()
        self._uploader.wait(timeout)
        self._raise_unless_done(time.monotonic() - started)

    def pending_steps(self) -> list[int]:
        """Steps uploading or waiting, oldest first."""
        return self._uploader.pending_steps()

    def closing_note(self, timeout: float | None) -> str:
        """What ``close(timeout)`` does with the pending checkpoints, as the end of a message announcing it
        (``"Training ended with X; closing cloudckpt" + note + "."``): "" when none is pending; abandoned
        (``timeout`` 0: not committed); not committed (this writer is fenced, its uploads are skipped); else
        committed, waiting up to ``timeout`` seconds (None: until done)."""
        pending = self.pending_steps()
        if not pending:
            return ""
        last = self._uploader.stats().last_committed_step
        stays = f"; the latest committed checkpoint of {self.url} stays step {last}" if last is not None else ""
        fenced = self.fenced
        if fenced is not None:
            return (f": checkpoint step(s) {pending} will not be committed (this writer is fenced by a newer "
                    f"{fenced.newer_writer or 'writer'}){stays}")
        if timeout == 0:
            return f": abandoning the upload of checkpoint step(s) {pending} (not committed){stays}"
        wait = "until done" if timeout is None else f"up to {timeout:g} s"
        return f": waiting for checkpoint step(s) {pending} to commit ({wait}: upload_timeout={timeout})"

    def take_failure(self) -> UploadError | None:
        """The upload failures not yet reported, as one error (None if none); they are then cleared."""
        return self._uploader.take_failure()

    @property
    def fenced(self) -> FencedError | None:
        """The ``FencedError`` once a newer writer took over the directory (nothing more is committed), else None."""
        return self._uploader.fenced

    def raise_if_failed(self) -> None:
        """Raise the unreported upload failures, if any, as one ``UploadError`` (``FencedError`` first).
        Cheap: call it every training step."""
        failure = self._uploader.take_failure()
        if failure is not None:
            raise failure

    def stats(self) -> UploadStats:
        """Counters: each save's outcome (committed = uploaded, of which replaced = in the place of a
        committed checkpoint of the same name; healed, already_committed, refused with last_refusal),
        dropped, failed, housekeeping failures with the last error, fenced_by, bytes (uploaded: sent over
        the network; copied: server-side by incremental commits), retries by cause, last committed step and
        the last commit's duration (seconds) and send rate, the commit lag of the newest committed
        checkpoint (measured at its commit), and what a preemption right now would lose
        (``uncommitted_seconds`` / ``uncommitted_steps``, measured now: see ``UploadStats``); ``task`` names
        the TF cluster task (``worker:1``) when the engine was given one."""
        stats = self._uploader.stats()
        stats.task = self.task
        return stats

    def stop_uploads(self, timeout: float | None = None, *, reason: str = "Stopping the uploads") -> None:
        """Stop the background uploader; checkpoints still uploading get ``timeout`` seconds (None: until
        done), then they are abandoned (the previous committed checkpoint stays the latest). The next
        ``submit`` starts it again. Failures are kept for ``take_failure``.

        Abandoned checkpoints (a timeout, a Ctrl-C while waiting: the ``KeyboardInterrupt`` propagates) are
        said in one WARNING (``reason`` starts it): their steps, the store's URL and the latest committed
        step there, which a restart resumes from. Nothing is said when nothing was abandoned.
        """
        interrupted = False
        try:
            self._uploader.close(timeout=timeout)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            abandoned = self._uploader.take_abandoned()
            if abandoned:
                log.warning("%s%s: abandoned the upload of checkpoint step(s) %s to %s (not committed); %s.",
                            reason, ", interrupted by KeyboardInterrupt while waiting" if interrupted else "",
                            abandoned, self.url, self._resume_point_note())

    def _resume_point_note(self) -> str:
        """What a restart resumes from, as known without a request (after an abandon the store's transfers are
        cancelled): the newest step this run committed, else the newest the resume's scan listed."""
        last = self._uploader.stats().last_committed_step
        if last is None and self._scanned:
            last = self._scanned_latest
        if last is not None:
            return f"the latest committed checkpoint there is step {last}, which a restart resumes from"
        if self._scanned:
            return "no checkpoint is committed there: a restart finds none to resume from"
        return f"this run committed none (`cloudckpt ls {self.url}` lists the one a restart resumes from)"

    def close(self, timeout: Any = UPLOAD_TIMEOUT, *, reason: str = "close()") -> None:
        """Stop watching for preemption (``stop_watching``) and stop the uploader; idempotent.

        Checkpoints still uploading get ``timeout`` seconds to commit (default:
        ``upload_timeout``; after a preemption notice at most until the deadline),
        then they are abandoned; afterwards no cloudckpt thread is left (but for a
        store request a preemption's final checkpoint stopped waiting for on a stalled
        gs:// or s3fs store: it ends by its own timeout, its answer unused). Failures
        not yet reported are logged at ERROR, not raised (``finish`` raises).
        A Ctrl-C while the watcher stops or the uploads are waited for is not
        waited for: the uploads are abandoned and the ``KeyboardInterrupt`` propagates.
        What is abandoned is said in one WARNING (``"Closing cloudckpt (<reason>): abandoned the upload of
        checkpoint step(s) [...] to <url> (not committed); the latest committed checkpoint there is step N,
        which a restart resumes from."``, see ``stop_uploads``); nothing when nothing was pending.
        """
        if timeout is UPLOAD_TIMEOUT:
            timeout = self._upload_timeout
        deadline = self.preemption_deadline_at()
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        try:
            self.stop_watching()
        except BaseException as exc:
            if not isinstance(exc, Exception):  # Ctrl-C while the watcher stops (its poller is joined): not waited
                timeout = 0  # for, as in the uploads' wait (the uploader abandons them, the interrupt propagates)
            raise
        finally:
            pending = self._uploader.pending_steps()
            try:
                self.stop_uploads(timeout=timeout, reason=f"Closing cloudckpt ({reason})")
            finally:  # a Ctrl-C in stop_uploads too: the event file is closed, the local directory let go
                summaries, self._summaries = self._summaries, None
                try:
                    if summaries is not None:  # open() starts a new event file
                        summaries.close()
                finally:
                    self.release_local_dir()  # after the uploads stopped: no snapshot of this engine is left there
            failure = self._uploader.take_failure()
            if failure is not None:
                log.error("%s", failure)
            log.debug("cloudckpt engine closed (%s); step(s) pending when it began: %s", reason, pending)

    def release_local_dir(self) -> None:
        """Let go of ``local_dir`` (held since ``open()``; ``close()`` does this): once no engine of this
        process holds it, another process may write it. Call it with no upload pending; idempotent."""
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release()

    def __enter__(self) -> "CheckpointEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------
    def _reset_final_save(self) -> None:
        self._ending = False
        self._final_step: int | None = None
        self._final_submitted = False
        self._upload_timeout_at: float | None = None
        self._end_deadline: Callable[[], float | None] = self.preemption_deadline_at

    def _local_checkpoint(self, step: int, files: Mapping[str, str] | Iterable[str],
                          extras: Mapping[str, str] | None, saved_at: float | None) -> LocalCheckpoint:
        number = integer_option(step)
        if number is None or number < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}.")
        step = number  # a numpy integer as the int: it goes into the manifest's JSON
        if isinstance(files, Mapping):
            mapping = {str(name): os.fspath(path) for name, path in files.items()}
        else:
            mapping = {os.path.basename(os.fspath(p)): os.fspath(p) for p in files}
        prefix, named_step = self._layout.prefix_of(mapping)
        if named_step != step:
            raise ConfigError(f"the files of checkpoint {prefix!r} name step {named_step}, not step {step}.")
        return LocalCheckpoint(step=step, prefix=prefix, files=mapping, extras=dict(extras or {}),
                               layout=self._layout.name, saved_at=time.time() if saved_at is None else saved_at)

    def _submit(self, ckpt: LocalCheckpoint, *, required: bool | None,
                on_committed: Callable[[CommitResult], None] | None, replace_committed: bool = False) -> None:
        if ckpt.saved_at is None:
            ckpt = LocalCheckpoint(ckpt.step, ckpt.prefix, ckpt.files, ckpt.extras, ckpt.layout, time.time())
        if required is None:
            required = self._ending and ckpt.step == self._final_step
        if required:
            self._final_submitted = True
        if self._in_place:
            # Extras already in the directory are the stored objects themselves.
            extras = {n: p for n, p in ckpt.extras.items()
                      if os.path.abspath(p) != os.path.abspath(self._store.path(n))}
            ckpt = LocalCheckpoint(ckpt.step, ckpt.prefix, ckpt.files, extras, ckpt.layout, ckpt.saved_at)

            def committed(result: CommitResult) -> None:
                if on_committed is not None:
                    on_committed(result)
                self._retire_deleted(self._scan_after(result))
            # From the uploader thread too: checksums and the directory scan stay off the training thread.
            self._uploader.start()
            self._uploader.submit(UploadJob(ckpt, on_committed=committed, required=required, may_vanish=True,
                                            replace_committed=replace_committed))
            return
        self._uploader.start()
        self._uploader.submit(self._snapshot(ckpt, required, on_committed, replace_committed))

    def _snapshot(self, ckpt: LocalCheckpoint, required: bool, on_committed: Callable[[CommitResult], None] | None,
                  replace_committed: bool = False) -> UploadJob:
        """Hard-link the checkpoint's files into a private directory; where that fails, open them (an open
        file stays readable after the framework deletes it) and let the uploader thread copy them."""
        staging = os.path.join(self._local_dir, STAGING_DIR, f"{ckpt.prefix}-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        held = _HeldFiles()
        try:
            size = sum(os.path.getsize(path) for path in ckpt.files.values())  # (held files are copied later)
            files = {name: self._link_or_hold(path, os.path.join(staging, name), held)
                     for name, path in ckpt.files.items()}
            extras = {name: self._link_or_hold(path, os.path.join(staging, name), held)
                      for name, path in ckpt.extras.items() if os.path.isfile(path)}
        except BaseException:
            held.close()
            shutil.rmtree(staging, ignore_errors=True)
            raise

        def committed(result: CommitResult) -> None:
            if on_committed is not None:
                on_committed(result)
            self._apply_retention(protect=result.manifest.step, scan=self._scan_after(result))

        def release() -> None:
            held.close()
            shutil.rmtree(staging, ignore_errors=True)

        snapshot = LocalCheckpoint(ckpt.step, ckpt.prefix, files, extras, ckpt.layout, ckpt.saved_at)
        return UploadJob(snapshot, release=release, on_committed=committed, required=required,
                         prepare=held.copy_out if held else None, replace_committed=replace_committed, size=size)

    def _link_or_hold(self, src: str, dst: str, held: "_HeldFiles") -> str:
        if self._hard_links is not False:
            try:
                os.link(src, dst)
                return dst
            except OSError:  # another device, or a filesystem without hard links
                pass
        held.hold(src, dst)
        return dst

    def _scan_after(self, result: CommitResult) -> DirectoryScan | None:
        """The directory as the commit of ``result`` left it: its listing and the log this writer has read
        (no further listing); None when the commit did not list (nothing was uploaded)."""
        if result.objects is None:
            return None
        entries = self._uploader.writer.log.cached()
        return scan_directory(self._store, objects=list(result.objects), state=fold(entries)) if entries else None

    def _apply_retention(self, protect: int, scan: DirectoryScan | None = None) -> None:
        """Remote retention after a commit; ``protect`` (the step just committed) is never deleted, even
        when newer steps exist (a run that fell back past a corrupt checkpoint). ``scan``: the directory
        as the commit left it (default: scanned now)."""
        if self.retention is None or not self.retention.deletes_checkpoints:
            return
        plan = plan_retention(scan or scan_directory(self._store), self.retention, protect={protect}, debris=False)
        apply_retention(self._store, plan, self._uploader.writer)

    def _retire_deleted(self, scan: DirectoryScan | None = None) -> None:
        """In place, the framework deletes old checkpoints itself (``max_to_keep``): retire their commits
        and remove their manifests too, so that no manifest vouches for files that are gone. Runs after each
        in-place commit (TF1's Saver has deleted by then; TF2's manager sweeps after its write callbacks, so
        what it deletes is retired at the next commit) and in ``finish``. ``scan``: the directory as the
        commit left it.

        The checkpoint's files are left to the framework, the one deleter of the directory's checkpoint files:
        a checkpoint with some files gone is one it is deleting right now, file after file, from the training
        thread (TF's Saver: ``.meta``, ``.index``, then ``.data-*``), while this runs in the uploader thread.
        Deleting the rest here raced it (TF logged "Hit NotFoundError when deleting ..., possibly because
        another process/thread is also deleting" for files this thread had removed first). TF's ``checkpoint``
        state file is the framework's too (it rewrites it after each save): not rewritten here either."""
        scan = scan or scan_directory(self._store)
        present = {o.name for o in scan.objects}
        # vanishing: in-place commits with files gone (readers no longer count them); the others: commits of
        # logs written before commit entries said "in_place"
        gone = scan.vanishing + [c for c in scan.committed + scan.superseded
                                 if not all(f.name in present for f in c.files)]
        if gone:
            apply_retention(self._store, RetentionPlan(keep=[], delete=gone, debris=[], log=scan.log),
                            self._uploader.writer, reason="Retention (max_to_keep, in place)", delete_files=False,
                            state_file=False)

    def _wait_until(self, deadline: Callable[[], float | None],
                    each: Callable[[float | None], None] | None = None) -> None:
        """Wait until every upload is done or ``deadline()`` (a ``time.monotonic()`` time, None for no
        limit) passes; the deadline is re-read every half second, so a later notice can move it, and
        ``each(deadline)`` is called then.

        Raises:
            UploadError: a checkpoint failed, or some were still uploading at the deadline.
        """
        started = time.monotonic()
        while True:
            at = deadline()
            remaining = None if at is None else at - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if each is not None:
                each(at)
            if self._uploader.wait(0.5 if remaining is None else min(0.5, remaining)):
                break
        self._raise_unless_done(time.monotonic() - started)

    def _raise_unless_done(self, waited: float) -> None:
        self.raise_if_failed()
        steps = self._uploader.pending_steps()
        if steps:
            deadline = self.preemption_deadline_at()
            if deadline is not None and deadline <= time.monotonic():
                # the preemption deadline ended the wait: raising upload_timeout would change nothing
                hint = ("The preemption deadline passed first (preemption_deadline, capped by a hard stop the "
                        "platform announced; else the platform's hard stop after the notice): the store took "
                        "longer than that for the final checkpoint; check the store's throughput or make "
                        "checkpoints smaller.")
            else:
                hint = "Raise upload_timeout or check the store's throughput."
            raise UploadError(
                f"Timed out after {waited:.1f}s waiting for checkpoint step(s) {steps} to commit to {self.url}; "
                f"the latest committed checkpoint is older. {hint}",
                url=self.url, step=steps[-1])

    def _count_retry(self, cause: str) -> None:
        self._uploader.count_retry(cause)

    def _record_summaries(self, step: int, stats: UploadStats) -> None:
        """After each checkpoint's outcome (in the uploader thread), and after each drop of a waiting one (in
        the uploader's notifier thread): the scalars of ``summaries.py``, at that checkpoint's step."""
        summaries = self._summaries  # read once: close() sets it to None from another thread
        if summaries is None:
            return
        committed = stats.last_committed_step == step
        summaries.scalars(step, {
            "commit_lag_seconds": stats.last_commit_lag_seconds if committed else None,
            "commit_lag_steps": stats.last_commit_lag_steps if committed else None,
            "throughput_mib_per_second": stats.last_upload_mib_per_second if committed else None,
            "copied_mib": stats.last_copied_bytes / (1 << 20) if committed else None,
            "uncommitted_seconds": stats.uncommitted_seconds, "uncommitted_steps": stats.uncommitted_steps,
            "queue_depth": stats.queue_depth, "retries": stats.retries, "dropped": stats.dropped,
            "failed": stats.failed})


def default_local_dir(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A stable per-URL cache directory, so a restarted process on the same VM finds its checkpoints.

    ``$CLOUDCKPT_CACHE_DIR`` (else ``$XDG_CACHE_HOME/cloudckpt``, else
    ``~/.cache/cloudckpt``) / ``<hash of URL and endpoint>``.
    """
    base = os.environ.get("CLOUDCKPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cloudckpt")
    check_storage_options(storage_options)
    options = dict(storage_options or {})
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url") or ""
    # The display form: a hash of a password (weak ones can be guessed from it) never names a directory,
    # and the cache survives a credential rotation.
    digest = hashlib.sha256(f"{display_url(url.rstrip('/'))}\n{display_url(str(endpoint))}".encode()).hexdigest()[:16]
    return os.path.join(base, digest)


def resolve_local_dir(url: str, local_dir: str | None, storage_options: Mapping[str, Any] | None = None, *,
                      url_arg: str = "checkpoint_dir", writer: str = "the framework") -> str:
    """The absolute local directory checkpoints of ``url`` are written to.

    A local path ``url`` is committed in place: it is the local directory
    (``local_dir`` must be None or the same). For a URL, ``local_dir`` or
    ``default_local_dir(url)``. ``url_arg`` and ``writer`` name the argument
    and what writes there in messages (``"directory"``, ``"TF"``).

    Raises:
        ConfigError: ``url`` is a local path to a file, or ``local_dir`` differs from a local path ``url``.
    """
    url = as_url(url, url_arg)
    if is_local_path(url):
        refuse_mistyped_url(url)  # s3:/bucket/run: not a local directory to fill
        if os.path.isfile(url):
            raise ConfigError(f"{url_arg} {url!r} is a file, not a directory: point it at a directory.")
        if local_dir is not None and os.path.abspath(local_dir) != os.path.abspath(url):
            raise ConfigError(f"local_dir={local_dir!r} was given but {url_arg} {url!r} is a local path, which "
                              f"{writer} writes to directly; drop local_dir or use a file:// URL.")
        local_dir = url
    elif local_dir is None:
        local_dir = default_local_dir(url, storage_options)
    return os.path.abspath(os.fspath(local_dir))


def ensure_writable(directory: str) -> None:
    """Create ``directory`` if needed and check a file can be created in it.

    Raises:
        ConfigError: it cannot be created or written (the message names it and what to do).
    """
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".cloudckpt-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"local_dir {directory!r} is not writable ({exc.strerror or exc}); pass local_dir= a writable "
            "directory on a disk with room for a few checkpoints.") from None


def _min(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


def supports_hard_links(directory: str) -> bool:
    """Whether a hard link can be made in ``directory`` (False on gcsfuse, some NFS and FUSE mounts)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".cloudckpt-link-probe-")
    except OSError:
        return False
    os.close(fd)
    link = probe + ".link"
    try:
        os.link(probe, link)
    except OSError:
        return False
    else:
        os.unlink(link)
        return True
    finally:
        os.unlink(probe)


class _HeldFiles:
    """Files of a snapshot held open (no hard links): cheap to take in the training thread, readable after
    the framework deletes or replaces them; ``copy_out`` (uploader thread) copies each to its snapshot path."""

    def __init__(self) -> None:
        self._held: list[tuple[int, str]] = []  # (file descriptor, snapshot path)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, src: str, dst: str) -> None:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._held.append((fd, dst))

    def copy_out(self) -> None:
        """Copy every held file to its snapshot path, then let go of it."""
        while True:
            with self._lock:
                if not self._held:
                    return
                fd, dst = self._held[0]
            with open(fd, "rb", closefd=False) as src, open(dst, "wb") as out:
                src.seek(0)
                shutil.copyfileobj(src, out, 1 << 20)
            with self._lock:
                if self._held and self._held[0][0] == fd:
                    self._held.pop(0)
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for fd, _ in held:
            os.close(fd)


_sigterm_ignored_at_exit = False


def _ignore_sigterm_at_exit() -> None:
    """From interpreter exit on, ignore SIGTERM (once a preemption notice was handled).

    Python's finalization puts ``SIG_DFL`` back for every signal it handles,
    so a shutdown SIGTERM landing while the framework and the interpreter tear
    down (a second or more) would turn the clean exit of a preempted run into
    143. ``atexit`` runs before that reset, and a ``SIG_IGN`` disposition is
    left alone by it. The process is ending anyway; SIGKILL still works.
    """
    global _sigterm_ignored_at_exit
    if _sigterm_ignored_at_exit:
        return
    _sigterm_ignored_at_exit = True

    def ignore() -> None:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread, or an embedded interpreter
            pass

    atexit.register(ignore)


def _listdir(path: str) -> list[str]:
    """The entries of directory ``path``; empty when it does not exist or cannot be read."""
    try:
        return os.listdir(path)
    except OSError:
        return []
