"""Keeping a bucket tidy: which committed checkpoints to keep, and removing debris of crashed uploads.

Deletion order is what keeps readers safe: a checkpoint stops being committed
first (with a commit log: a ``delete`` entry retires it; then, as without a
log, its manifest is removed), then its files go, then the state file is
rewritten. A crash anywhere in between leaves, at worst, uncommitted files
that ``gc`` removes later, never a committed checkpoint with missing files.
Committed in place, retention after the framework's own ``max_to_keep``
(``delete_files=False, state_file=False``) leaves the files and TF's state
file to the framework, their one writer.

Superseded checkpoints (committed in an abandoned lineage, ``lineage.py``) are
deleted before any checkpoint of the current lineage: the ``max_to_keep``
newest current ones are kept first, superseded ones only fill what is left.
With a commit log, every deletion is announced in the log by a ``Writer``
(``writers.py``) so that a deleter that has been fenced cannot remove objects
of a newer commit.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .catalog import CheckpointInfo, DirectoryScan, IncompleteCheckpoint, scan_directory, unreadable_by_step
from .commit import write_state_file
from .errors import ConfigError, ManifestError, integer_option, number_option
from .layout import DEFAULT_LAYOUT, basename_of, state_file_prefixes
from .lineage import LogState, fold
from .remote import RemoteStore, open_directory
from .retry import RetryPolicy
from .writers import Writer

log = logging.getLogger("cloudckpt")

DEFAULT_DEBRIS_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep.

    Args:
        max_to_keep: keep the newest N committed checkpoints (None or 0: keep all).
        keep_checkpoint_every_n_hours: additionally keep one checkpoint per N
            hours of run time, like TF's Saver (None: off).
        debris_grace_seconds: files of uncommitted checkpoints older than this
            are debris (younger ones may be an upload in flight).
    """

    max_to_keep: int | None = None
    keep_checkpoint_every_n_hours: float | None = None
    debris_grace_seconds: float = DEFAULT_DEBRIS_GRACE_SECONDS

    def __post_init__(self) -> None:
        if self.max_to_keep is not None:
            keep = integer_option(self.max_to_keep)
            if keep is None or keep < 0:
                raise ConfigError(f"max_to_keep must be an integer >= 0 or None, got {self.max_to_keep!r}.")
            object.__setattr__(self, "max_to_keep", keep)  # a numpy integer stored as the int
        if self.keep_checkpoint_every_n_hours is not None:
            hours = number_option(self.keep_checkpoint_every_n_hours)
            if hours is None or hours <= 0:
                raise ConfigError(f"keep_checkpoint_every_n_hours must be a number > 0 or None, "
                                  f"got {self.keep_checkpoint_every_n_hours!r}.")
            object.__setattr__(self, "keep_checkpoint_every_n_hours", hours)
        grace = number_option(self.debris_grace_seconds)
        if grace is None or grace < 0:
            raise ConfigError(f"debris_grace_seconds must be a number of seconds >= 0, "
                              f"got {self.debris_grace_seconds!r}.")
        object.__setattr__(self, "debris_grace_seconds", grace)


    @property
    def deletes_checkpoints(self) -> bool:
        """False when the policy keeps every committed checkpoint."""
        return bool(self.max_to_keep)


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention pass keeps and deletes."""

    keep: list[CheckpointInfo]
    delete: list[CheckpointInfo]  # in deletion order: superseded first, then the oldest current ones
    debris: list[IncompleteCheckpoint]
    log: LogState | None = None  # the log state the plan was made from (None: no commit log)
    # In-place commits whose files the framework is deleting (``DirectoryScan.vanishing``): retired first,
    # what is left of their files deleted (with ``delete_files``); TF's state file is not rewritten for them
    # (the framework has already rewritten it without them).
    vanishing: tuple[CheckpointInfo, ...] = ()

    @property
    def bytes_freed(self) -> int:
        """Bytes the plan deletes."""
        return sum(c.size for c in (*self.vanishing, *self.delete)) + sum(d.size for d in self.debris)


def _created(info: CheckpointInfo) -> float:
    try:
        return _dt.datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _kept_per_period(current: list[CheckpointInfo], log: LogState | None, period: float) -> set[Any]:
    """The checkpoints ``keep_checkpoint_every_n_hours`` keeps: commit ids (``id()`` of a checkpoint without one).

    As TF's managers: the first checkpoint kept is one N hours after training began (here: after the
    lineage's first checkpoint, which TF does not keep for this), then one N hours after the last kept.
    Counted over the whole lineage of the commit log, retired commits included (each at its recorded save
    time): retention runs after every commit, when the older checkpoints are gone, and counting from the
    oldest one left would move the start at every pass and keep none while ``max_to_keep`` saves span less
    than a period. Without a log (a version 1 directory), over the checkpoints there.
    """
    present = {c.commit_id: c for c in current if c.commit_id is not None}
    history: list[tuple[float, Any]] = []
    seen: set[str] = set()
    for record in (log.lineage() if log is not None else []):
        when = record.saved_at
        if when is None and record.commit_id in present:
            when = _created(present[record.commit_id])
        if when is not None:
            history.append((when, record.commit_id))
            seen.add(record.commit_id)
    history += [(_created(c), c.commit_id if c.commit_id is not None else id(c))
                for c in current if c.commit_id is None or c.commit_id not in seen]
    history.sort(key=lambda item: item[0])
    kept: set[Any] = set()
    if history:
        next_keep = history[0][0] + period
        for when, key in history:
            if when >= next_keep:
                kept.add(key)
                next_keep = when + period
    return kept


def plan_retention(scan: DirectoryScan, policy: RetentionPolicy, *, basenames: set[str] | None = None,
                   protect: set[int] = frozenset(), debris: bool = True,  # type: ignore[assignment]
                   now: float | None = None) -> RetentionPlan:
    """Decide what to delete; pure (no I/O). The latest committed checkpoint is always kept.

    ``max_to_keep`` keeps the newest current checkpoints first; superseded
    ones are kept only in the slots left (and deleted first). ``protect``
    lists steps of the current lineage never to delete. ``basenames`` limits
    debris to files of those checkpoint basenames (default: the basenames of
    the committed checkpoints, or ``model.ckpt``); ``debris=False`` plans none.
    """
    current = list(scan.committed)  # lineage order: the latest is last
    superseded = sorted(scan.superseded, key=lambda c: c.step)
    ranked = [*reversed(current), *reversed(superseded)]  # kept first -> deleted first
    keep_ids = {id(c) for c in ranked}
    if policy.max_to_keep:
        keep_ids = {id(c) for c in ranked[:policy.max_to_keep]}
    if current:
        keep_ids.add(id(current[-1]))
    keep_ids |= {id(c) for c in current if c.step in protect}
    if policy.keep_checkpoint_every_n_hours and current:
        preserved = _kept_per_period(current, scan.log, policy.keep_checkpoint_every_n_hours * 3600)
        keep_ids |= {id(c) for c in current if c.commit_id in preserved or id(c) in preserved}
    everything = sorted(current + superseded, key=lambda c: (c.step, c.status))
    keep = [c for c in everything if id(c) in keep_ids]
    delete = [c for c in reversed(ranked) if id(c) not in keep_ids]

    now = time.time() if now is None else now
    names = basenames or {basename_of(c.name) for c in everything} or {"model.ckpt"}
    found_debris = []
    for inc in (scan.incomplete if debris else []):
        basename = basename_of(inc.prefix.rsplit("/", 1)[-1])
        newest = max((o.modified or now for o in inc.objects), default=now)
        if basename in names and now - newest >= policy.debris_grace_seconds:
            found_debris.append(inc)
    return RetentionPlan(keep=keep, delete=delete, debris=found_debris, log=scan.log,
                         vanishing=tuple(scan.vanishing))


def delete_checkpoint(store: RemoteStore, info: CheckpointInfo, writer: Writer | None = None, *,
                      planned_at: int | None = None, delete_files: bool = True) -> bool:
    """Delete one committed checkpoint: un-commit it (with a log: a ``delete`` entry retiring it, by
    ``writer``), then its manifest, then its files (``delete_files=False``: not its files, see
    ``apply_retention``). False if the log gained commits or writers after index ``planned_at`` (plan again)."""
    manifest = info.manifest_url.rsplit("/", 1)[-1]
    if writer is None and info.writer_id is not None:  # a version 2 commit: announced in its log
        writer = Writer(store, role="maintenance")
    if writer is None:  # the manifest first (un-committed), then its files: in bulk where the store can
        store.delete([manifest])
        if delete_files:
            store.delete_before([f.name for f in info.files], deadline=float("inf"))
        return True
    return _retire_and_delete([info], writer, planned_at, delete_files)


def _retire_and_delete(doomed: list[CheckpointInfo], writer: Writer, planned_at: int | None,
                       delete_files: bool = True) -> bool:
    """Retire the commits of ``doomed`` with one ``delete`` log entry, then delete their manifests and
    files (manifests first; in bulk where the store can: one request per 1000 names; ``delete_files=False``:
    the manifests only). False if the log gained commits or writers after ``planned_at`` (nothing was
    deleted: plan again), or the deletion window closed first (what is left is uncommitted debris)."""
    names = [c.manifest_url.rsplit("/", 1)[-1] for c in doomed]
    if delete_files:
        names += [f.name for c in doomed for f in c.files]
    steps = [f"{c.step} ({c.status})" for c in doomed]
    if len(steps) > 8:  # a log entry stays small whatever a gc removes
        steps = [*steps[:4], f"... {len(steps) - 8} more ...", *steps[-4:]]
    reason = f"retention of step {steps[0]}" if len(doomed) == 1 else f"retention of steps {', '.join(steps)}"
    return writer.delete(names, retire=tuple(c.commit_id or "" for c in doomed), reason=reason,
                         planned_at=planned_at)


def apply_retention(store: RemoteStore, plan: RetentionPlan, writer: Writer | None = None, *,
                    reason: str = "Retention", delete_files: bool = True, state_file: bool = True) -> None:
    """Carry out ``plan``: un-commit and delete old checkpoints, remove debris, rewrite the state file.

    In a directory with a commit log, deletions are announced by ``writer``
    (a hook's registered writer, fenced by newer ones), or by a maintenance
    party (``cloudckpt gc``) when None. ``reason`` starts each INFO line about a deletion (what the
    deletion is: ``Retention``, ``delete_checkpoint=True``...).

    ``delete_files=False``: the checkpoints of ``plan.delete`` are un-committed (retired, then their
    manifests removed) but their files are left alone: someone else deletes them. Committed in place,
    that is the framework's own ``max_to_keep`` (TF's Saver, ``tf.train.CheckpointManager``), which
    deletes a checkpoint's files one after the other: a second deleter racing it makes TF log
    "Hit NotFoundError when deleting". A file nobody deletes stays as uncommitted debris (``gc``).

    ``state_file=False``: TF's ``checkpoint`` state file is not rewritten. Committed in place, the Saver or
    ``tf.train.CheckpointManager`` deleting the files rewrites it after each save, in the training thread;
    a rewrite from here (the uploader thread) raced it (``commit.py``, in place). True (default): rewritten
    when a TF checkpoint was deleted (``commit.write_state_file``).

    Raises:
        RemoteError: the store could not be read or written.
        FencedError: ``writer`` was fenced by a newer writer.
    """
    planned_at = None
    if plan.log is None:
        writer = None  # a directory without a commit log (version 1): deletions as before
    else:
        writer = writer or Writer(store, role="maintenance")
        planned_at = plan.log.last_index
    # With a log on a store that deletes in bulk, all of them at once: one delete entry, then one request per
    # 1000 objects (not a log append and a request per checkpoint). Elsewhere (a request per object anyway)
    # checkpoint by checkpoint, so that a crash midway leaves the newer ones of the plan committed.
    together = writer is not None and store.deletes_in_bulk and (plan.delete or plan.vanishing)
    doomed = [*plan.vanishing, *plan.delete]
    for batch in ([doomed] if together else [[c] for c in doomed]):
        done = _retire_and_delete(batch, writer, planned_at, delete_files) if writer is not None \
            else delete_checkpoint(store, batch[0], delete_files=delete_files)
        if not done:
            log.info("%s: %s changed while deleting; the rest waits for the next pass.", reason, store.url)
            break
        for info in batch:
            log.info("%s: %s checkpoint step %d (%s) from %s.", reason,
                     "deleted" if delete_files else "retired", info.step, info.status, store.url)
    for inc in plan.debris:
        names = [o.name for o in inc.objects]
        if writer is not None:
            if not writer.delete(names, reason=f"debris of step {inc.step}", planned_at=planned_at):
                continue
        else:
            store.delete_before(names, deadline=float("inf"))  # in bulk where the store can
        log.info("Removed %d file(s) of uncommitted checkpoint step %d from %s.", len(names), inc.step, store.url)
    if state_file and any(c.layout == DEFAULT_LAYOUT for c in plan.delete):  # it names TF checkpoints only
        write_state_file(store, fold(writer.log.cached()) if writer is not None else None)


@dataclass(frozen=True)
class GcResult:
    """What ``gc`` did (with ``dry_run``: would do).

    Attributes:
        url: the checkpoint directory, display form.
        plan: what is kept and deleted (``keep``, ``delete``, ``debris``, ``bytes_freed``).
        left_alone: (step, why) of manifests that cannot be read: neither kept nor deleted (see ``cloudckpt ls``).
        dry_run: True when nothing was deleted.
    """

    url: str
    plan: RetentionPlan
    left_alone: tuple[tuple[int, ManifestError], ...]
    dry_run: bool


def gc(url: str, keep: int | None, *, keep_every_hours: float | None = None,
       grace_seconds: float = DEFAULT_DEBRIS_GRACE_SECONDS, dry_run: bool = False,
       storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None) -> GcResult:
    """Delete old committed checkpoints and debris of uploads that never committed (``cloudckpt gc``).

    Keeps the newest ``keep`` committed checkpoints (None or 0: all; the
    latest is always kept; superseded ones go first) and one per
    ``keep_every_hours`` of run time, like TF's Saver; files of uncommitted
    checkpoints count as debris once older than ``grace_seconds`` (an upload
    may be in flight). ``dry_run`` only plans. Deletions are announced in the
    commit log first, so a reader never sees a committed checkpoint with
    missing files.

    Raises:
        ConfigError: a bad policy value; the bucket or local directory does not exist.
        RemoteError: the store cannot be read or written.
    """
    policy = RetentionPolicy(keep, keep_every_hours, grace_seconds)
    store = open_directory(url, storage_options, retry=retry)
    scan = scan_directory(store)
    plan = plan_retention(scan, policy)
    if store.is_local and plan.debris:
        # In place, TF's state file names the checkpoints TF resumes from and manages, committed or not
        # (a crash between a save and its commit): never debris (the next run commits its resume point).
        named = state_file_prefixes(store.root)
        plan = dataclasses.replace(plan, debris=[d for d in plan.debris if d.prefix.rsplit("/", 1)[-1] not in named])
    if not dry_run and (plan.delete or plan.debris or plan.vanishing):
        apply_retention(store, plan)
    left_alone = tuple((step, error) for step, _, error in unreadable_by_step(scan))
    return GcResult(url=store.url, plan=plan, left_alone=left_alone, dry_run=dry_run)
