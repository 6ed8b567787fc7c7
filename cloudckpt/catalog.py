"""What is in a remote checkpoint directory: committed checkpoints, and debris.

Only checkpoints with a readable manifest are committed. Files of a prefix
without a manifest (an upload cut short by a crash) are reported as
incomplete, never as checkpoints to restore.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping

from .commit import committed_prefixes
from .errors import ManifestError
from .manifest import FileEntry, Manifest, manifest_name, parse_checkpoint_file_name, parse_manifest
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

    committed: list[CheckpointInfo]
    incomplete: list[IncompleteCheckpoint]
    unreadable: dict[str, ManifestError]  # manifest name -> why it cannot be read
    objects: list[RemoteObject]


def info_from_manifest(store: RemoteStore, manifest: Manifest) -> CheckpointInfo:
    """A CheckpointInfo for a parsed manifest in ``store``."""
    return CheckpointInfo(step=manifest.step, prefix=store.url_of(manifest.prefix), files=manifest.files,
                          created_at=manifest.created_at, manifest_url=store.url_of(manifest.name))


def scan_directory(store: RemoteStore) -> DirectoryScan:
    """List the directory once and read every manifest in it."""
    objects = store.list_objects()
    names = [o.name for o in objects]
    committed: list[CheckpointInfo] = []
    unreadable: dict[str, ManifestError] = {}
    manifest_prefixes = committed_prefixes(names)
    for prefix, _step in manifest_prefixes:
        name = manifest_name(prefix)
        data = store.read_bytes(name)
        if data is None:  # deleted between listing and reading
            continue
        try:
            manifest = parse_manifest(data, url=store.url_of(name))
            if manifest.prefix != prefix or manifest.step != _step or any(
                    not f.name.startswith(prefix + ".") for f in manifest.files):
                raise ManifestError(f"Manifest {store.url_of(name)} describes {manifest.prefix!r} (step "
                                    f"{manifest.step}), not the checkpoint its name says; it cannot be trusted.")
            committed.append(info_from_manifest(store, manifest))
        except ManifestError as exc:
            unreadable[name] = exc
    with_manifest = {p for p, _ in manifest_prefixes}
    debris: dict[tuple[str, int], list[RemoteObject]] = defaultdict(list)
    for obj in objects:
        parsed = parse_checkpoint_file_name(obj.name)
        if parsed and parsed[0] not in with_manifest:
            debris[parsed].append(obj)
    incomplete = [IncompleteCheckpoint(step, store.url_of(prefix), tuple(objs))
                  for (prefix, step), objs in sorted(debris.items(), key=lambda kv: kv[0][1])]
    committed.sort(key=lambda c: c.step)
    return DirectoryScan(committed, incomplete, unreadable, objects)


def list_checkpoints(url: str, storage_options: Mapping[str, Any] | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints in the directory at ``url``, ascending by step.

    Raises:
        ManifestError: a manifest in the directory cannot be read (corrupt, or
            written by a newer cloudckpt); it is named in the message.
        RemoteError / ConfigError: the directory cannot be listed.
    """
    scan = scan_directory(RemoteStore(url, storage_options))
    if scan.unreadable:
        raise next(iter(scan.unreadable.values()))
    return scan.committed


def latest_checkpoint(url: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo | None:
    """The committed checkpoint with the highest step at ``url``, or None if nothing is committed."""
    checkpoints = list_checkpoints(url, storage_options)
    return checkpoints[-1] if checkpoints else None
