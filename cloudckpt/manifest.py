"""The checkpoint manifest: schema, naming, serialisation and checksums.

A manifest ``<basename>-<step>.manifest.json`` lists every file of one
checkpoint with its size and crc32c. In a directory without a commit log
(version 1) its presence is the commit point; with a commit log (version 2,
``commitlog.py``) a checkpoint is committed when a log ``commit`` entry names
the manifest's ``commit_id`` and the manifest exists. Version 2 adds the
writer (``writer_id``, ``writer_epoch``), the ``commit_id`` and the ``parent``
commit in the checkpoint's lineage; version 1 manifests stay readable. A
manifest of a checkpoint that is not in TF's layout names its ``layout``
(``layout.py``); without that field it is a TF checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import google_crc32c

from .errors import ManifestError
from .s3_transport import crc32c_combine
from .layout import (DEFAULT_LAYOUT, MANIFEST_SUFFIX, TF, committed_prefixes, get_layout, manifest_name,
                     parse_manifest_name)

__all__ = ["FORMAT", "VERSION", "MANIFEST_SUFFIX", "FileEntry", "Manifest", "parse_manifest", "manifest_name",
           "parse_manifest_name", "committed_prefixes", "parse_checkpoint_file_name", "crc32c_hex",
           "crc32c_of_stream", "crc32c_of_file", "crc32c_parts_of_stream", "checksum_part_size", "entry_for",
           "utc_now_iso", "PART_SIZE"]

FORMAT = "cloudckpt.manifest"
VERSION = 2  # the newest version this cloudckpt reads (and writes, for manifests with a commit id)
_CRC_HEX = re.compile(r"^[0-9a-f]{8}$")
_READ_CHUNK = 1 << 20  # several files are checksummed at once: keep buffers small
PART_SIZE = 8 << 20  # bytes per checksummed part (>= S3's 5 MiB minimum part): the unit an incremental commit copies
MAX_PARTS = 10_000  # S3's limit of parts per multipart upload


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its name relative to the directory, size in bytes and crc32c (8 hex digits).

    Files larger than one part also record the crc32c of each ``part_size``-byte part (``parts``, in
    order; the last may be shorter; the file's crc32c is their ``crc32c_combine``) and, where the store
    reports one, the object's ``etag`` when it was committed (S3, without quotes). The next commit copies
    parts whose checksums are unchanged server-side from this object (``incremental.py``), and ``verify``
    names the parts that differ. Manifests without them (older ones, small files) stay valid.
    """

    name: str
    size: int
    crc32c: str
    part_size: int | None = None
    parts: tuple[str, ...] = ()
    etag: str | None = None

    @property
    def key(self) -> tuple[str, int, str]:
        """(name, size, crc32c): what identifies the file's content."""
        return (self.name, self.size, self.crc32c)

    def part_spans(self) -> list[tuple[int, int]]:
        """[start, end) byte offsets of each recorded part (empty without parts)."""
        if not self.parts or not self.part_size:
            return []
        return [(start, min(self.size, start + self.part_size)) for start in range(0, self.size, self.part_size)]

    def checksummed_ranges(self) -> list[tuple[int, int, int]]:
        """``(start, end, crc32c)`` covering the file in order: each recorded part, or else the whole file."""
        if self.parts and self.part_size:
            return [(start, end, int(crc, 16)) for (start, end), crc in zip(self.part_spans(), self.parts)]
        return [(0, self.size, int(self.crc32c, 16))]


@dataclass(frozen=True)
class Manifest:
    """The committed description of one checkpoint."""

    step: int
    prefix: str
    files: tuple[FileEntry, ...]
    created_at: str = field(default_factory=lambda: utc_now_iso())
    tensorflow: str = ""
    cloudckpt: str = ""
    commit_id: str | None = None  # version 2: the commit this manifest belongs to
    writer_id: str | None = None  # version 2: the writer that committed it ...
    writer_epoch: int | None = None  # ... and its epoch (log index of its registration)
    parent: str | None = None  # version 2: the commit this checkpoint descends from (None: a first checkpoint)
    layout: str = DEFAULT_LAYOUT  # how its files are named (layout.py); written only when not "tf"

    @property
    def version(self) -> int:
        """2 when the manifest belongs to a commit in a commit log, else 1."""
        return 2 if self.commit_id is not None else 1

    @property
    def name(self) -> str:
        """The manifest's object name, e.g. ``model.ckpt-30.manifest.json``."""
        return manifest_name(self.prefix)

    @property
    def total_size(self) -> int:
        """Sum of the sizes of all files, in bytes."""
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """Serialise to the on-store JSON document."""
        doc = {
            "format": FORMAT,
            "version": self.version,
            "step": self.step,
            "prefix": self.prefix,
            "created_at": self.created_at,
            "files": [_file_doc(f) for f in self.files],
            "tensorflow": self.tensorflow,
            "cloudckpt": self.cloudckpt,
        }
        if self.version >= 2:
            doc.update(commit_id=self.commit_id, writer_id=self.writer_id, writer_epoch=self.writer_epoch,
                       parent=self.parent)
        if self.layout != DEFAULT_LAYOUT:
            doc["layout"] = self.layout
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    def same_tensors(self, other: "Manifest") -> bool:
        """True when both describe the same tensors: identical files a restore reads (TF: ``.index`` and
        ``.data-*``).

        Files a restore does not read are left out (``layout.PrefixLayout.is_restored``; TF's ``.meta``,
        the graph, which TF writes slightly differently when it re-saves identical variables after a
        restore).
        """
        def key(m: "Manifest") -> list[tuple[str, int, str]]:
            restored = get_layout(m.layout).is_restored
            return sorted(f.key for f in m.files if restored(f.name))
        return self.step == other.step and self.prefix == other.prefix and self.layout == other.layout \
            and key(self) == key(other)


def parse_manifest(data: bytes, *, url: str) -> Manifest:
    """Parse and validate a manifest document; ``url`` is only used in error messages.

    Raises:
        ManifestError: malformed JSON, missing or mistyped fields, or a format
            version newer than this cloudckpt understands.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(
            f"Manifest {url} is not valid JSON ({exc}); the checkpoint it describes cannot be trusted. "
            "Delete the manifest or re-upload the checkpoint."
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(f"{url} is not a cloudckpt manifest (expected \"format\": \"{FORMAT}\").")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"Manifest {url} has an invalid version {version!r}.")
    if version > VERSION:
        raise ManifestError(
            f"Manifest {url} has format version {version}, but this cloudckpt only reads version {VERSION}. "
            "Upgrade cloudckpt (pip install -U cloudckpt) to read it."
        )
    try:
        step = doc["step"]
        prefix = doc["prefix"]
        files = tuple(_parse_file(f) for f in doc["files"])
        if not isinstance(step, int) or step < 0 or not isinstance(prefix, str) or not files:
            raise TypeError("step/prefix/files")
        lineage: dict = {}
        layout = doc.get("layout", DEFAULT_LAYOUT)
        if not isinstance(layout, str) or not layout:
            raise TypeError("layout")
        if version >= 2:
            lineage = {k: doc.get(k) for k in ("commit_id", "writer_id", "writer_epoch", "parent")}
            if not isinstance(lineage["commit_id"], str) or not lineage["commit_id"]:
                raise TypeError("commit_id")
            if not isinstance(lineage["writer_id"], str) or not isinstance(lineage["writer_epoch"], int):
                raise TypeError("writer_id/writer_epoch")
            if lineage["parent"] is not None and not isinstance(lineage["parent"], str):
                raise TypeError("parent")
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"Manifest {url} is missing or has a malformed field ({exc}).") from None
    return Manifest(
        step=step,
        prefix=prefix,
        files=files,
        created_at=str(doc.get("created_at", "")),
        tensorflow=str(doc.get("tensorflow", "")),
        cloudckpt=str(doc.get("cloudckpt", "")),
        layout=layout,
        **lineage,
    )


def _file_doc(f: FileEntry) -> dict:
    doc: dict = {"name": f.name, "size": f.size, "crc32c": f.crc32c}
    if f.parts:
        doc.update(part_size=f.part_size, parts=list(f.parts))
    if f.etag:
        doc["etag"] = f.etag
    return doc


def _parse_file(doc: dict) -> FileEntry:
    """One ``files`` entry (``TypeError``/``KeyError`` when malformed)."""
    parts = doc.get("parts", [])
    part_size = doc.get("part_size") if parts else None
    etag = doc.get("etag")
    f = FileEntry(str(doc["name"]), doc["size"], doc["crc32c"], part_size, tuple(parts), etag)
    if not isinstance(f.size, int) or f.size < 0 or not isinstance(f.crc32c, str) or not _CRC_HEX.match(f.crc32c):
        raise TypeError(f"file entry {f.name!r}")
    if "/" in f.name or f.name in ("", ".", ".."):
        raise TypeError(f"file name {f.name!r}")
    if parts and (not isinstance(parts, list) or not isinstance(part_size, int) or isinstance(part_size, bool)
                  or part_size < 1 or len(parts) != -(-f.size // part_size)
                  or not all(isinstance(p, str) and _CRC_HEX.match(p) for p in parts)):
        raise TypeError(f"parts of file entry {f.name!r}")
    if etag is not None and not isinstance(etag, str):
        raise TypeError(f"etag of file entry {f.name!r}")
    return f


def parse_checkpoint_file_name(name: str) -> tuple[str, int] | None:
    """``model.ckpt-30.index`` -> (``model.ckpt-30``, 30); None for names the TF Saver does not write
    (``layout.TF.parse_file``)."""
    return TF.parse_file(name)


def utc_now_iso() -> str:
    """The current time as ISO-8601 UTC with a ``Z`` suffix, second precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def crc32c_hex(data: bytes) -> str:
    """crc32c of ``data`` as 8 lowercase hex digits (the manifest's encoding)."""
    return f"{google_crc32c.value(data):08x}"


def crc32c_of_stream(stream: BinaryIO, progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Read ``stream`` to the end in bounded chunks; return (size, crc32c hex).

    ``progress(n)`` is called with the size of each chunk read.
    """
    checksum = google_crc32c.Checksum()
    size = 0
    while chunk := stream.read(_READ_CHUNK):
        checksum.update(chunk)
        size += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return size, checksum.digest().hex()


def crc32c_of_file(path: str) -> tuple[int, str]:
    """(size, crc32c hex) of a local file, streamed so memory stays bounded."""
    with open(path, "rb") as f:
        return crc32c_of_stream(f)


def checksum_part_size(size: int) -> int:
    """Bytes per checksummed part of a ``size``-byte file: ``PART_SIZE``, or larger (whole MiB) to stay
    within S3's 10,000 parts."""
    return max(PART_SIZE, -(-size // (MAX_PARTS << 20)) << 20)


def crc32c_parts_of_stream(stream: BinaryIO, part_size: int,
                           progress: Callable[[int], None] | None = None) -> tuple[int, str, tuple[str, ...]]:
    """Read ``stream`` to the end in bounded chunks; (size, crc32c hex, crc32c hex of each ``part_size``-byte
    part). The whole crc32c is combined from the parts' (no second pass over the bytes)."""
    parts: list[int] = []
    lengths: list[int] = []
    size = 0
    while True:
        checksum = google_crc32c.Checksum()
        length = 0
        while length < part_size and (chunk := stream.read(min(_READ_CHUNK, part_size - length))):
            checksum.update(chunk)
            length += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if not length:
            break
        parts.append(int.from_bytes(checksum.digest(), "big"))
        lengths.append(length)
        size += length
    whole = parts[0] if parts else 0
    for crc, length in zip(parts[1:], lengths[1:]):
        whole = crc32c_combine(whole, crc, length)
    return size, f"{whole:08x}", tuple(f"{p:08x}" for p in parts)


def entry_for(name: str, path: str) -> FileEntry:
    """Build a manifest entry for local file ``path`` stored remotely as ``name`` (with per-part crc32c
    when it is larger than one part: ``checksum_part_size``)."""
    part_size = checksum_part_size(os.path.getsize(path))
    with open(path, "rb") as f:
        size, crc, parts = crc32c_parts_of_stream(f, part_size)
    if len(parts) < 2:
        return FileEntry(name=name, size=size, crc32c=crc)
    return FileEntry(name=name, size=size, crc32c=crc, part_size=part_size, parts=parts)
