"""Incremental commits: the parts of a new checkpoint that the store copies from the previous one.

TF's tensor bundle writes tensors contiguously in a fixed order without
padding: when shapes do not change, every tensor keeps its byte offsets in
``.data-*`` from one save to the next, and a tensor that did not change (a
frozen backbone while fine-tuning) keeps its bytes. The manifest records the
crc32c of each ``manifest.PART_SIZE`` part of every file (``FileEntry.parts``)
and the object's ETag once committed. The next commit of the same writer
matches each of its files with the same file of the previous committed
checkpoint in its lineage (the writer's head; the prefix swapped:
``model.ckpt-20.data-00000-of-00001`` <- ``model.ckpt-10.data-00000-of-00001``):
same part size, and a part with the same byte range and crc32c in both is
copied server-side (S3 ``UploadPartCopy``); the others are uploaded (a file
that grew keeps its parts before the change). The committed
objects are complete, independent objects: deleting the older checkpoint
afterwards (retention) leaves them intact.

Full uploads, unchanged from before, whenever a file has no such source: on
stores without range copies (GCS, memory, local, s3 through s3fs), for the
first checkpoint of a writer with no previous one, a source manifest without
part checksums or ETag (written by an older cloudckpt), or when less than
``MIN_COPY_BYTES`` is unchanged (dense training). A source that is gone, has
another ETag and checksum than its manifest records (rewritten), cannot be
copied, or whose copied bytes the store vouches for differently (the copy's
crc32c, or its MD5 ETag where the store reports no checksum) has those parts
uploaded from the local file instead (``S3Transport.put_file_copying``). A store
that reports no checksum of a copy and whose part ETags are not MD5s cannot
vouch for any copy: one warning, and its transport uploads in full from then on.

An equal byte range and crc32c are taken as equal bytes: the same 32-bit
check that vouches for every file of a manifest.
"""

from __future__ import annotations

import logging

from .catalog import read_committed_manifest
from .errors import ManifestError
from .lineage import LogState
from .manifest import FileEntry, Manifest
from .remote import RemoteStore
from .writers import Writer

__all__ = ["copy_source", "source_entry", "copy_chunks", "upload_file", "MIN_COPY_BYTES"]

log = logging.getLogger("cloudckpt")

# Unchanged bytes below this are uploaded with the rest: a copy costs a HEAD and a multipart upload of its own
# (S3's minimum part size, 5 MiB: a smaller run can only be a file's tail).
MIN_COPY_BYTES = 5 << 20


def copy_source(writer: Writer, state: LogState, prefix: str) -> Manifest | None:
    """The manifest of the checkpoint the next commit of ``prefix`` copies from: the head of the writer's
    lineage, if it is live, another checkpoint, and its store copies parts; else None.

    Read from ``ManifestCache`` (the writer committed it) or with one GET; never a listing.
    """
    store = writer.store
    head = writer.head
    if not store.copies_parts or head is None or head in state.retired:
        return None
    record = state.commits.get(head)
    if record is None or record.legacy or record.prefix == prefix:
        return None
    try:
        manifest = read_committed_manifest(store, record, None)
    except ManifestError as exc:
        log.info("Not copying from step %d: its manifest cannot be read (%s).", record.step, exc)
        return None
    if manifest is None or manifest.commit_id != record.commit_id:
        return None
    return manifest


def source_entry(name: str, prefix: str, source: Manifest) -> FileEntry | None:
    """The file of ``source`` that file ``name`` of checkpoint ``prefix`` corresponds to (prefix swapped)."""
    if not name.startswith(prefix):
        return None
    wanted = source.prefix + name[len(prefix):]
    return next((f for f in source.files if f.name == wanted), None)


def copy_chunks(entry: FileEntry, previous: FileEntry) -> list[tuple[int, int, int, bool]] | None:
    """``(start, end, crc32c, copy)`` for each part of ``entry``: ``copy`` where ``previous`` (the same
    file of the source checkpoint) has a part with the same byte range and checksum. A file that grew or
    shrank keeps the parts before the change (a ``tf.data`` iterator's state, saved last, grows the data
    file by a few bytes at every save). None when copying would not pay: part sizes differ, checksums
    missing, less than ``MIN_COPY_BYTES`` unchanged. (Whether ``previous`` can be copied from at all, its
    ETag known, is ``upload_file``'s check.)"""
    if not entry.parts or not previous.parts or entry.part_size != previous.part_size:
        return None
    before = {(start, end): crc for start, end, crc in previous.checksummed_ranges()}
    chunks = [(start, end, crc, before.get((start, end)) == crc) for start, end, crc in entry.checksummed_ranges()]
    if sum(end - start for start, end, _, copy in chunks if copy) < MIN_COPY_BYTES:
        return None
    return chunks


def upload_file(store: RemoteStore, name: str, path: str, entry: FileEntry | None,
                source: Manifest | None, prefix: str) -> int | None:
    """Upload ``path`` create-only as ``name`` (``entry``: its manifest entry), copying unchanged parts
    from ``source`` where it can. Bytes copied server-side, or None when ``name`` exists already."""
    previous = source_entry(name, prefix, source) if source is not None and entry is not None else None
    # no ETag recorded for the source file (an older manifest): nothing to copy from
    if entry is None or previous is None or previous.etag is None \
            or (chunks := copy_chunks(entry, previous)) is None:
        checksums = entry.checksummed_ranges() if entry is not None else None  # the file is not read again
        return 0 if store.put_file_if_absent(path, name, checksums) else None
    copied = store.put_file_if_absent_copying(path, name, chunks, previous.name, previous.etag, previous.crc32c)
    if copied:
        log.debug("%s: %d of %d bytes copied from %s.", name, copied, entry.size, previous.name)
    return copied
