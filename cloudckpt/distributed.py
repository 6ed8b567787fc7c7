"""Where this process stands in TensorFlow's distributed runtime, and agreeing with the other workers through it.

cloudckpt adds no side channel of its own to a cluster: what a worker must
agree on with the others (the step every worker restores, "a preemption notice
reached one of us") travels as a collective of the job's own
``tf.distribute`` strategy (an all-reduce, like the gradients), so every
worker learns it at the same call, in the same order.

The same collectives carry "cloudckpt failed on this worker" (a commit failing
on the chief, a verified download failing on another worker during the
restore): a worker must not raise alone, or the others block in the job's next
collective (until the failed process exits and TF aborts them). The failed
worker raises its own error at the agreed call and every other worker raises
``WorkerFailedError`` naming it, at the same call.

Roles follow TF's rules (``tensorflow/python/distribute/multi_worker_util.py``,
``is_chief``): the ``chief`` task if the cluster has one, else ``worker`` 0.
Only the chief commits to the checkpoint URL; the other workers save to a
temporary directory that is removed (TF's pattern for multi-worker
checkpoints: ``write_filepath`` / ``_is_chief`` in TF's multi-worker tutorials).

The task's name (``worker:1``) is what ``stats().task`` and every log record
of the ``cloudckpt`` loggers carry (``record.task``, and a ``[worker:1]``
prefix on the message) once ``name_task_in_logs`` has run.

Importing this module does not import TensorFlow (``WorkerAgreement`` does).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

from .catalog import CheckpointInfo, scan_directory
from .errors import (CloudCkptError, ConfigError, FencedError, IntegrityError, ManifestError, RemoteError,
                     UploadError, WorkerFailedError)
from .preemption.notice import announced_hard_stop_at
from .remote import RemoteStore
from .restore import download_verified, select_checkpoint

__all__ = ["TaskRole", "WorkerAgreement", "name_task_in_logs", "relay_peer_notice", "restore_as_the_chief_does", "role_from_cluster",
           "role_from_tf_config", "role_of_strategy"]

log = logging.getLogger("cloudckpt")

LOGGERS = ("cloudckpt", "cloudckpt.preemption")  # every logger cloudckpt logs to
WORKER_JOBS = ("chief", "worker")  # jobs that run the training loop (TF's "workers" of a multi-worker job)
# Multi-worker stop agreement (WorkerAgreement.stop_agreed): one all-reduce about every this many seconds of
# training, at most this many calls apart.
STOP_CHECK_SECONDS = 1.0
_MAX_CALLS_BETWEEN_CHECKS = 1000
# A failure travels as the index of its error type here, plus 1 (0: no failure); len + 1: another exception.
_FAILURE_KINDS = (FencedError, UploadError, ManifestError, IntegrityError, RemoteError, ConfigError, CloudCkptError)


@dataclass(frozen=True)
class TaskRole:
    """One task of a TF cluster: its job, index, whether it is the chief, and how many tasks train.

    ``workers`` counts the ``chief`` and ``worker`` tasks of the cluster (1 on a single machine),
    ``parameter_servers`` its ``ps`` tasks; ``peers`` names those ``workers`` tasks, the chief first.
    """

    task_type: str
    task_id: int
    is_chief: bool
    workers: int
    parameter_servers: int = 0
    peers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``"<job>:<index>"``, e.g. ``worker:1``: how logs and ``stats()`` name the task."""
        return f"{self.task_type}:{self.task_id}"

    @property
    def rank(self) -> int:
        """This task's position in ``peers`` (its slot in the failure agreement); ``task_id`` without peers."""
        return self.peers.index(self.name) if self.name in self.peers else min(self.task_id, self.workers - 1)

    @property
    def multi_worker(self) -> bool:
        """True when more than one task runs the training loop (checkpoints need the chief-only rule)."""
        return self.workers > 1


def role_from_cluster(cluster: Mapping[str, Any], task_type: str | None, task_id: int | None) -> TaskRole | None:
    """The role of task ``task_type:task_id`` in ``cluster`` (``{"worker": [...], "ps": [...]}``), or None
    when no task is named.

    Raises:
        ConfigError: the task is not in the cluster.
    """
    if not task_type:
        return None
    task_id = int(task_id or 0)
    if task_type == "evaluator":  # TF: outside the training cluster (it may be absent from it), its own chief
        return TaskRole(task_type, task_id, True, 1)
    tasks = cluster.get(task_type)
    known = (str(task_id) in tasks or task_id in tasks) if isinstance(tasks, dict) else \
        (isinstance(tasks, (list, tuple)) and 0 <= task_id < len(tasks))  # dict: TF's sparse cluster spec
    if not known:
        raise ConfigError(f"Task {task_type}:{task_id} is not in the cluster {sorted(cluster)} (TF_CONFIG).")
    workers = sum(len(cluster.get(job) or ()) for job in WORKER_JOBS)
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not cluster.get("chief"))
    peers = tuple(f"{job}:{i}" for job in WORKER_JOBS for i in _task_ids(cluster.get(job)))
    return TaskRole(task_type, task_id, chief, workers, len(cluster.get("ps") or ()), peers)


def _task_ids(tasks: Any) -> list[int]:
    """The task indices of one job of a cluster spec (a list, or TF's sparse dict form)."""
    if isinstance(tasks, dict):
        return sorted(int(i) for i in tasks)
    return list(range(len(tasks))) if isinstance(tasks, (list, tuple)) else []


def role_from_tf_config(environ: Mapping[str, str] | None = None) -> TaskRole | None:
    """This process's role from ``$TF_CONFIG`` (TF's cluster description), or None without one.

    Raises:
        ConfigError: ``TF_CONFIG`` is not JSON of TF's form, or names a task outside its cluster.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster = config.get("cluster") or {}
        task = config.get("task") or {}
        return role_from_cluster(cluster, task.get("type"), task.get("index"))
    except ConfigError:
        raise
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"TF_CONFIG is not TF's cluster description ({exc}): expected JSON like "
                          '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}.'
                          ) from None


def role_of_strategy(strategy: Any) -> TaskRole | None:
    """The role of this process in ``strategy``'s cluster (``strategy.cluster_resolver``), or None for a
    strategy without one (the default strategy, ``MirroredStrategy`` on one machine)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None
    return role_from_cluster(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)


def worker_temp_dir(role: TaskRole, parent: str | None) -> str:
    """A new temporary directory for a non-chief worker's saves (``.cloudckpt-<job>-<index>-*`` in
    ``parent``, or the system's temporary directory). Directories of this task left by a run that did
    not close (SIGKILL, a hard stop on a persistent disk) are removed first: one task is one process.
    """
    import glob  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    prefix = f".cloudckpt-{role.task_type}-{role.task_id}-"
    base = parent if parent is not None else tempfile.gettempdir()
    for stale in glob.glob(os.path.join(glob.escape(base), glob.escape(prefix) + "*")):
        shutil.rmtree(stale, ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


class WorkerAgreement:
    """What every worker of a multi-worker strategy must agree on, as all-reduces of that strategy.

    Each method is a collective: every worker must call it, in the same order
    relative to the other collectives of the job (its training steps), or the
    job blocks as it would for a training step a worker skipped.

    Every all-reduce also carries one slot per worker: the kind of the error
    cloudckpt failed with on that worker (0: none). When one is set, the call
    raises on every worker: the failed one raises its own error, the others
    ``WorkerFailedError`` naming it; ``context`` (set by the adapter) names what
    failed, e.g. ``"cloudckpt (s3://b/run)"``.

    Args:
        strategy: a multi-worker ``tf.distribute`` strategy (``MultiWorkerMirroredStrategy``).
        role: this process's role in it.
    """

    def __init__(self, strategy: Any, role: TaskRole) -> None:
        import tensorflow as tf  # noqa: PLC0415 - only the multi-worker path needs TF here

        self.role = role
        self._strategy = strategy
        self.context = "cloudckpt"
        self._slots = max(role.workers, len(role.peers), role.rank + 1)

        @tf.function(autograph=False)
        def sum_over_workers(value: Any) -> Any:
            per_replica = strategy.run(tf.identity, args=(value,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        self._sum = sum_over_workers
        self._tf = tf
        # SUM over replicas counts each worker's value once per local replica.
        self._replicas_per_worker = max(1, int(strategy.num_replicas_in_sync) // max(1, role.workers))

        # stop_agreed's cadence: calls until the next all-reduce, the interval in calls, and when it last ran.
        self._calls_to_check = 1
        self._interval = 1
        self._checked_at = time.monotonic()

    def _totals(self, values: list[float], failure: BaseException | None = None,
                mine: float | None = None) -> list[float]:
        """The sums of ``values`` over the workers; raises when a worker passed a ``failure`` (this one: its
        own, re-raised; the others: ``WorkerFailedError``). With ``mine`` (this worker's own figure), the
        sums are followed by every worker's figure, by rank (0.0 for a worker without one)."""
        slots = [0.0] * self._slots
        if failure is not None:
            slots[self.role.rank] = float(_failure_kind(failure))
        ranked = [0.0] * self._slots if mine is not None else []
        if mine is not None:
            ranked[self.role.rank] = float(mine)
        totals = self._sum(self._tf.constant([*values, *slots, *ranked], self._tf.float64)).numpy()
        totals = [float(t) / self._replicas_per_worker for t in totals]
        self._raise_failures(failure, totals[len(values):len(values) + self._slots])
        return totals[:len(values)] + totals[len(values) + self._slots:]

    def _raise_failures(self, failure: BaseException | None, slots: list[float]) -> None:
        failed = [(rank, int(round(kind))) for rank, kind in enumerate(slots) if round(kind)]
        if not failed:
            return
        peers = self.role.peers
        names = tuple(peers[rank] if rank < len(peers) else f"task #{rank}" for rank, _ in failed)
        errors = tuple(_FAILURE_KINDS[kind - 1].__name__ if kind <= len(_FAILURE_KINDS) else "an exception"
                       for _, kind in failed)
        if failure is not None:
            others = [n for n in names if n != self.role.name]
            log.error("%s failed on this worker (%s: %s); every worker of the job stops at this step%s.",
                      self.context, type(failure).__name__, failure,
                      f" (it failed on {', '.join(others)} too)" if others else "")
            raise failure
        described = ", ".join(f"{n} ({e})" for n, e in zip(names, errors))
        raise WorkerFailedError(
            f"{self.context} failed on {described}; every worker of the job stops at this step, this one "
            f"({self.role.name}) with this error. The cause is in the log of {', '.join(names)} (its cloudckpt "
            f"records start with [{names[0]}]).", workers=names, errors=errors)

    def agree_on_failure(self, failure: BaseException | None) -> None:
        """Raise on every worker if any passed a ``failure`` (see the class); returns on all of them if none did."""
        self._totals([], failure)

    def stop_agreed(self, engine: Any) -> int:
        """Whether a preemption notice reached any worker (``engine.should_stop()`` here): how many got
        one, the same answer on every worker. When one did, the seconds left before its deadline in use are
        agreed too (their mean over the noticed workers), with the seconds left before the hard stop each
        one's platform announced (``PreemptionNotice.announced``: a GCE / AWS / Azure notice, not a SIGTERM's
        guess), and a worker without a notice of its own records it as one (source ``"peer"``,
        ``relay_peer_notice``) on its engine's watcher: the chief then drops superseded queued checkpoints and
        commits the final one within that deadline, not ``upload_timeout`` -- by the earliest announced hard
        stop when there is one (it caps the chief's ``preemption_deadline``: that worker's machine stops then,
        and the job's collective ops with it).

        The all-reduce runs about every ``STOP_CHECK_SECONDS`` of training, not at every call: the workers
        agree, in the same all-reduce, on how many calls to wait until the next one (from their mean time
        per call), so the k-th call is a collective on every worker or on none. Between those calls this
        returns 0 without communicating: one all-reduce costs milliseconds even on one host, a training
        step can take less. A notice is therefore acted on up to about a second after it arrived.

        The same all-reduce carries the engine's unreported commit failures (``engine.take_failure()``,
        the chief's): when one failed, every worker raises at this call (see the class), about a second
        after the failure at most, instead of the chief raising alone.

        Raises:
            UploadError / FencedError: (the chief) a checkpoint failed to commit.
            WorkerFailedError: another worker failed.
        """
        self._calls_to_check -= 1
        if self._calls_to_check > 0:
            return 0
        here = engine.should_stop()
        now = time.monotonic()
        deadline_at = engine.preemption_deadline_at() if here else None
        left = max(0.0, deadline_at - now) if deadline_at is not None else 0.0
        watcher = engine.watcher
        stop_at = announced_hard_stop_at(watcher.notices) if here and watcher is not None else None
        # by rank: 1 + the seconds left before the hard stop this worker's platform announced; 0: none announced
        mine = 1.0 + max(0.0, stop_at - now) if stop_at is not None else 0.0
        noticed_f, left_total, elapsed_total, *ranked = self._totals(
            [1.0 if here else 0.0, left, now - self._checked_at], engine.take_failure(), mine)
        noticed = int(round(noticed_f))
        per_call = elapsed_total / max(1, self.role.workers) / self._interval  # seconds, mean over workers
        self._interval = max(1, min(_MAX_CALLS_BETWEEN_CHECKS, int(STOP_CHECK_SECONDS / per_call)
                                    if per_call > 0 else _MAX_CALLS_BETWEEN_CHECKS))
        self._calls_to_check = self._interval
        self._checked_at = time.monotonic()
        if not noticed:
            return 0
        if watcher is not None:
            others = [r - 1.0 if r >= 0.5 and rank != self.role.rank else None for rank, r in enumerate(ranked)]
            relay_peer_notice(watcher, noticed - here, left_total - left, others, here=here)
        return noticed

    def from_chief(self, value: int | None, failure: BaseException | None = None) -> int:
        """The chief's ``value`` (an int, ``|value| < 2**52``), on every worker; the others pass anything.

        Raises:
            a worker's ``failure``, or ``WorkerFailedError``: a worker passed one (see the class).
        """
        chief_value = float(value) if self.role.is_chief and value is not None else 0.0
        return int(round(self._totals([chief_value], failure)[0]))


def relay_peer_notice(watcher: Any, noticed: int, left_total: float,
                      announced_left: Sequence[float | None], *, here: bool = False) -> None:
    """Record on ``watcher`` (a ``PreemptionWatcher``) the notices ``noticed`` other workers of the job got, as
    a notice of source ``"peer"`` (``WorkerAgreement.stop_agreed``).

    Args:
        watcher: this worker's watcher (``CheckpointEngine.watcher``).
        noticed: how many other workers got a notice.
        left_total: the sum over them of the seconds their deadlines in use left (the user's
            ``preemption_deadline`` or the hard stop, ``CheckpointEngine.preemption_deadline_at``).
        announced_left: per other worker (by rank; None in this worker's place), the seconds left before the
            hard stop its platform announced (``PreemptionNotice.announced``), None when it announced none (or
            the worker got no notice).
        here: this worker got a notice of its own (the first, already on ``watcher``): the peers' are recorded
            only when a platform announced a hard stop sooner than this worker's deadline in use (a later notice,
            which brings it closer); otherwise nothing is recorded.

    When a platform announced a hard stop, the notice's deadline is the earliest of them, marked announced: it
    caps this worker's ``preemption_deadline``, as a metadata notice of its own would (that worker's machine
    stops then, and with it the job's collective ops). Else it is the mean of the deadlines in use (a
    SIGTERM's 25 s is a guess), which caps nothing.
    """
    stops = [s for s in announced_left if s is not None]
    detail = f"a preemption notice on {noticed} other worker(s) of the job"
    if here:
        in_use = watcher.deadline_at
        if stops and (in_use is None or time.monotonic() + min(stops) < in_use - 1.0):
            watcher.trigger("peer", f"{detail}, whose platform announced its hard stop", min(stops), announced=True)
        return
    if stops:
        watcher.trigger("peer", f"{detail}, whose platform announced its hard stop", min(stops), announced=True)
    else:
        watcher.trigger("peer", detail, left_total / max(1, noticed))


R = TypeVar("R")


def restore_as_the_chief_does(agreement: WorkerAgreement, store: RemoteStore, directory: str,
                              chief: Callable[[], tuple[int | None, R]],
                              worker: Callable[[CheckpointInfo], R]) -> R | None:
    """Multi-worker restore: every worker restores the checkpoint the chief restores, or none restores.

    The adapters' framework-specific parts are the two callables; what each worker does, in order:

    1. The chief calls ``chief()``: it restores as on one machine and returns the step every other worker
       must restore (None: nothing to restore) and its result. An exception from it (any
       ``BaseException``) is held for the first collective.
    2. Every worker calls ``agreement.from_chief`` (collective 1: an all-reduce of the chief's step, -1 for
       None, and of the failure slots). When the agreed step is -1, every worker returns None (the chief's
       result is dropped), after this collective only.
    3. Each non-chief worker selects the agreed step (``select_checkpoint`` on a new ``scan_directory`` of
       ``store``), downloads it verified into ``directory`` (``download_verified``), and calls
       ``worker(info)`` for its result. An exception from any of these (``Exception``) is held for the
       second collective. The chief does nothing here (``directory`` is not used on the chief).
    4. Every worker calls ``agreement.agree_on_failure`` (collective 2: an all-reduce of the failure slots).

    The collectives are ``from_chief`` then, unless the agreed step is -1, ``agree_on_failure``: the same
    calls in the same order on every worker, whatever failed where.

    Returns:
        the chief's result on the chief, ``worker(info)``'s on another worker; None on every worker when the
        chief had nothing to restore.

    Raises (on every worker at the same collective, ``WorkerAgreement``):
        the failed worker's own exception: at collective 1 from ``chief()``; at collective 2 from the
            selection (``CheckpointNotFoundError``, ``ManifestError``), the download (``IntegrityError``,
            ``RemoteError``) or ``worker(info)``;
        WorkerFailedError: on every other worker, naming the failed one(s) and their error types.
    """
    role = agreement.role
    step: int | None = None
    result: R | None = None
    failure: BaseException | None = None
    if role.is_chief:
        try:
            step, result = chief()
        except BaseException as exc:  # noqa: BLE001 - raised by the agreement, once the others are told
            failure = exc
    agreed = agreement.from_chief(-1 if step is None else step, failure)
    if agreed < 0:
        return None
    if not role.is_chief:
        try:
            info = select_checkpoint(store, scan_directory(store), agreed)
            download_verified(store, info, directory)
            result = worker(info)
        except Exception as exc:  # noqa: BLE001 - raised by the agreement, once the others are told
            failure = exc
    agreement.agree_on_failure(failure)
    return result


def _failure_kind(failure: BaseException) -> int:
    """The index + 1 of ``failure``'s type in ``_FAILURE_KINDS`` (len + 1: another exception)."""
    return next((i + 1 for i, kind in enumerate(_FAILURE_KINDS) if isinstance(failure, kind)), len(_FAILURE_KINDS) + 1)


class _TaskFilter(logging.Filter):
    """Adds ``record.task`` and a ``[task]`` prefix to every record of cloudckpt's loggers."""

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task", None) is None:
            record.task = self.task
            record.msg = f"[{self.task}] {record.msg}"
        return True


def name_task_in_logs(task: str) -> None:
    """Make every record of cloudckpt's loggers name ``task`` (``record.task``, ``[worker:1]`` prefix).

    A process is one task of its cluster: the first name given stays (idempotent).
    """
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TaskFilter) for f in logger.filters):
            logger.addFilter(_TaskFilter(task))
