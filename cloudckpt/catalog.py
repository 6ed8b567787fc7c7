"""What is in a remote checkpoint directory: committed checkpoints (current or superseded), and debris.

With a commit log (``commitlog.py``, every directory a current cloudckpt has
written to), a checkpoint is committed when a log ``commit`` entry names it,
no ``delete`` entry has retired it, and its manifest exists and carries that
commit's id; a commit made in place (its log entry says ``"in_place": true``) also
needs all of its files listed: the framework that owns them (TF's ``max_to_keep``)
deletes them inside its ``save()``, before the writer can retire the commit, and
such a commit is *vanishing* (``DirectoryScan.vanishing``), not committed. The
head of the newest writer's lineage and its ancestors are *current*
(``DirectoryScan.committed``, what restores use); other committed checkpoints
are *superseded*. Without a log (version 1 directories) a
checkpoint with a readable manifest is committed. Files (and manifests) of no
committed checkpoint, such as an upload cut short by a crash or by fencing,
are reported as incomplete, never as checkpoints to restore.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from .commitlog import CommitLog
from .lineage import CommitRecord, LogState, fold, legacy_commit_id
from .errors import ManifestError
from .layout import DEFAULT_LAYOUT, committed_prefixes, manifest_name, parse_manifest_name, parse_object_name
from .manifest import FileEntry, Manifest, parse_manifest
from .remote import RemoteObject, RemoteStore

log = logging.getLogger("cloudckpt")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint in a remote directory.

    Attributes:
        step: global step.
        prefix: full URL of the checkpoint prefix, e.g. ``s3://b/run/model.ckpt-30``, in display form
            (a URL's userinfo and query values masked as ``***``; a local path as given).
        files: the manifest's entries (``name``, ``size``, ``crc32c``).
        created_at: ISO-8601 UTC time the manifest was written.
        manifest_url: URL of the manifest (the commit record), in display form.
    """

    step: int
    prefix: str
    files: tuple[FileEntry, ...]
    created_at: str
    manifest_url: str
    status: str = "committed"  # or "superseded": committed in a lineage that is no longer the current one
    commit_id: str | None = None
    writer_id: str | None = None  # the writer that committed it (None for version 1 manifests)
    layout: str = DEFAULT_LAYOUT  # how its files are named (``layout.py``)

    @property
    def size(self) -> int:
        """Total bytes of the checkpoint's files."""
        return sum(f.size for f in self.files)

    @property
    def name(self) -> str:
        """The prefix relative to the directory, e.g. ``model.ckpt-30``."""
        return self.prefix.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class IncompleteCheckpoint:
    """Files of a checkpoint prefix that has no manifest (never committed)."""

    step: int
    prefix: str
    objects: tuple[RemoteObject, ...]

    @property
    def size(self) -> int:
        """Total bytes of the debris."""
        return sum(o.size for o in self.objects)


@dataclass(frozen=True)
class DirectoryScan:
    """One consistent listing of a remote checkpoint directory."""

    committed: list[CheckpointInfo]  # the current lineage, oldest first; the last one is the latest
    incomplete: list[IncompleteCheckpoint]
    unreadable: dict[str, ManifestError]  # manifest name -> why it cannot be read
    objects: list[RemoteObject]
    superseded: list[CheckpointInfo] = field(default_factory=list)  # committed, other lineages, by step
    log: LogState | None = None  # the folded commit log (None: a version 1 directory)
    # Committed in place (a live ``in_place`` commit) with files missing from the listing: the framework's
    # ``max_to_keep`` is deleting them (TF deletes inside ``save()``, before cloudckpt can retire the commit).
    # Not committed for readers (never listed, restored or verified); the writer (or ``gc``) retires them.
    vanishing: list[CheckpointInfo] = field(default_factory=list)


def info_from_manifest(store: RemoteStore, manifest: Manifest, *, status: str = "committed",
                       commit_id: str | None = None) -> CheckpointInfo:
    """A CheckpointInfo for a parsed manifest in ``store``."""
    return CheckpointInfo(step=manifest.step, prefix=store.url_of(manifest.prefix), files=manifest.files,
                          created_at=manifest.created_at, manifest_url=store.url_of(manifest.name), status=status,
                          commit_id=commit_id or manifest.commit_id or legacy_commit_id(manifest.prefix),
                          writer_id=manifest.writer_id, layout=manifest.layout)


class ManifestCache:
    """Parsed version 2 manifests of one store (``ManifestCache.of(store)``), by object name.

    A version 2 manifest is written create-only under a fresh commit id and never
    changed: while a live log record names that commit id and the listing shows an
    object of the same size at its name, it is the manifest read (or written)
    before. Version 1 manifests (no commit id) are always read.
    """

    _by_store: "weakref.WeakKeyDictionary[RemoteStore, ManifestCache]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._manifests: dict[str, tuple[Manifest, int]] = {}  # name -> (manifest, object size)

    @classmethod
    def of(cls, store: RemoteStore) -> "ManifestCache":
        """The cache of ``store`` (one per store object: a writer process's engine keeps its store)."""
        with cls._registry_lock:
            found = cls._by_store.get(store)
            if found is None:
                found = cls._by_store[store] = cls()
            return found

    def get(self, name: str, commit_id: str | None, size: int | None) -> Manifest | None:
        """The cached manifest at ``name`` if it carries ``commit_id`` and (when given) has ``size`` bytes."""
        if commit_id is None:
            return None
        with self._lock:
            found = self._manifests.get(name)
        if found is None or found[0].commit_id != commit_id or (size is not None and size != found[1]):
            return None
        return found[0]

    def put(self, name: str, manifest: Manifest, size: int) -> None:
        """Remember ``manifest`` (``size`` bytes, as stored) at ``name``; version 1 manifests are not kept."""
        if manifest.commit_id is None:
            return
        with self._lock:
            self._manifests[name] = (manifest, size)

    def keep_only(self, names: set[str]) -> None:
        """Forget manifests no longer in the directory (``names``: a listing's object names)."""
        with self._lock:
            for name in [n for n in self._manifests if n not in names]:
                del self._manifests[name]

    def __len__(self) -> int:
        with self._lock:
            return len(self._manifests)


def scan_directory(store: RemoteStore, *, objects: list[RemoteObject] | None = None,
                   state: LogState | None = None) -> DirectoryScan:
    """Read the commit log (cached), then list the directory once and read every committed manifest
    (at once, ``RemoteStore.read_many``; version 2 manifests this store read or wrote before come from
    ``ManifestCache``).

    The log is read first: a commit it names has its manifest in place already,
    so the listing cannot miss it (while the log gains entries during a listing).
    A writer that has just listed the directory and appended to the log passes
    both (``objects``, ``state``): nothing more is listed (one scan per commit).
    A writer that has just read the log (a non-empty one) passes ``state``: only
    the directory is listed.
    """
    if state is not None:
        return _scan_logged(store, store.list_objects() if objects is None else objects, state)
    entries = CommitLog.of(store).refresh()
    objects = store.list_objects() if objects is None else objects
    if entries:
        return _scan_logged(store, objects, fold(entries))
    committed: list[CheckpointInfo] = []
    unreadable: dict[str, ManifestError] = {}
    manifest_prefixes = committed_prefixes([o.name for o in objects])
    read = store.read_many([manifest_name(prefix) for prefix, _ in manifest_prefixes])
    for prefix, step in manifest_prefixes:
        try:
            manifest = _checked(store, prefix, step, read[manifest_name(prefix)])
        except ManifestError as exc:
            unreadable[manifest_name(prefix)] = exc
            continue
        if manifest is not None:
            committed.append(info_from_manifest(store, manifest))
    committed.sort(key=lambda c: c.step)
    return DirectoryScan(committed, _debris(store, objects, {p for p, _ in manifest_prefixes}), unreadable, objects)


def _scan_logged(store: RemoteStore, objects: list[RemoteObject], state: LogState) -> DirectoryScan:
    sizes = {o.name: o.size for o in objects}
    present = set(sizes)
    ManifestCache.of(store).keep_only(present)
    current = {c: i for i, c in enumerate(reversed(state.ancestry(state.head)))}
    committed: list[CheckpointInfo] = []
    superseded: list[CheckpointInfo] = []
    vanishing: list[CheckpointInfo] = []
    unreadable: dict[str, ManifestError] = {}
    claimed: set[str] = set()
    records = [record for record in state.live() if record.manifest in present]
    cache = ManifestCache.of(store)
    # Manifests not cached (a process that starts reads them all): one concurrent read, one GET each.
    read = store.read_many([manifest_name(r.prefix) for r in records
                            if cache.get(r.manifest, None if r.legacy else r.commit_id, sizes.get(r.manifest)) is None])
    for record in records:
        try:
            manifest = read_committed_manifest(store, record, sizes.get(record.manifest), read)
        except ManifestError as exc:
            unreadable[record.manifest] = exc
            claimed.add(record.prefix)
            continue
        if manifest is None or (manifest.commit_id is not None if record.legacy
                                else manifest.commit_id != record.commit_id):
            continue  # deleted meanwhile, or a manifest no commit entry names (debris)
        status = "committed" if record.commit_id in current else "superseded"
        info = info_from_manifest(store, manifest, status=status, commit_id=record.commit_id)
        claimed.add(record.prefix)
        if record.in_place and any(f.name not in present for f in manifest.files):
            vanishing.append(info)  # its files are the framework's, and it is deleting them: not committed
            continue
        (committed if status == "committed" else superseded).append(info)
    committed.sort(key=lambda c: current[c.commit_id or ""])
    superseded.sort(key=lambda c: c.step)
    vanishing.sort(key=lambda c: c.step)
    return DirectoryScan(committed, _debris(store, objects, claimed), unreadable, objects, superseded, state,
                         vanishing)


def read_committed_manifest(store: RemoteStore, record: CommitRecord, size: int | None,
                            read: Mapping[str, bytes | None] | None = None) -> Manifest | None:
    """The manifest a live commit ``record`` names (``size``: its listed size), from ``ManifestCache``
    when it holds that commit's manifest, else read (and checked against its name) and remembered.
    None if it vanished since the listing. ``read``: bytes already read by name (``RemoteStore.read_many``),
    used instead of reading it again.

    Raises:
        ManifestError: it cannot be parsed, or describes another checkpoint than its name says.
    """
    cached = ManifestCache.of(store).get(record.manifest, None if record.legacy else record.commit_id, size)
    if cached is not None:
        return cached
    name = manifest_name(record.prefix)
    data = read[name] if read is not None and name in read else store.read_bytes(name)
    return _checked(store, record.prefix, record.step, data)


def _checked(store: RemoteStore, prefix: str, step: int, data: bytes | None) -> Manifest | None:
    """The manifest of ``prefix`` parsed from ``data`` (None: it vanished since the listing), checked
    against its name."""
    name = manifest_name(prefix)
    if data is None:
        return None
    manifest = parse_manifest(data, url=store.url_of(name))
    if manifest.prefix != prefix or manifest.step != step or any(
            not f.name.startswith(prefix + ".") for f in manifest.files):
        raise ManifestError(f"Manifest {store.url_of(name)} describes {manifest.prefix!r} (step "
                            f"{manifest.step}), not the checkpoint its name says; it cannot be trusted.")
    ManifestCache.of(store).put(name, manifest, len(data))
    return manifest


def _debris(store: RemoteStore, objects: list[RemoteObject], claimed: set[str]) -> list[IncompleteCheckpoint]:
    """Checkpoint files (of any registered layout) and manifests of prefixes no committed (or unreadable)
    checkpoint claims."""
    debris: dict[tuple[str, int], list[RemoteObject]] = defaultdict(list)
    for obj in objects:
        parsed = parse_object_name(obj.name)
        if parsed and parsed[0] not in claimed:
            debris[parsed].append(obj)
    return [IncompleteCheckpoint(step, store.url_of(prefix), tuple(objs))
            for (prefix, step), objs in sorted(debris.items(), key=lambda kv: kv[0][1])]


def unreadable_by_step(scan: DirectoryScan) -> list[tuple[int, str, ManifestError]]:
    """(step, prefix, why) of every manifest in ``scan`` that cannot be read, by step."""
    found = [(parsed[1], parsed[0], error) if (parsed := parse_manifest_name(name)) else (-1, name, error)
             for name, error in scan.unreadable.items()]
    return sorted(found, key=lambda item: (item[0], item[1]))


def legacy_checkpoints(store: RemoteStore) -> list[tuple[str, int]]:
    """(prefix, step) of the checkpoints committed by manifests alone (a directory without a commit log)."""
    return [(c.name, c.step) for c in scan_directory(store).committed if c.writer_id is None]


def list_checkpoints(url: str, storage_options: Mapping[str, Any] | None = None, *,
                     include_superseded: bool = False) -> list[CheckpointInfo]:
    """Committed checkpoints in the directory at ``url``: the current lineage, oldest first.

    The last one is the latest: the head of the newest writer's lineage (see
    ``lineage.py``), which is what a resuming hook restores. With
    ``include_superseded``, committed checkpoints of abandoned lineages
    (``status == "superseded"``) are included too, and all are sorted by step.

    Raises:
        ManifestError: a manifest in the directory cannot be read (corrupt, or
            written by a newer cloudckpt); it is named in the message.
        RemoteError / ConfigError: the directory cannot be listed.
    """
    scan = scan_directory(RemoteStore(url, storage_options))
    if scan.unreadable:
        raise next(iter(scan.unreadable.values()))
    if include_superseded:
        return sorted(scan.committed + scan.superseded, key=lambda c: (c.step, c.status))
    return scan.committed


def latest_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
    """The latest committed checkpoint at ``url`` (the head of the current lineage), or None if there is none."""
    checkpoints = list_checkpoints(url, storage_options)
    return checkpoints[-1] if checkpoints else None


SUBDIRECTORIES_LOOKED_AT = 16  # subdirectories a "nothing committed here" hint looks into, in name order
SUBDIRECTORIES_NAMED = 3  # of those holding checkpoints, the ones the hint names; the others are counted


def checkpoint_subdirectories(store: RemoteStore) -> list[str]:
    """Names of ``store``'s immediate subdirectories that hold committed checkpoints (a manifest), for a
    "nothing committed here" message: a user gave a run's parent (``s3://b/k6`` for ``s3://b/k6/backup``).

    Looks at the first ``SUBDIRECTORIES_LOOKED_AT`` subdirectories by name (one listing each, plus one of the
    directory); [] when the store cannot be listed: a hint, never a new error.
    """
    return _checkpoint_subdirectories(store)[0]


def _checkpoint_subdirectories(store: RemoteStore) -> tuple[list[str], int]:
    """(``checkpoint_subdirectories``, how many subdirectories there are in all, looked at or not)."""
    try:
        subdirectories = sorted(o.name for o in store.list_under("", directories=True) if not o.name.startswith("."))
        found = [name for name in subdirectories[:SUBDIRECTORIES_LOOKED_AT]
                 if any(parse_manifest_name(o.name) is not None for o in store.list_under(name))]
        return found, len(subdirectories)
    except Exception as exc:  # noqa: BLE001 - a hint only
        log.debug("Could not look for checkpoints in the subdirectories of %s: %s", store.url, exc)
        return [], 0


def subdirectories_hint(store: RemoteStore) -> str:
    """`` Its subdirectories backup/ and models/ hold checkpoints: pass one (e.g. URL/backup).`` when
    ``checkpoint_subdirectories`` finds some, else ``""``: appended to a "nothing committed in URL" message.

    Names the first ``SUBDIRECTORIES_NAMED`` and counts the others (``a/, b/, c/ and 13 more``); when the
    directory has more subdirectories than were looked at, says so (``of the first 16 of 40 by name``).
    """
    found, total = _checkpoint_subdirectories(store)
    if not found:
        return ""
    names = [f"{name}/" for name in found[:SUBDIRECTORIES_NAMED]]
    more = len(found) - len(names)
    if more:
        listed = f"{', '.join(names)} and {more} more"
    else:
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    if total > SUBDIRECTORIES_LOOKED_AT:
        listed += f" (of the first {SUBDIRECTORIES_LOOKED_AT} of {total} subdirectories by name)"
    one = len(found) == 1
    return (f" Its subdirector{'y' if one else 'ies'} {listed} hold{'s' if one else ''} "
            f"checkpoints: pass {'it' if one else 'one'} ({store.url.rstrip('/')}/{found[0]}).")
