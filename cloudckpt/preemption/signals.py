"""The SIGTERM rules: when a SIGTERM is a preemption notice, and when it does what it always did.

On GCE the ACPI soft-off of a preempted VM reaches processes as ``SIGTERM``
about 30 s before the hard stop
(https://cloud.google.com/compute/docs/instances/spot#preemption-process);
shutdown scripts, ``docker stop`` and Kubernetes send it too.  A watcher that
watches ``"sigterm"`` installs a :class:`SigtermHandler`, whose rules are:

1. **Notice.**  The first SIGTERM the handler receives while its watcher runs
   is recorded as a notice and does *not* terminate the process, whatever the
   replaced disposition was: the point is to survive long enough to commit a
   final checkpoint.  Only SIGTERMs this handler received count: a metadata
   notice (GCE, AWS) or :meth:`~PreemptionWatcher.trigger` received before it
   does not, so "GCE notice, then the shutdown script's SIGTERM" is one
   notice followed by a later one, not an escalation.
2. **Defer.**  The first SIGTERM is only recorded: a replaced Python handler
   is *not* called then (a common one is ``lambda *a: sys.exit(0)``, which
   would end training before the final checkpoint). The watcher exposes it
   (:meth:`~PreemptionWatcher.replaced_sigterm_handler`) and cloudckpt's hook
   calls it once the final checkpoint is committed; what it raises
   (``SystemExit``...) propagates from there. A running watcher's handler
   underneath (nested watchers) is a notice source, not a user's handler: it
   is called at once.
3. **Escalate.**  The second SIGTERM the handler receives (the operator means
   it, or the run failed without saving) behaves exactly as the disposition
   it replaced: ``SIG_DFL`` (or ``None``, a handler installed from C) restores
   ``SIG_DFL`` and re-raises the signal, so the process is terminated by
   SIGTERM (exit status 143 in a shell, ``returncode == -15`` from
   :mod:`subprocess`); ``SIG_IGN`` ignores it; a Python callable is called.
4. **Transparent when not handling a preemption.**  Once its watcher stopped,
   the handler is inactive and every SIGTERM behaves as rule 3.
   :func:`uninstall_handler` restores the replaced disposition when the
   installed handler is ours; when someone installed another handler on top
   (it may chain to ours), ours stays in place, inactive.  From a non-main
   thread, where :func:`signal.signal` is not allowed, it only deactivates.
5. **Unwrap.**  An inactive cloudckpt handler is equivalent to the
   disposition it replaced, so it is skipped wherever it is met: when an
   active handler chains or escalates (watchers A then B, A stopped first:
   B's first SIGTERM is still only a notice), and when installing and
   restoring, so once every watcher stopped, in any order, the installed
   disposition is the original one.
6. **SIGINT is never touched**: Ctrl-C keeps raising ``KeyboardInterrupt``.

The decision is a pure function, :func:`decide` (state in, steps out), so it
is tested without sending signals; :class:`SigtermHandler` only executes it.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Union

__all__ = ["Disposition", "SigtermHandler", "Step", "decide", "install_handler", "replaced_behaviour",
           "uninstall_handler", "unwrap"]

logger = logging.getLogger("cloudckpt.preemption")

#: What :func:`signal.getsignal` returns: ``SIG_DFL``, ``SIG_IGN``, a callable, or ``None``
#: (a handler installed from C, which Python can neither call nor reinstall).
Disposition = Union[int, signal.Handlers, Callable[[int, Union[FrameType, None]], Any], None]


class Step(enum.Enum):
    """One thing the handler does with a SIGTERM; :func:`decide` returns them in order."""

    RECORD = "record a preemption notice"
    CALL = "call the replaced Python handler with (signum, frame)"
    TERMINATE = "restore SIG_DFL and re-raise: the process is terminated by the signal"
    IGNORE = "do nothing (the replaced disposition was SIG_IGN)"


def replaced_behaviour(previous: Disposition) -> Step:
    """What the disposition ``previous`` does with a signal: ``CALL``, ``IGNORE`` or ``TERMINATE``."""
    if previous is None:
        return Step.TERMINATE  # installed from C: cannot be called from Python; SIGTERM's default
    if callable(previous):
        return Step.CALL
    if previous == signal.SIG_IGN:
        return Step.IGNORE
    return Step.TERMINATE  # SIG_DFL, whose action for SIGTERM is to terminate


def decide(previous: Disposition, *, active: bool, first: bool) -> tuple[Step, ...]:
    """The steps for one SIGTERM (rules 1 to 4 of this module).

    Args:
        previous: The disposition the handler replaced.
        active: The handler's watcher is running (handling a preemption).
        first: This is the first SIGTERM the handler received while active.
    """
    if active and first:
        # Another running watcher underneath wants the notice too; a user's handler waits (rule 2).
        return (Step.RECORD, Step.CALL) if isinstance(previous, SigtermHandler) else (Step.RECORD,)
    return (replaced_behaviour(previous),)


class SigtermHandler:
    """The installed SIGTERM handler: records the first SIGTERM, otherwise behaves as ``previous``.

    Args:
        previous: The disposition it replaced (attribute of the same name).
        on_notice: Called, in the signal handler, for the SIGTERM that is a notice;
            must not block on locks.
        first: A lock acquired (without blocking, so signal-safe) by the first
            SIGTERM and never released.  A watcher passes the same lock to every
            handler it installs, so a restarted watcher does not count anew.

    Attributes:
        active: ``False`` once the watcher stopped: the handler is transparent.
    """

    def __init__(self, previous: Disposition, on_notice: Callable[[], None],
                 first: threading.Lock | None = None) -> None:
        self.previous = previous
        self.active = True
        self._on_notice = on_notice
        self._first = first if first is not None else threading.Lock()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        active = self.active
        first = active and self._first.acquire(blocking=False)
        # An inactive cloudckpt handler underneath (its watcher stopped first) is what it wraps (rule 5).
        previous = unwrap(self.previous)
        for step in decide(previous, active=active, first=first):
            if step is Step.RECORD:
                self._on_notice()
            elif step is Step.CALL:
                previous(signum, frame)  # type: ignore[operator]
            elif step is Step.TERMINATE:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} active={self.active} previous={self.previous!r}>"


def unwrap(disposition: Disposition) -> Disposition:
    """Skip inactive cloudckpt handlers: the first disposition underneath that acts on its own."""
    while isinstance(disposition, SigtermHandler) and not disposition.active:
        disposition = disposition.previous
    return disposition


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install_handler(on_notice: Callable[[], None], first: threading.Lock | None = None) -> SigtermHandler | None:
    """Install a :class:`SigtermHandler` on top of the current SIGTERM disposition.

    Returns:
        The installed handler, or ``None`` (logged as a WARNING) when not
        called from the main thread or when the interpreter refuses.
    """
    if not _in_main_thread():
        logger.warning("PreemptionWatcher started from a non-main thread: SIGTERM cannot be watched "
                       "(signal handlers can only be installed from the main thread)")
        return None
    try:
        handler = SigtermHandler(unwrap(signal.getsignal(signal.SIGTERM)), on_notice, first)
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError) as exc:  # e.g. embedded interpreters
        logger.warning("could not install SIGTERM handler: %s", exc)
        return None
    return handler


def uninstall_handler(handler: SigtermHandler) -> None:
    """Deactivate ``handler`` and, if it (or an inactive chain over it) is installed, restore what it replaced.

    Callable from any thread: from a non-main thread the handler only becomes
    transparent (rule 4), as it does when another handler is installed on top.
    """
    handler.active = False
    if not _in_main_thread():
        logger.debug("SIGTERM handler deactivated from a non-main thread; it stays installed, transparent")
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
        if not (isinstance(current, SigtermHandler) and not current.active):
            logger.debug("SIGTERM handler was replaced; leaving the current one (ours is transparent)")
            return
        restored = unwrap(current)
        # None: the original was installed from C and cannot be reinstalled; SIG_DFL is the closest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if restored is None else restored)
    except (ValueError, OSError) as exc:
        logger.warning("could not restore SIGTERM handler (ours stays installed, transparent): %s", exc)
