"""What a commit log says: writers and their epochs, commits and their lineage, retirements, deletions.

Pure functions over the entries of ``commitlog.py`` (no I/O).

* A ``writer`` entry registers a writer; its log index is the writer's
  *epoch*. The writer of the newest ``writer`` entry is the only one whose
  commits count: a ``commit`` entry appended by an older epoch is ignored
  (writers never append one: ``writers.py`` checks before appending).
* Each ``commit`` names its ``parent``: the writer's previous commit, or for
  its first one the commit it resumed from. The **head** is the newest
  writer's last commit, or the commit it resumed from; a writer that
  resumed from nothing and has not committed yet leaves the previous head
  in place (a fresh start that dies before its first commit must not hide
  the run before it). The head and its ancestors are the current lineage. Every other commit is **superseded**:
  listed, never restored, deleted first by retention.
* A ``delete`` entry announces deletions (and retires the commits it names:
  they stop being committed at that index). Whoever appends one issues its
  deletes only within a bounded window after appending (``writers.py``).
* The first ``writer`` entry of a directory committed before the log existed
  adopts its version 1 checkpoints as ``legacy:<prefix>`` commits, each the
  parent of the next by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .commitlog import LogEntry
from .layout import manifest_name

LEGACY = "legacy:"


def legacy_commit_id(prefix: str) -> str:
    """The commit id of a version 1 checkpoint adopted into a log (``legacy:model.ckpt-30``)."""
    return LEGACY + prefix


@dataclass(frozen=True)
class WriterRecord:
    """A registered writer. ``epoch`` is the index of its ``writer`` entry."""

    epoch: int
    writer_id: str
    host: str
    pid: int | None
    started_at: str
    resumed_from: str | None
    reason: str

    def describe(self) -> str:
        """``writer 3f2a… on vm-7 (pid 4242, started 2026-…Z, epoch 12)`` for messages."""
        return (f"writer {self.writer_id} on {self.host or '?'} (pid {self.pid}, started {self.started_at}, "
                f"epoch {self.epoch}{', a rollback' if self.reason == 'rollback' else ''})")


@dataclass(frozen=True)
class CommitRecord:
    """A commit: checkpoint ``prefix`` (manifest ``manifest``) appended by writer ``epoch``."""

    commit_id: str
    index: int
    step: int
    prefix: str
    manifest: str
    parent: str | None
    epoch: int | None  # None for adopted version 1 checkpoints
    writer_id: str | None
    saved_at: float | None = None  # when the checkpoint was saved (seconds since the epoch), if recorded
    in_place: bool = False  # committed in place: the framework (TF's max_to_keep) deletes its files itself

    @property
    def legacy(self) -> bool:
        """True for a version 1 checkpoint adopted when the log was started."""
        return self.commit_id.startswith(LEGACY)


@dataclass(frozen=True)
class DeleteRecord:
    """Announced deletions: ``names`` may be deleted from ``modified`` (store time) for a bounded window."""

    index: int
    party: str
    epoch: int | None
    names: tuple[str, ...]
    retire: tuple[str, ...]
    reason: str
    modified: float | None


@dataclass(frozen=True)
class LogState:
    """The log folded up to ``last_index``."""

    last_index: int = 0
    writers: tuple[WriterRecord, ...] = ()
    commits: dict[str, CommitRecord] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()
    deletes: tuple[DeleteRecord, ...] = ()
    head: str | None = None
    newest_modified: float | None = None  # the newest store timestamp among the entries

    @property
    def newest_writer(self) -> WriterRecord | None:
        """The writer whose lineage is current (the last ``writer`` entry)."""
        return self.writers[-1] if self.writers else None

    def ancestry(self, commit_id: str | None) -> list[str]:
        """``commit_id`` and its ancestors, newest first."""
        chain: list[str] = []
        while commit_id is not None and commit_id in self.commits and commit_id not in chain:
            chain.append(commit_id)
            commit_id = self.commits[commit_id].parent
        return chain

    def lineage(self) -> list[CommitRecord]:
        """The current lineage, oldest first, ending at the head (retired commits included)."""
        return [self.commits[c] for c in reversed(self.ancestry(self.head))]

    def is_current(self, commit_id: str) -> bool:
        """True when ``commit_id`` is the head or one of its ancestors."""
        return commit_id in self.ancestry(self.head)

    def live(self) -> list[CommitRecord]:
        """Commits not retired, in log order."""
        return [c for c in self.commits.values() if c.commit_id not in self.retired]

    def head_of(self, epoch: int) -> str | None:
        """The head of writer ``epoch``'s own lineage: its last commit, or the commit it resumed from."""
        mine = [c for c in self.commits.values() if c.epoch == epoch]
        if mine:
            return mine[-1].commit_id
        writer = next((w for w in self.writers if w.epoch == epoch), None)
        return writer.resumed_from if writer is not None else None


def fold(entries: Iterable[LogEntry]) -> LogState:
    """Fold log entries (in index order) into a ``LogState``."""
    writers: list[WriterRecord] = []
    commits: dict[str, CommitRecord] = {}
    retired: set[str] = set()
    deletes: list[DeleteRecord] = []
    last = 0
    newest_modified: float | None = None
    for entry in entries:
        doc = entry.doc
        last = entry.index
        if entry.modified is not None:
            newest_modified = max(entry.modified, newest_modified or entry.modified)
        if entry.kind == "writer":
            if not writers:
                previous = None
                for prefix, step in sorted(doc.get("legacy") or (), key=lambda p: (p[1], p[0])):
                    cid = legacy_commit_id(prefix)
                    commits[cid] = CommitRecord(cid, entry.index, int(step), prefix, manifest_name(prefix),
                                                previous, None, None)
                    previous = cid
            resumed = doc.get("resumed_from")
            writers.append(WriterRecord(entry.index, str(doc.get("writer_id", "")), str(doc.get("host", "")),
                                        doc.get("pid"), str(doc.get("time", "")),
                                        resumed if resumed in commits else None, str(doc.get("reason", "start"))))
        elif entry.kind == "commit":
            newest = writers[-1] if writers else None
            cid = doc.get("commit_id")
            if newest is None or doc.get("epoch") != newest.epoch or not isinstance(cid, str) or cid in commits:
                continue  # only the newest writer commits; writers.py never appends such an entry
            parent = doc.get("parent")
            saved_at = doc.get("saved_at")
            commits[cid] = CommitRecord(cid, entry.index, int(doc["step"]), str(doc["prefix"]), str(doc["manifest"]),
                                        parent if parent in commits else None, newest.epoch, newest.writer_id,
                                        float(saved_at) if isinstance(saved_at, (int, float))
                                        and not isinstance(saved_at, bool) else None,
                                        doc.get("in_place") is True)
        elif entry.kind == "delete":
            retire = tuple(str(c) for c in doc.get("retire") or ())
            retired.update(c for c in retire if c in commits)
            deletes.append(DeleteRecord(entry.index, str(doc.get("party", "")), doc.get("epoch"),
                                        tuple(str(n) for n in doc.get("names") or ()), retire,
                                        str(doc.get("reason", "")), entry.modified))
    head = None
    for writer in reversed(writers):  # a writer that resumed from nothing takes over at its first commit
        own = [c for c in commits.values() if c.epoch == writer.epoch]
        head = own[-1].commit_id if own else writer.resumed_from
        if head is not None:
            break
    return LogState(last, tuple(writers), commits, frozenset(retired), tuple(deletes), head, newest_modified)
