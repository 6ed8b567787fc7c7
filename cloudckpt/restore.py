"""Getting committed checkpoints back: verify in place, or download and verify into a local directory.

A download lands under a hidden temporary directory and is moved into place
only after every file matches its manifest (size and crc32c); the local
``checkpoint`` state file is written last. A failed or interrupted download
therefore never changes what ``tf.train.latest_checkpoint`` returns.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

from .catalog import CheckpointInfo, DirectoryScan, scan_directory, subdirectories_hint, unreadable_by_step
from .errors import CloudCkptError, ConfigError, IntegrityError, ManifestError, RemoteError, human_size
from .interrupt import cancelling_pool
from .localdir import check_download_target
from .layout import DEFAULT_LAYOUT, get_layout, parse_manifest_name, write_local_state_file
from .manifest import FileEntry, crc32c_of_file
from .remote import LOCAL_DISK_HINTS, RemoteObject, RemoteStore, local_disk_errno, open_directory
from .urls import as_url
from .retry import RetryPolicy
from .transfer import TransferOptions
from .staging import DownloadStaging
from .waits import map_all, result_of

log = logging.getLogger("cloudckpt")

OK, MISSING, SIZE_MISMATCH, CHECKSUM_MISMATCH = "ok", "missing", "size mismatch", "checksum mismatch"
# Downloads of a file whose bytes do not match its manifest (size or crc32c), in all, before the checkpoint is
# declared corrupt. A byte corrupted on the way (a NIC, a proxy, memory) is not there the next time; rot in the
# store is: only the latter may make a restore fall back to an older checkpoint, which a newer save then
# supersedes (and retention deletes).
_DOWNLOADS_ON_MISMATCH = 3


class CheckpointNotFoundError(CloudCkptError, LookupError):
    """No committed checkpoint (or none at the requested step) in the directory."""


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one file of a checkpoint."""

    name: str
    status: str  # "ok" | "missing" | "size mismatch" | "checksum mismatch"
    expected_size: int
    found_size: int | None
    expected_crc32c: str
    found_crc32c: str | None
    bad_parts: tuple[int, ...] = ()  # 0-based parts (``FileEntry.parts``) whose crc32c differs, when re-read
    part_size: int | None = None  # bytes per part of ``bad_parts`` (part i: bytes [i * part_size, (i+1) * part_size))

    def bad_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` byte offsets of each part in ``bad_parts``."""
        size = self.expected_size
        return [(i * self.part_size, min(size, (i + 1) * self.part_size)) for i in self.bad_parts] \
            if self.part_size else []


UNREADABLE, RETIRED, FAILED = "unreadable", "retired", "failed"

# progress(checkpoint, bytes): called as a checkpoint's bytes are read (from several threads).
Progress = Callable[[CheckpointInfo, int], None]


@dataclass(frozen=True)
class VerifyReport:
    """Result of re-reading one committed checkpoint and checking it against its manifest.

    Attributes:
        url: the checkpoint prefix URL, display form (``s3://b/run/model.ckpt-30``).
        step: global step.
        files: one verdict per file the manifest lists (empty when the manifest cannot be read).
        error: why the manifest itself cannot be read (``verify_checkpoints`` reports it instead of raising).
        retired: a writer's retention deleted the checkpoint while it was being read (not a corruption).
        superseded: committed in a lineage that is no longer the current one (``CheckpointInfo.status``, as
            ``cloudckpt ls`` shows it): intact or not, never restored as the latest.
    """

    url: str
    step: int
    files: tuple[FileCheck, ...]
    error: ManifestError | None = None
    retired: bool = False
    superseded: bool = False

    @property
    def ok(self) -> bool:
        """True when the manifest was read and every file is present with the right size and crc32c."""
        return self.error is None and not self.retired and all(f.status == OK for f in self.files)

    @property
    def status(self) -> str:
        """``ok``, ``failed`` (a file is missing or differs), ``unreadable`` (the manifest) or ``retired``."""
        if self.error is not None:
            return UNREADABLE
        if self.retired:
            return RETIRED
        return OK if self.ok else FAILED

    @property
    def problems(self) -> list[FileCheck]:
        """The files that failed."""
        return [f for f in self.files if f.status != OK]

    @property
    def name(self) -> str:
        """The checkpoint prefix relative to its directory, e.g. ``model.ckpt-30``."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def size(self) -> int:
        """Bytes of the checkpoint's files, as its manifest lists them."""
        return sum(f.expected_size for f in self.files)


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify_checkpoints`` checked.

    Attributes:
        url: the checkpoint directory, display form.
        reports: one per checkpoint checked, by step.
    """

    url: str
    reports: tuple[VerifyReport, ...]

    @property
    def failed(self) -> list[VerifyReport]:
        """Reports of corrupt or missing files and of unreadable manifests (retired checkpoints are not failures)."""
        return [r for r in self.reports if r.status in (FAILED, UNREADABLE)]

    @property
    def ok(self) -> bool:
        """True when no checkpoint failed."""
        return not self.failed


@dataclass(frozen=True)
class PullResult:
    """What ``pull_checkpoint`` downloaded.

    Attributes:
        url: the checkpoint directory, display form.
        checkpoint: the committed checkpoint downloaded (and verified).
        local_prefix: its local prefix, e.g. ``/data/ckpt/model.ckpt-30``;
            ``tf.train.latest_checkpoint(local_dir)`` returns it.
        passed_over: steps newer than ``checkpoint`` whose manifests cannot be read (left out; see
            ``cloudckpt ls``), only when the newest checkpoint was asked for.
    """

    url: str
    checkpoint: CheckpointInfo
    local_prefix: str
    passed_over: tuple[int, ...] = ()


def _select(store: RemoteStore, step: int | None, name: str | None) -> CheckpointInfo:
    return select_checkpoint(store, scan_directory(store), step, name=name)


NAMES_LISTED = 5  # committed names an unknown ``name=`` error lists, newest first


def _step_or_name(step: int | None, name: str | None) -> None:
    """Refuse ``step`` and ``name`` together: each picks one checkpoint."""
    if step is not None and name is not None:
        raise ConfigError(f"Pass step ({step}) or name ({name!r}), not both: each picks one checkpoint.")


def no_checkpoint_named(store: RemoteStore, name: str, candidates: Iterable[CheckpointInfo],
                        kind: str = "committed") -> CheckpointNotFoundError:
    """The error for a ``name=`` that no checkpoint of ``candidates`` has: it names a few that exist (by step,
    newest first; at one step, the later in ``candidates``, the newer commit of a lineage, first), or says that
    nothing is committed (with ``subdirectories_hint``)."""
    ranked = sorted(enumerate(candidates), key=lambda item: (item[1].step, item[0]), reverse=True)
    names = [c.name for _, c in ranked]
    if not names:
        return CheckpointNotFoundError(f"No committed checkpoint named {name!r} in {store.url}: nothing is "
                                       f"committed there.{subdirectories_hint(store)}")
    listed = ", ".join(names[:NAMES_LISTED]) + (f" and {len(names) - NAMES_LISTED} more"
                                                 if len(names) > NAMES_LISTED else "")
    return CheckpointNotFoundError(f"No committed checkpoint named {name!r} in {store.url} ({kind}: {listed}; "
                                   f"`cloudckpt ls {store.url}` lists them with their steps).")


def _unreadable_named(scan: DirectoryScan, name: str) -> ManifestError | None:
    """Why the manifest of the checkpoint named ``name`` cannot be read, if it is in ``scan`` and cannot."""
    return next((error for _, prefix, error in unreadable_by_step(scan) if prefix == name), None)


def select_checkpoint(store: RemoteStore, scan: DirectoryScan, step: int | None, *,
                      name: str | None = None) -> CheckpointInfo:
    """The committed checkpoint at ``step`` (the newest if None), or the one named ``name``, in ``scan``.

    Two checkpoints can share a step under different names (a Keras template
    with a metric, fit again from scratch): ``step`` takes the newer commit;
    ``name`` (``CheckpointInfo.name``, as ``cloudckpt ls`` shows it, e.g.
    ``model.ckpt-30``) picks either.

    Raises:
        CheckpointNotFoundError: nothing committed (at that step, of that name); a superseded one (see
            ``rollback``).
        ManifestError: the manifest of ``step`` / ``name`` (or, for the newest, a manifest newer than every
            readable one) exists but cannot be read.
        ConfigError: both ``step`` and ``name``.
    """
    _step_or_name(step, name)
    if name is not None:
        found = next((info for info in scan.committed if info.name == name), None)
        if found is not None:
            return found
        error = _unreadable_named(scan, name)
        if error is not None:
            raise error
        if any(c.name == name for c in scan.superseded):
            raise CheckpointNotFoundError(
                f"Checkpoint {name} in {store.url} is superseded (committed in an abandoned lineage), so it is "
                f"not restored; `cloudckpt rollback {store.url} --name {name}` makes it the latest on purpose.")
        raise no_checkpoint_named(store, name, scan.committed)
    if step is None:
        newest = scan.committed[-1].step if scan.committed else -1
        unreadable = sorted((((parse_manifest_name(n) or ("", -1))[1], e) for n, e in scan.unreadable.items()),
                            key=lambda item: item[0])
        if unreadable and unreadable[-1][0] > newest:  # the newest checkpoint is not silently skipped
            raise unreadable[-1][1]
        if not scan.committed:
            raise CheckpointNotFoundError(f"No committed checkpoint in {store.url}.{subdirectories_hint(store)}")
        return scan.committed[-1]
    for info in reversed(scan.committed):  # two names at one step (a Keras template with a metric, fit again
        if info.step == step:                 # from scratch): the newer commit, as the newest overall is taken
            return info
    for name, error in scan.unreadable.items():
        if (parse_manifest_name(name) or ("", -1))[1] == step:
            raise error
    if any(c.step == step for c in scan.superseded):
        raise CheckpointNotFoundError(
            f"Checkpoint step {step} in {store.url} is superseded (committed in an abandoned lineage), so it is "
            f"not restored; `cloudckpt rollback {store.url} --step {step}` makes it the latest on purpose.")
    steps = [c.step for c in scan.committed]
    raise CheckpointNotFoundError(f"No committed checkpoint at step {step} in {store.url} (committed steps: {steps}).")


def _check(entry: FileEntry, size: int | None, crc: str | None, parts: tuple[str, ...] | None = None) -> FileCheck:
    """The verdict on ``entry`` given what was found; ``parts``: the per-part crc32c re-read, if any."""
    bad = tuple(i for i, (want, got) in enumerate(zip(entry.parts, parts)) if want != got) \
        if parts is not None and size == entry.size else ()
    if size is None:
        status = MISSING
    elif size != entry.size:
        status = SIZE_MISMATCH
    elif crc != entry.crc32c or bad:
        status = CHECKSUM_MISMATCH
    else:
        status = OK
    return FileCheck(entry.name, status, entry.size, size, entry.crc32c, crc, bad, entry.part_size if bad else None)


def _streams_split(store: RemoteStore, files: int) -> tuple[int, int]:
    """(files read at once, ranged GETs per file) of ``store.transfer.max_download_streams`` connections: the
    per-file split of stores without a pool (``RemoteStore.get_files`` returns {} there) and of a file
    downloaded again after a mismatch."""
    streams = store.transfer.max_download_streams
    files_at_once = max(1, min(streams, files))
    return files_at_once, max(1, streams // files_at_once)


def _mismatch(check: FileCheck) -> str:
    """What differs between a file and its manifest entry, in words."""
    if check.status == MISSING:
        return "the manifest names it but it does not exist"
    if check.status == SIZE_MISMATCH:
        return f"expected {check.expected_size} bytes, found {check.found_size}"
    return f"expected crc32c {check.expected_crc32c}, found {check.found_crc32c}"


def _integrity_error(store: RemoteStore, info: CheckpointInfo, check: FileCheck, *,
                     downloads: int = 0) -> IntegrityError:
    url = store.url_of(check.name)
    detail = _mismatch(check)
    if downloads > 1 and check.status in (SIZE_MISMATCH, CHECKSUM_MISMATCH):
        detail += f" (in each of {downloads} downloads: the store holds other bytes)"
    return IntegrityError(f"Checkpoint step {info.step} in {store.url} is corrupt: {url}: {detail}. "
                          "Restore an older step (cloudckpt ls) or re-upload this one.")


def verify_checkpoint(store: RemoteStore, info: CheckpointInfo,
                      progress: Callable[[int], None] | None = None, *,
                      use_store_checksums: bool = False,
                      objects: Iterable[RemoteObject] | None = None) -> VerifyReport:
    """Check every file of ``info`` against its manifest.

    A file missing from a fresh listing, or listed with another size than its
    manifest entry's, fails without being read. The others are re-read and
    checksummed here (``RemoteStore.read_crc32c``: the bytes are streamed and
    discarded, memory stays bounded, transient errors are retried by the
    store's ``RetryPolicy``); a file whose manifest entry records per-part
    checksums has each part checked too (``FileCheck.bad_parts``). With
    ``use_store_checksums``, a file whose crc32c as the store keeps it
    (``RemoteStore.stored_crc32c``: S3 full-object CRC32C by HEAD, GCS's
    crc32c) equals the manifest's is passed without reading it; a differing
    or absent figure is settled by re-reading. ``progress(delta_bytes)`` is
    called as bytes are read (from several threads). ``objects``: a listing of the
    directory just made (``DirectoryScan.objects``), used instead of listing it again
    (a file deleted since is read as missing).

    Raises:
        RemoteError: a file cannot be read (retries exhausted, access denied...).
    """
    sizes = {o.name: o.size for o in (store.list_objects() if objects is None else objects)}
    readable = [e for e in info.files if sizes.get(e.name) == e.size]
    files_at_once, per_file = _streams_split(store, len(readable))  # the same connection budget as a download
    stored: dict[str, str] = {}
    pooled: dict[str, tuple[int, str, tuple[str, ...]] | None] = {}

    def check(entry: FileEntry) -> FileCheck:
        size = sizes.get(entry.name)
        if size != entry.size:  # missing or of another size: no byte needs reading
            return _check(entry, size, None)
        if stored.get(entry.name) == entry.crc32c:  # a store's differing figure is confirmed by re-reading
            return _check(entry, size, stored[entry.name])
        per_part = bool(entry.parts and entry.part_size)
        read = pooled[entry.name] if entry.name in pooled else store.read_crc32c(
            entry.name, size, part_size=entry.part_size if per_part else None, progress=progress, streams=per_file)
        if read is None:  # deleted since the listing
            return _check(entry, None, None)
        return _check(entry, read[0], read[1], read[2] if per_part else None)

    # As a download: the main thread waits in slices (waits.py) and a Ctrl-C cuts the requests in flight
    # (interrupt.py); the store's HEADs and reads run in the pool, not in the main thread.
    with cancelling_pool(store, ThreadPoolExecutor(max_workers=files_at_once,
                                                    thread_name_prefix="cloudckpt-verify")) as pool:
        if use_store_checksums and readable:
            stored.update(result_of(pool.submit(store.stored_crc32c, [e.name for e in readable])))
        # Read at once through one pool of connections (the S3 transport: every file's ranges in one queue, as a
        # download); elsewhere one by one in check().
        to_read = [(e.name, e.size, e.part_size if e.parts and e.part_size else None)
                   for e in readable if stored.get(e.name) != e.crc32c]
        pooled.update(result_of(pool.submit(store.read_files_crc32c, to_read, progress,
                                            streams=store.transfer.max_download_streams)))
        by_name = {c.name: c for c in map_all(pool, check, sorted(info.files, key=lambda e: -e.size))}  # largest first
    return VerifyReport(url=info.prefix, step=info.step, files=tuple(by_name[e.name] for e in info.files),
                        superseded=info.status == "superseded")


def verify(url: str, step: int | None = None, *, name: str | None = None,
           storage_options: Mapping[str, Any] | None = None, use_store_checksums: bool = True) -> VerifyReport:
    """Check the committed checkpoint at ``url`` (latest, or ``step``, or the one named ``name``) against its
    manifest; which one as ``download_checkpoint`` picks it.

    Returns a report with one verdict per file (ok / missing / size mismatch /
    checksum mismatch); it does not raise on a mismatch. Sizes come from a
    listing. ``use_store_checksums`` (default): where the store keeps its own
    crc32c of an object (S3 full-object CRC32C, which cloudckpt's uploads
    send, read by one HEAD per file; GCS's crc32c, from the listing) and it
    equals the manifest's, the file passes without its bytes being read: that
    shows the object arrived intact, not that its bytes still read back (rot
    in the store after upload goes unseen). A differing or absent figure is
    settled by re-reading. ``use_store_checksums=False`` re-reads every byte
    (``verify_checkpoint``), as a restore does. Transient errors are retried.

    Raises:
        CheckpointNotFoundError: nothing committed (at ``step``, of that ``name``).
        ManifestError: the manifest cannot be read.
        ConfigError: both ``step`` and ``name``.
        RemoteError: the store cannot be read (retries exhausted, access denied...).
    """
    _step_or_name(step, name)
    store = RemoteStore(url, storage_options)
    return verify_checkpoint(store, _select(store, step, name), use_store_checksums=use_store_checksums)


def verify_checkpoints(
    url: str,
    step: int | None = None,
    *,
    all_steps: bool = False,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    use_store_checksums: bool = True,
    progress: Progress | None = None,
    on_report: Callable[[VerifyReport], None] | None = None,
) -> VerifyResult:
    """Check committed checkpoints of the directory at ``url`` against their manifests (``cloudckpt verify``).

    Which checkpoints: by default the newest step of the current lineage; if
    a newer manifest cannot be read, that one (reported ``unreadable``).
    ``step``: the checkpoint(s) at that step (each name committed at it), of
    the current lineage or else superseded ones. ``name``: the checkpoint of
    that name (``CheckpointInfo.name``, e.g. ``model.ckpt-30``), current or
    superseded. ``all_steps``: every committed checkpoint, superseded ones
    and unreadable manifests included, by step.

    Each checkpoint is checked as ``verify`` does: by default
    (``use_store_checksums``) a file whose crc32c as the store keeps it (S3 by
    HEAD, GCS by listing) equals the manifest's passes unread; the others, and
    every file with ``use_store_checksums=False`` (``cloudckpt verify``'s
    default), are re-read in bounded memory with transient errors retried by
    ``retry``. A checkpoint that a running writer's retention deletes while it
    is being read is reported ``retired``, not failed.
    Problems are reported, not raised. ``progress(checkpoint, bytes)`` is
    called as bytes are read (from several threads); ``on_report(report)`` as
    each checkpoint is done.

    Raises:
        CheckpointNotFoundError: nothing committed (at ``step``, of that ``name``) to verify.
        ConfigError: more than one of ``step``, ``name`` and ``all_steps``; the bucket or local directory does
            not exist.
        RemoteError: the store cannot be read.
    """
    if step is not None and all_steps:
        raise ConfigError(f"Pass step ({step}) or all_steps, not both.")
    if name is not None and all_steps:
        raise ConfigError(f"Pass name ({name!r}) or all_steps, not both.")
    _step_or_name(step, name)
    store = open_directory(url, storage_options, retry=retry)
    scan = scan_directory(store)
    reports: list[VerifyReport] = []
    for target in _verify_targets(store, scan, step, all_steps, name):
        if isinstance(target, CheckpointInfo):
            count = (lambda n, info=target: progress(info, n)) if progress is not None else None
            # The scan's listing serves every checkpoint (a retired one is told apart below).
            report = verify_checkpoint(store, target, count, use_store_checksums=use_store_checksums,
                                       objects=scan.objects)
            if not report.ok and _retired_since(store, target):
                report = replace(report, retired=True)
        else:
            report = target
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return VerifyResult(url=store.url, reports=tuple(reports))


def _verify_targets(store: RemoteStore, scan: DirectoryScan, step: int | None, all_steps: bool,
                    name: str | None = None) -> list[CheckpointInfo | VerifyReport]:
    """What ``verify_checkpoints`` checks: committed checkpoints, and unreadable manifests as failed reports."""
    if name is not None:
        named: list[CheckpointInfo | VerifyReport] = [c for c in scan.committed + scan.superseded if c.name == name]
        named += [VerifyReport(store.url_of(prefix), s, (), error=error) for s, prefix, error in
                  unreadable_by_step(scan) if prefix == name]
        if not named:
            raise no_checkpoint_named(store, name, scan.committed + scan.superseded)
        return named
    current: list[tuple[int, CheckpointInfo | VerifyReport]] = [(c.step, c) for c in scan.committed]
    current += [(s, VerifyReport(store.url_of(prefix), s, (), error=error)) for s, prefix, error in
                unreadable_by_step(scan)]
    current.sort(key=lambda t: t[0])
    superseded: list[tuple[int, CheckpointInfo | VerifyReport]] = [(c.step, c) for c in scan.superseded]
    if step is not None:
        targets = [t for t in current if t[0] == step] or [t for t in superseded if t[0] == step]
        if not targets:
            raise CheckpointNotFoundError(f"No committed checkpoint at step {step} in {store.url} "
                                          f"(committed steps: {[c.step for c in scan.committed]}).")
    elif all_steps:
        targets = sorted(current + superseded, key=lambda t: t[0])
    else:
        targets = current[-1:]
    if not targets:
        raise CheckpointNotFoundError(f"No committed checkpoint in {store.url}: nothing to verify."
                                      f"{subdirectories_hint(store)}")
    return [target for _, target in targets]


def _retired_since(store: RemoteStore, info: CheckpointInfo) -> bool:
    """True when ``info`` is no longer committed (a running writer's retention removed it meanwhile)."""
    scan = scan_directory(store)
    return all(c.commit_id != info.commit_id for c in scan.committed + scan.superseded)


def download_checkpoint(
    url: str,
    local_dir: str,
    step: int | None = None,
    *,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    transfer: TransferOptions | None = None,
) -> str:
    """Download the committed checkpoint (latest, or ``step``, or the one named ``name``) into ``local_dir``
    and verify it.

    Returns the local checkpoint prefix (e.g. ``/data/ckpt/model.ckpt-30``);
    afterwards ``tf.train.latest_checkpoint(local_dir)`` returns it. ``transfer``:
    ``TransferOptions.max_download_streams`` connections (default 8).

    Two checkpoints can share a step under different names (a Keras template
    with a metric, fit again from scratch): ``step`` takes the newer commit;
    ``name`` (``CheckpointInfo.name``, as ``cloudckpt ls`` shows it, e.g.
    ``model.ckpt-30``) picks one of the current lineage.

    A file whose size or crc32c differs from the manifest is downloaded again, up to
    ``_DOWNLOADS_ON_MISMATCH`` (3) downloads in all (INFO; a later download that matches:
    WARNING): bytes corrupted on the way differ the next time, bytes rotten in the store do not.

    Raises:
        IntegrityError: a file is missing, or its size / crc32c differs from the manifest in
            every download (nothing is changed in ``local_dir``).
        ManifestError: the manifest of ``step`` cannot be read, or (latest) a manifest newer than every
            readable one: the newest checkpoint is never skipped silently (``pull_checkpoint`` passes over
            it and says so).
        CheckpointNotFoundError: nothing committed (at ``step``, of that ``name``); a superseded one.
        ConfigError: ``local_dir`` is a file or not a path, or a download there would mix runs (the local
            directory of another URL, a checkpoint directory committed in place, one a training process
            holds); an unusable URL or ``storage_options``; both ``step`` and ``name``.
    """
    _step_or_name(step, name)
    local_dir = _local_target(local_dir)
    store = RemoteStore(url, storage_options, transfer=transfer)
    _check_target(local_dir, store)
    scan = scan_directory(store)
    return download_verified(store, select_checkpoint(store, scan, step, name=name), local_dir,
                             objects=scan.objects)


def _local_target(local_dir: "str | os.PathLike[str]") -> str:
    """The directory a download goes to, checked before anything is read: a path, not a file."""
    local_dir = as_url(local_dir, "local_dir")
    if os.path.exists(local_dir) and not os.path.isdir(local_dir):
        raise ConfigError(f"local_dir {local_dir!r} is a file, not a directory: pass a directory to download into.")
    return local_dir


def _check_target(local_dir: str, store: RemoteStore) -> None:
    """Refuse a ``local_dir`` where a checkpoint of ``store`` would mix runs (``localdir.check_download_target``)."""
    check_download_target(local_dir, store.url, source=store.root if store.is_local else None)


def pull_checkpoint(
    url: str,
    local_dir: str,
    step: int | None = None,
    *,
    name: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    progress: Progress | None = None,
    transfer: TransferOptions | None = None,
) -> PullResult:
    """Download a committed checkpoint into ``local_dir`` and verify it (``cloudckpt pull``).

    Which checkpoint: ``step`` (the newer commit when two names share it),
    ``name`` (``CheckpointInfo.name``, e.g. ``model.ckpt-30``), or by default
    the latest committed one (the head of the current lineage). Unlike ``download_checkpoint``, newer
    checkpoints whose manifests cannot be read do not stop a pull of the
    latest readable one: they are named in ``PullResult.passed_over``.
    Every file is checked (size, crc32c) before it is moved into place and the
    local ``checkpoint`` state file is written last, so a failed pull leaves
    ``local_dir`` as it was. ``progress(checkpoint, bytes)`` is called as bytes
    arrive (from several threads). ``transfer``: ``TransferOptions.max_download_streams``
    connections (default 8).

    Raises:
        CheckpointNotFoundError: nothing committed (at ``step``, of that ``name``); ``step`` / ``name`` is
            superseded (see ``rollback``).
        IntegrityError: a file is missing or differs from the manifest (``ManifestError``: the manifest of
            ``step`` cannot be read).
        ConfigError: ``local_dir`` is a file or a download there would mix runs (as ``download_checkpoint``);
            the bucket or remote local directory does not exist; both ``step`` and ``name``.
        RemoteError: the store cannot be read.
    """
    _step_or_name(step, name)
    local_dir = _local_target(local_dir)
    store = open_directory(url, storage_options, retry=retry, transfer=transfer)
    _check_target(local_dir, store)
    scan = scan_directory(store)
    passed_over: tuple[int, ...] = ()
    if step is None and name is None:
        if not scan.committed:
            raise CheckpointNotFoundError(f"No committed checkpoint in {store.url}: nothing to pull."
                                          f"{subdirectories_hint(store)}")
        info = scan.committed[-1]
        passed_over = tuple(s for s, _, _ in unreadable_by_step(scan) if s > info.step)
    else:
        info = select_checkpoint(store, scan, step, name=name)
    count = (lambda n: progress(info, n)) if progress is not None else None
    local_prefix = download_verified(store, info, local_dir, progress=count, objects=scan.objects)
    return PullResult(url=store.url, checkpoint=info, local_prefix=local_prefix, passed_over=passed_over)


def download_verified(store: RemoteStore, info: CheckpointInfo, local_dir: str,
                      progress: Callable[[int], None] | None = None, *,
                      objects: Iterable[RemoteObject] | None = None) -> str:
    """Download ``info`` into ``local_dir`` through a temporary directory; see ``download_checkpoint``.

    ``progress(delta_bytes)`` is called as bytes arrive (from several threads). ``objects``: a listing
    of the directory just made (``DirectoryScan.objects``), used instead of listing it again.
    """
    local_dir = os.path.abspath(local_dir)
    created = []  # the directories this download creates, deepest first: removed again if it fails
    missing = local_dir
    while not os.path.exists(missing) and os.path.dirname(missing) != missing:
        created.append(missing)
        missing = os.path.dirname(missing)
    try:
        return _download_verified(store, info, local_dir, progress, objects)
    except BaseException as exc:
        for directory in created:  # local_dir as it was: not there
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty (another download into it), or never made
        code = local_disk_errno(exc) if isinstance(exc, (RemoteError, OSError)) else None
        if code is None:
            raise
        raise RemoteError(  # this machine's disk, not the store: say which directory and how much it needs
            f"Downloading checkpoint step {info.step} of {store.url} into {local_dir} failed: {os.strerror(code)} "
            f"({LOCAL_DISK_HINTS[code]}; the checkpoint takes {human_size(info.size)}).",
            url=store.url, transient=False) from exc


def _download_verified(store: RemoteStore, info: CheckpointInfo, local_dir: str,
                       progress: Callable[[int], None] | None, objects: Iterable[RemoteObject] | None) -> str:
    os.makedirs(local_dir, exist_ok=True)
    listed = {o.name: o.size for o in (store.list_objects() if objects is None else objects)}
    for entry in info.files:
        if entry.name not in listed:
            raise _integrity_error(store, info, _check(entry, None, None))
    staged = DownloadStaging(local_dir)  # removes what interrupted downloads left, unless one is running
    staging = staged.path
    try:
        pooled: dict[str, str] = {}  # the crc32c of each file downloaded by ``get_files``

        def fetch(entry: FileEntry) -> FileCheck:
            path = os.path.join(staging, entry.name)
            first = ""  # how the first download differed
            for attempt in range(1, _DOWNLOADS_ON_MISMATCH + 1):
                if attempt == 1 and entry.name in pooled:
                    crc: str | None = pooled[entry.name]
                else:  # listed at the manifest's size: no HEAD to size it (another size is found by the GETs)
                    known = entry.size if listed[entry.name] == entry.size else None
                    crc = store.get_file(entry.name, path, progress, streams=per_file, size=known)  # of what it wrote
                if crc is None:
                    size, crc = crc32c_of_file(path)
                else:
                    size = os.path.getsize(path)
                check = _check(entry, size, crc)
                if check.status == OK and attempt > 1:
                    log.warning("%s of checkpoint step %d: download %d of %d matches its manifest; the earlier "
                                "one(s) did not (%s): bytes corrupted on the way, not in the store.",
                                store.url_of(entry.name), info.step, attempt, _DOWNLOADS_ON_MISMATCH, first)
                if check.status == OK or attempt == _DOWNLOADS_ON_MISMATCH:
                    return check  # every download differed: the IntegrityError says so
                first = first if attempt > 1 else _mismatch(check)
                log.info("%s of checkpoint step %d does not match its manifest (%s); downloading it again: "
                         "bytes corrupted on the way differ the next time, bytes rotten in the store do not.",
                         store.url_of(entry.name), info.step, _mismatch(check))
                if progress is not None:
                    progress(-size)  # counted again by the next download
            raise AssertionError("unreachable")

        files_at_once, per_file = _streams_split(store, len(info.files))
        # Files listed at their manifest's size go all at once through one pool of connections (the S3
        # transport: every file's ranges in one queue); the rest, and every later download, one by one.
        at_size = [(e.name, os.path.join(staging, e.name), e.size) for e in info.files if listed[e.name] == e.size]
        with cancelling_pool(store, ThreadPoolExecutor(max_workers=files_at_once,
                                                        thread_name_prefix="cloudckpt-get")) as pool:
            pooled.update(result_of(pool.submit(store.get_files, at_size, progress,
                                                streams=store.transfer.max_download_streams)))
            # largest first; as Executor.map: the first failure cancels the files not started
            checks = map_all(pool, fetch, sorted(info.files, key=lambda e: -e.size))
        for check in checks:
            if check.status != OK:
                raise _integrity_error(store, info, check, downloads=_DOWNLOADS_ON_MISMATCH)
        # The marker (TF: the .index) goes last: a checkpoint counts as present locally once it is there.
        layout = get_layout(info.layout)
        for entry in sorted(info.files, key=lambda f: layout.is_marker(f.name)):
            os.replace(os.path.join(staging, entry.name), os.path.join(local_dir, entry.name))
        if info.layout == DEFAULT_LAYOUT:
            write_local_state_file(local_dir, info.name)  # the latest; the other local ones listed too
    finally:
        staged.remove()
    log.info("Restored checkpoint step %d from %s into %s (%d files, %s, verified).", info.step,
             store.url, local_dir, len(info.files), human_size(info.size))
    return os.path.join(local_dir, info.name)


