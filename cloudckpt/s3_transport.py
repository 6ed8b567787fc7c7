"""The bulk-data transport for ``s3://``: checkpoint files up and down over plain HTTP/1.1.

``S3Transport`` moves whole files between local disk and S3 with as little
client CPU and memory as the job allows, and nothing else: listing, small
objects and deletes stay on fsspec (s3fs), which ``RemoteStore`` owns.

* A file smaller than ``multipart_threshold`` (200 MiB), or no larger than
  ``part_size``, goes in one PutObject; a larger one in a multipart upload of
  ``part_size`` parts (as does a file some of whose parts are copied, ``put_file_copying``).
  Uploads send each part's bytes with ``socket.sendfile`` (the kernel copies
  page cache to the socket; no Python buffer holds the part) with the part's
  crc32c (combined from the manifest's, or one streaming pass). Every request carries
  ``x-amz-checksum-crc32c``: the store rejects a corrupted body (``BadDigest``,
  a transient error, so the caller's retry policy re-sends it). Multipart
  uploads use S3's full-object CRC32C (``x-amz-checksum-type: FULL_OBJECT``):
  the stored checksum is the file's own crc32c, the manifest's, which
  ``stored_crc32c`` reads back for ``verify``. A store that refuses the checksum headers
  (``NotImplemented``...) gets ``Content-MD5`` instead, S3's original body check (one more read
  of the bytes, on such stores only).
* Create-only writes (``create=True``) carry ``If-None-Match: *`` on the
  PutObject or the CompleteMultipartUpload: the store refuses to replace an
  existing object (``FileExistsError``). A store that refuses the header itself (``NotImplemented``:
  no conditional writes, which the commit protocol needs) raises ``ConfigError`` at once, not retried;
  one that refuses the checksum headers alongside it is told apart by one attempt without them.
  A retried create-only PutObject or CompleteMultipartUpload that fails (412 or any error: the first
  attempt may have gone through, its answer lost) is settled by one HEAD: the object is this upload's
  when its size and the store's crc32c, or its ETag (the MD5 of the bytes; the ETag the parts' ETags make),
  are this upload's.
* Downloads issue ranged GETs in parallel (as many ranges as streams, up to
  ``4 x range_size`` each; for several files, ``get_files_crc32c``, one queue of
  every file's ranges, largest file first, and no HEAD: the sizes are the listing's)
  and write each range at its offset (``os.pwrite``)
  in ``READ_BUFFER`` chunks: memory stays at ``ranges in flight x READ_BUFFER``
  whatever the file size. Each chunk goes to the file in ``WRITE_SLICE`` writes
  (see there: on Linux >= 6.16's ext4, larger writes cost the kernel up to 3-9x more).
  Each chunk's crc32c is taken as it is written, so ``get_file_crc32c``
  returns the checksum of the bytes in the file without reading it back (a
  restore checks it against the manifest). ``crc32c_of_object`` makes the same
  ranged GETs for a re-reading ``verify`` and keeps no byte.
* Every request goes through the ``call`` wrapper its caller passes (the
  store's ``RetryPolicy``: one retry layer, counted by cause, cancellable);
  HTTP errors become ``S3ResponseError`` (an ``OSError`` with botocore's
  ``response`` shape, so ``cloudckpt.retry`` classifies them) chained under
  the builtin s3fs raises for the same answer (``FileNotFoundError``,
  ``PermissionError``, ``FileExistsError``). Messages name the bucket and key,
  never a credential or a signed header.
* Cancellation (``S3Transport.cancel`` set by the owner giving up: Ctrl-C,
  an abandoned upload): no request starts any more, a request in flight
  stops within ``SEND_SLICE`` bytes of its body (sent in slices) or one
  ``READ_BUFFER`` chunk of a download (``TransferCancelled``), at once when
  its connection is stalled (``abort_requests`` shuts its socket), and a
  multipart upload that stops so is aborted (that DELETE is the one request
  still sent).

Why not obstore 0.12.1 (Rust ``object_store``): by its API, its S3 checksums are
SHA256/CRC64NVME only, and its create-only puts (``PutMode.create``) are
single PUTs that hold the whole file in memory; a conditional multipart
upload is what the commit protocol needs for large files.

``transport_for`` maps a user's s3fs ``storage_options`` to a transport, or
returns None (the caller stays on s3fs) for options it cannot honour.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as _dt
import errno
import functools
import hashlib
import hmac
import http.client
import logging
import os
import queue
import re
import select
import socket
import ssl
import struct
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import quote, urlsplit

try:  # _unsent (Linux; elsewhere the ioctl fails on a socket and nothing is known to be queued)
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows
    fcntl = termios = None  # type: ignore[assignment]

import google_crc32c

from .cancel import CancelSignal, TransferCancelled, TransferScope, in_context
from .errors import ConfigError
from .process_cache import ProcessCache
from .retry import attempt_timeout
from .waits import result_of

__all__ = ["S3Transport", "S3ResponseError", "TransferCancelled", "transport_for", "crc32c_combine", "PART_SIZE",
           "PARTS_IN_FLIGHT", "MULTIPART_THRESHOLD", "RANGE_SIZE", "RANGES_IN_FLIGHT", "COPY_PART_SIZE",
           "CopySource", "CopiedPartsRejected", "unquoted_etag", "DownloadFailed"]

log = logging.getLogger("cloudckpt")
T = TypeVar("T")

# Defaults measured by ``python -m bench`` (README, scenarios 3/4); memory does not grow with them (parts are
# sent from the file, ranges written through a READ_BUFFER). 16 MiB parts: as fast as 32 MiB on SeaweedFS and
# ~15 % faster on moto (py-spy: moto spends its time copying each part into a spooled temporary file and back,
# and more per byte for 32 MiB parts; why is not established), for ~0.1 client CPU-s/GiB more.
PART_SIZE = 16 << 20  # bytes per multipart part
# Files smaller than this go in one PutObject, ones of at least this size (and larger than a part) in a multipart
# upload: boto3's ``multipart_threshold`` names the knob (its default is 8 MiB); the value is rclone's S3
# ``upload_cutoff``. Measured (1 GiB in 8 files of 128 MiB, the server pinned to its own core, 2026-12-01): moto
# spent 5.5-5.9 CPU-s per GiB stored by single PUTs against 8.9 for 16 MiB parts (a CompleteMultipartUpload
# re-reads and re-writes every part), 176-183 MiB/s against 112 (TransferManager 130); SeaweedFS alike both ways
# (100 vs 99 MiB/s). The bench's 128 MiB files cannot tell 129 MiB from 5 GiB apart. A checkpoint of several
# files keeps ``max_files_in_flight`` single PUTs going; a single large file still gets parallel parts.
MULTIPART_THRESHOLD = 200 << 20
_MAX_PUT = 5 << 30  # S3's largest PutObject
PARTS_IN_FLIGHT = 4  # parts of one file uploading at once
RANGE_SIZE = 32 << 20  # bytes per ranged GET
RANGES_IN_FLIGHT = 4  # ranges of one file downloading at once
COPY_PART_SIZE = 64 << 20  # bytes per UploadPartCopy at most (consecutive unchanged chunks, one request)
_ABORT_RETRY_DELAYS = (0.2, 0.5)  # seconds before the 2nd and 3rd AbortMultipartUpload (see _abort_upload)
READ_BUFFER = 1 << 20  # bytes read from disk (checksums) or the socket (downloads) at a time
SEND_SLICE = 1 << 20  # bytes of a part per sendfile call: a cancelled upload stops within one slice
# Bytes per os.pwrite of a download: 32 KiB, the largest write whose page-cache folio the kernel takes from its
# per-CPU free lists. Since Linux 6.16 ext4 caches a file in large folios sized by the write; the per-CPU lists
# hold pages up to order 3 (PAGE_ALLOC_COSTLY_ORDER, 32 KiB; mm/page_alloc.c pcp_allowed_order), so a larger
# write's folio comes from the zone's buddy lists under its lock, dearer as memory fragments. Measured (restore
# of 8 x 128 MiB from SeaweedFS on CPU 1, client unpinned, Linux 6.18, interleaved with s5cmd, 2026-12-03):
# 64 KiB writes ran at 650-860 MiB/s and 0.5-0.7 CPU-s/GiB until memory fragmented (after s5cmd's files were
# freed), then at 230-370 MiB/s and 3.5-5.8 CPU-s/GiB of system time; 32 KiB writes stayed at 750-860 MiB/s and
# 0.6-0.7 CPU-s/GiB in every repetition (s5cmd 540-780 at 1.1-1.9), 16 KiB ones at 490-760 and 0.8-2.0. Earlier
# (fresh processes): 1 MiB writes 1.3-3.3 CPU-s/GiB and 230-500 MiB/s, 256 KiB ones growing to 1.5-2.9 over a
# long-lived process's repetitions. Details: bench/NOTES.md.
WRITE_SLICE = 32 << 10
_MAX_RANGE_FACTOR = 4  # a download's ranges grow up to this many x range_size (see get_file_crc32c)
_MIN_PART = 5 << 20  # S3's minimum part size (all parts but the last)
_MAX_PARTS = 10_000
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 60.0
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)  # a socket's send queue fill (_unsent)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection, dropping unsent bytes
_IDLE_S = 20.0  # a kept-alive connection idle longer is closed rather than reused (servers time them out)
# Answers of S3-compatible stores that do not implement additional checksums (or FULL_OBJECT ones).
_CHECKSUM_REFUSALS = frozenset({"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"})
_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")  # an unencrypted single-part object's or part's ETag: the MD5 of its bytes
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "InvalidRequest", "InvalidArgument"})
_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial

Call = Callable[[Callable[[], T]], T]


def _no_retry(fn: Callable[[], T]) -> T:
    return fn()


def _unsent(sock: socket.socket | None) -> int:
    """Bytes in ``sock``'s send queue that the peer has not acknowledged yet (Linux's ``TIOCOUTQ``: unsent and
    unacknowledged); 0 where the platform does not say, or the socket is closed."""
    if sock is None or _TIOCOUTQ is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # closed (fileno -1), or not a TCP socket
        return 0


class S3ResponseError(OSError):
    """An S3 error answer: HTTP status, service code and message (bucket/key named, no credentials).

    ``response`` has botocore's ``ClientError`` shape, so ``cloudckpt.retry``
    classifies it (``SlowDown``, ``BadDigest``, 5xx: transient) and labels it.
    """

    def __init__(self, status: int, code: str | None, message: str, where: str) -> None:
        label = f"{code} ({status})" if code else f"HTTP {status}"  # a HEAD's answer has no body: no code
        super().__init__(errno.EIO, f"{label} for {where}: {message}".rstrip(": "))
        self.status = status
        self.code = code
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


class DownloadFailed(Exception):
    """One object of a several-object read (``S3Transport.get_files_crc32c``, ``crc32c_of_objects``) failed (the
    error is the ``__cause__``): ``key`` names it. Its text is the cause's (bucket and key, never a credential)."""

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(f"{key}: {cause}")
        self.key = key


class CopiedPartsRejected(Exception):
    """The store refused a multipart upload's server-side copied parts (their checksums did not add up)."""


@dataclass(frozen=True)
class _Unvouched:
    """A copied part the store reported no checksum of, whose ETag (32 hex digits) is not the MD5 of the local
    bytes: either the copy holds other bytes, or the store's part ETags are not MD5s. The ETag the store gives
    the same bytes uploaded tells which (``S3Transport._settle_unvouched``)."""

    etag: str
    md5: str  # of the local bytes


@dataclass(frozen=True)
class CopySource:
    """An object whose byte ranges a new upload may copy server-side (``S3Transport.put_file_copying``).

    ``etag``: the object's ETag when it was written (quotes optional): ranges are copied only while the
    object still has it (``x-amz-copy-source-if-match``, and a HEAD first for stores that ignore it).
    ``crc32c``: the object's crc32c (8 hex digits) as its manifest records it, or None: an object with
    another ETag (re-uploaded in other parts, e.g. healed) is still copied from when the store's
    full-object checksum equals it.
    """

    bucket: str
    key: str
    etag: str
    crc32c: str | None = None


def unquoted_etag(value: str | None) -> str | None:
    """An ETag without its quotes (S3 answers ``"abc-2"``; some stores omit them); None stays None."""
    return value.strip().strip('"') or None if value else None


def etag_md5(etag: str | None) -> str | None:
    """The MD5 an ETag states (32 hex digits, lowercased), with or without its quotes: an unencrypted
    single-part S3 object's or part's ETag is the MD5 of its bytes (some stores write it upper-case). None
    for other ETags (a multipart object's ``<hex>-<parts>``, SSE-KMS/SSE-C ones, other stores' forms), which
    tell nothing of the bytes, and for None."""
    value = unquoted_etag(etag)
    return value.lower() if value is not None and _MD5_HEX.fullmatch(value) else None


def _translated(err: S3ResponseError) -> OSError:
    """The builtin s3fs raises for the same answer (the S3 error becomes its cause)."""
    if err.status == 404 or err.code in ("NoSuchKey", "NoSuchBucket", "NoSuchUpload"):
        return FileNotFoundError(errno.ENOENT, err.strerror)
    if err.status == 403 or err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return PermissionError(errno.EACCES, err.strerror)
    if err.status == 412 or err.code == "PreconditionFailed":
        return FileExistsError(errno.EEXIST, err.strerror)
    return err


def _raise(err: S3ResponseError) -> None:
    translated = _translated(err)
    if translated is err:
        raise err
    raise translated from err


# -- crc32c ----------------------------------------------------------------------------------------------
def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: Sequence[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The GF(2) matrix that appends ``nbytes`` zero bytes to a crc32c register (cached: ranges and parts
    mostly share one length, so each combine then costs one matrix-vector product)."""
    op = [_CRC32C_POLY] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # one zero byte
    result: list[int] | None = None
    while nbytes:
        if nbytes & 1:
            result = op if result is None else [_gf2_times(op, result[n]) for n in range(32)]
        nbytes >>= 1
        if nbytes:
            op = _gf2_square(op)
    return tuple(result or [1 << n for n in range(32)])


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32c of ``A + B`` from crc32c(A), crc32c(B) and len(B) in bytes (zlib's ``crc32_combine`` method).

    The operator that appends ``len2`` zero bytes is built once per length (cached): combining the parts
    of a file, all of one size but the last, costs microseconds each.
    """
    if len2 <= 0:
        return crc1
    return _gf2_times(_zeros_operator(len2), crc1) ^ crc2


def _range_chunks(fd: int, offset: int, count: int) -> Iterator[bytes]:
    """``count`` bytes of ``fd`` from ``offset``, in ``READ_BUFFER`` chunks (``os.pread``: no shared position).

    Raises OSError (EIO) if the file ends first (it shrank while being sent).
    """
    end = offset + count
    while offset < end:
        chunk = os.pread(fd, min(READ_BUFFER, end - offset), offset)
        if not chunk:
            raise OSError(errno.EIO, f"local file ended at byte {offset} of {end} (it shrank while uploading)")
        yield chunk
        offset += len(chunk)


def _crc32c_of_range(fd: int, offset: int, count: int) -> int:
    checksum = google_crc32c.Checksum()
    for chunk in _range_chunks(fd, offset, count):
        checksum.update(chunk)
    return int.from_bytes(checksum.digest(), "big")


def _content_md5(body: bytes | None, send: tuple[Any, int, int] | None) -> str:
    """The base64 MD5 of a request body: ``body``, or ``send=(file, offset, count)`` read in READ_BUFFER chunks."""
    md5 = hashlib.md5(usedforsecurity=False)
    if body is not None:
        md5.update(body)
    elif send is not None:
        f, offset, count = send
        for chunk in _range_chunks(f.fileno(), offset, count):
            md5.update(chunk)
    return base64.b64encode(md5.digest()).decode()


class LocalFileChanged(ValueError):
    """A file's bytes differ from the crc32c taken of them for its manifest: it changed after the save
    (not retried: the checkpoint's files must not change once saved)."""


def _checked(request: Callable[[], T], f: Any, ranges: Sequence[tuple[int, int, int]] | None) -> Callable[[], T]:
    """``request`` (an upload of ``f``'s bytes covered by ``ranges``, ``(start, end, crc32c)`` taken earlier for
    the manifest, whose combination the request declares; None: read as sent), raising ``LocalFileChanged``
    instead of the store's checksum refusal when the bytes in the file no longer have those crc32c. It names
    the first range that differs (the manifest's 8 MiB parts for a file sent in one PUT)."""
    def run() -> T:
        try:
            return request()
        except S3ResponseError as exc:
            if not ranges or exc.code not in _CHECKSUM_REFUSALS:
                raise
            changed = [(a, b, now, crc) for a, b, crc in ranges
                       if (now := _crc32c_of_range(f.fileno(), a, b - a)) != crc]
            if not changed:
                raise  # the bytes were corrupted on the way: sent again
            start, end, now, crc = changed[0]
            more = f" ({len(changed)} of the {len(ranges)} checksummed ranges sent differ)" if len(ranges) > 1 else ""
            raise LocalFileChanged(f"{f.name} changed after its checksum was taken for the manifest: bytes "
                                   f"{start}-{end - 1} have crc32c {now:08x}, the manifest {crc:08x}{more}. It is "
                                   "not committed: a checkpoint's files must not change once saved (a second "
                                   "writer in the same local directory?).") from exc
    return run


def md5_of_file(file: str | int, offset: int = 0, length: int | None = None) -> str:
    """The MD5 (32 lowercase hex digits) of a local file's bytes from byte ``offset``: ``length`` bytes, or all
    to its end (None); what S3 reports as the ETag of an unencrypted single-part object or part holding them
    (``etag_md5``). ``file``: a path, or an open file descriptor (read with ``os.pread``: its position is
    neither used nor moved). Read ``READ_BUFFER`` bytes at a time, so memory stays bounded.

    Raises:
        OSError: the file cannot be opened or read, or (EIO) it ends before ``offset + length``.
    """
    if isinstance(file, str):
        with open(file, "rb") as f:
            return md5_of_file(f.fileno(), offset, length)
    digest = hashlib.md5(usedforsecurity=False)
    if length is not None:
        for chunk in _range_chunks(file, offset, length):
            digest.update(chunk)
        return digest.hexdigest()
    while chunk := os.pread(file, READ_BUFFER, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _describe(exc: BaseException) -> str:
    """The S3 error code and status behind ``exc`` (or its type), for a log line."""
    cause = exc if isinstance(exc, S3ResponseError) else exc.__cause__
    if isinstance(cause, S3ResponseError):
        return f"{cause.code or 'error'} {cause.status}"
    return type(exc).__name__


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def crc32c_hex_from_header(value: str | None) -> str | None:
    """An ``x-amz-checksum-crc32c`` (base64 of 4 bytes; a composite "...-N" is not the object's) as 8 hex digits."""
    if not value or "-" in value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 4 else None


# -- signing ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Credentials:
    key: str = field(repr=False)  # never in a repr: a traceback or debugger printing locals shows none
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _uri_encode(text: str, safe: str = "-_.~") -> str:
    return quote(text, safe=safe)


def _sign_v4(method: str, host: str, path: str, query: Mapping[str, str], headers: dict[str, str],
             creds: _Credentials, region: str, now: _dt.datetime) -> None:
    """Add AWS Signature V4 headers (payload unsigned) to ``headers`` in place."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    headers["x-amz-date"] = amz_date
    headers["x-amz-content-sha256"] = _UNSIGNED_PAYLOAD
    if creds.token:
        headers["x-amz-security-token"] = creds.token
    signed = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    signed["host"] = host
    names = sorted(signed)
    canonical_query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in sorted(query.items()))
    canonical = "\n".join([method, path, canonical_query, "".join(f"{n}:{signed[n]}\n" for n in names),
                           ";".join(names), _UNSIGNED_PAYLOAD])
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, _sha256_hex(canonical.encode())])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{creds.secret}".encode(), date), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.key}/{scope}, "
                                f"SignedHeaders={';'.join(names)}, Signature={signature}")


# -- the transport ---------------------------------------------------------------------------------------
class S3Transport:
    """Whole-file uploads and downloads against one S3 endpoint.

    Args:
        endpoint_url: ``http(s)://host[:port]`` of a custom endpoint (path-style
            addressing), or None for AWS (``https://<bucket>.s3.<region>.amazonaws.com``).
        region: the signing region.
        credentials: ``() -> (key, secret, token)`` called per request (refreshing
            credentials stay fresh), or None for unsigned (anonymous) requests.
        verify: TLS verification: True, False, or a CA bundle path.
        requester_pays: send ``x-amz-request-payer: requester``.
        part_size: bytes per multipart part, in [5 MiB, 5 GiB].
        multipart_threshold: files of at least this many bytes (and larger than ``part_size``) go in a
            multipart upload, smaller ones in one PUT; in [5 MiB, 5 GiB].
        parts_in_flight: parts of one file uploading concurrently (>= 1).
        range_size: bytes per ranged GET (>= 1 MiB).
        ranges_in_flight: ranges of one file downloading concurrently (>= 1).

    Raises:
        ConfigError: a size or concurrency out of range, an endpoint that is not http(s).
    """

    def __init__(self, endpoint_url: str | None, region: str,
                 credentials: Callable[[], tuple[str, str, str | None]] | None, *,
                 verify: bool | str = True, requester_pays: bool = False,
                 part_size: int = PART_SIZE, parts_in_flight: int = PARTS_IN_FLIGHT,
                 multipart_threshold: int = MULTIPART_THRESHOLD, range_size: int = RANGE_SIZE,
                 ranges_in_flight: int = RANGES_IN_FLIGHT) -> None:
        if isinstance(part_size, bool) or not isinstance(part_size, int) or not _MIN_PART <= part_size <= _MAX_PUT:
            raise ConfigError(f"S3 part_size must be an integer in [5 MiB, 5 GiB] (bytes), got {part_size!r}.")
        if isinstance(multipart_threshold, bool) or not isinstance(multipart_threshold, int) \
                or not _MIN_PART <= multipart_threshold <= _MAX_PUT:
            raise ConfigError("S3 multipart_threshold must be an integer in [5 MiB, 5 GiB] (bytes), "
                              f"got {multipart_threshold!r}.")
        if not isinstance(range_size, int) or range_size < READ_BUFFER:
            raise ConfigError(f"S3 range_size must be an integer >= {READ_BUFFER} bytes, got {range_size!r}.")
        for name, value in (("parts_in_flight", parts_in_flight), ("ranges_in_flight", ranges_in_flight)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"S3 {name} must be an integer >= 1, got {value!r}.")
        self.region = region
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.parts_in_flight = parts_in_flight
        self.range_size = range_size
        self.ranges_in_flight = ranges_in_flight
        self._credentials = credentials
        self._requester_pays = requester_pays
        self._endpoint = None
        if endpoint_url is not None:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError("S3 endpoint_url must be an http:// or https:// URL with a host.")
            if "@" in parts.netloc:  # the Host header and the DNS lookup would carry the password
                raise ConfigError("S3 endpoint_url must not hold credentials (user:password@): pass them as "
                                  "key/secret in storage_options or through the environment.")
            self._endpoint = (parts.scheme, parts.netloc, parts.path.rstrip("/"))
        self._ssl: ssl.SSLContext | None = None
        if endpoint_url is None or self._endpoint is not None and self._endpoint[0] == "https":
            if verify is False:
                self._ssl = ssl._create_unverified_context()  # noqa: S323 - the user asked for verify=False
            else:
                self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        self._pools: dict[tuple[str, str], queue.LifoQueue[tuple[http.client.HTTPConnection, float]]] = {}
        self._pools_lock = threading.Lock()
        self._bucket_regions: dict[str, str] = {}
        self._checksums = True  # off once the store refuses x-amz-checksum-* headers (see _request)
        # set by the owner giving up: requests stop (TransferCancelled, see the module doc), a failed copy is not
        # uploaded; the whole store's, or the calling context's scope (cancel.py)
        self.cancel: CancelSignal | None = None
        # connections of cancellable requests (abort_requests), with the transfer scope each belongs to
        self._in_flight: dict[http.client.HTTPConnection, TransferScope | None] = {}
        self.copies_off: str | None = None  # why server-side copies stopped (a failure, or no way to verify one)
        self._copies_lock = threading.Lock()

    def __repr__(self) -> str:
        where = f"{self._endpoint[0]}://{self._endpoint[1]}" if self._endpoint else f"AWS {self.region}"
        return f"S3Transport({where})"

    # -- public operations ----------------------------------------------------------------------
    def put_file(self, local_path: str, bucket: str, key: str, *, create: bool = False,
                 call: Call = _no_retry, checksums: Sequence[tuple[int, int, int]] | None = None) -> None:
        """Upload ``local_path`` as ``bucket/key`` with crc32c checksums.

        ``create``: only if no object has that key (``FileExistsError`` otherwise).
        ``checksums``: ``(start, end, crc32c)`` of consecutive byte ranges covering the file (what its
        manifest recorded while checksumming it): each part's and the object's crc32c are combined from
        them instead of reading the file a second time, so the store checks the body against the
        manifest's checksums (a file that changed since is refused, not committed). Parts the ranges do
        not make up (a part size that is not a multiple of theirs) and None: read here.
        Each HTTP request runs through ``call`` (the retry policy). A failed
        multipart upload is aborted (best effort).

        Raises:
            ValueError: ``checksums`` do not cover the file.
        """
        with open(local_path, "rb") as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            if checksums is not None:
                _check_cover([(a, b) for a, b, _ in checksums], size, f"{bucket}/{key}")
            if size < self.multipart_threshold or size <= self.part_size:
                crc = _crc32c_of_range(fd, 0, size) if checksums is None else _combined(checksums)
                headers = {"x-amz-checksum-crc32c": _b64(crc), "Content-Length": str(size)}
                if create:
                    headers["If-None-Match"] = "*"
                put = _checked(lambda: self._request("PUT", bucket, key, headers=headers, send=(f, 0, size)),
                               f, checksums)
                call(self._settling(put, f, bucket, key, size, crc) if create else put)
                return
            part_size = max(self.part_size, -(-size // _MAX_PARTS))
            spans = [(start, min(size, start + part_size)) for start in range(0, size, part_size)]
            parts = _coalesced([(a, b, crc, False) for a, b, crc in checksums or ()], part_size, part_size)
            if [(a, b) for a, b, _, _ in parts] != spans:  # the ranges do not make up the parts: read them
                parts = [(a, b, None, False) for a, b in spans]
            self._put_parts(f, bucket, key, parts, None, create, call)

    def put_bytes(self, data: bytes, bucket: str, key: str, *, create: bool = False,
                  call: Call = _no_retry) -> None:
        """Write a small object in one PUT with its crc32c (``create``: If-None-Match, ``FileExistsError``)."""
        headers = {"x-amz-checksum-crc32c": _b64(google_crc32c.value(bytes(data)))}
        if create:
            headers["If-None-Match"] = "*"
        call(lambda: self._request("PUT", bucket, key, headers=headers, body=bytes(data)))

    def put_file_copying(self, local_path: str, bucket: str, key: str,
                         chunks: Sequence[tuple[int, int, int, bool]], source: CopySource, *,
                         create: bool = False, call: Call = _no_retry) -> int:
        """Upload ``local_path`` as ``bucket/key``, copying unchanged byte ranges from ``source`` server-side.

        ``chunks``: ``(start, end, crc32c, copy)`` covering the file in order, each but the last >= 5 MiB,
        at most 10,000: ``copy`` says the source holds the same bytes at the same range (its manifest's
        per-part crc32c equals ``crc32c``, the local bytes'). Consecutive chunks of one kind go in one part
        (up to ``part_size`` bytes uploaded, ``COPY_PART_SIZE`` copied: ``UploadPartCopy`` with
        ``x-amz-copy-source-range``). Every part carries its crc32c (uploaded: the store checks the body;
        copied: compared with the store's checksum of the copy when it reports one) and the
        CompleteMultipartUpload the file's full-object CRC32C, so a corrupted source is not propagated:
        a source that changed (ETag), vanished, cannot be copied or whose copied bytes do not match has
        those parts uploaded from ``local_path`` instead, and a store refusing the copied parts at
        completion gets the whole file uploaded again. ``create``: If-None-Match (``FileExistsError``).
        A copy failing for another reason than its source (a server error past the retries, a refusal, no
        support) turns copies off for this transport (``copies_off``): every later copy would cost the same.
        So does a store that cannot vouch for any copy (no checksum of a copied part, part ETags that are not
        MD5s): one warning, and the file is uploaded in full, as every later one.
        A failed upload is aborted. Returns the bytes copied server-side (the rest was sent).

        Raises:
            ValueError: ``chunks`` do not cover the file, or break S3's part limits.
        """
        checksums = [(a, b, crc) for a, b, crc, _ in chunks]
        with open(local_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_cover([(a, b) for a, b, _ in checksums], size, f"{bucket}/{key}", parts=True)
            wanted = any(copy for *_, copy in chunks) and self.copies_off is None
            current = self._source_unchanged(source, call) if wanted else None
            if current is None:
                self.put_file(local_path, bucket, key, create=create, call=call, checksums=checksums)
                return 0
            parts = _coalesced(chunks, self.part_size, COPY_PART_SIZE)
            try:
                return self._put_parts(f, bucket, key, parts, current, create, call)
            except CopiedPartsRejected as exc:
                log.warning("%s: uploading the whole file instead.", exc)
                self.put_file(local_path, bucket, key, create=create, call=call, checksums=checksums)
                return 0

    def _source_unchanged(self, source: CopySource, call: Call) -> CopySource | None:
        """``source`` to copy from, with the ETag it has now, when it holds what its manifest records (one
        HEAD: moto ignores copy-source conditions): its recorded ETag, or another one with the manifest's
        crc32c as the store's full-object checksum (re-uploaded in other parts). None: upload instead."""
        where = f"s3://{source.bucket}/{source.key}"
        try:
            head = call(lambda: self.head(source.bucket, source.key))
        except TransferCancelled:
            raise
        except FileNotFoundError:
            log.info("Copy source %s is gone: uploading instead.", where)
            return None
        except Exception as exc:  # noqa: BLE001 - copying is an optimisation: any doubt means uploading
            log.warning("Cannot look at copy source %s (%s): uploading instead.", where, _describe(exc))
            return None
        recorded = unquoted_etag(source.etag)
        if head["etag"] == recorded:
            return source
        if source.crc32c is not None and head["crc32c"] == source.crc32c and head["etag"]:
            log.info("Copy source %s was re-uploaded with the same bytes (ETag %s, recorded %s; the store's "
                     "crc32c %s is the manifest's): copying from it.", where, head["etag"], recorded, head["crc32c"])
            return CopySource(source.bucket, source.key, head["etag"], source.crc32c)
        log.warning("Copy source %s is not the object its checkpoint committed (ETag %s, recorded %s; store crc32c "
                    "%s, manifest %s): uploading instead.", where, head["etag"], recorded, head["crc32c"],
                    source.crc32c)
        return None

    def _put_parts(self, f: Any, bucket: str, key: str, parts: Sequence[tuple[int, int, int | None, bool]],
                   source: CopySource | None, create: bool, call: Call) -> int:
        """One multipart upload of ``parts`` (``(start, end, crc32c, copy)``): uploaded from ``f`` (a crc32c
        of None is read from ``f`` as the part is sent), or copied from ``source`` where ``copy``. Bytes
        copied server-side."""
        upload_id = self._create_upload(bucket, key, call)
        done: dict[int, tuple[str, int]] = {}
        copied: dict[int, int] = {}
        source_ok = threading.Event()
        source_ok.set()
        try:
            def upload(number: int, start: int, end: int, given: int | None) -> None:
                crc = _crc32c_of_range(f.fileno(), start, end - start) if given is None else given
                headers = {"x-amz-checksum-crc32c": _b64(crc), "Content-Length": str(end - start)}
                declared = None if given is None else [(start, end, given)]
                _, answer, _ = call(_checked(lambda: self._request(
                    "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                    headers=headers, send=(f, start, end - start)), f, declared))
                done[number] = (answer.get("etag", ""), crc)

            def send(item: tuple[int, tuple[int, int, int | None, bool]]) -> None:
                number, (start, end, crc, copy) = item
                unvouched: tuple[_Unvouched, str] | None = None
                if copy and crc is not None and source is not None and source_ok.is_set() \
                        and self.copies_off is None:
                    etag = self._copy_part(f, bucket, key, upload_id, number, start, end, crc, source, call)
                    if isinstance(etag, str):
                        done[number] = (etag, crc)
                        copied[number] = end - start
                        return
                    source_ok.clear()  # the source is not what its manifest says, or no copy is: upload the rest
                    if etag is not None:
                        unvouched = etag, f"{source.bucket}/{source.key} bytes {start}-{end - 1}"
                upload(number, start, end, crc)
                if unvouched is not None:  # the ETag of the uploaded bytes tells why the copy's differed
                    self._settle_unvouched(*unvouched, done[number][0])
            self._run_all(send, list(enumerate(parts, 1)), self.parts_in_flight)
            full = _combined([(start, end, done[number][1]) for number, (start, end, _, _) in enumerate(parts, 1)])
            self._complete_upload(bucket, key, upload_id, done, full, create, call, copied=bool(copied),
                                  size=parts[-1][1])
            upload_id = ""
            return sum(copied.values())
        finally:
            if upload_id:
                self._abort_upload(bucket, key, upload_id)

    def _copy_part(self, f: Any, bucket: str, key: str, upload_id: str, number: int, start: int, end: int,
                   crc: int, source: CopySource, call: Call) -> str | _Unvouched | None:
        """UploadPartCopy of ``source``'s bytes [start, end) as part ``number``; its ETag, or None when the
        copy cannot be trusted to hold the bytes of ``f`` there: the copy failed (source gone or changed,
        copies unsupported or refused, a server error past the retries) or the store vouches for other bytes.

        The store vouches by the copied part's crc32c (S3, SeaweedFS: compared with ``crc``) or, where it
        reports none (moto), by the part's ETag, the MD5 of its bytes for an unencrypted S3 part (compared
        with the MD5 of the local bytes). An ETag of 32 hex digits that is not that MD5 is ``_Unvouched``
        (other bytes, or ETags that are not MD5s: the caller uploads the part and settles it); any other
        ETag cannot vouch for a copy on this store: copies are turned off (``_copies_unverifiable``)."""
        etag = unquoted_etag(source.etag)
        headers = {"x-amz-copy-source": _uri_encode(f"/{source.bucket}/{source.key}", safe="/-_.~"),
                   "x-amz-copy-source-range": f"bytes={start}-{end - 1}",
                   "x-amz-copy-source-if-match": f'"{etag}"'}
        where = f"{source.bucket}/{source.key} bytes {start}-{end - 1}"

        def attempt() -> bytes:
            _, _, body = self._request("PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                                       headers=headers)
            if body.lstrip()[:200].find(b"<Error>") >= 0:  # S3 may answer 200 and fail the copy in the body
                code, message = _xml_error(body)
                raise S3ResponseError(500, code or "InternalError", message, f"{bucket}/{key}")
            return body
        try:
            body = call(attempt)
        except Exception as exc:  # noqa: BLE001 - copying is an optimisation: the bytes are uploaded instead
            cause = exc.__cause__ if isinstance(exc.__cause__, S3ResponseError) else exc
            if isinstance(cause, S3ResponseError) and cause.code == "NoSuchUpload" \
                    or self.cancel is not None and self.cancel.is_set():
                raise  # the upload itself is gone, or its owner gave up: nothing to fall back into
            unsupported = isinstance(cause, S3ResponseError) and cause.status in (400, 501) \
                and cause.code in _UNSUPPORTED_CODES
            log.log(logging.INFO if unsupported else logging.WARNING,
                    "Server-side copy of %s into s3://%s/%s failed (%s): uploading those bytes instead.",
                    where, bucket, key, _describe(exc))
            # not the source: the store's copies fail, and each would cost the retries again
            if not isinstance(exc, (FileNotFoundError, FileExistsError)) \
                    and self._stop_copies(f"a copy failed with {_describe(exc)}"):
                log.warning("%r: server-side copies are off for this transport (%s); uploads send every byte.",
                            self, self.copies_off)
            return None
        etag = _xml_text(body, "ETag") or ""
        stored = _xml_text(body, "ChecksumCRC32C")
        if stored is not None:
            if crc32c_hex_from_header(stored) == f"{crc:08x}":
                return etag
            log.warning("Copy source %s does not hold the bytes its manifest records (crc32c %s, expected "
                        "%08x): uploading instead.", where, crc32c_hex_from_header(stored), crc)
            return None
        md5 = etag_md5(etag)
        if md5 is None:
            self._copies_unverifiable(f"a copy of {where} has ETag {etag!r}")
            return None
        local = md5_of_file(f.fileno(), start, end - start)
        return etag if md5 == local else _Unvouched(md5, local)

    def _settle_unvouched(self, copy: _Unvouched, where: str, uploaded: str) -> None:
        """A copy of ``where`` was ``_Unvouched``, and the same bytes, uploaded, got ETag ``uploaded``: the MD5
        of the bytes (the store's ETags are MD5s), so the copy held other bytes; or not, so this store's ETags
        cannot vouch for copies."""
        if etag_md5(uploaded) == copy.md5:
            log.warning("Copy source %s does not hold the bytes its manifest records (the copy's MD5 %s differs "
                        "from the local bytes' %s): uploaded those bytes instead.", where, copy.etag, copy.md5)
        else:
            self._copies_unverifiable(f"a copy of {where} has ETag {copy.etag}, the same bytes uploaded ETag "
                                      f"{unquoted_etag(uploaded)}, their MD5 {copy.md5}")

    def _copies_unverifiable(self, detail: str) -> None:
        """Turn copies off: this store reports no checksum of a copied part, and its ETags are not MD5s."""
        if self._stop_copies("copies cannot be verified on this store"):
            log.warning("%r: server-side copies cannot be verified on this store: it reports no checksum of a "
                        "copied part and its part ETags are not MD5s (%s). Copies are off for this transport: "
                        "checkpoints are uploaded in full (no data is lost; the bytes a copy would have saved "
                        "are sent).", self, detail)

    def _stop_copies(self, why: str) -> bool:
        """Set ``copies_off`` to ``why`` unless copies are off already; True if this call turned them off."""
        with self._copies_lock:
            if self.copies_off is not None:
                return False
            self.copies_off = why
            return True

    def get_file(self, bucket: str, key: str, local_path: str, *, call: Call = _no_retry,
                 progress: Callable[[int], None] | None = None) -> int:
        """Download ``bucket/key`` to ``local_path`` (created or truncated) with parallel ranged GETs.

        ``progress(delta_bytes)`` is called as bytes land; a retried range first
        takes back what its failed attempt reported. Returns the size in bytes.
        Raises ``FileNotFoundError`` if there is no such object.
        """
        return self.get_file_crc32c(bucket, key, local_path, call=call, progress=progress)[0]

    def get_file_crc32c(self, bucket: str, key: str, local_path: str, *, call: Call = _no_retry,
                        progress: Callable[[int], None] | None = None,
                        ranges_in_flight: int | None = None, size: int | None = None) -> tuple[int, str]:
        """``get_file``, returning (size in bytes, crc32c as 8 hex digits of the bytes written to ``local_path``).

        ``ranges_in_flight``: this download's concurrent ranged GETs (default: the transport's), for a caller
        that downloads several files at once within one connection budget. ``size``: the object's size in
        bytes as just listed, if known: no HEAD is sent first (one round trip less per file, and the file's
        ranges start with the others'); an object the store answers with another size (replaced since the
        listing) is then sized by a HEAD and downloaded as it is now.

        The crc32c is computed from each chunk as it is handed to ``os.pwrite``
        (per range, combined in file order with ``crc32c_combine``; a retried
        range is checksummed afresh), so checking it against a manifest checks
        what the file holds without reading it back. Raises ``FileNotFoundError``
        if there is no such object.
        """
        if size is not None:
            counted = [0]

            def count(delta: int) -> None:
                counted[0] += delta
                if progress is not None:
                    progress(delta)
            try:
                return self._download(bucket, key, local_path, size, call, count, ranges_in_flight)
            except S3ResponseError as exc:  # another size, or none at all (416: the object is empty now)
                if exc.code != "ObjectChanged" and exc.status != 416:
                    raise
                if progress is not None and counted[0]:
                    progress(-counted[0])  # counted again by the download of the object as it is now
        size = call(lambda: self.head(bucket, key)["size"])
        return self._download(bucket, key, local_path, size, call, progress, ranges_in_flight)

    def _download(self, bucket: str, key: str, local_path: str, size: int, call: Call,
                  progress: Callable[[int], None] | None, ranges_in_flight: int | None) -> tuple[int, str]:
        """``size`` bytes of ``bucket/key`` into ``local_path`` (created or truncated): (size, crc32c hex)."""
        with open(local_path, "wb") as f:
            fd = f.fileno()
            if size == 0:
                return 0, f"{0:08x}"
            _preallocate(fd, size, local_path)
            pieces = self._read_ranges(bucket, key, size, fd, call, progress, ranges_in_flight, None)
        return size, f"{_combined(pieces):08x}"

    def get_files_crc32c(self, bucket: str, files: Sequence[tuple[str, str, int]], *, streams: int,
                         call: Callable[[str], Call] | None = None,
                         progress: Callable[[int], None] | None = None) -> list[tuple[int, str] | None]:
        """Download several objects into local files (created or truncated) with one pool of ``streams``
        ranged GETs; per file, (size in bytes, crc32c as 8 hex digits of the bytes written), as
        ``get_file_crc32c``.

        ``files``: (key, local path, size in bytes as listed: no HEAD is sent). Every file's ranges wait in
        one queue, largest file first, each range ``total / streams`` bytes within [``range_size``,
        ``4 x range_size``]: a connection that finishes early takes the next range of any file. So a
        checkpoint's one large data file (TF writes one shard by default, next to a small ``.index`` and
        ``.meta``) gets every connection, not its share of per-file ones, and no connection idles while
        another file's last range ends alone. ``call(key)``: the retry wrapper for that object's requests
        (default: none). ``progress`` as in ``get_file_crc32c``.

        An object the store answers with another size than given (replaced since the listing; 416 when it
        is empty now) gets None, its bytes and progress taken back: download it with ``get_file_crc32c``,
        which HEADs it. Any other error stops every range not yet started and raises ``DownloadFailed``
        naming the object (of several failed, the first in the queue's order: largest file first). A
        retried object's retry count is that of all its ranges.
        """
        for _, path, size in files:
            with open(path, "wb") as f:
                _preallocate(f.fileno(), size, path)
        read = self._read_files(bucket, [(key, path, size, None) for key, path, size in files], streams, call,
                                progress, changed_ok=True, missing_ok=False)
        return [None if pieces is None else (size, f"{_combined(pieces):08x}")
                for (_, _, size), pieces in zip(files, read)]

    def crc32c_of_objects(self, bucket: str, objects: Sequence[tuple[str, int, int | None]], *, streams: int,
                          call: Callable[[str], Call] | None = None, progress: Callable[[int], None] | None = None
                          ) -> list[tuple[str, tuple[str, ...]] | None]:
        """``crc32c_of_object`` of several objects with one pool of ``streams`` ranged GETs, ranges as in
        ``get_files_crc32c``: per object (key, size in bytes as listed, part size or None), its crc32c
        (8 hex digits) and those of its parts (empty without a part size), or None for an object deleted
        since the listing. No byte is kept. An object of another size than given, or any other error,
        stops every range not yet started and raises ``DownloadFailed`` naming the object."""
        read = self._read_files(bucket, [(key, None, size, part) for key, size, part in objects], streams, call,
                                progress, changed_ok=False, missing_ok=True)
        return [None if pieces is None else
                (f"{_combined(pieces):08x}", tuple(f"{crc:08x}" for _, _, crc in pieces) if part else ())
                for (_, _, part), pieces in zip(objects, read)]

    def _read_files(self, bucket: str, files: Sequence[tuple[str, str | None, int, int | None]], streams: int,
                    call: Callable[[str], Call] | None, progress: Callable[[int], None] | None, *,
                    changed_ok: bool, missing_ok: bool) -> list[list[tuple[int, int, int]] | None]:
        """GET the objects ``files`` (key, local path to write into at each offset or None, size as listed,
        part size or None) in ranges from one queue served by ``streams`` connections (see
        ``get_files_crc32c``); per object, ``(start, end, crc32c)`` of its consecutive pieces (one per part
        with a part size, else per range), or None: with ``changed_ok``, an object of another size than
        given (its progress taken back); with ``missing_ok``, one that no longer exists."""
        calls = call or (lambda _key: _no_retry)
        total = sum(size for _, _, size, _ in files)
        step = min(max(self.range_size, -(-total // max(1, streams))), _MAX_RANGE_FACTOR * self.range_size)
        steps = [-(-step // part) * part if part else step for _, _, _, part in files]
        order = sorted(range(len(files)), key=lambda i: -files[i][2])
        tasks = [(i, start, min(files[i][2], start + steps[i])) for i in order
                 for start in range(0, files[i][2], steps[i])]
        found: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        counted = [0] * len(files)
        skipped: set[int] = set()
        lock = threading.Lock()

        def fetch(task: tuple[int, int, int]) -> None:
            i, start, end = task
            key, path, size, part = files[i]
            if i in skipped:
                return
            reported = [0]

            def counting(delta: int) -> None:
                with lock:
                    counted[i] += delta
                if progress is not None:
                    progress(delta)

            def attempt() -> None:
                if reported[0]:
                    counting(-reported[0])
                reported[0] = 0
                fd = os.open(path, os.O_WRONLY) if path is not None else None
                try:
                    found[(i, start)] = self._get_range(bucket, key, (start, end), size, fd, counting, reported, part)
                finally:
                    if fd is not None:
                        os.close(fd)
            try:
                calls(key)(attempt)
            except TransferCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - named for the caller, kept as the cause
                changed = isinstance(exc, S3ResponseError) and (exc.code == "ObjectChanged" or exc.status == 416)
                if not (changed and changed_ok or isinstance(exc, FileNotFoundError) and missing_ok):
                    raise DownloadFailed(key, exc) from exc
                with lock:
                    skipped.add(i)
        self._run_all(fetch, tasks, streams)
        results: list[list[tuple[int, int, int]] | None] = []
        for i, (_, _, size, _) in enumerate(files):
            if i in skipped:
                if progress is not None and counted[i]:
                    progress(-counted[i])  # counted again by the download of the object as it is now
                results.append(None)
                continue
            results.append([piece for start in range(0, size, steps[i]) for piece in found[(i, start)]])
        return results

    def crc32c_of_object(self, bucket: str, key: str, size: int, *, part_size: int | None = None,
                         call: Call = _no_retry, progress: Callable[[int], None] | None = None,
                         ranges_in_flight: int | None = None) -> tuple[str, tuple[str, ...]]:
        """crc32c (8 hex digits) of the ``size`` bytes of ``bucket/key``, read with parallel ranged GETs and
        discarded: memory stays at ranges in flight x ``READ_BUFFER``, nothing is written locally.

        Also returns the crc32c of each ``part_size``-byte part (empty when ``part_size`` is None), as a
        manifest's per-part checksums record them. ``size``: the object's size as listed (no HEAD is sent);
        an object whose size the store reports otherwise raises ``S3ResponseError`` (``ObjectChanged``).
        ``progress`` and retries as in ``get_file_crc32c``. Raises ``FileNotFoundError`` if there is no
        such object.
        """
        if size == 0:
            return f"{0:08x}", ()
        pieces = self._read_ranges(bucket, key, size, None, call, progress, ranges_in_flight, part_size)
        return f"{_combined(pieces):08x}", tuple(f"{crc:08x}" for _, _, crc in pieces) if part_size else ()

    def _read_ranges(self, bucket: str, key: str, size: int, fd: int | None, call: Call,
                     progress: Callable[[int], None] | None, ranges_in_flight: int | None,
                     part_size: int | None) -> list[tuple[int, int, int]]:
        """GET an object of ``size`` bytes in parallel ranges (into ``fd`` if given): ``(start, end, crc32c)``
        of its consecutive pieces, one per ``part_size``-byte part if given, else one per range."""
        streams = max(1, ranges_in_flight or self.ranges_in_flight)
        # As many ranges as streams (no more requests than parallelism needs: each costs a round trip, and
        # some stores, moto, read the whole object for every range), each in [range_size, 4 x range_size],
        # made of whole parts when the caller wants the parts' checksums.
        step = min(max(self.range_size, -(-size // streams)), _MAX_RANGE_FACTOR * self.range_size)
        if part_size:
            step = -(-step // part_size) * part_size
        ranges = [(start, min(size, start + step)) for start in range(0, size, step)]
        found: dict[int, list[tuple[int, int, int]]] = {}

        def fetch(span: tuple[int, int]) -> None:
            reported = [0]

            def attempt() -> None:
                if reported[0] and progress is not None:
                    progress(-reported[0])
                reported[0] = 0
                found[span[0]] = self._get_range(bucket, key, span, size, fd, progress, reported, part_size)
            call(attempt)
        self._run_all(fetch, ranges, streams)
        return [piece for start, _ in ranges for piece in found[start]]

    def head(self, bucket: str, key: str) -> dict[str, Any]:
        """``size`` (bytes), ``crc32c`` (8 hex digits of the whole object, or None) and ``etag`` (without
        quotes, or None) of ``bucket/key``.

        Raises ``FileNotFoundError`` if there is no such object.
        """
        status, headers, _ = self._request("HEAD", bucket, key, headers={"x-amz-checksum-mode": "ENABLED"})
        return {"size": int(headers.get("content-length", "0")),
                "crc32c": crc32c_hex_from_header(headers.get("x-amz-checksum-crc32c")),
                "etag": unquoted_etag(headers.get("etag"))}

    def close(self) -> None:
        """Close every idle connection."""
        with self._pools_lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            while True:
                try:
                    pool.get_nowait()[0].close()
                except queue.Empty:
                    break

    # -- multipart --------------------------------------------------------------------------------
    def _create_upload(self, bucket: str, key: str, call: Call) -> str:
        """CreateMultipartUpload with a FULL_OBJECT CRC32C; the upload id. Once sent, not cut by a cancel
        (``abort_requests``): the store may have created the upload, which only its id can abort."""
        self._check_cancel(f"{bucket}/{key}")
        _, _, body = call(lambda: self._request(
            "POST", bucket, key, query={"uploads": ""},
            headers={"x-amz-checksum-algorithm": "CRC32C", "x-amz-checksum-type": "FULL_OBJECT"}, cancellable=False))
        upload_id = _xml_text(body, "UploadId")
        if not upload_id:
            raise S3ResponseError(500, "InternalError", "CreateMultipartUpload returned no UploadId", f"{bucket}/{key}")
        return upload_id

    def _complete_upload(self, bucket: str, key: str, upload_id: str, done: Mapping[int, tuple[str, int]],
                         full: int, create: bool, call: Call, *, copied: bool = False, size: int) -> None:
        """CompleteMultipartUpload of parts ``done`` (number -> (ETag, crc32c)) with the file's crc32c ``full``
        (``size`` bytes).

        ``create``: If-None-Match (``FileExistsError``). ``copied``: some parts were copied server-side, and a
        store refusing the parts' checksums (``BadDigest``, ``InvalidPart``) raises ``CopiedPartsRejected``
        at once (not retried). A retried attempt that fails (the first one may have gone through: its answer
        lost) is settled by what the key holds (``_settle_retried_complete``).
        """
        xml = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_escape(done[n][0])}</ETag>"
                      f"<ChecksumCRC32C>{_b64(done[n][1])}</ChecksumCRC32C></Part>" for n in sorted(done))
        payload = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
        headers = {"x-amz-checksum-crc32c": _b64(full), "x-amz-checksum-type": "FULL_OBJECT",
                   "Content-Type": "application/xml"}
        if create:
            headers["If-None-Match"] = "*"
        attempts = [0]
        etag = _multipart_etag([done[n][0] for n in sorted(done)])

        def complete() -> None:
            attempts[0] += 1
            try:
                self._request("POST", bucket, key, query={"uploadId": upload_id}, headers=headers, body=payload)
            except S3ResponseError as exc:
                if copied and exc.code in ("BadDigest", "InvalidPart"):
                    raise CopiedPartsRejected(f"{bucket}/{key}: the store refused the copied parts' checksums "
                                              f"({exc.code})") from None
                if attempts[0] == 1:
                    raise
                self._settle_retried_complete(bucket, key, full, size, etag, create, exc)
            except Exception as exc:
                if attempts[0] == 1:
                    raise
                self._settle_retried_complete(bucket, key, full, size, etag, create, exc)
        call(complete)

    def _settle_retried_complete(self, bucket: str, key: str, full: int, size: int, etag: str | None, create: bool,
                                 exc: Exception) -> None:
        """A retried Complete failed, whose first attempt may have gone through (the upload is gone:
        NoSuchUpload; moto answers 500; the key exists: 412). Ours if the store holds our object
        (``_holds_ours``: our bytes, or the ETag of our parts); else raises."""
        if self._holds_ours(bucket, key, size, full, lambda: etag, exc):
            log.info("%s/%s: a retried CompleteMultipartUpload failed (%s), but the store holds the object of this "
                     "upload: the answer to an earlier attempt was lost.", bucket, key, _describe(exc))
            return
        gone = isinstance(exc.__cause__, S3ResponseError) and exc.__cause__.code == "NoSuchUpload"
        if create and (gone or isinstance(exc, S3ResponseError) and exc.status == 500):
            # someone's object (maybe ours, unprovable): the caller looks at what the name holds
            raise FileExistsError(errno.EEXIST, f"{bucket}/{key}: completed by an earlier attempt "
                                  "or another writer") from exc
        raise exc

    def _settling(self, put: Callable[[], Any], f: Any, bucket: str, key: str, size: int,
                  crc: int) -> Callable[[], Any]:
        """``put`` (a create-only PutObject of file ``f``'s ``size`` bytes, crc32c ``crc``), whose retried
        attempts that fail are settled by what the key holds: the first attempt may have gone through, its
        answer lost (then the retry gets 412, or any error). Ours (``_holds_ours``; a store that reports no
        crc32c of the object, moto, by its ETag, the MD5 of the bytes: read once more then): done; else the
        attempt's error."""
        attempts = [0]

        def md5() -> str:
            return md5_of_file(f.fileno(), 0, size)

        def run() -> Any:
            attempts[0] += 1
            try:
                return put()
            except (LocalFileChanged, TransferCancelled):
                raise
            except Exception as exc:
                if attempts[0] == 1 or not self._holds_ours(bucket, key, size, crc, md5, exc):
                    raise
                log.info("%s/%s: a retried create-only upload failed (%s), but the store holds its bytes: the "
                         "answer to an earlier attempt was lost.", bucket, key, _describe(exc))
                return None  # (a PutObject's answer is not used)
        return run

    def _holds_ours(self, bucket: str, key: str, size: int, crc: int, etag: Callable[[], str | None],
                    exc: Exception) -> bool:
        """True when ``bucket/key`` holds the object an upload of ours created: ``size`` bytes, and the store's
        crc32c of them is ``crc`` (S3 reports the full-object checksum it stored) or its ETag is ``etag()``
        (asked only then: the MD5 of our bytes for a PutObject, the multipart ETag our parts' ETags make; None:
        not known). One HEAD. Raises ``exc`` when there is no such key, or the HEAD fails.

        ``exc`` is raised outside the HEAD's ``except``: raised inside, the HEAD's 404 became its ``__context__``,
        and the retry layer, which reads the whole chain (``retry.is_transient``), took a reset for a fatal
        NoSuchKey and gave up on the first retry."""
        try:
            head: dict[str, Any] | None = self.head(bucket, key)
        except FileNotFoundError:
            head = None
        except Exception as failed:  # noqa: BLE001 - undecided: the attempt's own error is the one to report
            log.debug("%s/%s: HEAD after a failed create-only upload failed: %s", bucket, key, _describe(failed))
            head = None
        if head is None:
            raise exc
        if head["size"] != size:
            return False
        # etag() is lower-case hex (an MD5, or a multipart "<md5>-<parts>"); some stores write ETags in upper case
        return head["crc32c"] == f"{crc:08x}" or head["etag"] is not None and head["etag"].lower() == etag()

    def _abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """AbortMultipartUpload, also once cancelled (an aborted upload leaves no parts behind); best effort.

        Tried again after ``_ABORT_RETRY_DELAYS`` when it fails: a part the store is still taking in when
        the abort arrives (a cancel cuts parts mid-body) may fail it -- moto answers 500 -- and "it might be
        necessary to abort a given multipart upload multiple times" (AWS API reference,
        AbortMultipartUpload). NoSuchUpload (404) means it is gone. What is left open then is the bucket's
        lifecycle rule's to remove (``AbortIncompleteMultipartUpload``)."""
        for delay in (0.0, *_ABORT_RETRY_DELAYS):
            time.sleep(delay)
            try:
                self._request("DELETE", bucket, key, query={"uploadId": upload_id}, cancellable=False)
                return
            except S3ResponseError as exc:
                if exc.status == 404:
                    return
                failure: Exception = exc
            except Exception as exc:  # noqa: BLE001 - best effort: the lifecycle rule cleans up
                failure = exc
        log.debug("Aborting multipart upload of %s/%s failed: %s", bucket, key, type(failure).__name__)

    def abort_requests(self, scope: TransferScope | None = None) -> None:
        """Shut the sockets of the cancellable requests in flight (``scope``: of that transfer scope only); call
        it after setting ``cancel`` (cancelling ``scope``). A request blocked on a stalled connection (a send
        the store does not read, a read it sends nothing for) then stops at once with ``TransferCancelled``
        instead of after ``_READ_TIMEOUT`` or the store's late answer, so an abandoned upload does not outlive
        its owner (interpreter exit joins the part threads). The DELETE aborting a multipart upload is not
        cancellable and goes on, and so do the requests of a scope past its point of no return
        (``TransferScope.committing``: a commit point being written)."""
        with self._pools_lock:
            connections = [conn for conn, owner in self._in_flight.items()
                           if (scope is None or owner is scope) and not (owner is not None and owner.committing)]
        for conn in connections:
            sock = conn.sock
            if sock is not None:
                try:
                    # closed by its request thread next: a reset, so the bytes still queued in the socket (up to
                    # its send buffer, megabytes) are dropped, not sent on the link the next upload needs
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

    def measure(self, scope: TransferScope) -> None:
        """Bring ``scope``'s delivered bytes up to date: what the send queues of its requests in flight still
        hold (``TransferScope.note_unsent``)."""
        with self._pools_lock:  # a request that ends meanwhile waits: what it leaves is not counted again
            for conn, owner in self._in_flight.items():
                if owner is scope and conn.sock is not None:
                    scope.note_unsent(id(conn), _unsent(conn.sock))

    def _check_cancel(self, where: str) -> None:
        """Raise ``TransferCancelled`` once ``cancel`` is set."""
        if self.cancel is not None and self.cancel.is_set():
            raise TransferCancelled(f"transfer{' of ' + where if where else 's'} cancelled")

    def _run_all(self, fn: Callable[[Any], None], items: list[Any], workers: int) -> None:
        """Run ``fn`` over ``items`` with up to ``workers`` threads; the first error (or ``cancel``) stops the
        rest from starting."""
        if len(items) == 1 or workers == 1:
            for item in items:
                fn(item)
            return
        failed = threading.Event()

        def guarded(item: Any) -> None:
            if failed.is_set():
                return
            self._check_cancel("")
            try:
                fn(item)
            except BaseException:
                failed.set()
                raise
        with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="cloudckpt-s3") as pool:
            futures = [pool.submit(in_context(guarded), item) for item in items]  # in the caller's transfer scope
            try:
                for future in futures:
                    result_of(future)  # a Ctrl-C is raised within SIGNAL_SLICE, however long the request
            except BaseException:  # (a failed item set ``failed`` itself) Ctrl-C: start no further item
                failed.set()
                for future in futures:
                    future.cancel()
                raise

    # -- HTTP ---------------------------------------------------------------------------------------
    def _address(self, bucket: str, key: str) -> tuple[str, str, str]:
        """(scheme, host, path) of an object: path-style on custom endpoints, virtual-hosted on AWS."""
        encoded = _uri_encode(key, safe="/-_.~")
        if self._endpoint is not None:
            scheme, netloc, base = self._endpoint
            return scheme, netloc, f"{base}/{bucket}/{encoded}"
        region = self._bucket_regions.get(bucket, self.region)
        if re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket):
            return "https", f"{bucket}.s3.{region}.amazonaws.com", f"/{encoded}"
        return "https", f"s3.{region}.amazonaws.com", f"/{bucket}/{encoded}"

    def _connection(self, scheme: str, host: str) -> tuple[http.client.HTTPConnection, queue.LifoQueue[Any]]:
        """A kept-alive connection to ``host`` (or a new one) and its pool.

        An idle connection is not reused after ``_IDLE_S`` seconds, nor when the server has closed it
        meanwhile (its socket is readable while no request is outstanding), as urllib3 does.
        """
        with self._pools_lock:
            pool = self._pools.setdefault((scheme, host), queue.LifoQueue())
        while True:
            try:
                conn, since = pool.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() - since < _IDLE_S and conn.sock is not None \
                    and not select.select([conn.sock], [], [], 0)[0]:
                return conn, pool
            conn.close()
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, timeout=_CONNECT_TIMEOUT,
                                                                           context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, timeout=_CONNECT_TIMEOUT)
        return conn, pool

    def _signed_headers(self, method: str, bucket: str, host: str, path: str, query: Mapping[str, str],
                        headers: Mapping[str, str]) -> dict[str, str]:
        out = dict(headers)
        if self._requester_pays:
            out["x-amz-request-payer"] = "requester"
        if self._credentials is not None:
            key, secret, token = self._credentials()
            region = self._bucket_regions.get(bucket, self.region)
            _sign_v4(method, host, path, query, out, _Credentials(key, secret, token), region,
                     _dt.datetime.now(_dt.timezone.utc))
        else:
            out["x-amz-content-sha256"] = _UNSIGNED_PAYLOAD
        return out

    def _request(self, method: str, bucket: str, key: str, *, query: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None, body: bytes | None = None,
                 send: tuple[Any, int, int] | None = None,
                 into: Callable[[http.client.HTTPResponse], None] | None = None,
                 cancellable: bool = True) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; returns (status, lower-cased headers, body). Errors raise (see module doc).

        ``send=(file, offset, count)`` streams a file range as the body (sendfile, ``SEND_SLICE`` bytes
        at a time); ``into(response)`` consumes a successful response's body instead of reading it.
        ``cancellable``: ``TransferCancelled`` once ``cancel`` is set, before the request and between slices.
        """
        query = dict(query or {})
        conditional = any(k.lower() == "if-none-match" for k in headers or {})
        # The code of a refusal that sent this attempt without checksum headers, to learn which header the
        # store refused (If-None-Match or the checksums); None: not such an attempt.
        trial: str | None = None
        where = f"{bucket}/{key}"
        for _ in range(3):  # again only with a learnt region, or without checksums
            if cancellable:
                self._check_cancel(where)
            scheme, host, path = self._address(bucket, key)
            wanted = {k: v for k, v in (headers or {}).items()
                      if self._checksums and trial is None or not k.lower().startswith("x-amz-checksum")}
            if not (self._checksums and trial is None) and (body or send is not None and send[2] > 0):
                # No checksum headers (a store without additional checksums, or the attempt telling its
                # refusals apart): S3's original check, which S3-compatible stores implement (the body's MD5,
                # refused with BadDigest on a mismatch); one more read of the bytes.
                wanted["Content-MD5"] = _content_md5(body, send)
            all_headers = self._signed_headers(method, bucket, host, path, query, wanted)
            if body is not None:
                all_headers["Content-Length"] = str(len(body))
            elif send is None and method in ("PUT", "POST"):
                all_headers["Content-Length"] = "0"
            target = path + ("?" + "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" if v else _uri_encode(k)
                                            for k, v in sorted(query.items())) if query else "")
            conn, pool = self._connection(scheme, host)
            reusable = answered = False
            scope = self.cancel.current() if self.cancel is not None else None
            # Socket waits bounded by the time the RetryPolicy's deadline leaves this attempt (retry.attempt_timeout)
            read_timeout = attempt_timeout(_READ_TIMEOUT)
            if conn.sock is None:  # (connected by putrequest with conn.timeout)
                conn.timeout = attempt_timeout(_CONNECT_TIMEOUT)
            else:
                conn.sock.settimeout(read_timeout)
            carries_data = scope is not None and send is not None and send[2] > 0
            sending = scope.sending() if carries_data else contextlib.nullcontext()
            if cancellable:
                with self._pools_lock:
                    self._in_flight[conn] = scope
            with sending:  # (the time this request carries file data: TransferScope.send_seconds)
                try:
                    conn.putrequest(method, target, skip_accept_encoding=True)
                    for name, value in all_headers.items():
                        conn.putheader(name, value)
                    conn.endheaders()
                    if body is not None:
                        conn.send(body)
                    elif send is not None and send[2] > 0:
                        conn.sock.settimeout(read_timeout)
                        f, offset, count = send
                        sent = 0
                        while sent < count:
                            if cancellable:
                                self._check_cancel(where)
                            n = conn.sock.sendfile(f, offset + sent, min(SEND_SLICE, count - sent))
                            if n == 0:
                                break
                            sent += n
                            if scope is not None:
                                scope.note_sent(n, connection=id(conn), unsent=_unsent(conn.sock))
                        if sent != count:
                            raise OSError(errno.EIO, f"sent {sent} of {count} bytes of {bucket}/{key}")
                    if cancellable:  # cancelled while it connected (abort_requests found no socket to shut then):
                        self._check_cancel(where)  # from here on abort_requests shuts this socket
                    conn.sock.settimeout(read_timeout)
                    response = conn.getresponse()
                    answered = True
                    answer = {k.lower(): v for k, v in response.getheaders()}
                    status = response.status
                    if status < 300 and into is not None:
                        into(response)
                        data = b""
                    else:
                        data = response.read()  # (a HEAD's is empty; reading it frees the connection)
                    reusable = not response.will_close and response.isclosed()
                except (OSError, http.client.HTTPException) as exc:
                    if cancellable and self.cancel is not None and self.cancel.is_set():  # abort_requests shut it
                        reusable = False
                        raise TransferCancelled(f"transfer of {where} cancelled") from exc
                    raise
                finally:
                    if cancellable or scope is not None:
                        with self._pools_lock:  # (as measure looks: a request it sees has not ended)
                            self._in_flight.pop(conn, None)
                            if scope is not None:  # the send queue was delivered, or is gone with the connection
                                scope.note_unsent(id(conn), 0, lost=not answered)
                    if reusable:
                        pool.put((conn, time.monotonic()))
                    else:
                        conn.close()
            code, message = _xml_error(data) if status >= 300 or method == "POST" else (None, "")
            if trial is not None and not (_refusal(status, code) or status in (408, 429) or status >= 500):
                self._checksums_refused(trial)  # without them the store took (or judged) the request
            if status < 300 and not (method == "POST" and data.lstrip()[:200].find(b"<Error>") >= 0):
                return status, answer, data
            region = answer.get("x-amz-bucket-region")
            if self._endpoint is None and region and region != self._bucket_regions.get(bucket, self.region) \
                    and status in (301, 400, 403):
                self._bucket_regions[bucket] = region  # AWS told us where the bucket lives: ask there
                continue
            if _refusal(status, code):
                named = (_xml_text(data, "Header") or "").lower() + " " + message.lower()
                checksummed = any(k.lower().startswith("x-amz-checksum") for k in wanted)
                if conditional and ("if-none-match" in named or code == "NotImplemented" and not checksummed):
                    raise self._no_conditional_writes(bucket, key, status, code, message)
                if checksummed and conditional and "x-amz-checksum" not in named:
                    trial = code or "HTTP"  # either header may be the one refused: try once without the checksums
                    continue
                if checksummed:
                    self._checksums_refused(code)
                    continue
            if method == "HEAD" and status == 404:
                code = "NoSuchKey"
            _raise(S3ResponseError(status if status >= 300 else 500, code, message, f"{bucket}/{key}"))
        raise AssertionError("unreachable")

    def _checksums_refused(self, code: str | None) -> None:
        if self._checksums:
            self._checksums = False  # an S3-compatible store without additional checksums: carry on without
            log.info("%r refused S3 checksum headers (%s): uploads to it carry Content-MD5 instead; the "
                     "manifest's crc32c still verifies every file.", self, code)

    def _no_conditional_writes(self, bucket: str, key: str, status: int, code: str | None,
                               message: str) -> ConfigError:
        """The error for a store that refuses ``If-None-Match: *`` (answered ``status`` ``code``)."""
        where = f"{self._endpoint[0]}://{self._endpoint[1].rpartition('@')[2]}" if self._endpoint else "AWS S3"
        return ConfigError(
            f"The S3 store at {where} does not support conditional writes: it refused a create-only write of "
            f"s3://{bucket}/{key} (If-None-Match: *) with {code or 'HTTP'} ({status}): {message or 'no message'}. "
            "cloudckpt's commit protocol needs them (If-None-Match: * on PutObject and CompleteMultipartUpload) "
            "so that no writer replaces another's committed objects. Use a store or version that supports "
            "them (AWS S3 does), or a gs:// or local directory.")

    def _get_range(self, bucket: str, key: str, span: tuple[int, int], size: int, fd: int | None,
                   progress: Callable[[int], None] | None, reported: list[int],
                   part_size: int | None = None) -> list[tuple[int, int, int]]:
        """GET bytes ``span`` of an object of ``size`` bytes, into ``fd`` at their offsets if given;
        ``(start, end, crc32c)`` of the span, or of each ``part_size``-byte part it covers."""
        start, end = span
        pieces: list[tuple[int, int, int]] = []

        def into(response: http.client.HTTPResponse) -> None:
            if response.status != 206 and not (start == 0 and end == size):
                # a store that ignored Range sent the whole object: writing it at ``start`` would corrupt the file
                raise S3ResponseError(500, "InvalidRange", f"HTTP {response.status} for bytes {start}-{end - 1}",
                                      f"{bucket}/{key}")
            total = _object_size(response)
            if total is not None and total != size:  # replaced since it was listed (or HEAD): not what was asked
                raise S3ResponseError(409, "ObjectChanged", f"the object has {total} bytes now, not {size}",
                                      f"{bucket}/{key}")
            pieces.clear()
            offset = start
            while offset < end:
                piece_start, value = offset, 0
                piece_end = min(end, (offset // part_size + 1) * part_size) if part_size else end
                while offset < piece_end:
                    self._check_cancel(f"{bucket}/{key}")
                    chunk = response.read(min(READ_BUFFER, piece_end - offset))  # bytes: google_crc32c
                    if not chunk:  # takes no memoryview
                        raise http.client.IncompleteRead(b"", end - offset)
                    value = google_crc32c.extend(value, chunk)
                    if fd is not None:
                        _pwrite_all(fd, chunk, offset)
                    offset += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                        reported[0] += len(chunk)
                pieces.append((piece_start, piece_end, value))
        self._request("GET", bucket, key, headers={"Range": f"bytes={start}-{end - 1}"}, into=into)
        return pieces


def _object_size(response: http.client.HTTPResponse) -> int | None:
    """The whole object's size an answer to a GET states (``Content-Range: bytes a-b/size``, or a 200's
    ``Content-Length``), or None."""
    if response.status == 206:
        total = (response.getheader("content-range") or "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.getheader("content-length")
    return int(length) if length and length.isdigit() else None


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """glibc's ``fallocate(2)`` wrapper (Linux; None elsewhere). Not ``os.posix_fallocate``: where the file
    system cannot allocate, glibc's posix_fallocate emulates it by writing every block (gcsfuse, NFSv3...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _libc_fallocate()


def _preallocate(fd: int, size: int, path: str) -> None:
    """Give the file ``path``, open as ``fd``, its final ``size`` in bytes (``ftruncate``) and, on Linux, its disk
    blocks before the bytes arrive (``fallocate(2)``, mode 0; rclone's local backend preallocates downloads too):
    the ranges then write into extents that exist, not through ext4's delayed allocation, which reserves and
    accounts each 4 KiB block as it is written (``perf``: ~15 % of a restore's system time). Measured (restore of
    8 x 128 MiB from SeaweedFS, the client on a core shared with a busy loop, Linux 6.18, ext4, 2026-12-03, 6
    interleaved repetitions): 0.72-0.80 client CPU-s/GiB against 0.70-1.07 without, 561-651 MiB/s against
    433-660 (s5cmd 403-468). A disk without room fails here, before any byte is downloaded; the blocks ext4
    allocated before it ran out are given back at once (a failed ``fallocate`` keeps them). A file system that
    cannot allocate ahead (EOPNOTSUPP: NFSv3, FUSE mounts...) is written as before, allocating as it goes.

    Raises:
        OSError: ``ftruncate`` failed, or (ENOSPC, EDQUOT, EFBIG) the disk or quota has no room for ``size`` bytes;
            the file is then empty.
    """
    os.ftruncate(fd, size)
    if size <= 0 or _FALLOCATE is None:
        return
    if _FALLOCATE(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            os.ftruncate(fd, 0)  # what was allocated before it failed stays allocated otherwise
            raise OSError(err, f"{os.strerror(err)} (allocating {size} bytes for a download)", path)
        log.debug("fallocate(2) of %d bytes refused (%s): the download allocates as it writes.", size,
                  errno.errorcode.get(err, err))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset`` (a regular file may take fewer at once),
    at most ``WRITE_SLICE`` bytes per call."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_SLICE], offset)
        view = view[n:]
        offset += n


def _check_cover(bounds: Sequence[tuple[int, int]], size: int, where: str, *, parts: bool = False) -> None:
    """Raise ValueError unless ``bounds`` are consecutive ``[start, end)`` ranges covering ``size`` bytes
    (``where``: the object they are for); with ``parts``, also ranges S3 accepts as one multipart upload's
    parts: at most 10,000, each but the last at least 5 MiB."""
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != size \
            or any(b1 != a2 or a2 >= b2 for (_, b1), (a2, b2) in zip(bounds, bounds[1:])):
        raise ValueError(f"The byte ranges given for {where} do not cover its {size} bytes: pass consecutive "
                         f"[start, end) ranges from 0 to {size}, as its manifest entry records them "
                         "(FileEntry.checksummed_ranges()).")
    if not parts:
        return
    small = next(((a, b) for a, b in bounds[:-1] if b - a < _MIN_PART), None)
    if len(bounds) > _MAX_PARTS or small is not None:
        found = (f"{len(bounds)} ranges" if small is None
                 else f"bytes {small[0]}-{small[1] - 1} are a part of {small[1] - small[0]} bytes")
        raise ValueError(f"The byte ranges given for {where} break S3's multipart limits ({found}; at most "
                         f"{_MAX_PARTS} parts, each but the last at least {_MIN_PART} bytes): give ranges of at "
                         "least 5 MiB (manifest.PART_SIZE parts), or upload the file without copying.")


def _combined(checksums: Sequence[tuple[int, int, int]]) -> int:
    """The crc32c of consecutive ranges ``(start, end, crc32c)`` together."""
    full = 0  # crc32c of no bytes
    for start, end, crc in checksums:
        full = crc32c_combine(full, crc, end - start)
    return full


def _coalesced(chunks: Sequence[tuple[int, int, int, bool]], upload_size: int,
               copy_size: int) -> list[tuple[int, int, int, bool]]:
    """Consecutive chunks of one kind merged into parts of up to ``upload_size`` / ``copy_size`` bytes
    (a chunk larger than that stays one part); each part's crc32c combined from its chunks'."""
    parts: list[tuple[int, int, int, bool]] = []
    for start, end, crc, copy in chunks:
        if parts:
            p_start, p_end, p_crc, p_copy = parts[-1]
            if p_copy == copy and end - p_start <= (copy_size if copy else upload_size):
                parts[-1] = (p_start, end, crc32c_combine(p_crc, crc, end - start), copy)
                continue
        parts.append((start, end, crc, copy))
    return parts


def _multipart_etag(part_etags: Sequence[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these ETags (in order): the MD5 of their binary
    MD5s, ``-<parts>``; None when a part's ETag is not 32 hex digits."""
    digests = [md5 for etag in part_etags if (md5 := etag_md5(etag)) is not None]
    if not digests or len(digests) < len(part_etags):
        return None
    return hashlib.md5(b"".join(bytes.fromhex(d) for d in digests), usedforsecurity=False).hexdigest() + \
        f"-{len(digests)}"


def _xml_text(data: bytes, tag: str) -> str | None:
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag == tag or element.tag.endswith("}" + tag):
            return element.text
    return None


def _refusal(status: int, code: str | None) -> bool:
    """An answer by which a store says it does not implement something the request asked for."""
    return status in (400, 501) and code in _UNSUPPORTED_CODES


def _xml_error(data: bytes) -> tuple[str | None, str]:
    if not data:
        return None, ""
    return _xml_text(data, "Code"), (_xml_text(data, "Message") or "")[:300]


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# -- storage_options -> transport -------------------------------------------------------------------------
# s3fs options that tune only s3fs's own caching/concurrency, or that the transport honours itself.
_HARMLESS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size",
                       "default_fill_cache", "default_cache_type", "max_concurrency", "fixed_upload_size",
                       "cache_regions", "skip_instance_cache", "config_kwargs", "version_aware", "asynchronous",
                       "loop"})
_CLIENT_KWARGS = frozenset({"endpoint_url", "region_name", "verify", "aws_access_key_id", "aws_secret_access_key",
                            "aws_session_token", "use_ssl"})


_SESSIONS: ProcessCache[Any] = ProcessCache(16)  # environments come and go (tests): keep the newest few


def forget_sessions() -> None:
    """New transports get a new botocore session: one resolves the default chain's credentials once and keeps
    them (called when a store refused them, see ``remote._forget_s3fs``)."""
    _SESSIONS.clear()


def aws_environment() -> list[tuple[str, str]]:
    """What a cached client or session depends on besides its options: the ``AWS_*`` environment variables,
    sorted (endpoint, region, credentials, profile and config file names), and the modification time and
    size of the shared config and credentials files (``~/.aws/config``, ``~/.aws/credentials`` or the
    files those variables name), so keys rotated in a file give new stores a new session. Holds secrets:
    hash it before keeping it."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    for name, default in (("AWS_CONFIG_FILE", "~/.aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")):
        path = os.path.expanduser(os.environ.get(name) or default)
        try:
            stat = os.stat(path)
        except OSError:
            continue
        env.append((f"file:{path}", f"{stat.st_mtime_ns}:{stat.st_size}"))
    return env


def _botocore_session(profile: str | None) -> Any:
    """A botocore session for ``profile`` (region and the credential chain), shared by every transport of
    this process while the ``AWS_*`` environment variables stay the same (a change gives a new session, so
    new environment credentials are seen). Creating one registers ~1200 event handlers: 5-12 ms of CPU,
    per ``RemoteStore`` before. Keyed by a hash: no credential is kept in a key."""
    import botocore.session

    key = hashlib.sha256(repr((profile, aws_environment())).encode()).hexdigest()
    return _SESSIONS.get(key, lambda: botocore.session.Session(profile=profile))


def transport_for(storage_options: Mapping[str, Any] | None, **sizes: int) -> S3Transport | None:
    """The transport for s3fs-style ``storage_options``, or None to stay on s3fs.

    Mapped: ``key``/``secret``/``token`` (and ``username``/``password``),
    ``endpoint_url`` (also in ``client_kwargs``), ``client_kwargs`` ``region_name``
    / ``verify`` / ``aws_*`` credentials, ``anon``, ``profile``, ``requester_pays``,
    ``use_ssl``; credentials otherwise come from botocore's usual chain
    (environment, config files, then instance metadata), resolved here once.
    s3fs's cache and concurrency options are ignored. None (s3fs keeps the
    data path too) for anything else, e.g. ``s3_additional_kwargs`` (SSE-KMS,
    ACLs), an aiobotocore ``session``, a proxy from the environment, or no
    credentials at all. ``sizes`` go to ``S3Transport`` (part_size...).
    """
    options = dict(storage_options or {})
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    if set(client_kwargs) - _CLIENT_KWARGS:
        return None
    key = options.pop("key", None) or options.pop("username", None) or client_kwargs.get("aws_access_key_id")
    secret = options.pop("secret", None) or options.pop("password", None) \
        or client_kwargs.get("aws_secret_access_key")
    token = options.pop("token", None) or client_kwargs.get("aws_session_token")
    anon = bool(options.pop("anon", False))
    profile = options.pop("profile", None)
    requester_pays = bool(options.pop("requester_pays", False))
    use_ssl = options.pop("use_ssl", client_kwargs.get("use_ssl", True))
    endpoint = options.pop("endpoint_url", None) or client_kwargs.get("endpoint_url")
    options.pop("key", None)
    options.pop("secret", None)
    if set(options) - _HARMLESS or options.get("version_aware") or options.get("asynchronous"):
        return None
    if any(os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
        return None  # s3fs honours proxies from the environment; this transport does not
    session = _botocore_session(profile)
    if endpoint is None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint is not None and not use_ssl and endpoint.startswith("https://"):
        endpoint = "http://" + endpoint[len("https://"):]
    region = client_kwargs.get("region_name") or session.get_config_variable("region") or "us-east-1"
    credentials: Callable[[], tuple[str, str, str | None]] | None
    if anon:
        credentials = None
    elif key and secret:
        fixed = (str(key), str(secret), str(token) if token else None)
        credentials = lambda: fixed  # noqa: E731
    else:
        resolved = session.get_credentials()
        if resolved is None:
            return None  # s3fs decides what to do without credentials (it raises a clear error)

        def credentials() -> tuple[str, str, str | None]:
            frozen = resolved.get_frozen_credentials()
            return frozen.access_key, frozen.secret_key, frozen.token
    verify = client_kwargs.get("verify", os.environ.get("AWS_CA_BUNDLE") or True)
    return S3Transport(endpoint, region, credentials, verify=verify, requester_pays=requester_pays, **sizes)
