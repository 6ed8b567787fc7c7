"""Preemption notices: what a warning says, and the process-wide record of the first one.

A :class:`PreemptionNotice` is one warning that the machine is about to be
reclaimed, with the seconds the platform grants before the hard stop
(:data:`DEFAULT_DEADLINES`).  The figures come from the providers:

* **GCE** spot / preemptible VMs get an ACPI soft-off (processes receive
  ``SIGTERM``) and ``instance/preempted`` turns ``TRUE`` on the metadata
  server; the VM is hard-stopped about 30 s later
  (https://cloud.google.com/compute/docs/instances/spot#preemption-process).
* **AWS** spot instances get a two-minute interruption notice on the instance
  metadata endpoint ``latest/meta-data/spot/instance-action``
  (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html).
* **Azure** sends no SIGTERM before a Spot VM's eviction: the only notice is a
  Scheduled Event (``Preempt``, at least 30 s ahead; ``Reboot``, ``Redeploy``,
  ``Terminate`` too) on the instance metadata service, whose ``NotBefore`` says
  when the VM stops
  (https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events).
  The notice's deadline is the time until ``NotBefore`` minus 5 s; without a
  ``NotBefore`` it is :data:`DEFAULT_DEADLINES` ``["azure"]``.

The defaults keep a margin below those figures (25 s of GCE's 30 s, 100 s of
AWS's 120 s, 25 s of Azure's 30 s minimum) for the work that follows the save:
upload, process exit.

Notices from the metadata sources (:data:`ANNOUNCING_SOURCES`: ``"gce"``,
``"aws"``, ``"azure"``) announce the platform's own hard stop; a ``SIGTERM``'s 25 s is only a
guess (a Kubernetes pod's ``terminationGracePeriodSeconds``, a shutdown script
may grant more).  :func:`deadline_at` caps a user's deadline by the former only.

:func:`was_preempted` / :func:`last_notice` answer "did any watcher in this
process receive a notice?", so code far from the watcher (an ``atexit``
handler, a training loop's ``finally``) can decide on its exit status.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ANNOUNCING_SOURCES", "DEFAULT_DEADLINES", "SOURCES", "PreemptionNotice", "announced_hard_stop_at",
           "deadline_at", "last_notice", "was_preempted"]

#: All notice sources understood by :class:`~cloudckpt.preemption.PreemptionWatcher`.
SOURCES: tuple[str, ...] = ("sigterm", "gce", "aws", "azure")

#: Seconds the platform gives between the notice and the hard stop, per source.
#: ``sigterm`` uses the GCE soft-off figure (SIGTERM, hard stop ~30 s later); ``azure`` is used for a
#: Scheduled Event without a ``NotBefore`` (one that has ``Started``): 25 s of a ``Preempt``'s 30 s minimum.
DEFAULT_DEADLINES: dict[str, float] = {"sigterm": 25.0, "gce": 25.0, "aws": 100.0, "azure": 25.0}

#: Sources whose notice announces the platform's real hard stop (a metadata server saying the machine is
#: reclaimed): a user's deadline ending later than it is capped (:func:`deadline_at`).  Not ``"sigterm"``:
#: its 25 s is a guess (Kubernetes' ``terminationGracePeriodSeconds``, a shutdown script may grant more).
ANNOUNCING_SOURCES: tuple[str, ...] = ("gce", "aws", "azure")


@dataclass(frozen=True)
class PreemptionNotice:
    """A preemption warning received from one of the watched sources.

    Attributes:
        source: ``"sigterm"``, ``"gce"``, ``"aws"`` or ``"azure"`` (or any string passed to
            :meth:`PreemptionWatcher.trigger`).
        received_at: ``time.monotonic()`` when the notice was recorded.
        detail: Human-readable description, e.g. ``"SIGTERM"``,
            ``"instance/preempted=TRUE"`` or
            ``"spot instance-action: terminate at 2026-11-26T19:00:00Z"`` or
            ``"scheduled event Preempt (Scheduled) for vm-1, NotBefore Mon, 19 Sep 2016 18:29:47 GMT"``.
        deadline: Seconds the platform grants after the notice before the
            machine is hard-stopped.
        announced: ``deadline`` is a hard stop a platform announced (a notice from
            :data:`ANNOUNCING_SOURCES`, or a ``"peer"`` notice relaying one another worker's platform
            announced), not a guess: it caps a user's deadline (:func:`deadline_at`).
    """

    source: str
    received_at: float
    detail: str
    deadline: float
    announced: bool = False

    @property
    def hard_stop_at(self) -> float:
        """``time.monotonic()`` value at which the platform hard-stops the machine."""
        return self.received_at + self.deadline

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before :attr:`deadline` expires (may be negative).

        Args:
            now: A ``time.monotonic()`` value; defaults to the current time.
        """
        if now is None:
            now = time.monotonic()
        return self.hard_stop_at - now


def announced_hard_stop_at(notices: Sequence[PreemptionNotice]) -> float | None:
    """The earliest :attr:`~PreemptionNotice.hard_stop_at` (``time.monotonic()`` seconds) of the ``notices``
    that announce one (:attr:`~PreemptionNotice.announced`: from :data:`ANNOUNCING_SOURCES`, or a ``"peer"``
    notice relaying such a one); ``None`` if none of them does."""
    stops = [n.hard_stop_at for n in notices if n.announced]
    return min(stops) if stops else None


def deadline_at(notices: Sequence[PreemptionNotice], deadline: float | None) -> float | None:
    """When the work the first of ``notices`` announces must be done (``time.monotonic()`` seconds).

    Args:
        notices: A watcher's notices in arrival order (the first is the one ``deadline`` counts from).
        deadline: Seconds after the first notice the user allows (``preemption_deadline``), or ``None``.

    Returns:
        ``None`` without notices.  With ``deadline``: ``first.received_at + deadline``, capped by the
        earliest hard stop announced by the platform (notices from :data:`ANNOUNCING_SOURCES`, or relayed by
        another worker of the job, see :func:`announced_hard_stop_at`; a ``"sigterm"`` notice's guess does not cap it).  Without: the
        earliest hard stop over all notices.
    """
    if not notices:
        return None
    if deadline is None:
        return min(n.hard_stop_at for n in notices)
    wanted = notices[0].received_at + float(deadline)
    announced = announced_hard_stop_at(notices)
    return wanted if announced is None else min(wanted, announced)


_last_notice: PreemptionNotice | None = None


def was_preempted() -> bool:
    """Return ``True`` if any watcher in this process has received a notice."""
    return _last_notice is not None


def last_notice() -> PreemptionNotice | None:
    """Return the first notice of the watcher that most recently received one (``None`` if none did).

    Later notices of the same watcher (see :attr:`PreemptionWatcher.notices`)
    do not replace it.
    """
    return _last_notice


def _record_first_notice(notice: PreemptionNotice) -> None:
    """Remember ``notice``, a watcher's first, process-wide (a single assignment: signal-safe)."""
    global _last_notice
    _last_notice = notice


def _reset_last_notice() -> None:
    """Forget the process-wide notice (for tests)."""
    global _last_notice
    _last_notice = None
