"""The commit protocol: what makes a checkpoint in a remote directory "committed".

Order, and why:
1. upload every file of the checkpoint (partial objects are harmless: nothing points at them);
2. check each remote size against the local file (catches truncated uploads);
3. write ``<prefix>.manifest.json`` atomically: THE commit point;
4. rewrite the remote ``checkpoint`` state file (relative paths, committed checkpoints only).

A reader that trusts only manifests therefore never sees a half-written
checkpoint. A committed checkpoint is never overwritten: saving a step that is
already committed (TF saves right after restoring) keeps the committed one.
"""

from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import sys
from multiprocessing.pool import ThreadPool
from typing import Any, Callable, Iterable, Protocol
from dataclasses import dataclass, field

from ._version import __version__
from .errors import IntegrityError, ManifestError
from .manifest import (
    Manifest,
    entry_for,
    manifest_name,
    parse_checkpoint_file_name,
    parse_manifest,
    parse_manifest_name,
)
from .remote import RemoteStore

log = logging.getLogger("cloudckpt")


class Mapper(Protocol):
    """A thread pool's ``map`` (concurrent.futures' lazy one or multiprocessing's eager one)."""

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> Iterable[Any]: ...


STATE_FILE = "checkpoint"
GRAPH_FILE = "graph.pbtxt"


@dataclass(frozen=True)
class LocalCheckpoint:
    """The files of one saved checkpoint on local disk, ready to commit.

    Attributes:
        step: global step of the checkpoint.
        prefix: checkpoint prefix relative to the directory, e.g. ``model.ckpt-30``.
        files: remote name -> local path of each file the manifest will list.
        extras: files uploaded alongside but not part of the checkpoint (``graph.pbtxt``).
    """

    step: int
    prefix: str
    files: dict[str, str]
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        """Bytes on local disk of the checkpoint's files."""
        return sum(os.path.getsize(p) for p in self.files.values())


@dataclass(frozen=True)
class CommitResult:
    """What ``commit_checkpoint`` did."""

    manifest: Manifest
    bytes_uploaded: int
    already_committed: bool


def find_local_checkpoint(directory: str, prefix: str) -> LocalCheckpoint | None:
    """The files the Saver wrote for ``prefix`` (e.g. ``model.ckpt-30``) in ``directory``, or None."""
    files: dict[str, str] = {}
    for path in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + ".*")):
        name = os.path.basename(path)
        parsed = parse_checkpoint_file_name(name)
        if parsed and parsed[0] == prefix and os.path.isfile(path):
            files[name] = path
    if not any(n.endswith(".index") for n in files):
        return None
    step = int(prefix.rsplit("-", 1)[1])
    return LocalCheckpoint(step=step, prefix=prefix, files=files)


def local_checkpoint_prefixes(directory: str) -> list[str]:
    """Prefixes (``model.ckpt-30``) of the checkpoints in a local directory (an ``.index`` file), oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = {parsed for name in names if name.endswith(".index") and (parsed := parse_checkpoint_file_name(name))}
    return [prefix for prefix, _ in sorted(found, key=lambda p: (p[1], p[0]))]


def tensorflow_version() -> str:
    """The TensorFlow version, without importing TensorFlow if it is not loaded yet."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and getattr(tf, "__version__", None):
        return str(tf.__version__)
    for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def build_manifest(ckpt: LocalCheckpoint, executor: Mapper | None = None) -> Manifest:
    """Checksum every file of ``ckpt`` (concurrently when an executor is given)."""
    names = sorted(ckpt.files)
    if executor is None:
        entries = [entry_for(n, ckpt.files[n]) for n in names]
    else:
        entries = list(executor.map(lambda n: entry_for(n, ckpt.files[n]), names))
    return Manifest(step=ckpt.step, prefix=ckpt.prefix, files=tuple(entries),
                    tensorflow=tensorflow_version(), cloudckpt=__version__)


def read_manifest(store: RemoteStore, prefix: str) -> Manifest | None:
    """The committed manifest of ``prefix``, or None if it is not committed."""
    name = manifest_name(prefix)
    data = store.read_bytes(name)
    return None if data is None else parse_manifest(data, url=store.url_of(name))


def commit_checkpoint(
    store: RemoteStore,
    ckpt: LocalCheckpoint,
    *,
    executor: Mapper | None = None,
    manifest: Manifest | None = None,
) -> CommitResult:
    """Upload ``ckpt`` to ``store`` and commit it with its manifest (see module docstring).

    Args:
        store: the remote checkpoint directory.
        ckpt: the local files (they must not change while this runs: pass a snapshot).
        executor: runs file uploads and checksums concurrently; sequential if None.
        manifest: a precomputed manifest for ``ckpt`` (computed here if None).

    Raises:
        RemoteError: an upload or write failed after retries.
        IntegrityError: a remote size did not match after upload.
    """
    own_pool = executor is None
    pool = executor or ThreadPool(4)
    try:
        manifest = manifest or build_manifest(ckpt, pool)
        # List rather than probe: with a prefix-restricted IAM policy, S3 answers a GET of a missing
        # key with 403, not 404.
        remote_sizes = {o.name: o.size for o in store.list_objects()}
        existing = None
        if manifest.name in remote_sizes:
            try:
                existing = read_manifest(store, ckpt.prefix)
            except ManifestError as exc:  # it never vouched for anything: replace it
                log.warning("Replacing unreadable manifest of step %d: %s", ckpt.step, exc)
                store.delete([manifest.name])
                write_state_file(store)
        if existing is not None:
            return _keep_committed(store, ckpt, manifest, existing, remote_sizes, pool)

        uploads = {**ckpt.extras, **ckpt.files}
        list(pool.map(lambda item: store.put_file(item[1], item[0]), sorted(uploads.items())))

        remote_sizes = {o.name: o.size for o in store.list_objects()}
        for entry in manifest.files:
            found = remote_sizes.get(entry.name)
            if found != entry.size:
                raise IntegrityError(
                    f"Uploaded {store.url_of(entry.name)} has size {found}, expected {entry.size}; "
                    "the checkpoint was not committed.")

        store.write_atomic(manifest.name, manifest.to_json())
        write_state_file(store)
        return CommitResult(manifest, sum(os.path.getsize(p) for p in uploads.values()), already_committed=False)
    finally:
        if own_pool:
            pool.close()
            pool.join()


def _keep_committed(store: RemoteStore, ckpt: LocalCheckpoint, manifest: Manifest, existing: Manifest,
                    remote_sizes: dict[str, int], pool: Mapper) -> CommitResult:
    """A save of a step that is already committed (typically the save TF makes right after a restore).

    A committed checkpoint is never taken apart: if the tensors differ, the
    committed one stays and this save is not uploaded. If they are the same,
    objects that went missing or were truncated are re-uploaded from the
    local copy, whose bytes the manifest already vouches for.
    """
    if not existing.same_tensors(manifest):
        log.warning("Step %d is already committed in %s with different tensor data; keeping the committed "
                    "checkpoint and not uploading this save (a run restarted from an older state?).",
                    ckpt.step, store.url)
        return CommitResult(existing, 0, already_committed=True)
    mine = {f.name: f for f in manifest.files}
    broken = [f.name for f in existing.files if remote_sizes.get(f.name) != f.size and mine.get(f.name) == f]
    if broken:
        log.warning("Re-uploading %s of committed step %d: missing or truncated in the store.", broken, ckpt.step)
        list(pool.map(lambda name: store.put_file(ckpt.files[name], name), broken))
    write_state_file(store)
    return CommitResult(existing, sum(mine[n].size for n in broken), already_committed=True)


def committed_prefixes(names: list[str]) -> list[tuple[str, int]]:
    """(prefix, step) of every manifest among object ``names``, ascending by step."""
    found = [p for p in (parse_manifest_name(n) for n in names) if p is not None]
    return sorted(found, key=lambda p: (p[1], p[0]))


def render_state_file(prefixes: list[str]) -> bytes:
    """TF's ``checkpoint`` state file (text proto) naming ``prefixes``, the last one as latest.

    Paths are relative, so the directory stays valid wherever it is copied or
    mounted. Strings are escaped as TF writes them (protobuf text format,
    UTF-8 kept), so any basename the Saver accepts reads back unchanged.
    """
    lines = [f'model_checkpoint_path: "{_text_proto_escape(prefixes[-1])}"']
    lines += [f'all_model_checkpoint_paths: "{_text_proto_escape(p)}"' for p in prefixes]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


# protobuf's text_encoding.CEscape(as_utf8=True): what TF's update_checkpoint_state writes.
_TEXT_PROTO_ESCAPES = {i: f"\\{i:03o}" for i in [*range(32), 127]}
_TEXT_PROTO_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord('"'): '\\"',
                            ord("'"): "\\'", ord("\\"): "\\\\"})


def _text_proto_escape(text: str) -> str:
    return text.translate(_TEXT_PROTO_ESCAPES)


def write_state_file(store: RemoteStore) -> None:
    """Rewrite the remote state file from the committed manifests (removed if none is left)."""
    prefixes = [p for p, _ in committed_prefixes([o.name for o in store.list_objects()])]
    if prefixes:
        store.write_atomic(STATE_FILE, render_state_file(prefixes))
    else:
        store.delete([STATE_FILE])


