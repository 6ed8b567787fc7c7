"""cloudckpt.process_cache: the most recently used values kept, forgotten on request, emptied in a forked child."""

from __future__ import annotations

import os
import signal

import pytest

from cloudckpt.process_cache import ProcessCache


def test_the_most_recently_used_values_are_kept():
    cache: ProcessCache[object] = ProcessCache(2)
    built: list[str] = []

    def build(key: str) -> object:
        built.append(key)
        return object()

    a = cache.get("a", lambda: build("a"))
    cache.get("b", lambda: build("b"))
    assert cache.get("a", lambda: build("a")) is a  # used again: now the most recent
    cache.get("c", lambda: build("c"))  # drops b, the least recently used
    assert cache.keys() == ["a", "c"]
    assert cache.get("a", lambda: build("a")) is a
    cache.get("b", lambda: build("b"))
    assert built == ["a", "b", "c", "b"]


def test_a_forgotten_value_is_built_again_and_a_failed_build_keeps_nothing():
    cache: ProcessCache[object] = ProcessCache(4)
    first = cache.get("k", object)
    cache.forget(first)
    assert cache.keys() == []
    assert cache.get("k", object) is not first

    def fails() -> object:
        raise RuntimeError("no client")

    with pytest.raises(RuntimeError):
        cache.get("other", fails)
    assert cache.keys() == ["k"]
    with pytest.raises(ValueError):
        ProcessCache(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_starts_empty_even_if_the_lock_was_held_at_the_fork():
    """A child cannot use its parent's clients (connections, event loop); a lock held by another thread at
    the fork would stay held in the child forever."""
    cache: ProcessCache[object] = ProcessCache(4)
    parents = cache.get("k", object)
    cache._lock.acquire()  # as if another thread were building a value when the fork happened
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 only if it is empty and usable
            code = 1
            try:
                signal.alarm(10)  # a lock left held would hang here
                code = 0 if cache.keys() == [] and cache.get("k", object) is not parents else 2
            finally:
                os._exit(code)
    finally:
        cache._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("k", object) is parents  # the parent's is untouched
