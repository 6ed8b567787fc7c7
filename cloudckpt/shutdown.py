"""Work left for interpreter exit, run while the interpreter can still do it.

Python's exit (CPython's ``threading._shutdown``, then ``atexit``) first runs
threading's exit hooks, newest first; ``concurrent.futures`` registers one
that makes every ``ThreadPoolExecutor`` refuse new work from then on
("cannot schedule new futures after interpreter shutdown") -- asyncio's
default executor too, where aiobotocore (s3fs) resolves host names, and
cloudckpt's own pools of parts and files. ``atexit`` handlers run after it:
a checkpoint committed from there fails at its first new connection. So
closing what a program left open (a ``CheckpointManager``, a Keras callback:
their last checkpoints still to commit) is registered here as a threading
exit hook, after ``concurrent.futures``' own, so it runs before it.

``threading._register_atexit`` is CPython's (3.9+) and private; where it is
missing, or registering is refused because the exit has begun, ``atexit``.

A program ended by Ctrl-C is not waited for: ``interrupted_exit`` tells the
exit hooks so (the interpreter prints the uncaught ``KeyboardInterrupt`` and
keeps it as ``sys.last_exc`` / ``sys.last_value`` before any exit hook runs),
and they abandon what is still uploading, as ``with`` blocks do on Ctrl-C.
"""

from __future__ import annotations

import atexit
import importlib
import sys
import threading
from typing import Any, Callable

__all__ = ["call_at_exit", "interrupted_exit", "EXECUTORS_SHUT_DOWN"]

importlib.import_module("concurrent.futures.thread")  # its exit hook registers first, so ours run before it

# What a ThreadPoolExecutor raises once the exit has shut executors down (concurrent.futures.thread.submit).
EXECUTORS_SHUT_DOWN = "cannot schedule new futures after"


def call_at_exit(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(*args)`` at interpreter exit, before executors stop taking work (see the module doc).

    Hooks run newest first, like ``atexit``'s; an exception in one is printed by the interpreter and the
    others still run.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(fn, *args)
            return
        except RuntimeError:  # "can't register atexit after shutdown": atexit still runs
            pass
    atexit.register(fn, *args)


def interrupted_exit() -> BaseException | None:
    """At interpreter exit: the ``KeyboardInterrupt`` (Ctrl-C) that ended the program, else None.

    The interpreter keeps the exception that ended the main program (``sys.last_exc``, 3.12+;
    ``sys.last_value`` before) when it prints its traceback, before threading's and ``atexit``'s hooks
    run (Python docs: ``sys.last_exc``). Call it from an exit hook only. Always None in an interactive
    session (``sys.ps1`` set, or ``python -i``): a Ctrl-C there, even at the prompt, ends a statement,
    not the session, and is kept all the same.
    """
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return None
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return exc if isinstance(exc, KeyboardInterrupt) else None
