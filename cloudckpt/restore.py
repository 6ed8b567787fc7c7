"""Getting committed checkpoints back: verify in place, or download and verify into a local directory.

A download lands under a hidden temporary directory and is moved into place
only after every file matches its manifest (size and crc32c); the local
``checkpoint`` state file is written last. A failed or interrupted download
therefore never changes what ``tf.train.latest_checkpoint`` returns.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .catalog import CheckpointInfo, DirectoryScan, scan_directory
from .errors import CloudCkptError, IntegrityError
from .layout import DEFAULT_LAYOUT, STATE_FILE, get_layout, parse_manifest_name, render_state_file
from .manifest import FileEntry, crc32c_of_file, crc32c_of_stream
from .remote import RemoteStore

log = logging.getLogger("cloudckpt")

OK, MISSING, SIZE_MISMATCH, CHECKSUM_MISMATCH = "ok", "missing", "size mismatch", "checksum mismatch"
_DOWNLOAD_CONCURRENCY = 8
DOWNLOAD_STAGING_PREFIX = ".cloudckpt-download-"


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


@dataclass(frozen=True)
class VerifyReport:
    """Result of re-reading one committed checkpoint and checking it against its manifest."""

    url: str
    step: int
    files: tuple[FileCheck, ...]

    @property
    def ok(self) -> bool:
        """True when every file is present with the right size and crc32c."""
        return all(f.status == OK for f in self.files)

    @property
    def problems(self) -> list[FileCheck]:
        """The files that failed."""
        return [f for f in self.files if f.status != OK]


def _select(store: RemoteStore, step: int | None) -> CheckpointInfo:
    return select_checkpoint(store, scan_directory(store), step)


def select_checkpoint(store: RemoteStore, scan: DirectoryScan, step: int | None) -> CheckpointInfo:
    """The committed checkpoint at ``step`` (the newest if None) in ``scan``.

    Raises:
        CheckpointNotFoundError: nothing committed (at that step).
        ManifestError: the manifest of ``step`` (or, for the newest, a manifest newer than every
            readable one) exists but cannot be read.
    """
    if step is None:
        newest = scan.committed[-1].step if scan.committed else -1
        unreadable = sorted((((parse_manifest_name(n) or ("", -1))[1], e) for n, e in scan.unreadable.items()),
                            key=lambda item: item[0])
        if unreadable and unreadable[-1][0] > newest:  # the newest checkpoint is not silently skipped
            raise unreadable[-1][1]
        if not scan.committed:
            raise CheckpointNotFoundError(f"No committed checkpoint in {store.url}.")
        return scan.committed[-1]
    for info in scan.committed:
        if info.step == step:
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


def _check(entry: FileEntry, size: int | None, crc: str | None) -> FileCheck:
    if size is None:
        status = MISSING
    elif size != entry.size:
        status = SIZE_MISMATCH
    elif crc != entry.crc32c:
        status = CHECKSUM_MISMATCH
    else:
        status = OK
    return FileCheck(entry.name, status, entry.size, size, entry.crc32c, crc)


def _integrity_error(store: RemoteStore, info: CheckpointInfo, check: FileCheck) -> IntegrityError:
    url = store.url_of(check.name)
    if check.status == MISSING:
        detail = "the manifest names it but it does not exist"
    elif check.status == SIZE_MISMATCH:
        detail = f"expected {check.expected_size} bytes, found {check.found_size}"
    else:
        detail = f"expected crc32c {check.expected_crc32c}, found {check.found_crc32c}"
    return IntegrityError(f"Checkpoint step {info.step} in {store.url} is corrupt: {url}: {detail}. "
                          "Restore an older step (cloudckpt ls) or re-upload this one.")


def verify_checkpoint(store: RemoteStore, info: CheckpointInfo,
                      progress: Callable[[int], None] | None = None, *,
                      use_store_checksums: bool = False) -> VerifyReport:
    """Check every file of ``info`` against its manifest.

    Files are re-read (streamed) and checksummed here, unless
    ``use_store_checksums`` and the store reports its own crc32c of the stored
    bytes (GCS): then no byte is downloaded. ``progress(delta_bytes)`` is
    called as bytes are read (from several threads).
    """
    sizes = {o.name: o.size for o in store.list_objects()}
    stored = store.stored_crc32c() if use_store_checksums else {}

    def check(entry: FileEntry) -> FileCheck:
        if entry.name not in sizes:
            return _check(entry, None, None)
        if entry.name in stored:
            return _check(entry, sizes[entry.name], stored[entry.name])
        try:
            with store.open_read(entry.name) as f:
                size, crc = crc32c_of_stream(f, progress)
        except FileNotFoundError:  # deleted since the listing
            return _check(entry, None, None)
        return _check(entry, size, crc)

    with ThreadPoolExecutor(max_workers=_DOWNLOAD_CONCURRENCY, thread_name_prefix="cloudckpt-verify") as pool:
        checks = tuple(pool.map(check, info.files))
    return VerifyReport(url=info.prefix, step=info.step, files=checks)


def verify(url: str, step: int | None = None, *, storage_options: Mapping[str, Any] | None = None,
           use_store_checksums: bool = True) -> VerifyReport:
    """Check the committed checkpoint at ``url`` (latest, or ``step``) against its manifest.

    Returns a report with one verdict per file (ok / missing / size mismatch /
    checksum mismatch); it does not raise on a mismatch. Where the store keeps
    its own crc32c of each object (GCS), that is compared without downloading;
    pass ``use_store_checksums=False`` to re-read every byte.
    """
    store = RemoteStore(url, storage_options)
    return verify_checkpoint(store, _select(store, step), use_store_checksums=use_store_checksums)


def download_checkpoint(
    url: str,
    local_dir: str,
    step: int | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Download the committed checkpoint (latest, or ``step``) into ``local_dir`` and verify it.

    Returns the local checkpoint prefix (e.g. ``/data/ckpt/model.ckpt-30``);
    afterwards ``tf.train.latest_checkpoint(local_dir)`` returns it.

    Raises:
        IntegrityError: a file is missing or its size / crc32c differs from the manifest
            (nothing is changed in ``local_dir``).
        CheckpointNotFoundError: nothing committed (at ``step``).
    """
    store = RemoteStore(url, storage_options)
    return download_verified(store, _select(store, step), local_dir)


def download_verified(store: RemoteStore, info: CheckpointInfo, local_dir: str,
                      progress: Callable[[int], None] | None = None) -> str:
    """Download ``info`` into ``local_dir`` through a temporary directory; see ``download_checkpoint``.

    ``progress(delta_bytes)`` is called as bytes arrive (from several threads).
    """
    local_dir = os.path.abspath(local_dir)
    os.makedirs(local_dir, exist_ok=True)
    present = {o.name for o in store.list_objects()}
    for entry in info.files:
        if entry.name not in present:
            raise _integrity_error(store, info, _check(entry, None, None))
    staging = os.path.join(local_dir, f"{DOWNLOAD_STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        def fetch(entry: FileEntry) -> FileCheck:
            path = os.path.join(staging, entry.name)
            store.get_file(entry.name, path, progress)
            size, crc = crc32c_of_file(path)
            return _check(entry, size, crc)

        with ThreadPoolExecutor(max_workers=_DOWNLOAD_CONCURRENCY, thread_name_prefix="cloudckpt-get") as pool:
            checks = list(pool.map(fetch, info.files))
        for check in checks:
            if check.status != OK:
                raise _integrity_error(store, info, check)
        # The marker (TF: the .index) goes last: a checkpoint counts as present locally once it is there.
        layout = get_layout(info.layout)
        for entry in sorted(info.files, key=lambda f: layout.is_marker(f.name)):
            os.replace(os.path.join(staging, entry.name), os.path.join(local_dir, entry.name))
        if info.layout == DEFAULT_LAYOUT:
            _point_state_file_at(local_dir, info.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Restored checkpoint step %d from %s into %s (%d files, %.1f MB, verified).", info.step,
             store.url, local_dir, len(info.files), info.size / 1e6)
    return os.path.join(local_dir, info.name)


def _point_state_file_at(local_dir: str, prefix: str) -> None:
    """Make ``prefix`` the latest checkpoint of ``local_dir``, keeping the other local ones listed."""
    others = [p for p in get_layout(DEFAULT_LAYOUT).local_prefixes(local_dir) if p != prefix]
    tmp = os.path.join(local_dir, f".{STATE_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(render_state_file([*others, prefix]))
    os.replace(tmp, os.path.join(local_dir, STATE_FILE))
