"""Who may change a checkpoint directory: writer registration, fencing, and announced deletions.

The newest writer wins. A writer (a hook, ``cloudckpt push``, ``cloudckpt
rollback``) registers by appending a ``writer`` entry to the commit log
(``commitlog.py``); its epoch is that entry's index. Before every append it
reads the entries it has not seen; if one is a ``writer`` entry newer than
its own, it raises ``FencedError`` and appends nothing. An append is a
create-only write at ``last + 1``, and the writer has read every entry below
that index, so an older writer's append can only land *before* a newer
writer's registration: from the moment the newer writer is registered, the
older one cannot commit anything.

Deletions are the one mutation that create-only writes do not order.
Whoever deletes (a writer's retention or debris cleanup, ``cloudckpt gc``)
first appends a ``delete`` entry naming the objects, and issues those
deletes only within ``delete_window`` seconds of starting that append. A
writer about to create an object named in someone else's ``delete`` entry
waits until that announcement cannot take effect any more (``delete_lease``
after it first saw it, or provably earlier by the store's own timestamps),
unless the deleter marked it settled in a later entry. So a delete decided by
a party that has since been fenced can never remove an object of a newer
commit. The assumption: a delete request reaches the store within
``delete_lease - delete_window`` seconds of being sent, or never.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any, Callable

from .commitlog import CommitLog, LogEntry, new_entry
from .errors import FencedError, UploadError
from .lineage import LogState, WriterRecord, fold
from .manifest import Manifest
from .remote import RemoteStore

log = logging.getLogger("cloudckpt")

DELETE_WINDOW = 5.0  # seconds after starting a delete entry's append in which its deletes may be sent
DELETE_LEASE = 20.0  # after this, an announced delete can no longer reach the store
STORE_CLOCK_MARGIN = 2.0  # store timestamps: 1 s resolution on S3, several front ends
MAX_APPEND_ATTEMPTS = 50
MAX_REDECISIONS = 1


def _lineage_start(state: LogState, head: str | None) -> str:
    """For the registration log line: the store's committed checkpoint a new writer's commits follow (its
    parent; not what training resumed from locally, which ``resume.py`` logs), or that there is none."""
    if head is None:
        return "no checkpoint committed in the store precedes its commits: its first commit starts a new lineage"
    record = state.commits.get(head)
    which = f"{record.prefix} (step {record.step}, commit {head})" if record is not None else f"commit {head}"
    return f"its commits follow {which}, the store's committed checkpoint it continues"


class LogChanged(Exception):
    """The log gained commits or writers since a plan was made: plan again."""


class Writer:
    """A party that changes one checkpoint directory.

    Args:
        store: the checkpoint directory.
        role: ``"writer"`` (registers, is fenced by newer writers, commits) or
            ``"maintenance"`` (``cloudckpt gc``: only announced deletions, never fenced,
            never fences anyone).
        delete_window, delete_lease: seconds; see the module docstring.
    """

    def __init__(self, store: RemoteStore, *, role: str = "writer", delete_window: float = DELETE_WINDOW,
                 delete_lease: float = DELETE_LEASE) -> None:
        if role not in ("writer", "maintenance"):
            raise ValueError(f"unknown role {role!r}")
        if not 0 < delete_window < delete_lease:
            raise ValueError("need 0 < delete_window < delete_lease")
        self.store = store
        self.log = CommitLog.of(store)
        self.role = role
        self.writer_id = uuid.uuid4().hex[:16]
        self.party = self.writer_id if role == "writer" else f"maintenance:{self.writer_id}"
        self.delete_window = delete_window
        self.delete_lease = delete_lease
        self.epoch: int | None = None
        self.head: str | None = None  # the head of this writer's lineage (its last commit or its resume point)
        self.fenced_by: WriterRecord | None = None
        self._observed: dict[int, float] = {}  # delete entry index -> time.monotonic() when first seen
        self._ambiguous: dict[int, float] = {}  # own delete entries whose deletes may still land -> start time
        self._to_settle: list[int] = []  # own delete entries whose deletes all completed, not yet announced

    # -- reading -------------------------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        """True once this writer's ``writer`` entry is in the log."""
        return self.epoch is not None

    def state(self, *, step: int | None = None) -> LogState:
        """The log folded up to its newest entry.

        Raises:
            FencedError: (a registered writer) a newer writer has registered; ``step`` goes into the error.
        """
        entries = self.log.refresh()
        now = time.monotonic()
        for entry in entries:
            if entry.kind == "delete":
                self._observed.setdefault(entry.index, now)
        state = fold(entries)
        self._check_fence(state, step)
        return state

    # -- appending -----------------------------------------------------------------------------------
    def register(self, resume: Callable[[LogState], str | None] | str | None, *, reason: str = "start",
                 legacy: Callable[[], list[tuple[str, int]]] | None = None) -> LogState:
        """Append this writer's ``writer`` entry; afterwards every older writer is fenced.

        ``resume(state)`` returns the commit id this writer continues from (or
        None for a new lineage); it is asked again if another party appended
        first. ``legacy()`` lists the version 1 checkpoints ``(prefix, step)``
        to adopt when this is the directory's first entry.
        """
        if self.role != "writer" or self.registered:
            raise RuntimeError("register() is for an unregistered writer")
        doc: dict[str, Any] | None = None
        decided_at = -1
        redecisions = 0
        for _ in range(MAX_APPEND_ATTEMPTS):
            state = self.state()
            # Decide again if another writer registered meanwhile, or (a couple of times) if commits
            # landed; a writer that keeps committing must not starve this one: its newer commits then
            # become superseded, as for any commit that lands after a newer writer decided.
            changed = [e.kind for e in self.log.cached() if e.index > decided_at]
            # And always if the commit it chose to continue was retired meanwhile (a running writer's retention
            # deleting it): registered, it would continue a deleted checkpoint, and the directory would have
            # no latest checkpoint at all (its next run starting from nothing).
            retired = doc is not None and doc.get("resumed_from") in state.retired
            if doc is None or "writer" in changed or retired or ("commit" in changed and redecisions < MAX_REDECISIONS):
                redecisions += doc is not None
                resumed = resume(state) if callable(resume) else resume
                doc = new_entry("writer", writer_id=self.writer_id, pid=os.getpid(), resumed_from=resumed,
                                reason=reason)
                if state.last_index == 0 and legacy is not None:
                    doc["legacy"] = [[prefix, step] for prefix, step in legacy()]
                decided_at = state.last_index
            if decided_at == 0 and state.last_index > 0:
                doc.pop("legacy", None)  # adopting is only for the first entry
            entry = self.log.try_append(state.last_index + 1, doc)
            if entry is not None:
                self.epoch = entry.index
                after = fold(self.log.cached())
                self.head = after.head_of(self.epoch)  # not after.head: a fresh start has no parent
                log.info("Registered as the writer of %s (writer epoch %d: its commit log index); %s.",
                         self.store.url, self.epoch, _lineage_start(after, self.head))
                return after
        raise UploadError(f"Could not register a writer on {self.store.url}: the commit log kept changing "
                          f"({MAX_APPEND_ATTEMPTS} attempts).", url=self.store.url)

    def append(self, doc: dict[str, Any], *, step: int | None = None,
               validate: Callable[[LogState], None] | None = None) -> LogEntry:
        """Append ``doc`` at the end of the log as this party.

        Before every attempt the log is re-read: a registered writer that has
        been fenced raises ``FencedError``; ``validate(state)`` may wait, repair
        or raise (``LogChanged`` to give up).
        """
        if self.role == "writer" and not self.registered:
            raise RuntimeError("a writer must register before it appends")
        doc = {**doc, "party": self.party, "epoch": self.epoch}
        for _ in range(MAX_APPEND_ATTEMPTS):
            state = self.state(step=step)
            if validate is not None:
                validate(state)
            settled = list(self._to_settle)
            if settled:
                doc["settled"] = settled
            entry = self.log.try_append(state.last_index + 1, doc)
            if entry is not None:
                self._to_settle = [i for i in self._to_settle if i not in settled]
                return entry
        raise UploadError(f"Could not append to the commit log of {self.store.url}: it kept changing "
                          f"({MAX_APPEND_ATTEMPTS} attempts).", url=self.store.url, step=step)

    def commit(self, manifest: Manifest, *, validate: Callable[[LogState], None] | None = None,
               saved_at: float | None = None, in_place: bool = False) -> LogEntry:
        """Append the ``commit`` entry of ``manifest`` (already written): THE commit point.

        ``saved_at``: when the checkpoint was saved (seconds since the epoch), if known; the remote TF
        state file lists it as the checkpoint's timestamp. ``in_place``: the checkpoint's files are the
        framework's own (a plain local directory committed in place, ``commit.committed_in_place``): the
        entry says so (``"in_place": true``), and readers take a commit whose files are gone for one the
        framework's ``max_to_keep`` is deleting, not for a damaged one (``catalog.scan_directory``).
        """
        doc = new_entry("commit", writer_id=self.writer_id, commit_id=manifest.commit_id, step=manifest.step,
                        prefix=manifest.prefix, manifest=manifest.name, parent=manifest.parent)
        if saved_at is not None:
            doc["saved_at"] = float(saved_at)
        if in_place:
            doc["in_place"] = True
        entry = self.append(doc, step=manifest.step, validate=validate)
        self.head = manifest.commit_id
        return entry

    def delete(self, names: list[str], *, retire: tuple[str, ...] = (), reason: str,
               planned_at: int | None = None, step: int | None = None) -> bool:
        """Announce, then delete ``names`` in order (retiring the commits ``retire`` first).

        ``planned_at``: the log index the decision was based on; if commits or
        writers were appended since, nothing is done (False): decide again.
        Returns True when every object is gone; False if the decision is stale
        or the deletion window closed first (what is left is debris).
        """
        if not names and not retire:
            return True

        def unchanged(state: LogState) -> None:
            if planned_at is not None and any(e.kind != "delete" for e in self.log.cached() if e.index > planned_at):
                raise LogChanged()

        start = time.monotonic()
        doc = new_entry("delete", names=list(names), retire=list(retire), reason=reason)
        try:
            entry = self.append(doc, step=step, validate=unchanged)
        except LogChanged:
            return False
        done, retried = self.store.delete_before(list(names), start + self.delete_window)
        if done and not retried:
            self._to_settle.append(entry.index)
        else:
            self._ambiguous[entry.index] = start
        return done

    def wait_for_deletes(self, names: set[str], state: LogState) -> float:
        """Block until no announced delete of any of ``names`` can still reach the store; seconds waited.

        Announcements of other parties count unless settled, provably older than
        the lease by the store's timestamps, or seen more than a lease ago; this
        party's own count when their deletes were ambiguous (retried, or cut by
        the window).
        """
        settled = {(e.doc.get("party"), i) for e in self.log.cached() for i in (e.doc.get("settled") or ())}
        waited = 0.0
        for record in state.deletes:
            if not names.intersection(record.names) or (record.party, record.index) in settled:
                continue
            own = record.party == self.party
            if own and record.index not in self._ambiguous:
                continue
            if not own and record.modified is not None and state.newest_modified is not None and \
                    state.newest_modified - record.modified > self.delete_lease + STORE_CLOCK_MARGIN:
                continue
            since = self._ambiguous[record.index] if own else self._observed.get(record.index, time.monotonic())
            remaining = since + self.delete_lease - time.monotonic()
            if remaining > 0:
                log.info("Waiting %.1fs before writing %s in %s: a deletion announced by %s (log entry %d) may "
                         "still reach the store.", remaining, sorted(names.intersection(record.names)),
                         self.store.url, record.party, record.index)
                time.sleep(remaining)
                waited += remaining
        return waited

    # -- internals -----------------------------------------------------------------------------------
    def _check_fence(self, state: LogState, step: int | None) -> None:
        if self.role != "writer" or self.epoch is None:
            return
        newest = state.newest_writer
        if newest is not None and newest.epoch != self.epoch:
            self.fenced_by = newest
            lost = f"nothing more{f' (step {step} was not committed)' if step is not None else ''}"
            if _this_process(newest):
                message = (
                    f"Writer {self.writer_id} (epoch {self.epoch}) of {self.store.url} is fenced by a newer "
                    f"{newest.describe()}: this same process. Two cloudckpt objects of this process write into one "
                    "checkpoint directory (e.g. cloudckpt.keras.BackupAndRestore(url) and cloudckpt.keras."
                    "ModelCheckpoint(url + '/model-{epoch}.keras'), or two CheckpointManagers or hooks on one URL), "
                    f"and the newest writer wins: this one commits {lost}. Give each of them its own checkpoint "
                    "directory (e.g. url + '/backup' and url + '/models').")
            else:
                message = (
                    f"Writer {self.writer_id} (epoch {self.epoch}) of {self.store.url} is fenced: a newer "
                    f"{newest.describe()} registered on the directory, and the newest writer wins. This writer "
                    f"commits {lost}; stop this process, or make sure one job trains into one checkpoint directory.")
            raise FencedError(message, url=self.store.url, step=step, newer_writer=newest.describe())


def _this_process(record: WriterRecord) -> bool:
    """True when ``record``'s writer registered from this process (same pid and host; not a rollback, which is
    ``cloudckpt rollback``, a command of its own even when run in-process)."""
    return record.pid == os.getpid() and record.host == socket.gethostname() and record.reason != "rollback"
