"""Objects one process builds once and shares: clients, sessions (``ProcessCache``).

Building an S3 client or a botocore session costs milliseconds of CPU (see ``remote._shared_s3fs``,
``s3_transport._botocore_session``); every store of a process asks for one. A ``ProcessCache`` keeps the
most recently used few per key, thread-safe, and empties itself in a forked child (a child cannot use
its parent's connections or event loop, and a lock another thread held at the fork would stay held:
``os.register_at_fork``, as fsspec's own instance cache does).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable, Generic, TypeVar

__all__ = ["ProcessCache"]

V = TypeVar("V")


class ProcessCache(Generic[V]):
    """Values by key, the ``size`` most recently used kept, emptied in a forked child.

    Keys should be hashes of what the value depends on (never a credential in clear: see the callers).

    Args:
        size: how many keys are kept (>= 1); the least recently used one is dropped for a new one. A
            caller holding a dropped value keeps it.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"ProcessCache size must be >= 1, got {size}")
        self.size = size
        self._lock = threading.Lock()
        self._values: dict[str, V] = {}  # the most recently used last
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (cache := ref()) is not None and cache._reset())

    def get(self, key: str, build: Callable[[], V]) -> V:
        """The value for ``key``, made by ``build()`` (under the cache's lock) if there is none.

        Raises:
            whatever ``build`` raises (nothing is kept then).
        """
        with self._lock:
            value = self._values.pop(key, None)
            if value is None:
                value = build()
                if len(self._values) >= self.size:
                    self._values.pop(next(iter(self._values)))
            self._values[key] = value
            return value

    def forget(self, value: V) -> None:
        """Stop handing out ``value`` (compared by identity); whoever holds it keeps it."""
        with self._lock:
            for key in [k for k, v in self._values.items() if v is value]:
                del self._values[key]

    def clear(self) -> None:
        """Stop handing out every value; whoever holds one keeps it."""
        with self._lock:
            self._values.clear()

    def keys(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._values)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._values.clear()
