"""gs:// resumable uploads resumed chunk by chunk, under cloudckpt's RetryPolicy.

gcsfs sends a large file as one resumable upload session: a POST that opens it (its answer's ``Location``,
the session URI, carries ``upload_id``), then the file's bytes in chunks, each a request to that URI with
``Content-Range: bytes START-END/TOTAL``, answered ``308`` with ``Range: bytes=0-LAST`` (what the store
holds so far) until the last one, answered with the object. cloudckpt's gcsfs instances send each request
once (``remote._single_attempt_gcsfs``): the policy retries the operation, which for an upload is the whole
file, a new session from byte 0. For a chunk that failed (a 503, a dropped connection) that re-sends every
byte already accepted: a GiB for one 503 in a multi-GiB shard.

So a chunk request that fails is retried on its own, resumed as Google documents
(https://cloud.google.com/storage/docs/resumable-uploads, "Resume an interrupted upload"; the same in
https://cloud.google.com/storage/docs/performing-resumable-uploads#status-check): ask the session what it
holds (``PUT`` with ``Content-Range: bytes */TOTAL``, or ``*/*`` when the size is not known yet, and no
body), answered ``308`` with ``Range: bytes=0-LAST`` (no ``Range``: nothing yet) or, if the upload is
complete, ``200``/``201`` with the object; then send the chunk's bytes from the next one. Each retry is an
attempt of the store's ``RetryPolicy`` (``RetryPolicy.acall``: its attempts, backoff and deadline, counted
per chunk as per part on ``s3://``), reported through the operation's ``on_retry`` (logged, counted by
cause in the stats) and ended by its ``cancel``. The waits are ``asyncio.sleep`` on gcsfs's loop thread.

What a chunk retry cannot resume safely is raised as the chunk's own error, for the operation's policy to
restart the file: a session that is gone (404, 410), a store that says it holds bytes before the chunk's
first (bytes gcsfs was told it had) or after its last, one that finalised the object at another size than
the upload's. A chunk whose retries the policy gave up on ends the operation (``ChunkRetries.gave_up``):
the store failed ``max_attempts`` times in a row or past the deadline, so the file is not started again
(as on ``s3://``, where a part's exhausted retries fail the upload). Whatever reaches the store, the
commit compares the crc32c GCS computed from the bytes it holds with the manifest's
(``commit._check_sizes``): an object assembled wrongly is never committed.

A cancelled operation (the store's ``cancel``: ``RemoteStore.cancel_transfers``, for the whole store or the
operation's ``TransferScope``) sends no further chunk: before each chunk request, and before each attempt to
resume one, the cancel is looked at and ``TransferCancelled`` raised (the error the ``s3://`` transport raises
before a part: "cancelled on purpose"), as ``s3_transport`` looks before each part and slice. gcsfs then cancels
the session (its ``DELETE``, sent still: the store drops the bytes it holds; a failure of that ``DELETE`` does
not hide the cancel). The chunk in flight when the cancel comes is not cut: it ends first (at most one chunk,
``TransferOptions.part_size``, is sent after the cancel).

The operation's retry settings reach gcsfs's coroutine through a ``ContextVar`` (``retrying_chunks``):
fsspec's ``sync`` runs the coroutine as a task made from the calling thread's context. Without one (a
request made outside ``RemoteStore``'s operations), a chunk is sent once, as every other request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Mapping
from urllib.parse import parse_qs, urlsplit

from .cancel import CancelSignal, TransferCancelled
from .retry import RetryPolicy, describe_cause, is_transient

log = logging.getLogger("cloudckpt")

# ``_request``'s answer in gcsfs: (HTTP status, headers, aiohttp request info, body).
Answer = tuple[int, Mapping[str, str], Any, bytes]
Request = Callable[..., Awaitable[Answer]]

_CONTENT_RANGE = re.compile(r"bytes (?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<total>\d+|\*)")
_HELD = re.compile(r"bytes=0-(?P<last>\d+)")
# Answers to a resumed chunk that mean the session is not where it was: gone (expired, cancelled: 404, 410), or
# refusing the bytes it said it lacked (400): a new session is needed.
_NOT_RESUMABLE = frozenset({400, 404, 410})


@dataclass
class ChunkRetries:
    """How the chunk requests of one operation's resumable uploads are retried: the store's ``policy`` and
    ``cancel`` (set, or the operation's scope cancelled: no further chunk is sent, ``TransferCancelled``),
    ``on_retry`` of the operation (``RemoteStore._retry_reporter``: logs, counts, reports the cause).
    ``gave_up`` is set when the policy gave up on a chunk: the operation is not retried as a whole."""

    policy: RetryPolicy
    cancel: CancelSignal | threading.Event
    on_retry: Callable[[int, BaseException, float], None]
    gave_up: bool = False

    def check_cancel(self, what: str) -> None:
        """Raise ``TransferCancelled`` (naming ``what`` was not sent) once ``cancel`` is set: in the calling
        context, gcsfs's coroutine, that is also the operation's ``TransferScope`` cancelled on its own."""
        if self.cancel.is_set():
            raise TransferCancelled(f"resumable upload cancelled before {what}")


_RETRIES: ContextVar[ChunkRetries | None] = ContextVar("cloudckpt_gcs_chunk_retries", default=None)


@contextlib.contextmanager
def retrying_chunks(retries: ChunkRetries) -> Iterator[ChunkRetries]:
    """Within the block (this thread's context, and gcsfs coroutines started from it), chunk requests of
    resumable uploads are retried per ``retries``."""
    token = _RETRIES.set(retries)
    try:
        yield retries
    finally:
        _RETRIES.reset(token)


def resuming_chunks(single: Request) -> Request:
    """gcsfs's ``GCSFileSystem._request`` (``single``: its undecorated coroutine, one attempt) with a failed
    chunk of a resumable upload session resumed under the operation's ``ChunkRetries``; any other request,
    or any request outside ``retrying_chunks``, is ``single`` itself."""

    async def _request(self: Any, method: str, path: str, *args: Any, headers: Mapping[str, str] | None = None,
                       data: Any = None, **kwargs: Any) -> Answer:
        retries = _RETRIES.get()
        if retries is None or args or not _is_session(path):
            return await single(self, method, path, *args, headers=headers, data=data, **kwargs)
        if method.upper() == "DELETE":  # gcsfs cancels the session of an upload that failed, then re-raises
            try:
                return await single(self, method, path, headers=headers, data=data, **kwargs)
            except FileNotFoundError:  # gone already (what made the chunk unresumable): nothing to cancel; the
                return 404, {}, None, b""  # upload's own error is raised, not this one, and the file restarted
            except Exception as exc:
                if not retries.cancel.is_set():
                    raise
                # the upload was cancelled: its TransferCancelled is the error to raise, not the cancel's failure
                log.debug("Cancelling the resumable upload session of a cancelled upload failed: %s",
                          describe_cause(exc))
                return 499, {}, None, b""
        chunk = _Chunk.of(method, headers, data)
        if chunk is None:
            retries.check_cancel("its next request")
            return await single(self, method, path, headers=headers, data=data, **kwargs)
        retries.check_cancel(f"bytes {chunk.start}-{chunk.end}")
        return await chunk.send(lambda m, h, d: single(self, m, path, headers=h, data=d, **kwargs), retries)

    _request.__doc__ = single.__doc__
    return _request


class _CannotResume(Exception):
    """The session cannot be resumed where the chunk began (why in the message); not transient, so that the
    chunk's retry loop ends and its first error is raised for the operation to restart the file."""


@dataclass
class _Chunk:
    """One chunk request of a resumable upload session: bytes ``start``..``end`` (inclusive; an empty chunk,
    ``bytes */TOTAL``, finalises: ``start = total``) of an upload of ``total`` bytes (None: not known yet)."""

    method: str
    headers: Mapping[str, str]
    data: Any  # the body as gcsfs gave it (sent as it is the first time)
    payload: memoryview  # the same bytes, to slice
    start: int
    end: int
    total: int | None

    @classmethod
    def of(cls, method: str, headers: Mapping[str, str] | None, data: Any) -> "_Chunk | None":
        """The chunk a request to a session URI sends, or None if it is not a chunk (or a body this cannot
        slice)."""
        if method.upper() not in ("PUT", "POST") or not headers:
            return None
        content_range = next((v for k, v in headers.items() if k.lower() == "content-range"), None)
        match = _CONTENT_RANGE.fullmatch(str(content_range or "").strip())
        if match is None:
            return None
        total = None if match["total"] == "*" else int(match["total"])
        if match["start"] is None:
            if total is None:
                return None  # a status query of an upload of unknown size: not a chunk
            start, end = total, total - 1
        else:
            start, end = int(match["start"]), int(match["end"])
        payload = _payload(data)
        if payload is None or len(payload) != end - start + 1:
            return None
        return cls(method, dict(headers), data, payload, start, end, total)

    @property
    def final(self) -> bool:
        """True for the upload's last chunk: its answer is the object."""
        return self.total is not None and self.end + 1 == self.total

    async def send(self, request: Callable[[str, Mapping[str, str], Any], Awaitable[Answer]],
                   retries: ChunkRetries) -> Answer:
        """The chunk's answer: sent once, then, on a transient failure, resumed per ``retries``.

        Raises:
            the chunk's first error: the session could not be resumed (the operation restarts the file);
            the last error: the policy gave up (``retries.gave_up`` set) or it is fatal.
        """
        first: list[BaseException] = []

        async def attempt() -> Answer:
            if not first:
                try:
                    return await request(self.method, self.headers, self.data)
                except Exception as exc:
                    first.append(exc)
                    raise
            retries.check_cancel(f"resuming bytes {self.start}-{self.end}")
            return await self._resume(request)

        try:
            return await retries.policy.acall(attempt, on_retry=retries.on_retry, cancel=retries.cancel)
        except _CannotResume as cannot:
            why = str(cannot)
        except TransferCancelled:
            raise
        except Exception:
            retries.gave_up = True
            raise
        log.info("A resumable upload's chunk (bytes %d-%d) cannot be resumed: %s; its upload starts again.",
                 self.start, self.end, why)
        raise first[0]

    async def _resume(self, request: Callable[[str, Mapping[str, str], Any], Awaitable[Answer]]) -> Answer:
        """Ask the session what it holds, then send the chunk's bytes it lacks (its answer), or none: the
        status answer when it holds them all."""
        status_query = {"Content-Range": f"bytes */{'*' if self.total is None else self.total}",
                        "Content-Length": "0"}
        refused: str | None = None
        try:
            answer = await request("PUT", status_query, b"")
        except Exception as exc:
            if is_transient(exc):
                raise
            refused = describe_cause(exc)
        if refused is not None:  # raised outside the handler: no transient error rides along as its context
            raise _CannotResume(f"its status query was refused: {refused}")
        status, headers, _, body = answer
        if status in (200, 201):  # the upload is complete: the failed request was its last, and it arrived
            size = _object_size(body)
            if self.final and size == self.total:
                return answer
            raise _CannotResume(f"the store finalised the object with {size} bytes, the upload has "
                                f"{self.total if self.total is not None else 'more'}")
        if status != 308:
            raise _CannotResume(f"its status query was answered HTTP {status}")
        held = _held(headers)
        if held is None or not self.start <= held <= self.end + 1:
            raise _CannotResume(f"the store holds {'an unreadable range' if held is None else f'{held} bytes'}, "
                                f"the chunk covers bytes {self.start}-{self.end}")
        if held == self.end + 1 and not self.final:
            log.debug("Resumable upload: bytes %d-%d had arrived.", self.start, self.end)
            return answer  # the chunk had arrived (its answer was lost): what it would have been answered
        rest = self.payload[held - self.start:]
        log.debug("Resumable upload: resuming at byte %d (chunk %d-%d).", held, self.start, self.end)
        headers_now = {k: v for k, v in self.headers.items() if k.lower() not in ("content-range", "content-length")}
        headers_now["Content-Range"] = (f"bytes {held}-{self.end}/{self.total if self.total is not None else '*'}"
                                        if len(rest) else f"bytes */{self.total}")
        headers_now["Content-Length"] = str(len(rest))
        try:
            return await request(self.method, headers_now, rest)
        except Exception as exc:
            code = 404 if isinstance(exc, FileNotFoundError) else getattr(exc, "code", None)
            if code not in _NOT_RESUMABLE:
                raise
        raise _CannotResume(f"resuming at byte {held} was answered HTTP {code}")


def _is_session(path: Any) -> bool:
    """True for a resumable upload's session URI (the initiation's ``Location``: it carries ``upload_id``)."""
    return isinstance(path, str) and "upload_id" in parse_qs(urlsplit(path).query)


def _payload(data: Any) -> memoryview | None:
    """A request body gcsfs sends (bytes, a memoryview, a file-like ``UnclosableBytesIO``; None) as bytes."""
    if data is None:
        return memoryview(b"")
    if hasattr(data, "seek") and hasattr(data, "read"):
        data.seek(0)
        return memoryview(data.read())
    try:
        return memoryview(data).cast("B")
    except TypeError:
        return None


def _held(headers: Mapping[str, str]) -> int | None:
    """Bytes a session holds, from a 308 answer's ``Range: bytes=0-LAST`` (none: 0); None if unreadable."""
    value = headers.get("Range")
    if value is None:
        return 0
    match = _HELD.fullmatch(value.strip())
    return None if match is None else int(match["last"]) + 1


def _object_size(body: bytes) -> int | None:
    try:
        return int(json.loads(body)["size"])
    except (ValueError, KeyError, TypeError):
        return None

