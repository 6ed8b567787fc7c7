"""The commit log of a checkpoint directory: a totally ordered list of immutable entries.

Entry ``i`` is the object ``<dir>/.cloudckpt/log/<i // 100, 10 digits>/<i, 20
digits>.json``. An entry is appended only with a create-only write at index
``last + 1`` (the put-if-absent protocol of Delta Lake): of several parties
racing for one index, the store lets exactly one win; the others read what
was appended and decide again. Nobody ever rewrites or deletes an entry, so a
parsed entry can be cached for the lifetime of a store.

Reading stays cheap as the log grows: entries live in partitions of
``PARTITION`` (a listing covers only the newest partition), and whoever
appends the last entry of a partition also writes ``snapshot.json`` into the
next one: every entry so far in one object, so a reader that starts fresh
reads one snapshot plus the entries after it (a missing snapshot only makes
reading slower: the partitions before are read entry by entry).

What the entries mean (writers, commits, deletions) is folded in
``lineage.py``; who may append what is ``writers.py``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError, RemoteError
from .manifest import utc_now_iso
from .remote import RemoteObject, RemoteStore

log = logging.getLogger("cloudckpt")

LOG_DIR = ".cloudckpt/log"
FORMAT = "cloudckpt.log"
SNAPSHOT_FORMAT = "cloudckpt.log-snapshot"
VERSION = 1
ENTRY_KINDS = ("writer", "commit", "delete")
PARTITION = 100  # entries per log partition (directory)
_ENTRY_NAME = re.compile(r"^(\d{20})\.json$")
_PARTITION_NAME = re.compile(r"^\d{10}$")


@dataclass(frozen=True)
class LogEntry:
    """One appended entry.

    Attributes:
        index: position in the log (1-based, contiguous).
        kind: ``writer`` | ``commit`` | ``delete``.
        doc: the parsed JSON document.
        modified: the store's timestamp of the entry object (POSIX seconds), when it reports one.
    """

    index: int
    kind: str
    doc: dict[str, Any]
    modified: float | None


def partition_dir(partition: int) -> str:
    """The directory (relative to the checkpoint directory) of log partition ``partition``."""
    return f"{LOG_DIR}/{partition:010d}"


def entry_name(index: int) -> str:
    """The object name (relative to the checkpoint directory) of log entry ``index``."""
    return f"{partition_dir(index // PARTITION)}/{index:020d}.json"


def snapshot_name(partition: int) -> str:
    """The snapshot of every entry before partition ``partition`` (indices below ``partition * PARTITION``)."""
    return f"{partition_dir(partition)}/snapshot.json"


def new_entry(kind: str, **fields: Any) -> dict[str, Any]:
    """A log document of ``kind`` with the common fields (a nonce identifies it after an ambiguous append)."""
    if kind not in ENTRY_KINDS:
        raise ValueError(f"unknown log entry kind {kind!r}")
    return {"format": FORMAT, "version": VERSION, "type": kind, "nonce": uuid.uuid4().hex,
            "time": utc_now_iso(), "host": socket.gethostname(), **fields}


class CommitLog:
    """The log of one ``RemoteStore``; use ``CommitLog.of(store)`` to share its cache."""

    _by_store: "weakref.WeakKeyDictionary[RemoteStore, CommitLog]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, store: RemoteStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._entries: dict[int, LogEntry] = {}

    @classmethod
    def of(cls, store: RemoteStore) -> "CommitLog":
        """The (cached) log of ``store``."""
        with cls._registry_lock:
            found = cls._by_store.get(store)
            if found is None:
                found = cls._by_store[store] = cls(store)
            return found

    def refresh(self) -> list[LogEntry]:
        """Every entry, in order: a listing of the newest partition(s) plus a read of each entry not seen before.

        Raises:
            ManifestError: an entry is not a readable log document, or an index is
                missing in the middle (someone deleted entries by hand).
        """
        with self._lock:
            top = max(self._entries, default=0)
        if top:
            partition = top // PARTITION
        else:
            partitions = sorted(int(o.name) for o in self.store.list_under(LOG_DIR, directories=True)
                                if _PARTITION_NAME.match(o.name))
            if not partitions:
                return []
            partition = partitions[-1]
            while partition > 0 and not self._load_snapshot(partition):
                partition -= 1
        while True:
            listed = {int(m.group(1)): o for o in self.store.list_under(partition_dir(partition))
                      if (m := _ENTRY_NAME.match(o.name))}
            with self._lock:
                missing = [i for i in sorted(listed) if i not in self._entries]
                for i, known in self._entries.items():  # appended here: the listing has the store's timestamp
                    if known.modified is None and i in listed:
                        self._entries[i] = LogEntry(i, known.kind, known.doc, listed[i].modified)
            self._read_many(missing, listed)
            if (partition + 1) * PARTITION - 1 not in listed:
                break
            partition += 1  # this partition is full: the log goes on in the next one
        with self._lock:
            entries = [self._entries[i] for i in sorted(self._entries)]
        for expected, entry in enumerate(entries, start=1):
            if entry.index != expected:
                raise ManifestError(
                    f"The commit log of {self.store.url} is missing entry {expected} ({self.store.url_of(entry_name(expected))}); "
                    "entries are never deleted, so the directory was changed by hand. Restore the entry from a "
                    "bucket version, or move the checkpoints to a new directory.")
        return entries

    def try_append(self, index: int, doc: dict[str, Any]) -> LogEntry | None:
        """Create entry ``index`` with ``doc`` unless it exists; the entry, or None if another party won.

        A write whose answer was lost may have been applied all the same: a retried attempt then finds
        its own first attempt (the store says the entry exists), or the retries fail and the write
        raises. Either way the entry is read back once, and its nonce tells: ``doc``'s, and it counts as
        appended; another party's, and this party lost the race (None).

        Raises:
            RemoteError: the write failed and the entry is not there (or could not be read back): the
                write's own error.
            ManifestError: the entry another party appended is not a readable log document.
        """
        data = (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")
        try:
            created = self.store.write_if_absent(entry_name(index), data)
        except RemoteError as exc:
            found = self._read_back(index, exc)
            if found is None:
                raise
            log.info("Appending commit log entry %s failed (%s), but the store holds %s.",
                     self.store.url_of(entry_name(index)), exc, "it: the answer to this write was lost"
                     if found.doc.get("nonce") == doc["nonce"] else "another party's entry there")
        else:
            found = LogEntry(index, doc["type"], doc, None) if created else self._read(index, None)
        self._remember(found)
        if found.doc.get("nonce") != doc["nonce"]:
            return None
        if index % PARTITION == PARTITION - 1:
            self._write_snapshot(index)
        return found

    def cached(self) -> list[LogEntry]:
        """The entries read so far, in order (no I/O)."""
        with self._lock:
            return [self._entries[i] for i in sorted(self._entries)]

    # -- internals -------------------------------------------------------------------------------
    def _read_many(self, indices: list[int], listed: dict[int, RemoteObject]) -> None:
        # A store opened fresh reads a whole partition: one concurrent read (RemoteStore.read_many).
        data = self.store.read_many([entry_name(i) for i in indices])
        for i in indices:
            self._remember(self._parse(i, data[entry_name(i)], listed[i]))

    def _write_snapshot(self, last: int) -> None:
        """Best effort: every entry up to ``last`` into the next partition's snapshot (create-only)."""
        with self._lock:
            entries = [self._entries.get(i) for i in range(1, last + 1)]
        if any(e is None for e in entries):
            return
        doc = {"format": SNAPSHOT_FORMAT, "version": VERSION, "last": last,
               "entries": [{"index": e.index, "modified": e.modified, "doc": e.doc} for e in entries if e]}
        try:
            self.store.write_if_absent(snapshot_name((last + 1) // PARTITION), json.dumps(doc).encode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - readers fall back to the entries themselves
            log.debug("Could not write the commit log snapshot of %s: %s", self.store.url, exc)

    def _load_snapshot(self, partition: int) -> bool:
        """Remember the entries of partition ``partition``'s snapshot; False if it has none (or a bad one)."""
        data = self.store.read_bytes(snapshot_name(partition))
        if data is None:
            return False
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("format") != SNAPSHOT_FORMAT or doc.get("last") != partition * PARTITION - 1:
                return False
            entries = [LogEntry(int(e["index"]), e["doc"]["type"], e["doc"], e.get("modified")) for e in doc["entries"]]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("Ignoring the unreadable commit log snapshot %s.", self.store.url_of(snapshot_name(partition)))
            return False
        if [e.index for e in entries] != list(range(1, partition * PARTITION)):
            return False
        for entry in entries:
            self._remember(entry)
        return True

    def _remember(self, entry: LogEntry) -> None:
        with self._lock:
            known = self._entries.get(entry.index)
            if known is None or (known.modified is None and entry.modified is not None):
                self._entries[entry.index] = entry

    def _read_back(self, index: int, failure: RemoteError) -> LogEntry | None:
        """Entry ``index`` after its create failed with ``failure`` (the store may have applied it); None when
        it is absent or cannot be read now."""
        try:
            data = self.store.read_bytes(entry_name(index))
        except RemoteError as exc:
            log.debug("Could not read back commit log entry %s after a failed append (%s): %s",
                      self.store.url_of(entry_name(index)), failure, exc)
            return None
        if data is None:
            return None
        return self._parse(index, data, None)

    def _read(self, index: int, listed: RemoteObject | None) -> LogEntry:
        return self._parse(index, self.store.read_bytes(entry_name(index)), listed)

    def _parse(self, index: int, data: bytes | None, listed: RemoteObject | None) -> LogEntry:
        """Entry ``index`` from its object's bytes (None: missing).

        Raises:
            ManifestError: missing, or not a readable log document of a version this cloudckpt reads.
        """
        url = self.store.url_of(entry_name(index))
        if data is None:
            raise ManifestError(f"Commit log entry {url} was listed but cannot be read; entries are never deleted.")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"Commit log entry {url} is not valid JSON ({exc}).") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("type") not in ENTRY_KINDS:
            raise ManifestError(f"{url} is not a cloudckpt commit log entry.")
        version = doc.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise ManifestError(f"Commit log entry {url} has format version {version!r}, but this cloudckpt reads "
                                f"version {VERSION}. Upgrade cloudckpt (pip install -U cloudckpt) to read it.")
        modified = listed.modified if listed is not None else None
        return LogEntry(index, doc["type"], doc, modified)
