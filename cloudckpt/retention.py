"""Keeping a bucket tidy: which committed checkpoints to keep, and removing debris of crashed uploads.

Deletion order is what keeps readers safe: a checkpoint's manifest is removed
first (it stops being committed), then its files, then the state file is
rewritten. A crash anywhere in between leaves, at worst, uncommitted files
that ``gc`` removes later, never a committed checkpoint with missing files.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .catalog import CheckpointInfo, DirectoryScan, IncompleteCheckpoint, scan_directory
from .commit import write_state_file
from .errors import ConfigError
from .remote import RemoteStore

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
        if self.max_to_keep is not None and (not isinstance(self.max_to_keep, int) or isinstance(
                self.max_to_keep, bool) or self.max_to_keep < 0):
            raise ConfigError(f"max_to_keep must be an integer >= 0 or None, got {self.max_to_keep!r}.")
        hours = self.keep_checkpoint_every_n_hours
        if hours is not None and (not isinstance(hours, (int, float)) or isinstance(hours, bool) or hours <= 0):
            raise ConfigError(f"keep_checkpoint_every_n_hours must be a number > 0 or None, got {hours!r}.")
        if not isinstance(self.debris_grace_seconds, (int, float)) or self.debris_grace_seconds < 0:
            raise ConfigError(f"debris grace period must be >= 0 seconds, got {self.debris_grace_seconds!r}.")


    @property
    def deletes_checkpoints(self) -> bool:
        """False when the policy keeps every committed checkpoint."""
        return bool(self.max_to_keep)


@dataclass(frozen=True)
class RetentionPlan:
    """What a retention pass keeps and deletes."""

    keep: list[CheckpointInfo]
    delete: list[CheckpointInfo]
    debris: list[IncompleteCheckpoint]

    @property
    def bytes_freed(self) -> int:
        """Bytes the plan deletes."""
        return sum(c.size for c in self.delete) + sum(d.size for d in self.debris)


def _created(info: CheckpointInfo) -> float:
    try:
        return _dt.datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def plan_retention(scan: DirectoryScan, policy: RetentionPolicy, *, basenames: set[str] | None = None,
                   protect: set[int] = frozenset(), debris: bool = True,  # type: ignore[assignment]
                   now: float | None = None) -> RetentionPlan:
    """Decide what to delete; pure (no I/O). The newest committed checkpoint is always kept.

    ``protect`` lists steps never to delete. ``basenames`` limits debris to
    files of those checkpoint basenames (default: the basenames of the
    committed checkpoints, or ``model.ckpt``); ``debris=False`` plans none.
    """
    committed = sorted(scan.committed, key=lambda c: c.step)
    keep_ids = {c.step for c in committed}
    if policy.max_to_keep:
        keep_ids = {c.step for c in committed[-policy.max_to_keep:]}
    if committed:
        keep_ids.add(committed[-1].step)
    keep_ids |= set(protect)
    if policy.keep_checkpoint_every_n_hours and committed:
        period = policy.keep_checkpoint_every_n_hours * 3600
        next_keep = _created(committed[0])
        for c in committed:
            if _created(c) >= next_keep:
                keep_ids.add(c.step)
                next_keep = _created(c) + period
    keep = [c for c in committed if c.step in keep_ids]
    delete = [c for c in committed if c.step not in keep_ids]

    now = time.time() if now is None else now
    names = basenames or {c.name.rsplit("-", 1)[0] for c in committed} or {"model.ckpt"}
    found_debris = []
    for inc in (scan.incomplete if debris else []):
        basename = inc.prefix.rsplit("/", 1)[-1].rsplit("-", 1)[0]
        newest = max((o.modified or now for o in inc.objects), default=now)
        if basename in names and now - newest >= policy.debris_grace_seconds:
            found_debris.append(inc)
    return RetentionPlan(keep=keep, delete=delete, debris=found_debris)


def delete_checkpoint(store: RemoteStore, info: CheckpointInfo) -> None:
    """Delete one committed checkpoint: manifest first (un-commit), then its files."""
    store.delete([info.manifest_url.rsplit("/", 1)[-1]])
    store.delete([f.name for f in info.files])


def apply_retention(store: RemoteStore, plan: RetentionPlan) -> None:
    """Carry out ``plan``: un-commit and delete old checkpoints, remove debris, rewrite the state file."""
    for info in plan.delete:
        delete_checkpoint(store, info)
        log.info("Retention: deleted checkpoint step %d from %s.", info.step, store.url)
    for inc in plan.debris:
        names = [o.name for o in inc.objects]
        store.delete(names)
        log.info("Removed %d file(s) of uncommitted checkpoint step %d from %s.", len(names), inc.step, store.url)
    if plan.delete:
        write_state_file(store)


def gc(url: str, keep: int | None, *, keep_every_hours: float | None = None,
       grace_seconds: float = DEFAULT_DEBRIS_GRACE_SECONDS, dry_run: bool = False,
       storage_options: Mapping[str, Any] | None = None) -> RetentionPlan:
    """Apply retention to the directory at ``url`` (what ``cloudckpt gc`` runs); ``dry_run`` only plans."""
    store = RemoteStore(url, storage_options)
    plan = plan_retention(scan_directory(store), RetentionPolicy(keep, keep_every_hours, grace_seconds))
    if not dry_run:
        apply_retention(store, plan)
    return plan
