"""Retrying storage operations: which errors are transient, and how long to wait.

All classification of backend errors (s3fs/botocore, gcsfs, aiohttp, OSError)
lives here, so the uploader, restore and CLI agree on what deserves a retry.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, TypeVar

from .errors import ConfigError, RemoteError, integer_option, number_option
from .shutdown import EXECUTORS_SHUT_DOWN

log = logging.getLogger("cloudckpt")
T = TypeVar("T")

# The least socket timeout an attempt gets from ``attempt_timeout`` however little of its deadline is left: an
# attempt the policy started may still wait this long for a byte (so an operation can end up to this much past
# its deadline).
MIN_ATTEMPT_TIMEOUT = 1.0
# time.monotonic() by which the innermost ``RetryPolicy.call`` running in this context must give up (its start
# plus its deadline, or an enclosing call's sooner one); None outside any call with a deadline.
_GIVE_UP_AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("cloudckpt_retry_give_up_at",
                                                                         default=None)


def attempt_timeout(default: float) -> float:
    """Seconds a request of the attempt running now may wait on its socket (to connect, or for the store's next
    bytes): ``default``, bounded by the time left until the deadline of the ``RetryPolicy.call`` running it
    (``RetryPolicy.deadline``; at least ``MIN_ATTEMPT_TIMEOUT``). Outside such a call: ``default``.

    cloudckpt's own S3 transport (``s3_transport``) sets each request's socket timeouts with it, so a stalled
    request (a store that accepts and never answers) ends by the deadline, not after the transport's
    60 s read timeout; ``RetryPolicy.acall`` (a gs:// resumable upload's chunks) bounds each attempt by it too.
    Other requests of the fsspec backends (s3fs, gcsfs) have their timeouts set once per file system
    (``remote._with_single_retry_layer``): there the deadline bounds the retries only."""
    give_up_at = _GIVE_UP_AT.get()
    if give_up_at is None:
        return default
    return min(default, max(MIN_ATTEMPT_TIMEOUT, give_up_at - time.monotonic()))


# S3 error codes that mean "try again later" (throttling, server trouble).
_TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
    "OperationAborted", "XAmzContentSHA256Mismatch", "BadDigest", "IncompleteBody",
})
_TRANSIENT_HTTP = frozenset({408, 425, 429})
_TRANSIENT_ERRNO = frozenset({
    errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.EAGAIN,
})
_UNREACHED_ERRNO = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE})
# Exceptions whose meaning is unambiguous and permanent.
_FATAL_TYPES = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                NotADirectoryError, ValueError, TypeError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _http_status_and_code(exc: BaseException) -> tuple[int | None, str | None] | None:
    """(HTTP status, service error code) for botocore ClientError or gcsfs HttpError, else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, response["Error"].get("Code")
    if type(exc).__name__ == "HttpError" and isinstance(getattr(exc, "code", None), int):  # gcsfs
        return exc.code, None  # type: ignore[attr-defined]
    return None


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    mod = type(exc).__module__ or ""
    # botocore.exceptions.HTTPClientError covers EndpointConnectionError, ConnectionClosedError,
    # ReadTimeoutError...; aiohttp.ClientError covers ServerDisconnected, ClientPayloadError...
    if mod.startswith(("botocore", "aiohttp", "urllib3", "requests", "http.client")):
        names = {c.__name__ for c in type(exc).__mro__}
        return bool(names & {"HTTPClientError", "ClientError", "ConnectionError", "HTTPException",
                             "ProtocolError", "IncompleteReadError", "ResponseStreamingError",
                             "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError"}) \
            and "ClientResponseError" not in names
    return False


def _retryable_by_its_library(exc: BaseException) -> bool:
    """True for errors their library marks as worth another attempt, which gcsfs's own retry loop (off under
    cloudckpt's, see ``remote._single_attempt_gcsfs``) retried: gcsfs's ``ChecksumError`` (downloaded bytes
    that do not match the store's checksum, with a ``consistency`` option) and google-auth errors flagged
    ``retryable`` (a token endpoint or metadata server answering 5xx or throttling)."""
    mod = type(exc).__module__ or ""
    if mod.startswith("gcsfs") and type(exc).__name__ == "ChecksumError":
        return True
    return mod.startswith(("google.auth", "google.oauth2")) and getattr(exc, "retryable", False) is True


def is_transient(exc: BaseException) -> bool:
    """True if retrying the operation that raised ``exc`` may succeed.

    Throttling (S3 ``SlowDown``, HTTP 429), server errors (5xx, but 501 Not
    Implemented), timeouts and connection resets are transient. Access denied,
    missing buckets, bad credentials, features the store lacks and programming
    errors are not; nor is a call made while the interpreter exits, after executors were shut down
    (``shutdown.EXECUTORS_SHUT_DOWN``: asyncio's default executor resolves host names for aiobotocore).
    """
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, RemoteError):
            return e.transient
    if any(EXECUTORS_SHUT_DOWN in str(e) for e in chain):  # the interpreter is exiting: no retry can succeed
        return False
    if any(isinstance(e, AttemptTimedOut) for e in chain):  # a stalled request cut at the deadline
        return True
    for e in chain:  # the service's own answer is the most precise signal
        status_code = _http_status_and_code(e)
        if status_code is not None:
            status, code = status_code
            if code in _TRANSIENT_S3_CODES:
                return True
            # 501 Not Implemented: the store lacks the feature asked for, and will on every attempt
            return status is not None and (status >= 500 and status != 501 or status in _TRANSIENT_HTTP)
    if any("SlowDown" in str(e) or "reduce your request rate" in str(e) for e in chain):
        return True
    for e in chain:
        if _is_connection_error(e) or _retryable_by_its_library(e):
            return True
        if isinstance(e, _FATAL_TYPES):
            return False
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return False


def is_connection_failure(exc: BaseException) -> bool:
    """True if ``exc`` is a failure to reach the store (refused, reset, timed out, unreachable): no answer
    from it at all, as opposed to an error it answered with."""
    chain = list(_chain(exc))
    if any(_http_status_and_code(e) is not None for e in chain):
        return False
    return any(_is_connection_error(e) or isinstance(e, OSError) and e.errno in _UNREACHED_ERRNO
               for e in chain)


def describe_cause(exc: BaseException) -> str:
    """A short, credential-free label for an error: ``SlowDown``, ``HTTP 503``, ``ConnectionResetError``..."""
    chain = list(_chain(exc))
    for e in chain:
        status_code = _http_status_and_code(e)
        if status_code is not None:
            status, code = status_code
            return code or f"HTTP {status}"
    for e in chain:
        if not isinstance(e, RemoteError):  # a RedactedError stands in for its original_type
            return str(getattr(e, "original_type", type(e).__name__)).rsplit(".", 1)[-1]
    return type(exc).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient storage errors.

    The wait before retry ``n`` (1-based) is uniform in
    ``[0, min(max_backoff, initial_backoff * 2**(n-1))]`` (AWS's "full jitter").
    An operation is abandoned after ``max_attempts`` attempts, or when the next
    wait would take it past ``deadline`` seconds since its first attempt.

    Args:
        max_attempts: attempts in total, including the first (>= 1).
        initial_backoff: upper bound of the first wait, in seconds.
        max_backoff: cap on any single wait, in seconds.
        deadline: total seconds one operation may spend, from its first attempt; None for no limit. No retry
            starts whose wait would pass it; and on cloudckpt's own ``s3://`` transport each attempt's socket
            timeouts (to connect, and between the store's bytes) are bounded by the time it leaves
            (``attempt_timeout``, at least ``MIN_ATTEMPT_TIMEOUT``), so a stalled request ends by then too. On
            the fsspec backends (the s3fs fallback, gcsfs) a request in flight (but a ``gs://`` resumable upload's
            chunk, retried by ``acall``: cut at the deadline) is bounded by their own timeouts
            instead (``remote._with_single_retry_layer``: 10 s to connect, 60 s between bytes of an answer,
            unless ``storage_options`` set others), which may take the operation up to that much past it.
        seed: seed for the jitter, for reproducible tests; None for a random one.
    """

    max_attempts: int = 10
    initial_backoff: float = 0.5
    max_backoff: float = 20.0
    deadline: float | None = 300.0
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        attempts = integer_option(self.max_attempts)
        if attempts is None or attempts < 1:
            raise ConfigError(f"RetryPolicy max_attempts must be an integer >= 1, got {self.max_attempts!r}.")
        object.__setattr__(self, "max_attempts", attempts)  # a numpy integer stored as the int
        for name in ("initial_backoff", "max_backoff"):
            seconds = number_option(getattr(self, name))
            if seconds is None or seconds < 0:
                raise ConfigError(f"RetryPolicy {name} must be a number of seconds >= 0, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, seconds)
        if self.deadline is not None:
            deadline = number_option(self.deadline)
            if deadline is None or deadline <= 0:
                raise ConfigError(f"RetryPolicy deadline must be > 0 seconds or None, got {self.deadline!r}.")
            object.__setattr__(self, "deadline", deadline)
        seed = integer_option(self.seed)
        if seed is not None:  # random.Random takes no numpy integer
            object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        cap = min(self.max_backoff, self.initial_backoff * (2 ** (retry - 1)))
        return self._rng.uniform(0.0, cap)

    def call(
        self,
        fn: Callable[[], T],
        *,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        cancel: threading.Event | None = None,
        retry_if: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """Run ``fn`` until it succeeds, a fatal error occurs, or the policy gives up.

        ``on_retry(attempt, exc, delay)`` is called before each wait. Setting
        ``cancel`` ends the wait early and re-raises the last error; a failure once it is set is
        re-raised at once, not reported as a retry (a Ctrl-C cuts the requests in flight: their
        connection errors are no store trouble). ``retry_if(exc)``, if given, must also be True for
        a transient error to be retried (False: re-raised at once).
        """
        start = time.monotonic()
        token = None
        if self.deadline is not None:  # the attempts' socket timeouts are bounded by it (attempt_timeout)
            enclosing = _GIVE_UP_AT.get()
            give_up_at = start + self.deadline
            token = _GIVE_UP_AT.set(give_up_at if enclosing is None else min(enclosing, give_up_at))
        try:
            return self._call(fn, start, on_retry, cancel, retry_if)
        finally:
            if token is not None:
                _GIVE_UP_AT.reset(token)

    def _call(self, fn: Callable[[], T], start: float, on_retry: Callable[[int, BaseException, float], None] | None,
              cancel: threading.Event | None, retry_if: Callable[[BaseException], bool] | None) -> T:
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if fatal
                delay = self._delay_before_retry(exc, attempt, start, cancel, retry_if)
                if delay is None:
                    raise
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                if cancel is not None:
                    if cancel.wait(delay):
                        raise
                else:
                    time.sleep(delay)
                attempt += 1

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> T:
        """``call`` for a coroutine function, on an event loop (gcsfs's requests run on fsspec's loop thread):
        the same attempts, backoff, deadline and ``on_retry``; a wait is an ``asyncio.sleep`` (the loop serves
        its other tasks meanwhile) that ends early, re-raising the last error, when ``cancel`` is set
        (looked at every ``_CANCEL_POLL`` seconds: a ``threading.Event`` cannot be awaited).

        With a ``deadline`` each attempt is bounded by the time it leaves (this call's, or an enclosing
        ``call``'s if earlier, which no retry's wait passes either; at least ``MIN_ATTEMPT_TIMEOUT`` seconds):
        an attempt still running then is cancelled (``asyncio.wait_for``) and ends with ``AttemptTimedOut``
        (transient; no retry follows, the deadline has passed), so a stalled request (a
        store that accepts and never answers) does not outlive the deadline by its library's read timeout
        (gcsfs: 60 s)."""
        start = time.monotonic()
        enclosing = _GIVE_UP_AT.get()
        give_up_at = None if self.deadline is None else start + self.deadline
        if enclosing is not None:
            give_up_at = enclosing if give_up_at is None else min(enclosing, give_up_at)
        attempt = 1
        while True:
            try:
                if give_up_at is None:
                    return await fn()
                bound = max(MIN_ATTEMPT_TIMEOUT, give_up_at - time.monotonic())
                try:
                    return await asyncio.wait_for(_own_timeouts_marked(fn), bound)
                except asyncio.TimeoutError as timeout:
                    if getattr(timeout, _OWN_TIMEOUT, False):  # the attempt's own (aiohttp's), not the bound
                        raise
                # raised outside the handler: the cancellation does not ride along as context
                raise AttemptTimedOut(f"attempt {attempt} cut after {bound:.1f} s: the retry policy's deadline "
                                      "passed")
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if fatal
                delay = self._delay_before_retry(exc, attempt, start, cancel, None)
                if delay is None or give_up_at is not None and time.monotonic() + delay > give_up_at:
                    raise  # (the latter: an enclosing call's deadline, of the operation, would pass)
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                if await _cancelled_while_waiting(delay, cancel):
                    raise
                attempt += 1

    def _delay_before_retry(self, exc: Exception, attempt: int, start: float, cancel: threading.Event | None,
                            retry_if: Callable[[BaseException], bool] | None) -> float | None:
        """Seconds to wait before retrying after ``exc`` ended attempt ``attempt`` of an operation begun at
        ``start`` (``time.monotonic()``); None to give up: ``exc`` is fatal, the attempts are spent, the wait
        would pass the deadline, or ``cancel`` is set (given up: Ctrl-C, an abandon; no retry to report)."""
        if not is_transient(exc) or attempt >= self.max_attempts or (retry_if is not None and not retry_if(exc)):
            return None
        if cancel is not None and cancel.is_set():
            return None
        delay = self.backoff(attempt)
        if self.deadline is not None and time.monotonic() - start + delay > self.deadline:
            return None
        return delay


class AttemptTimedOut(Exception):
    """An attempt of ``RetryPolicy.acall`` still running when the policy's deadline passed, cancelled then:
    transient (``is_transient``), but no retry follows. Not a ``TimeoutError``: fsspec's ``sync`` would turn
    that into its ``FSTimeoutError``, and the operation's ``RemoteError`` would blame an unreachable store
    (``remote.remote_error`` says the store stalled past the deadline)."""


_OWN_TIMEOUT = "_cloudckpt_raised_by_the_attempt"


async def _own_timeouts_marked(fn: Callable[[], Awaitable[T]]) -> T:
    """``await fn()``; an ``asyncio.TimeoutError`` it raises itself is marked so, to tell it from
    ``asyncio.wait_for``'s."""
    try:
        return await fn()
    except asyncio.TimeoutError as exc:
        try:
            setattr(exc, _OWN_TIMEOUT, True)
        except AttributeError:
            pass
        raise


# Seconds between looks at ``cancel`` during ``RetryPolicy.acall``'s waits.
_CANCEL_POLL = 0.05


async def _cancelled_while_waiting(delay: float, cancel: threading.Event | None) -> bool:
    """Wait ``delay`` seconds on the running loop; True, as soon as seen, if ``cancel`` is set meanwhile."""
    if cancel is None:
        await asyncio.sleep(delay)
        return False
    end = time.monotonic() + delay
    while not cancel.is_set():
        left = end - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, _CANCEL_POLL))
    return True
