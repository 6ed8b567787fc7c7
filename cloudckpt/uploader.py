"""The background uploader: a bounded queue of checkpoints and one worker that commits them.

The training thread only ever enqueues (``submit`` never touches the network).
One checkpoint is committed at a time, with its files uploaded concurrently;
at most ``max_pending`` more wait behind it. When a new checkpoint arrives
and the queue is full, the oldest *waiting* one is dropped: the newest
checkpoint is always the one worth having.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import queue
import threading
import time
from multiprocessing.pool import ThreadPool
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .cancel import ContextPool, TransferScope, in_context
from .commit import ALREADY_COMMITTED, HEALED, REFUSED, UPLOADED, CommitResult, LocalCheckpoint, commit_checkpoint
from .errors import ConfigError, FencedError, UploadError, human_size, integer_option
from .lineage import CommitRecord, fold
from .remote import RemoteStore
from .retry import describe_cause
from .waits import SIGNAL_SLICE, wait_event
from .writers import Writer

log = logging.getLogger("cloudckpt")

ON_ERROR_CHOICES = ("raise", "warn")
BACKGROUND_NICENESS = 10  # added to the uploader threads' nice value: the training thread gets the CPU first
# A store slower than the save interval drops a checkpoint at every save: one WARNING per this many seconds
# (with the count since the last), the others at INFO.
DROP_WARNING_INTERVAL = 300.0
# Seconds ``close`` waits, after cancelling, for the uploads it abandons to stop and abort their multipart uploads
# (on s3:// a request stops within s3_transport.SEND_SLICE bytes: normally milliseconds; this bounds a stalled one).
ABANDON_GRACE = 2.0
# Seconds ``close`` waits for the observer's notifier thread to deliver the drops still waiting (each a few
# TensorBoard scalars: milliseconds).
NOTIFIER_JOIN_TIMEOUT = 5.0
# The final checkpoint of a preemption (``plan_final_upload``): upload time estimates are stretched by
# FINAL_MARGIN (the throughput measured over the last seconds varies, and a machine shutting down has other
# traffic on the link), and each commit costs COMMIT_OVERHEAD seconds besides its file bodies (the commit
# log read, the listing, the manifest, the log entry, the TF state file, retention: about ten small requests,
# tens of milliseconds each on S3 or GCS).
FINAL_MARGIN = 1.25
COMMIT_OVERHEAD = 1.0
# A save cut for the final checkpoint before its commit found its step committed: the store is asked whether it
# still lists the step (``Uploader._abandoned_before_checking``) for at most this share of the seconds left until
# the preemption deadline, the final checkpoint waiting (a healthy store answers in tens of milliseconds).
CUT_CHECK_SHARE = 0.05
ABANDON, KEEP = "abandon", "keep"


def lower_thread_priority() -> None:
    """Lower the calling thread's CPU priority by ``BACKGROUND_NICENESS`` (Linux: nice values are per
    thread); a no-op where that is not possible. Checksums and uploads then yield the CPU to training."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICENESS))
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


@dataclass
class UploadStats:
    """Counters of an uploader (a snapshot; see ``Uploader.stats``).

    Each save ends as one outcome: ``committed`` (uploaded: a new commit; ``replaced`` of
    them took the place of a committed checkpoint of the same name, ``UploadJob.replace_committed``),
    ``healed`` (already committed; missing or truncated objects re-uploaded; a heal cut short by
    a preemption's final checkpoint or ``close`` is neither: the step stays committed, and it counts
    in ``housekeeping_failures``, as does such a save cut before its commit found the step committed, if
    the store still lists it, ``Uploader._abandoned_before_checking``; else it is ``dropped``),
    ``already_committed`` (identical; nothing uploaded), ``refused`` (see
    ``last_refusal``), ``failed`` or ``dropped``. ``last_committed_step`` is the
    newest step this uploader saw committed (by any of the first three).

    Commit lag, of the newest committed checkpoint, measured once, when its commit completed:
    ``last_commit_lag_seconds`` from its save (``saved_at``) to its commit, and ``last_commit_lag_steps``
    the training steps run between its save and its commit, in the unit of its step: the training step
    then (``Uploader.step_source``) minus its step, >= 0. They describe how far behind training that
    commit was; they do not move until the next commit (during an outage they keep the last commit's
    figures while saves are dropped or failing).

    What a preemption right now would lose, measured when the stats are taken (None before this
    uploader saw any checkpoint committed): ``uncommitted_seconds``, seconds since the newest committed
    checkpoint was saved (training time not in the store), and ``uncommitted_steps``, training steps
    run since it, >= 0 (the training step now minus its step). They grow while commits fail or are
    dropped. For both step figures, without a step source (or when it has no value) the newest step
    saved stands in for the training step: the figure then moves in whole save intervals. Which one
    each adapter uses: ``CheckpointEngine.step_source``.
    ``queue_depth``: checkpoints not yet committed when the stats were taken: waiting, or in flight until
    its outcome is recorded (the housekeeping after a commit -- retention, cleanup -- does not count).

    Bytes: ``bytes_uploaded`` counts checkpoint bytes sent over the network; ``bytes_copied``
    those an incremental commit had the store copy server-side from the previous checkpoint
    (``incremental.py``), never sent. ``last_upload_bytes`` / ``last_copied_bytes``: the last commit's.
    ``last_upload_seconds`` is the last commit's whole duration (sending, server-side copies, the commit
    point, retries); ``last_send_seconds`` only the time it spent sending: while at least one request
    carrying file data was in flight (``TransferScope.send_seconds``). ``last_upload_mib_per_second``
    divides the bytes sent by that send time: the rate the link delivered, not lowered by server-side
    copies or a commit's small requests.
    """

    committed: int = 0
    dropped: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    retries: int = 0
    last_committed_step: int | None = None
    last_upload_seconds: float | None = None
    retries_by_cause: dict[str, int] = field(default_factory=dict)
    failures_by_cause: dict[str, int] = field(default_factory=dict)
    healed: int = 0
    already_committed: int = 0
    refused: int = 0
    last_refusal: str | None = None
    housekeeping_failures: int = 0  # retention / cleanup after a commit that failed, or an abandoned heal
    last_housekeeping_error: str | None = None
    fenced_by: str | None = None  # the newer writer, once this one is fenced
    task: str | None = None  # the TF cluster task that owns these counters (``worker:1``), if any
    last_commit_lag_seconds: float | None = None
    last_commit_lag_steps: int | None = None
    queue_depth: int = 0
    last_upload_bytes: int = 0  # bytes the last commit sent (0 when nothing needed uploading)
    bytes_copied: int = 0  # bytes of committed checkpoints the store copied server-side (incremental commits)
    last_copied_bytes: int = 0  # of those, the last commit's
    replaced: int = 0  # commits that replaced a committed checkpoint of the same name (replace_committed)
    last_send_seconds: float | None = None  # of last_upload_seconds, the time spent sending file data
    uncommitted_seconds: float | None = None  # since the newest committed checkpoint was saved (read-time)
    uncommitted_steps: int | None = None  # training steps run since the newest committed checkpoint (read-time)

    @property
    def last_upload_mib_per_second(self) -> float | None:
        """Send rate of the last commit (MiB/s): the bytes it sent (``last_upload_bytes``) over the time it
        spent sending them (``last_send_seconds``; server-side copies of an incremental commit and the commit
        point excluded). None before any commit, or when it sent nothing."""
        if not self.last_upload_bytes or not self.last_send_seconds:
            return None
        return self.last_upload_bytes / (1 << 20) / self.last_send_seconds


@dataclass
class UploadJob:
    """One checkpoint waiting to be committed; ``release`` frees its local snapshot.

    ``required``: the checkpoint must not be lost silently (the final one of a run): its failure is
    kept for ``take_failure`` even with ``on_error="warn"``. ``prepare`` runs in the uploader thread
    before the commit (a snapshot finishing its copies off the training thread). ``may_vanish``: the
    files are the framework's own (committed in place): if they are deleted before they are committed
    (the Saver's ``max_to_keep``), the save is dropped, not failed. ``replace_committed``: a checkpoint
    of the same name already committed with other tensors is replaced, not kept (``commit_checkpoint``).
    """

    checkpoint: LocalCheckpoint
    release: Callable[[], None] = lambda: None
    on_committed: Callable[[CommitResult], None] = lambda result: None
    required: bool = False
    prepare: Callable[[], None] | None = None
    may_vanish: bool = False
    replace_committed: bool = False
    size: int | None = None  # bytes of the checkpoint's files, if known at submit (default: their size on disk)

    def nbytes(self) -> int | None:
        """Bytes of the checkpoint's files: ``size``, else their size on disk; None if unknown."""
        if self.size is not None:
            return self.size
        try:
            return self.checkpoint.total_size
        except OSError:  # not copied into the snapshot yet, or deleted (may_vanish)
            return None


@dataclass(frozen=True)
class FinalPlan:
    """What ``plan_final_upload`` decided.

    Attributes:
        action: ``"abandon"`` the older upload in flight, or ``"keep"`` it going.
        case: ``"both fit"``, ``"final alone fits"``, ``"final cannot fit"``, ``"older is committing"``,
            ``"no figure"`` or ``"deadline passed"``.
        reason: why, in words, for the log (estimates in seconds, sizes as ``errors.human_size`` prints them,
            throughput in MiB/s).
        both_seconds / final_seconds: the estimated seconds to commit the older one's rest and then the final
            one / the final one alone; None without a throughput figure.
    """

    action: str
    case: str
    reason: str
    both_seconds: float | None = None
    final_seconds: float | None = None


def plan_final_upload(*, older_left: int, final_size: int, bytes_per_second: float | None,
                      seconds_left: float) -> FinalPlan:
    """During a preemption, with the final checkpoint waiting behind an older one whose upload is in flight:
    abandon the older upload (the final one starts at once), or let it finish (the final one starts after)?

    What matters is that the newest possible checkpoint is committed before the deadline; the previous
    committed checkpoint stays the latest until then either way (an abandoned upload commits nothing).

    Args:
        older_left: bytes the older upload still has to send.
        final_size: bytes of the final checkpoint's files.
        bytes_per_second: the measured upload throughput; None when there is no figure yet.
        seconds_left: seconds until the deadline.

    A commit is estimated at ``bytes / throughput x FINAL_MARGIN + COMMIT_OVERHEAD`` seconds:

    * both fit (the older one's rest, then the final one): keep (nothing is lost);
    * else, the final one alone fits: abandon the older one, the final is newer and only it can make it;
    * else, even the final one alone would not fit: keep, the older one is the better bet (nearer its commit
      than the final one could get);
    * the older one has nothing left to send (it is committing: a few small requests): keep; cut at its
      commit point it might be committed anyway, and finishing it costs less than a commit's overhead.

    No throughput figure (no upload of this uploader has sent for longer than ``cancel.RATE_WINDOW`` yet, or
    nothing was delivered over that window: a stalled link): abandon the older one only when it has at least
    as many bytes left to send as the final checkpoint has. Then, whatever the throughput, the final one
    needs no more time than the older one's rest (both pay one commit's overhead), so it is at least as
    likely to make the deadline, and it is newer; without a figure the older upload has also barely started,
    so abandoning it wastes little. When the older one is nearer done than that, it is kept: it is the
    likelier of the two to be committed. The caller decides again as figures come in
    (``Uploader.favour_final``).
    """
    mib = float(1 << 20)
    if seconds_left <= 0:
        return FinalPlan(KEEP, "deadline passed", "the deadline has passed")
    if older_left <= 0:
        return FinalPlan(KEEP, "older is committing",
                         "it has sent what its commit has to send and is committing (a few small requests)")
    if bytes_per_second is None or bytes_per_second <= 0:
        why = "no upload throughput measured yet" if bytes_per_second is None else \
            "nothing was delivered over the last seconds (a stalled link): no throughput figure"
        if older_left >= final_size:
            return FinalPlan(ABANDON, "no figure",
                             f"{why}; it still has {human_size(older_left)} to send, no less than the final "
                             f"checkpoint's {human_size(final_size)}: the final one needs no more time than its "
                             "rest, and it is newer")
        return FinalPlan(KEEP, "no figure",
                         f"{why}; it has {human_size(older_left)} left to send, less than the final checkpoint's "
                         f"{human_size(final_size)}: it is the likelier to commit")

    def seconds(nbytes: int) -> float:
        return nbytes / bytes_per_second * FINAL_MARGIN + COMMIT_OVERHEAD

    older, final = seconds(older_left), seconds(final_size)
    both = older + final
    figures = (f"at {bytes_per_second / mib:.1f} MiB/s its {human_size(older_left)} left and then the final "
               f"checkpoint's {human_size(final_size)} need about {both:.1f} s, the final one alone about "
               f"{final:.1f} s, and {seconds_left:.1f} s are left")
    if both <= seconds_left:
        return FinalPlan(KEEP, "both fit", figures, both, final)
    if final <= seconds_left:
        return FinalPlan(ABANDON, "final alone fits", figures, both, final)
    return FinalPlan(KEEP, "final cannot fit",
                     f"{figures}: even the final one alone would not make the deadline, and the older one "
                     f"(about {older:.1f} s) is the better bet", both, final)


class Uploader:
    """Commits checkpoints to ``store`` from a background thread.

    Args:
        store: the remote checkpoint directory.
        max_pending: checkpoints allowed to wait behind the one in flight (>= 1).
        concurrency: files uploaded in parallel within one checkpoint (default: the
            store's ``transfer.max_files_in_flight``).
        on_error: ``"raise"`` keeps failures for ``take_failure`` (the hook
            re-raises them in the training thread); ``"warn"`` logs and counts them.
        observer: called in the uploader thread after each checkpoint's outcome
            (committed, refused, failed, or dropped by the commit) with its step and the stats (a copy;
            ``queue_depth``: the checkpoints waiting behind it); and, for checkpoints dropped while waiting
            (``submit``'s full queue, ``drop_waiting``), with the dropped step and the stats then, from a
            thread of its own (``cloudckpt-observer``: never the training thread, and not held up by a
            commit in flight, which during an outage may retry for minutes).

    ``step_source`` (attribute, default None): the training step now, for ``last_commit_lag_steps``; see
    ``CheckpointEngine.step_source``.
    """

    def __init__(self, store: RemoteStore, *, max_pending: int = 2, concurrency: int | None = None,
                 on_error: str = "raise", observer: Callable[[int, UploadStats], None] | None = None) -> None:
        pending = integer_option(max_pending)
        if pending is None or pending < 1:
            raise ConfigError(f"max_pending must be an integer >= 1, got {max_pending!r}.")
        max_pending = pending
        if on_error not in ON_ERROR_CHOICES:
            raise ConfigError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}.")
        self.store = store
        self.max_pending = max_pending
        self.on_error = on_error
        self._concurrency = concurrency or store.transfer.max_files_in_flight
        self._observer = observer
        self._newest_submitted: int | None = None
        self.step_source: Callable[[], int | None] | None = None  # see CheckpointEngine.step_source
        self._step_source_failed = False  # logged once
        self._cond = threading.Condition()
        self._queue: collections.deque[UploadJob] = collections.deque()
        self._in_flight: UploadJob | None = None
        self._in_flight_settled = False  # its outcome is recorded: housekeeping after it (no longer queue_depth)
        # the transfer scope of the in-flight job while it uploads (cancellable alone: favour_final); None after
        self._in_flight_scope: TransferScope | None = None
        self._plans_logged: set[tuple[int, str]] = set()  # (step in flight, FinalPlan.case) logged by favour_final
        self._final_deadline_at: float | None = None  # deadline_at of favour_final's last abandon (time.monotonic())
        self._last_send_rate: float | None = None  # bytes/s an upload measured when it ended (TransferScope)
        self._failures: list[UploadError] = []
        self._drop_notices: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # dropped steps for the observer
        self._notifier: threading.Thread | None = None  # started at the first drop (with an observer)
        self._stats = UploadStats()
        self._committed_saved_at: float | None = None  # saved_at of the newest committed checkpoint (uncommitted_*)
        self._drop_warned_at: float | None = None  # time.monotonic() of the last WARNING about a drop
        self._drops_not_warned = 0  # drops logged at INFO since
        self._drop_log_lock = threading.Lock()
        self._closing = False
        # close() gave up on the worker (_abandon_worker: the store's transfers cancelled, what was left logged once);
        # start() / resume_transfers() wait for that worker to end, then clear it and the cancel. Not the Keras
        # callbacks' EngineLifecycle._abandon_ran (their own Ctrl-C close-down, one layer up).
        self._worker_abandoned = False
        # steps the last close() gave up on (not committed), for the engine's one WARNING (take_abandoned)
        self._abandoned_steps: list[int] = []
        self._thread: threading.Thread | None = None
        self._done: threading.Event | None = None  # set when the current worker has ended
        self._pool: ThreadPool | None = None
        self.writer = Writer(store)  # registers at the first commit unless registered before (the hook does)
        self._fenced: FencedError | None = None
        # prefixes whose commit an earlier attempt began and did not finish (a previous process's, as the engine
        # found at resume; one of this process that failed or was abandoned): their commit is ``resumed``
        self._unfinished: set[str] = set()

    def note_unfinished(self, prefixes: Iterable[str]) -> None:
        """Checkpoint ``prefixes`` (``model.ckpt-30``) an earlier attempt began to commit and did not finish (a
        previous process's upload debris in the store, its snapshots): their next commit is taken up again
        (``commit_checkpoint``'s ``resumed``: the directory is listed before anything is sent)."""
        with self._cond:
            self._unfinished.update(prefixes)

    # -- called from the training thread ------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent; restarts after ``close``, see ``resume_transfers``)."""
        with self._cond:
            if self._worker_running() and not self._worker_abandoned:
                return
        self.resume_transfers()
        with self._cond:
            if self._worker_running():
                return
            self._closing = False
            self.store.cancel.clear()
            # multiprocessing's ThreadPool has daemon threads: an abandoned upload never holds up
            # interpreter exit (concurrent.futures joins its workers at exit).
            self._pool = ThreadPool(self._concurrency, initializer=lower_thread_priority)
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._done,), name="cloudckpt-uploader",
                                            daemon=True)
            self._thread.start()

    def resume_transfers(self) -> None:
        """Let the store's transfers run again after ``close`` abandoned them (clears ``store.cancel``).

        An abandoned worker still stopping is waited for first, without limit (a WARNING after 1 s):
        cleared under it, the cancel would let it go on with the requests it was told to stop, and commit
        what was abandoned. On ``s3://`` it stops at once (requests are cut); another backend finishes the file in
        flight first, and a CreateMultipartUpload or an abort already sent is answered or times out.
        """
        with self._cond:
            waiting = self._worker_abandoned and self._worker_running()
            done = self._done
        if waiting and done is not None and not wait_event(done, 1.0):
            log.warning("Waiting for the abandoned upload to %s to stop before uploading again.", self.store.url)
            wait_event(done)
        with self._cond:
            self._worker_abandoned = False
            self.store.cancel.clear()

    def _worker_running(self) -> bool:
        """The worker has not ended. Its own event, not ``Thread.is_alive``: on CPython 3.11-3.12 a
        KeyboardInterrupt in ``Thread.join`` can mark a running thread as ended (CPython gh-90882, bpo-46726)."""
        return self._done is not None and not self._done.is_set()

    def _abandon_worker(self) -> None:
        """Cancel the store's transfers (the worker's retries end, requests stop), then say what is given up."""
        self.store.cancel_transfers()
        with self._cond:
            first = not self._worker_abandoned
            self._worker_abandoned = True
            scope = self._in_flight_scope
            # past its point of no return (it passed it before the cancel: passing is refused after it)
            committing = self._in_flight if self._in_flight and scope is not None and scope.committing else None
            # not one whose outcome is recorded (committed, its housekeeping running): nothing of it is lost
            settled = self._in_flight_settled
            abandoned = ([self._in_flight] if self._in_flight and not committing and not settled else []) \
                + list(self._queue)
        # a save of a step committed already (a heal, or one cut before its commit found that out): the step
        # stays committed (recorded as such when the worker stops, _abandoned_before_checking): nothing is lost
        abandoned = [j for j in abandoned if not (j is self._in_flight and (
            (scope is not None and scope.healing) or self._committed_record(j.checkpoint, fresh=False) is not None))]
        if first and abandoned:  # said once, with what a restart resumes from, by CheckpointEngine.stop_uploads
            steps = [j.checkpoint.step for j in abandoned]
            with self._cond:
                self._abandoned_steps = sorted(set(self._abandoned_steps) | set(steps))
            log.debug("Abandoning upload of checkpoint step(s) %s to %s.", steps, self.store.url)
        if first and committing is not None:
            log.warning("Not abandoning checkpoint step %d: it is writing its commit point to %s, which no cancel "
                        "may cut (a few small requests); it is committed when they end.", committing.checkpoint.step,
                        self.store.url)

    def submit(self, job: UploadJob) -> None:
        """Queue a checkpoint for commit. Never blocks on the network."""
        with self._cond:
            self._queue.append(job)
            self._note_submitted(job.checkpoint.step)
            while len(self._queue) > self.max_pending:
                dropped = self._queue.popleft()
                self._stats.dropped += 1
                self._log_drop("Dropping checkpoint step %d: %d newer checkpoint(s) are waiting for upload to %s "
                               "(max_pending=%d). The store is slower than the save interval.",
                               dropped.checkpoint.step, len(self._queue), self.store.url, self.max_pending)
                dropped.release()
                self._notify_dropped(dropped.checkpoint.step)
            self._cond.notify_all()

    def drop_waiting(self, older_than: int, reason: str) -> None:
        """Drop checkpoints still waiting (not the one in flight) with a step below ``older_than``."""
        with self._cond:
            dropped = [j for j in self._queue if j.checkpoint.step < older_than]
            self._queue = collections.deque(j for j in self._queue if j.checkpoint.step >= older_than)
            self._stats.dropped += len(dropped)
        for job in dropped:
            self._log_drop("Dropping checkpoint step %d: %s.", job.checkpoint.step, reason)
            job.release()
            self._notify_dropped(job.checkpoint.step)

    def _notify_dropped(self, step: int) -> None:
        """Have the observer called for dropped checkpoint ``step`` from the notifier thread (never here: the
        caller may be the training thread). Does not block."""
        if self._observer is None:
            return
        self._drop_notices.put(step)
        with self._drop_log_lock:
            if self._notifier is None or not self._notifier.is_alive():
                self._notifier = threading.Thread(target=self._notify_loop, name="cloudckpt-observer", daemon=True)
                self._notifier.start()

    def _notify_loop(self) -> None:
        """The notifier thread: calls the observer for each dropped step; ends after 1 s without one."""
        while True:
            try:
                step: int | None = self._drop_notices.get(timeout=1.0)
            except queue.Empty:
                step = None
            if step is None:  # idle for 1 s, or close() (_end_notifier): ends once nothing waits
                with self._drop_log_lock:
                    if self._drop_notices.empty():
                        self._notifier = None
                        return
                continue
            self._observe(step)

    def _end_notifier(self) -> None:
        """close(): let the notifier thread deliver the drops still waiting and end (at most
        ``NOTIFIER_JOIN_TIMEOUT`` seconds), so the observer (the TensorBoard writer) sees them before it closes
        and no cloudckpt thread outlives ``close``."""
        with self._drop_log_lock:
            notifier = self._notifier
            if notifier is None or notifier is threading.current_thread():  # an observer closing its uploader
                return
            self._drop_notices.put(None)
        notifier.join(NOTIFIER_JOIN_TIMEOUT)

    def _log_drop(self, message: str, *args: object) -> None:
        """Log a dropped checkpoint, rate-limited per uploader (one per hook or Keras callback): the first drop
        is a WARNING; every further drop less than ``DROP_WARNING_INTERVAL`` seconds (300 s) after the last
        WARNING is logged at INFO only; the first drop after that interval is a WARNING again and adds how many
        drops were logged at INFO since the previous one. Drops at INFO after the last WARNING get no later
        summary unless another drop comes; ``stats().dropped`` counts every drop, whatever its level."""
        with self._drop_log_lock:  # the training thread and the worker both drop
            now = time.monotonic()
            warn = self._drop_warned_at is None or now - self._drop_warned_at >= DROP_WARNING_INTERVAL
            if warn:
                if self._drops_not_warned:
                    message += (f" ({self._drops_not_warned} more dropped since the last such warning, "
                                "logged at INFO.)")
                self._drop_warned_at, self._drops_not_warned = now, 0
            else:
                self._drops_not_warned += 1
        log.log(logging.WARNING if warn else logging.INFO, message, *args)

    def require(self, step: int) -> bool:
        """Mark the checkpoint of ``step`` waiting or in flight as required (see ``UploadJob``);
        False if no such checkpoint is pending."""
        with self._cond:
            jobs = [j for j in ([self._in_flight] if self._in_flight else []) + list(self._queue)
                    if j.checkpoint.step == step]
            for job in jobs:
                job.required = True
            return bool(jobs)

    def favour_final(self, step: int, deadline_at: float) -> FinalPlan | None:
        """During a preemption, with the final checkpoint (``step``) waiting behind an older one whose upload is
        in flight: abandon that upload when only the final checkpoint can be committed by ``deadline_at``
        (``time.monotonic()``), else let it finish; the decision is ``plan_final_upload``'s.

        Its figures: the bytes the older upload still has to send (``TransferScope.bytes_left``: what its commit's
        current round announced it sends -- the files it has not stored yet, after it went round again for debris
        at its names the ones debris took; a heal the missing objects -- less what it delivered since), the final
        checkpoint's size, the throughput the older upload measured over its last ``cancel.RATE_WINDOW`` seconds
        (else the one an earlier upload measured so when it ended; not ``UploadStats.last_upload_mib_per_second``,
        which a small checkpoint's round trips dominate), and the seconds left. Call it
        again while waiting: the figures firm up as the older upload goes on. Each decision is logged once per
        upload (an abandon at WARNING, with its figures; "even the final one alone would not fit" at WARNING
        too); an abandon is final.

        Abandoning cancels the older upload's transfers alone (its ``TransferScope``): on ``s3://`` its requests
        stop within ``SEND_SLICE`` and its multipart uploads are aborted; other backends stop after the file in
        flight. Nothing of it is committed (the previous committed checkpoint stays the latest until the final
        one commits), it counts as ``dropped``, and the worker goes on with the final checkpoint at once, in a
        scope of its own. Except an older save of a step committed already whose commit is healing it
        (re-uploading objects of it missing or truncated in the store, ``TransferScope.healing``): abandoned,
        its step stays committed (those objects still missing), and it counts in ``housekeeping_failures``, not
        ``dropped``. Cut before its commit has found the step committed (a save of a step the commit log lists
        as committed, ``_abandoned_before_checking``): still committed in the store (the catalog lists it), it
        counts in ``housekeeping_failures`` too (its objects were not checked); no longer committed (retired, its
        manifest gone), it counts as ``dropped``, said at WARNING.

        An older upload past its point of no return -- its files uploaded, its commit point being written
        (``TransferScope.enter_commit_point``) -- cannot be abandoned, whatever the figures (which can call for
        it: bytes an incremental commit copies server-side are never sent, so they look left to send): it is
        let finish (a few small requests) and committed as usual, and the plan says so (``"keep"``, ``"older is
        committing"``, "could not abandon it: it is committing ...; the figures called for it: ..."; logged once,
        at WARNING). Cut there, a commit point may have been applied by the store regardless.

        Returns:
            The plan, or None when there was nothing to decide (no older upload in flight, the final checkpoint
            not waiting, sizes unknown, or the older upload already abandoned).
        """
        with self._cond:
            job, scope = self._in_flight, self._in_flight_scope
            final = next((j for j in self._queue if j.checkpoint.step == step), None)
            if job is None or scope is None or final is None or scope.cancelled or job.required \
                    or job.checkpoint.step >= step:
                return None
            last_rate, last_committed = self._last_send_rate, self._stats.last_committed_step
        older = job.checkpoint.step
        older_size, final_size = job.nbytes(), final.nbytes()
        if older_size is None or final_size is None:
            return None
        self.store.measure(scope)
        rate = scope.bytes_per_second()
        plan = plan_final_upload(older_left=scope.bytes_left(older_size), final_size=final_size,
                                 bytes_per_second=rate if rate is not None else last_rate,
                                 seconds_left=deadline_at - time.monotonic())
        if plan.action == ABANDON:
            with self._cond:
                if self._in_flight is not job or self._in_flight_scope is not scope:
                    return None  # it ended meanwhile: the final checkpoint is next anyway
                self._final_deadline_at = deadline_at  # before the cancel: it bounds the worker's check of the cut
                abandoned = self.store.cancel_transfers(scope)
            if not abandoned:  # past its point of no return: its commit point is being written
                return self._keep_committing(older, step, plan)
            if scope.healing:  # committed already: only the re-upload of its missing objects stops
                log.warning("Preemption: abandoning the heal of committed checkpoint step %d in %s (re-uploading "
                            "objects of it missing or truncated in the store) so that the final checkpoint (step %d) "
                            "starts now: %s. Step %d stays committed, those objects still missing.", older,
                            self.store.url, step, plan.reason, older)
                return plan
            if self._committed_record(job.checkpoint, fresh=False) is not None:  # the log as last read: no request
                log.warning("Preemption: abandoning the save of checkpoint step %d, committed already in %s (its "
                            "commit had not yet checked the committed objects), so that the final checkpoint (step "
                            "%d) starts now: %s. Step %d stays committed if the store still lists it (checked once "
                            "the save has stopped).", older, self.store.url, step, plan.reason, older)
                return plan
            log.warning("Preemption: abandoning the upload of checkpoint step %d to %s so that the final checkpoint "
                        "(step %d) starts now: %s. Nothing of step %d is committed; the latest committed checkpoint "
                        "stays %s until the final one commits.", older, self.store.url, step, plan.reason, older,
                        f"step {last_committed}" if last_committed is not None else "none")
        elif (older, plan.case) not in self._plans_logged:
            self._plans_logged.add((older, plan.case))
            level = logging.WARNING if plan.case == "final cannot fit" else logging.INFO
            log.log(level, "Preemption: letting the upload of checkpoint step %d finish before the final checkpoint "
                    "(step %d) starts: %s.", older, step, plan.reason)
        return plan

    def _keep_committing(self, older: int, step: int, planned: FinalPlan) -> FinalPlan:
        """The plan for an older upload whose abandon (``planned``) was refused: it is past its point of no
        return (its commit point is being written, or was; ``TransferScope.enter_commit_point``) and is let
        finish, which takes a few small requests. Logged once per upload, at WARNING."""
        reason = ("could not abandon it: it is committing (its files are uploaded and its commit point is being "
                  f"written, which no cancel may cut: a few small requests); the figures called for it: "
                  f"{planned.reason}")
        plan = FinalPlan(KEEP, "older is committing", reason, planned.both_seconds, planned.final_seconds)
        if (older, "could not abandon") not in self._plans_logged:
            self._plans_logged.add((older, "could not abandon"))
            log.warning("Preemption: letting the upload of checkpoint step %d finish before the final checkpoint "
                        "(step %d) starts: %s.", older, step, reason)
        return plan

    def commit_now(self, job: UploadJob, *, background: bool = False) -> None:
        """Commit ``job`` in the calling thread (the worker's, ``background=True``; else a caller's own).

        Failures are recorded exactly as for background commits.
        """
        if not background:
            with self._cond:
                self._note_submitted(job.checkpoint.step)
        try:
            self._commit(job, in_flight=background)
        finally:
            with self._cond:
                if self._in_flight is job:
                    self._in_flight_settled = True
            job.release()
        if self._observer is not None:
            self._observe(job.checkpoint.step, behind=True)

    def _observe(self, step: int, *, behind: bool = False) -> None:
        """Call the observer with ``step`` and the stats now (``behind``: ``queue_depth`` counts only the
        checkpoints waiting, the one just done not being in flight any more)."""
        if self._observer is None:
            return
        stats = self.stats()
        if behind:
            with self._cond:
                stats.queue_depth = len(self._queue)  # waiting behind this one
        try:
            self._observer(step, stats)
        except Exception as exc:  # noqa: BLE001 - observability never fails a commit
            log.warning("Recording upload statistics failed: %s", exc)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is committed, dropped or failed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight is not None:
                if not self._worker_running():
                    return not self._queue and self._in_flight is None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(min(remaining, SIGNAL_SLICE) if remaining is not None else SIGNAL_SLICE)
            return True

    @property
    def fenced(self) -> FencedError | None:
        """The ``FencedError`` once a newer writer took over the directory (for good), else None."""
        return self._fenced

    def take_failure(self) -> UploadError | None:
        """The failures not yet reported, as one error (None if there is none); they are then cleared."""
        if not self._failures:  # called every step: skip the lock in the common case
            return None
        with self._cond:
            failures, self._failures = self._failures, []
        fenced = next((f for f in failures if isinstance(f, FencedError)), None)
        if fenced is not None:
            return fenced  # the one that matters: nothing more will be committed
        if len(failures) <= 1:
            return failures[0] if failures else None
        steps = sorted({f.step for f in failures if f.step is not None})  # a final step retried fails twice
        combined = UploadError(f"{len(steps) or len(failures)} checkpoints (steps {steps}) were not committed to "
                               f"{self.store.url}; the first failure: {failures[0]}", url=self.store.url,
                               step=steps[-1] if steps else None)
        combined.__cause__ = failures[0]
        return combined

    def take_abandoned(self) -> list[int]:
        """The steps ``close`` abandoned (their upload given up, not committed) since the last call, oldest first;
        then cleared."""
        with self._cond:
            steps, self._abandoned_steps = self._abandoned_steps, []
        return steps

    def pending_steps(self) -> list[int]:
        """Steps in flight or waiting, oldest first."""
        with self._cond:
            jobs = ([self._in_flight] if self._in_flight else []) + list(self._queue)
            return [j.checkpoint.step for j in jobs]

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker once the queue drains; after ``timeout`` seconds, or on a Ctrl-C while waiting
        (the ``KeyboardInterrupt`` is re-raised), abandon what is left.

        Abandoning cancels the store's transfers (``RemoteStore.cancel_transfers``): pending retries end, no
        request starts any more (so nothing abandoned is committed, on any backend), on ``s3://`` each
        request in flight stops within ``SEND_SLICE`` (1 MiB) of its body, at once on a stalled
        connection, and the multipart uploads started are aborted; close waits up to ``ABANDON_GRACE``
        seconds for that. On ``gs://`` a resumable upload (a file from 5 MiB) stops before its next chunk.
        Except a checkpoint already writing its commit point (past its point of no return,
        ``TransferScope.enter_commit_point``): it is not abandoned but finishes within that wait (a few small
        requests), and is counted and logged as committed; cut there, the store might have applied its commit
        point while it was reported abandoned. Other backends stop between files: a file in flight there may
        finish in the background (daemon threads), uncommitted. Otherwise the worker and its file-upload threads have
        ended when this returns. A later ``close`` waits ``ABANDON_GRACE`` at most, not ``timeout``; a
        later ``start`` waits for the abandoned worker to end (``resume_transfers``). Whatever the outcome, a
        Ctrl-C included, the drops still waiting reach the observer and its thread has ended (``_end_notifier``).
        """
        try:
            self._stop_worker(timeout)
        finally:  # also after a Ctrl-C: the drops waiting reach the observer, and its thread ends
            self._end_notifier()

    def _stop_worker(self, timeout: float | None) -> None:
        """``close`` but for the notifier thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread, pool, done = self._thread, self._pool, self._done
            already_abandoned = self._worker_abandoned
        if thread is not None and done is not None:
            try:
                finished = wait_event(done, ABANDON_GRACE if already_abandoned else timeout)
            except BaseException:  # Ctrl-C while waiting: give up on the uploads, as a timeout does
                self._abandon_worker()
                raise
            if not finished and not already_abandoned:
                self._abandon_worker()
                finished = wait_event(done, ABANDON_GRACE)
            if not finished:
                if pool is not None:
                    pool.close()  # the worker starts no further file: what it still submits fails (abandoned)
                return
        with self._cond:
            self._thread = None
            self._pool = None
        if pool is not None:
            pool.close()
            pool.join()

    def stats(self) -> UploadStats:
        """A copy of the counters, with the read-time figures (``uncommitted_seconds`` / ``uncommitted_steps``)
        measured now; reads ``step_source`` (without the lock held)."""
        with self._cond:
            stats = copy.deepcopy(self._stats)
            # not yet committed: waiting, or in flight until its outcome is recorded (then its housekeeping runs)
            stats.queue_depth = len(self._queue) + (self._in_flight is not None and not self._in_flight_settled)
            saved_at = self._committed_saved_at
        if stats.last_committed_step is not None:
            stats.uncommitted_steps = self._training_step(stats.last_committed_step) - stats.last_committed_step
            stats.uncommitted_seconds = None if saved_at is None else max(0.0, time.time() - saved_at)
        return stats

    def count_housekeeping_failure(self, error: str) -> None:
        """Record a failed housekeeping step outside a commit (``stats().housekeeping_failures``)."""
        with self._cond:
            self._stats.housekeeping_failures += 1
            self._stats.last_housekeeping_error = error
        log.warning("Housekeeping of %s failed: %s", self.store.url, error)

    def count_retry(self, cause: str) -> None:
        """Record one retry of a storage operation (wired to ``RemoteStore``'s ``on_retry``)."""
        with self._cond:
            self._stats.retries += 1
            self._stats.retries_by_cause[cause] = self._stats.retries_by_cause.get(cause, 0) + 1

    def _note_submitted(self, step: int) -> None:
        if self._newest_submitted is None or step > self._newest_submitted:
            self._newest_submitted = step

    def _training_step(self, step: int) -> int:
        """The training step now, for the commit lag of checkpoint ``step`` (never below it): ``step_source``'s
        value, else (no source, it returned None or raised) the newest step submitted. Called without the lock
        held: a source may read a framework variable."""
        source = self.step_source
        now: int | None = None
        if source is not None:
            try:
                value = source()
                now = None if value is None else int(value)
            except Exception as exc:  # noqa: BLE001 - a statistic never fails a commit
                if not self._step_source_failed:
                    self._step_source_failed = True
                    log.debug("Reading the training step for the commit lag failed (%s: %s); the newest saved step "
                              "stands in for it.", type(exc).__name__, exc)
        if now is None:
            with self._cond:
                now = self._newest_submitted
        return step if now is None else max(step, now)

    # -- the worker --------------------------------------------------------------------------------
    def _run(self, done: threading.Event) -> None:
        try:
            self._work()
        finally:
            done.set()

    def _work(self) -> None:
        lower_thread_priority()
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._in_flight = self._queue.popleft()
                self._in_flight_settled = False
            try:
                self.commit_now(job, background=True)
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()

    def _commit(self, job: UploadJob, *, in_flight: bool = False) -> None:
        """Commit ``job`` and record its outcome; ``in_flight``: it is the worker's job (``favour_final`` may
        abandon its upload)."""
        step = job.checkpoint.step
        started = time.monotonic()
        if self._fenced is not None:  # a fenced writer commits nothing more
            with self._cond:
                self._stats.dropped += 1
                if job.required:  # the run's final checkpoint: its loss is reported, not only logged
                    self._failures.append(self._fenced)
            log.warning("Not uploading checkpoint step %d: this writer is fenced (%s).", step,
                        self._fenced.newer_writer)
            return
        # The commit's transfers in a scope of their own: favour_final can cancel them alone (the next job's
        # scope is a fresh one); the pool's tasks run in it too (ContextPool).
        cut: Exception | None = None
        with self.store.transfer_scope() as scope:
            try:
                result = self._upload(job, scope, in_flight)
            except FencedError as exc:
                self._record_fenced(exc, step)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none swallowed
                # Cancelled (favour_final): the scope was not past its point of no return then (a cancel is
                # refused there), nor after (passing it is refused once cancelled): nothing of it was committed.
                if scope.cancelled and scope.healing:  # the step stays committed: only its heal was cut
                    self._record_abandoned_heal(step, "abandoned for the final checkpoint", exc)
                    return
                if not scope.cancelled:
                    self._record_failure(job, exc, scope)
                    return
                cut = exc  # favour_final abandoned it for the final checkpoint: said there
            finally:
                self._note_send_rate(scope)
        if cut is not None:  # out of its cancelled scope: checking the store's catalog may send requests
            with self._cond:
                deadline_at = self._final_deadline_at
            if not self._abandoned_before_checking(job, "abandoned for the final checkpoint", cut, deadline_at):
                with self._cond:
                    self._stats.dropped += 1
                log.info("Upload of checkpoint step %d stopped (abandoned for the final checkpoint); nothing of "
                         "it was committed: %s", step, cut)
            return
        if scope.cancelled:  # a commit without a commit point of its own (already committed, healed, refused)
            log.info("Checkpoint step %d: its commit ended before abandoning its upload took effect.", step)
        self._record_outcome(job, result, time.monotonic() - started, scope.send_seconds)

    def _note_send_rate(self, scope: TransferScope) -> None:
        """Keep the throughput ``scope`` measured over its last seconds of sending, if it sent long enough."""
        last = scope.last_sent_at
        rate = scope.bytes_per_second(last) if last is not None else None
        if rate is not None:
            with self._cond:
                self._last_send_rate = rate

    def _upload(self, job: UploadJob, scope: TransferScope, in_flight: bool) -> CommitResult:
        """``prepare`` and ``commit_checkpoint`` of ``job`` in ``scope`` (the in-flight job's while it runs)."""
        if in_flight:
            with self._cond:
                self._in_flight_scope = scope
        try:
            if job.prepare is not None:
                job.prepare()
            pool = ContextPool(self._pool) if self._pool is not None else None
            prefix = job.checkpoint.prefix
            with self._cond:
                resumed = prefix in self._unfinished
                self._unfinished.add(prefix)  # until it ends: an attempt cut short leaves it taken up again
            result = commit_checkpoint(self.store, job.checkpoint, executor=pool, writer=self.writer,
                                       replace_committed=job.replace_committed, resumed=resumed)
            with self._cond:
                self._unfinished.discard(prefix)
            return result
        finally:
            if in_flight:
                with self._cond:
                    self._in_flight_scope = None

    def _record_failure(self, job: UploadJob, exc: Exception, scope: TransferScope | None = None) -> None:
        """Count and report the failed commit of ``job`` in ``scope`` (abandoned by ``close``: dropped).

        A commit past its point of no return (``scope.committing``) is not stopped by ``close``'s cancel: its
        failure is a failure (its commit point could not be written), never "abandoned"."""
        step = job.checkpoint.step
        healing = scope is not None and scope.healing
        if self.store.cancel.all_set() and healing:  # close() cut the heal of a committed checkpoint
            self._record_abandoned_heal(step, "abandoned", exc)
            return
        if self.store.cancel.all_set() and not (scope is not None and scope.committing):
            # close() abandoned it (Ctrl-C, upload_timeout) before its commit point: said there
            if self._abandoned_before_checking(job, "abandoned", exc):
                return
            with self._cond:
                self._stats.dropped += 1
            log.info("Upload of checkpoint step %d stopped (abandoned): %s", step, exc)
            return
        if job.may_vanish and not job.required and not all(
                os.path.exists(p) for p in job.checkpoint.files.values()):
            with self._cond:
                self._stats.dropped += 1
            self._log_drop("Dropping checkpoint step %d: its files were deleted (max_to_keep) before it was "
                           "committed; the store is slower than the save interval.", step)
            return
        cause = describe_cause(exc)
        if healing:  # committed before this save: it stays so, without the objects the heal was to re-upload
            message = (f"Checkpoint step {step} stays committed in {self.store.url}, but healing it (re-uploading its "
                       f"objects missing or truncated in the store) failed: {exc}")
        else:
            message = f"Checkpoint step {step} was not committed to {self.store.url}: {exc}"
        error = UploadError(message, url=self.store.url, step=step)
        error.__cause__ = exc
        keep = self.on_error == "raise" or job.required
        with self._cond:
            self._stats.failed += 1
            self._stats.failures_by_cause[cause] = self._stats.failures_by_cause.get(cause, 0) + 1
            if keep:
                self._failures.append(error)
        if keep:
            log.error("%s", error)
        else:
            log.warning("%s (on_error='warn': training continues; the next checkpoint tries again).", error)

    def _committed_record(self, ckpt: LocalCheckpoint, *, fresh: bool) -> CommitRecord | None:
        """The live commit of checkpoint ``ckpt`` (its prefix) in this writer's lineage that the commit log lists,
        else None. ``fresh``: the log's new entries are read from the store first (``CommitLog.refresh``, a
        request or two); a failed read is not retried here: the log as this writer last read it (every commit
        reads it first) stands in for it, as it does without ``fresh`` (no request)."""
        writer = self.writer
        if not writer.registered:
            return None
        entries = None
        if fresh:
            try:
                entries = writer.log.refresh()
            except Exception as exc:  # noqa: BLE001 - the log last read answers instead
                log.debug("Reading the commit log of %s failed (%s: %s); using the entries read before.",
                          self.store.url, type(exc).__name__, exc)
        state = fold(entries if entries is not None else writer.log.cached())
        lineage = set(state.ancestry(writer.head))
        return next((r for r in reversed(state.live()) if r.prefix == ckpt.prefix and r.commit_id in lineage), None)

    def _abandoned_before_checking(self, job: UploadJob, why: str, exc: Exception,
                                   deadline_at: float | None = None) -> bool:
        """``job``'s save was cut (``why``: by ``favour_final`` or ``close``) before its commit found out whether its
        checkpoint is committed already (a heal, ``TransferScope.healing``, had not started). If the commit log
        (as last read) lists a commit of it in this writer's lineage, it was committed once: is it still, as the
        catalog defines it (a live log commit entry, its manifest in the store)? Asked of the store (the log's new
        entries, the manifest's size: a few small requests) unless every transfer of the store is cancelled
        (``close``: no request may start), then answered from the log as last read. Cut for the final checkpoint
        (``deadline_at``: the preemption deadline, ``time.monotonic()``), the store has ``CUT_CHECK_SHARE`` of the
        seconds left until it to answer (``_still_committed``); unanswered then, the log as last read answers too.

        Returns:
            False when the log never listed it (an ordinary abandoned upload: the caller counts it dropped).
            True when it was recorded here: still committed, a housekeeping failure (its objects were not
            checked; ``last_committed_step`` left alone), logged at INFO; no longer committed (retired, or its
            manifest gone), a dropped save, logged at WARNING.
        """
        ckpt = job.checkpoint
        record = self._committed_record(ckpt, fresh=False)
        if record is None:
            return False
        why_not, not_checked = "", "every transfer being cancelled"
        if not self.store.cancel.all_set():
            within = None if deadline_at is None else max(0.0, CUT_CHECK_SHARE * (deadline_at - time.monotonic()))
            answer = self._still_committed(ckpt, within)
            if self.store.cancel.all_set():  # close() cut the check: whatever it got is not the store's word
                pass
            elif answer is not None:
                (record, why_not), not_checked = answer, ""
            else:
                not_checked = (f"the store did not answer within {within or 0:.2f} s, the final checkpoint of a "
                               "preemption waiting")
        if record is not None:
            with self._cond:
                self._stats.housekeeping_failures += 1
                self._stats.last_housekeeping_error = (
                    f"step {ckpt.step}: its save was abandoned before its commit checked the committed checkpoint's "
                    "objects (not verified; a later save of it heals what is missing)")
            log.info("Checkpoint step %d stays committed in %s%s; its save was %s before its commit checked the "
                     "committed objects (not verified: any missing or truncated are still so): %s", ckpt.step,
                     self.store.url, f" (as the commit log last read lists it: not checked again, {not_checked})"
                     if not_checked else "", why, exc)
            return True
        with self._cond:
            self._stats.dropped += 1
        log.warning("Checkpoint step %d is not committed in %s: it was committed once, but the store no longer "
                    "lists it (%s), and this save of it was %s before committing it again: dropped.", ckpt.step,
                    self.store.url, why_not, why)
        return True

    def _still_committed(self, ckpt: LocalCheckpoint, within: float | None) -> tuple[CommitRecord | None, str] | None:
        """Ask the store whether checkpoint ``ckpt`` is still committed: the commit log's new entries
        (``_committed_record``, fresh), then its manifest's size, each under the store's RetryPolicy; a read that
        fails leaves the log's word standing (the log as last read; a manifest that could not be sized: there).

        ``within``: seconds to wait for the answer (None: no limit); the requests then run in a thread of their
        own (``cloudckpt-check``) and a transfer scope that is cancelled when the time is up: no further request
        or retry starts, and on ``s3://`` cloudckpt's own requests stop; a request in flight on s3fs or gcsfs ends
        by its own timeouts in the background (that thread may outlive ``close`` so long), its answer unused.

        Returns:
            (the live commit record, or None; why not, for the log), or None when there was no answer in time.
        """
        def ask() -> tuple[CommitRecord | None, str]:
            record = self._committed_record(ckpt, fresh=True)
            if record is None:
                return None, "the commit log no longer lists a commit of it"
            try:
                present = self.store.size(record.manifest) is not None
            except Exception as exc:  # noqa: BLE001 - unknown: the log's word stands
                log.debug("Checking the manifest of step %d in %s failed: %s", ckpt.step, self.store.url, exc)
                present = True
            return (record, "") if present else (None, f"its manifest {record.manifest} is gone")

        if within is None:
            return ask()
        answers: list[tuple[CommitRecord | None, str]] = []

        def asked() -> None:
            try:
                answers.append(ask())
            except Exception as exc:  # noqa: BLE001 - no answer: the log's word stands
                log.debug("Checking whether step %d is still committed in %s failed: %s", ckpt.step, self.store.url,
                          exc)
        with self.store.transfer_scope() as scope:
            check = in_context(asked)
            thread = threading.Thread(target=check, name="cloudckpt-check", daemon=True)
            thread.start()
            thread.join(within)
            if answers:
                return answers[0]
            self.store.cancel_transfers(scope)
        log.debug("Checking whether step %d is still committed in %s took over %.2f s: given up, the final checkpoint "
                  "waiting.", ckpt.step, self.store.url, within)
        return None

    def _record_abandoned_heal(self, step: int, why: str, exc: Exception) -> None:
        """The heal of committed checkpoint ``step`` (its missing or truncated objects re-uploaded) was cut: ``why``
        (by ``favour_final`` or ``close``). The step stays committed, without those objects, as before this save:
        not a dropped save (nothing committed is lost, ``last_committed_step`` is left alone) but a
        housekeeping failure (``housekeeping_failures``, ``last_housekeeping_error``), logged at INFO (the abandon
        itself is logged at WARNING where it was decided; the missing objects were, when the heal started)."""
        with self._cond:
            self._stats.housekeeping_failures += 1
            self._stats.last_housekeeping_error = (f"step {step}: its heal was {why}; objects of it are still missing "
                                                   "or truncated in the store")
        log.info("Checkpoint step %d stays committed in %s; its heal (re-uploading objects of it missing or truncated "
                 "in the store) was %s, and those objects are still missing: %s", step, self.store.url, why, exc)

    def _record_outcome(self, job: UploadJob, result: CommitResult, seconds: float,
                        send_seconds: float | None = None) -> None:
        """Count and log the outcome of ``job``'s commit (``seconds`` it took, ``send_seconds`` of them spent
        sending file data), then run its ``on_committed``."""
        step = job.checkpoint.step
        # The commit lag, measured now (the commit point is written); the training step is read without the lock.
        committed_at = time.time()
        training_step = self._training_step(step) if result.outcome != REFUSED else step
        with self._cond:
            if self._in_flight is job:  # its housekeeping (on_committed: retention) is not queue_depth
                self._in_flight_settled = True
            if result.outcome != REFUSED and (self._stats.last_committed_step is None
                                              or step >= self._stats.last_committed_step):
                saved_at = job.checkpoint.saved_at
                self._stats.last_commit_lag_seconds = None if saved_at is None else max(0.0, committed_at - saved_at)
                self._stats.last_commit_lag_steps = training_step - step
                self._committed_saved_at = saved_at
            if result.outcome in (UPLOADED, HEALED):
                self._stats.last_upload_bytes = result.bytes_uploaded
                self._stats.last_copied_bytes = result.bytes_copied
                self._stats.bytes_copied += result.bytes_copied
            if result.outcome == UPLOADED:
                self._stats.committed += 1
                self._stats.replaced += bool(result.replaced)
                self._stats.bytes_uploaded += result.bytes_uploaded
            elif result.outcome == HEALED:
                self._stats.healed += 1
                self._stats.bytes_uploaded += result.bytes_uploaded
            elif result.outcome == ALREADY_COMMITTED:
                self._stats.already_committed += 1
            else:
                self._stats.refused += 1
                self._stats.last_refusal = result.reason
            if result.outcome != REFUSED:
                self._stats.last_committed_step = step
            self._stats.last_upload_seconds = seconds
            self._stats.last_send_seconds = send_seconds
        if result.outcome == REFUSED:
            if job.required:  # the run's final checkpoint is not what the store holds for its step: say so
                with self._cond:
                    self._failures.append(UploadError(
                        f"The final checkpoint (step {step}) was not committed to {self.store.url}: "
                        f"{result.reason}.", url=self.store.url, step=step))
            return  # logged (WARNING) with its reason by the commit
        if result.housekeeping_error:
            with self._cond:
                self._stats.housekeeping_failures += 1
                self._stats.last_housekeeping_error = f"step {step}: {result.housekeeping_error}"
        try:
            job.on_committed(result)
        except FencedError as exc:  # found out while cleaning up: the commit itself counted
            self._record_fenced(exc, None)
        except Exception as exc:  # noqa: BLE001 - the commit itself succeeded; housekeeping may retry later
            with self._cond:
                self._stats.housekeeping_failures += 1
                self._stats.last_housekeeping_error = f"step {step}: {type(exc).__name__}: {exc}"
            log.warning("Checkpoint step %d is committed, but follow-up housekeeping failed: %s", step, exc)
        if result.outcome == UPLOADED:
            log.info("Committed checkpoint step %d to %s (%d files, %s%s, %.2fs)%s.", step, self.store.url,
                     len(result.manifest.files), human_size(result.manifest.total_size),
                     f", {human_size(result.bytes_copied)} of it copied server-side" if result.bytes_copied else "",
                     seconds,
                     f", replacing {result.manifest.prefix} of commit {', '.join(result.replaced)}"
                     if result.replaced else "")
        elif result.outcome == HEALED:
            log.info("Healed committed checkpoint step %d in %s (%s re-uploaded, %.2fs).", step, self.store.url,
                     human_size(result.bytes_uploaded), seconds)
        else:
            log.info("Checkpoint step %d is already committed in %s with identical content; nothing uploaded.",
                     step, self.store.url)

    def _record_fenced(self, exc: FencedError, step: int | None) -> None:
        """Stop committing for good and report ``exc`` in the training thread (even with on_error='warn')."""
        with self._cond:
            self._fenced = exc
            self._stats.fenced_by = exc.newer_writer
            if step is not None:
                self._stats.failed += 1
                self._stats.failures_by_cause["Fenced"] = self._stats.failures_by_cause.get("Fenced", 0) + 1
            self._failures.append(exc)
        log.error("%s", exc)
