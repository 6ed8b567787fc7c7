"""cloudckpt.waits: sliced waits return what the plain ones do (the Ctrl-C they exist for is tested with real
signals in test_interrupt::test_a_ctrl_c_the_wait_does_not_see_arrive_still_abandons_the_upload)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloudckpt.waits import SIGNAL_SLICE, result_of, wait_event


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
