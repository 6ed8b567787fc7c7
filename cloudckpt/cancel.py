"""Cancelling a store's transfers: all of them, or one unit of work's (a ``TransferScope``).

``RemoteStore.cancel`` is a ``CancelSignal``. Set, it stops every transfer of the store: retries end,
no request starts, on ``s3://`` requests in flight stop (a Ctrl-C, a ``close`` abandoning uploads).

A unit of work -- the uploader's commit of one checkpoint -- runs its transfers inside
``signal.scope()``. Cancelling that scope (``RemoteStore.cancel_transfers(scope)``) stops them alone:
the store's other transfers, and those of the next unit of work (its own, fresh scope), never see it.
So a preemption can abandon an older checkpoint in flight and commit the final one at once
(``uploader.plan_final_upload``). A scope also counts the bytes its transfers sent and measures
their throughput (``TransferScope.bytes_per_second``).

A scope has a **point of no return** (``TransferScope.enter_commit_point``): a commit passes it once its data
is uploaded, just before it writes its commit point (the manifest, then the commit-log entry). From then on
nothing cancels the scope -- neither ``cancel_transfers(scope)`` (refused: ``cancel`` returns False) nor the
store-wide signal (its requests are neither refused nor cut) -- so a commit point is never cut half-way, where
the store may have applied a request the client saw fail: what is reported as committed is what the store holds.
That costs a few small requests (milliseconds). Passing it is refused once the scope (or the store) is
cancelled: the cancel and the point of no return are one decision, taken under one lock.

The current scope is a ``contextvars.ContextVar``: a thread that runs part of a scope's work runs it in
a copy of the submitting thread's context (``in_context``; ``s3_transport``'s part threads,
``waits.map_all``, the uploader's pool). Work running outside any scope sees only the store-wide signal.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["CancelSignal", "TransferCancelled", "TransferScope", "ContextPool", "in_context", "RATE_WINDOW"]

T = TypeVar("T")

# Throughput is measured over the newest RATE_WINDOW seconds, once a scope has been sending for longer than
# that. Bytes count when delivered (acknowledged by the peer), not when handed to a socket: a send queue holds
# up to a few MiB a connection (Linux's tcp_wmem), filled at memory speed when an upload starts.
RATE_WINDOW = 2.0

_CURRENT: contextvars.ContextVar["TransferScope | None"] = contextvars.ContextVar("cloudckpt_transfer_scope",
                                                                                  default=None)


class TransferCancelled(Exception):
    """A transfer stopped because its owner cancelled it (the store's ``CancelSignal`` or its
    ``TransferScope``): raised by ``s3_transport`` before a part or slice, by ``gcs_resumable`` before a
    chunk, by ``RemoteStore`` between files; never retried."""


class TransferScope:
    """The transfers of one unit of work on one store: cancelled on their own, their bytes counted.

    Attributes:
        cancelled: this scope alone was cancelled (``cancel``); the store-wide signal is not reflected here.
        committing: the scope is past its point of no return (``enter_commit_point``): it cannot be cancelled.
        healing: its commit found its checkpoint committed already and only re-uploads objects of it that are
            missing or truncated (a heal, ``commit._keep_committed``): cancelled, it leaves the checkpoint
            committed (with those objects still missing), not uncommitted.
    """

    def __init__(self, signal: "CancelSignal") -> None:
        self.signal = signal
        self.cancelled = False
        self.committing = False
        self.healing = False
        self._wake = threading.Event()  # set while this scope or the whole signal is cancelled (waits end)
        self._lock = threading.Lock()
        self._sent = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, bytes so far)
        self._first_sent_at: float | None = None
        self._unsent: dict[int, int] = {}  # connection key -> bytes in its send queue (note_unsent)
        self._sending = 0  # requests carrying file data in flight (sending)
        self._sending_since: float | None = None  # monotonic start of the current busy period
        self._send_seconds = 0.0  # closed busy periods
        self._round: tuple[int, int] | None = None  # (bytes the current round sends, bytes_sent at its start)

    def cancel(self) -> bool:
        """Cancel this scope's transfers (``RemoteStore.cancel_transfers(scope)`` also stops its requests in
        flight). Idempotent; never undone.

        Returns:
            True when the scope is cancelled; False, and nothing is done, when it is past its point of no
            return (``committing``: its commit point is being written, or was).
        """
        with self.signal._lock:
            if self.committing:
                return False
            self.cancelled = True
            self._wake.set()
            return True

    def enter_commit_point(self) -> bool:
        """Pass the scope's point of no return (a commit about to write its commit point): from now on neither
        ``cancel`` nor the store-wide signal stops its transfers (``CancelSignal.is_set`` is False in it).

        Returns:
            True when passed; False, and nothing changes, when the scope or the whole store was cancelled first
            (the caller must then not write its commit point).
        """
        with self.signal._lock:
            if self.cancelled or self.signal._all.is_set():
                return False
            self.committing = True
            return True

    def leave_commit_point(self) -> None:
        """Back before the point of no return, when the commit point was not written after all (a commit that
        starts a round again, its data to upload anew): the scope can be cancelled again, and a store-wide
        cancel set meanwhile applies to it from now on."""
        with self.signal._lock:
            self.committing = False
            if self.signal._all.is_set():
                self._wake.set()

    def note_sent(self, count: int, *, connection: int | None = None, unsent: int = 0) -> None:
        """Record ``count`` bytes of file data handed to the network by one of this scope's transfers
        (thread-safe); ``unsent``: bytes its ``connection`` (any key) still holds undelivered (``note_unsent``)."""
        with self._lock:
            self._sent += count
            if connection is not None:
                self._unsent[connection] = unsent
            self._sample()

    def note_unsent(self, connection: int, unsent: int, *, lost: bool = False) -> None:
        """Record that ``connection`` (any key) holds ``unsent`` bytes not yet delivered to the store (a socket's
        send queue: sent bytes stay there until the peer acknowledges them); 0 once its request is answered.
        ``lost``: the connection ended without an answer; what it still held was never delivered."""
        with self._lock:
            held = self._unsent.pop(connection, None)
            if lost and held:
                self._sent -= held
            if unsent:
                self._unsent[connection] = unsent
            elif held is None:
                return
            self._sample()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """``with scope.sending():`` around one request (or one whole-file upload on a backend that sends a
        file in one call) carrying file data, from its start to its answer: ``send_seconds`` adds up the time
        during which at least one such request was in flight. Requests without file data (server-side copies,
        the commit point, listings) are not wrapped: their time is no sending time."""
        with self._lock:
            if self._sending == 0:
                self._sending_since = time.monotonic()
            self._sending += 1
        try:
            yield
        finally:
            with self._lock:
                self._sending -= 1
                if self._sending == 0 and self._sending_since is not None:
                    self._send_seconds += time.monotonic() - self._sending_since
                    self._sending_since = None

    @property
    def send_seconds(self) -> float:
        """Seconds during which at least one of this scope's requests carrying file data was in flight
        (``sending``; concurrent requests count once), up to now: the time the scope spent sending, which
        excludes what it spent on anything else (server-side copies of an incremental commit, reading
        the commit log, writing the commit point)."""
        with self._lock:
            running = time.monotonic() - self._sending_since if self._sending_since is not None else 0.0
            return self._send_seconds + running

    def _sample(self) -> None:
        now = time.monotonic()
        if self._first_sent_at is None:
            self._first_sent_at = now
        self._samples.append((now, self._sent - sum(self._unsent.values())))
        while len(self._samples) > 2 and self._samples[1][0] <= now - RATE_WINDOW:
            self._samples.popleft()

    @property
    def bytes_sent(self) -> int:
        """Bytes of file data this scope's transfers delivered so far: sent less what is still in the send
        queues of its requests in flight (the S3 transport; as of its last look, ``RemoteStore.measure``), or
        whole files stored (other backends). A retried request's bytes count again."""
        with self._lock:
            return self._sent - sum(self._unsent.values())

    def begin_round(self, nbytes: int) -> None:
        """The scope's work has ``nbytes`` bytes of file data left to send from now on (a commit starting its
        upload, or going round again after a name was taken: only the files it has not stored yet). Bytes sent
        before do not count against it (``bytes_left``). Call again at each round."""
        with self._lock:
            self._round = (max(0, nbytes), self._sent - sum(self._unsent.values()))

    def bytes_left(self, total: int) -> int:
        """Bytes of file data the scope's work still has to send: what its current round announced
        (``begin_round``) less what the scope delivered since; before any announcement, ``total`` (all of its
        files, in bytes) less ``bytes_sent``. Never below 0 (a retried request's bytes count again), nor above
        what the round announced."""
        with self._lock:
            delivered = self._sent - sum(self._unsent.values())
            if self._round is None:
                return max(0, total - delivered)
            nbytes, start = self._round
            return min(nbytes, max(0, nbytes - (delivered - start)))

    @property
    def last_sent_at(self) -> float | None:
        """``time.monotonic()`` of the last bytes counted, None before any."""
        with self._lock:
            return self._samples[-1][0] if self._samples else None

    def bytes_per_second(self, now: float | None = None) -> float | None:
        """Throughput of this scope's transfers over the ``RATE_WINDOW`` seconds before ``now`` (default: now;
        a stall lowers it), in bytes/s; None until the scope has been sending for longer than ``RATE_WINDOW``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._first_sent_at is None or now - self._first_sent_at <= RATE_WINDOW:
                return None
            base_at, base = self._samples[0]
            for at, delivered in self._samples:  # the newest sample at or before the window's start
                if at > now - RATE_WINDOW:
                    break
                base_at, base = at, delivered
            delivered = self._samples[-1][1]
        return max(0.0, delivered - base) / (now - base_at) if now > base_at else None


class CancelSignal:
    """A store's cancel: ``set``/``clear``/``is_set``/``wait`` as a ``threading.Event`` for the whole store,
    plus the calling context's ``TransferScope`` (``scope``): ``is_set`` and ``wait`` see both."""

    def __init__(self) -> None:
        self._all = threading.Event()
        self._lock = threading.Lock()
        self._scopes: set[TransferScope] = set()

    def set(self) -> None:
        """Cancel every transfer of the store, in any scope or none, except those of a scope past its point of
        no return (``TransferScope.enter_commit_point``)."""
        with self._lock:
            self._all.set()
            for scope in self._scopes:
                if not scope.committing:
                    scope._wake.set()

    def clear(self) -> None:
        """Let the store's transfers run again (a cancelled scope stays cancelled)."""
        with self._lock:
            self._all.clear()
            for scope in self._scopes:
                if not scope.cancelled:
                    scope._wake.clear()

    def is_set(self) -> bool:
        """True when the whole store, or the calling context's scope, is cancelled; False in a scope past its
        point of no return (``TransferScope.committing``)."""
        scope = self.current()
        if scope is not None and scope.committing:
            return False
        return self._all.is_set() or scope is not None and scope.cancelled

    def all_set(self) -> bool:
        """True when the whole store is cancelled (``set``), whatever the calling context's scope."""
        return self._all.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds until ``is_set``; its value then (a retry's backoff ends early)."""
        scope = self.current()
        (scope._wake if scope is not None else self._all).wait(timeout)
        return self.is_set()

    def current(self) -> TransferScope | None:
        """The calling context's scope of this signal, if any."""
        scope = _CURRENT.get()
        return scope if scope is not None and scope.signal is self else None

    @contextlib.contextmanager
    def scope(self) -> Iterator[TransferScope]:
        """``with signal.scope() as scope:`` -- the transfers of the block (and of the threads it hands work
        to through ``in_context``) belong to ``scope``."""
        scope = TransferScope(self)
        with self._lock:
            self._scopes.add(scope)
            if self._all.is_set():
                scope._wake.set()
        token = _CURRENT.set(scope)
        try:
            yield scope
        finally:
            _CURRENT.reset(token)
            with self._lock:
                self._scopes.discard(scope)


def in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` bound to a copy of the calling thread's context: call it in another thread and it runs in
    the caller's transfer scope. Make one per task (a context cannot run in two threads at once)."""
    context = contextvars.copy_context()
    return lambda *args, **kwargs: context.run(fn, *args, **kwargs)


class ContextPool:
    """A pool's ``map`` whose tasks run in the submitting thread's context (its transfer scope)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def map(self, func: Callable[[Any], T], iterable: Iterable[Any]) -> list[T]:
        tasks = [(in_context(func), item) for item in iterable]
        return list(self._pool.map(lambda task: task[0](task[1]), tasks))
