"""cloudckpt.waits: sliced waits return what the plain ones do (the Ctrl-C they exist for is tested with real
signals in test_interrupt::test_a_ctrl_c_the_wait_does_not_see_arrive_still_abandons_the_upload and
test_a_ctrl_c_the_main_thread_does_not_see_arrive_still_stops_push_and_verify, and here for ``map_all``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloudckpt.waits import SIGNAL_SLICE, map_all, result_of, wait_event


def test_wait_event_returns_once_set_and_false_on_timeout():
    event = threading.Event()
    assert wait_event(event, 0) is False
    assert wait_event(event, SIGNAL_SLICE * 1.5) is False  # more than one slice
    threading.Timer(SIGNAL_SLICE * 2, event.set).start()  # set after a few slices
    assert wait_event(event) is True
    assert wait_event(event, 0) is True


def test_result_of_returns_the_value_or_raises_the_error_of_the_future():
    release = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(lambda: release.wait() and 42)
        threading.Timer(SIGNAL_SLICE * 2, release.set).start()
        assert result_of(slow) == 42

        def times_out() -> None:
            raise TimeoutError("the request timed out")  # not the wait's own timeout: raised, not waited again
        with pytest.raises(TimeoutError, match="the request timed out"):
            result_of(pool.submit(times_out))


def test_map_all_returns_the_results_in_order_and_a_failure_cancels_the_items_not_started():
    ran: list[int] = []
    gate = threading.Event()

    def work(item: int) -> int:
        ran.append(item)
        if item == 3:
            raise ValueError("item 3 failed")
        if item == 4:  # the one thread may take it before the failure is seen: it holds the thread until then
            gate.wait(10)
        time.sleep(0.05 * (3 - min(item, 3)))  # later items finish first: the order is still the items'
        return item * 10

    with ThreadPoolExecutor(3) as pool:
        assert map_all(pool, work, [0, 1, 2]) == [0, 10, 20]
    ran.clear()
    with ThreadPoolExecutor(1) as pool:
        try:
            with pytest.raises(ValueError, match="item 3 failed"):
                map_all(pool, work, [3, 4, 5])
        finally:
            gate.set()
    assert ran in ([3], [3, 4])  # as Executor.map: the items not started (5 at least) were cancelled


def test_map_all_raises_a_failure_while_an_earlier_item_still_runs():
    """A verify reads the largest file first: a small file that fails meanwhile is raised at once (Executor.map
    raised it only once every item before it had ended)."""
    release = threading.Event()
    ran: list[int] = []
    ended: list[int] = []

    def work(item: int) -> int:
        ran.append(item)
        if item == 0:
            release.wait(10)  # a large file still downloading
            ended.append(item)
        if item == 1:
            raise ValueError("item 1 failed")
        return item

    with ThreadPoolExecutor(2) as pool:
        try:
            with pytest.raises(ValueError, match="item 1 failed"):
                map_all(pool, work, [0, 1, 2, 3])
            ended_when_raised = list(ended)
        finally:
            release.set()
    assert ended_when_raised == []  # raised while item 0 was still running
    assert ran[:2] in ([0, 1], [1, 0])


def test_map_all_raises_a_ctrl_c_recorded_by_another_thread_while_a_future_never_completes():
    """The SIGINT reaches another thread (the main thread blocks it), as when it lands just before an untimed wait
    starts: Python records it, and the main thread's wait must come back to raise it. ``list(pool.map(...))``
    raised it only once the stuck item ended (here after 10 s), having started the queued one meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run in the main thread")
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []
    ended: list[str] = []

    def work(item: str) -> None:
        ran.append(item)
        started.set()
        release.wait(10)  # a stalled request, as far as the wait can tell
        ended.append(item)

    def main_thread_waits() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident)
        return frame is not None and frame.f_code is threading.Condition.wait.__code__

    def send() -> None:  # started before the main thread blocks SIGINT: the kernel delivers it to another thread
        deadline = time.monotonic() + 10
        while not (started.is_set() and main_thread_waits()) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # once the main thread waits for the stuck item
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=send)
    sender.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with ThreadPoolExecutor(1) as pool:
            try:
                with pytest.raises(KeyboardInterrupt):
                    map_all(pool, work, ["stuck", "queued"])
                assert ran == ["stuck"] and ended == []  # raised while the stuck item still ran
            finally:
                release.set()
        assert ran == ["stuck"]  # the queued item was cancelled
    finally:
        release.set()
        sender.join()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
