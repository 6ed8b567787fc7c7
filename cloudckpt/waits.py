"""Blocking waits of the main thread that a Ctrl-C always interrupts.

CPython runs a signal's Python handler (``KeyboardInterrupt`` for SIGINT) in
the main thread, between bytecodes; the C-level handler only records the
signal, and interrupts a blocking call only when the kernel delivers the
signal to the main thread while it is inside that call (``EINTR``). A SIGINT
that arrives just before a wait starts (after the last check, the thread
preempted on a busy machine), or that the kernel hands to another thread, is
therefore seen only when the wait returns: ``Event.wait()`` without a timeout
on a stalled upload, or ``Future.result()`` on a hung request, never does. A
CI run under load hit this (``test_interrupt``: no reaction to a SIGINT for
60 s while the exit waited for a held upload). These waits block at most
``SIGNAL_SLICE`` seconds at a time, so a recorded signal is raised within
that. The Python docs' signal module page ("Execution of Python signal
handlers") describes the handler model.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Iterable, TypeVar

from .cancel import in_context

__all__ = ["SIGNAL_SLICE", "wait_event", "result_of", "map_all"]

T = TypeVar("T")
A = TypeVar("A")

SIGNAL_SLICE = 0.25  # seconds a main-thread wait blocks at most in one go


def wait_event(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)`` (``timeout`` in seconds, None: until set), in slices of ``SIGNAL_SLICE``:
    a Ctrl-C recorded meanwhile raises ``KeyboardInterrupt`` within a slice. True once set, False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = SIGNAL_SLICE if deadline is None else min(SIGNAL_SLICE, deadline - time.monotonic())
        if remaining <= 0:
            return event.is_set()
        if event.wait(remaining):
            return True


def result_of(future: "concurrent.futures.Future[T]") -> T:
    """``future.result()`` (its value, or its exception raised), waiting in slices of ``SIGNAL_SLICE``."""
    while not future.done():
        concurrent.futures.wait([future], timeout=SIGNAL_SLICE)
    return future.result()


def map_all(pool: concurrent.futures.Executor, fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
    """``list(pool.map(fn, items))`` waited for in slices of ``SIGNAL_SLICE``: the results in the order of
    ``items``. A failure is raised as soon as it happens, whatever item it is (``Executor.map`` raises it only
    once the items before it end; a verify reads the largest file first), and it, or a Ctrl-C, cancels the
    items not started yet. Items already running go on: a pool that must stop them is a ``cancelling_pool``."""
    futures: list[concurrent.futures.Future[T]] = []
    try:
        for item in items:
            futures.append(pool.submit(in_context(fn), item))  # in the caller's transfer scope (cancel.py)
        pending: set[concurrent.futures.Future[T]] = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=SIGNAL_SLICE,
                                                    return_when=concurrent.futures.FIRST_EXCEPTION)
            for future in done:
                if future.cancelled() or future.exception() is not None:
                    future.result()  # raises it
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        raise
