"""PreemptionWatcher: one object that watches SIGTERM and the metadata servers, and keeps the notices.

The watcher combines the other modules of :mod:`cloudckpt.preemption`: it
installs the SIGTERM handler of :mod:`.signals` (whose rules say when a SIGTERM
is a notice and when it escalates), runs the pollers of :mod:`.metadata` on
one daemon thread, and records :class:`~.notice.PreemptionNotice` objects:

* the **first** notice, from any source, is :attr:`PreemptionWatcher.notice`:
  it wakes :meth:`~PreemptionWatcher.wait`, runs the callbacks once, logs one
  WARNING and is remembered process-wide (:func:`~.notice.last_notice`);
* **later** notices (e.g. AWS's two-minute notice, then the shutdown's SIGTERM)
  are kept in :attr:`~PreemptionWatcher.notices` and only tighten
  :attr:`~PreemptionWatcher.hard_stop_at`, the earliest ``received_at +
  deadline`` of all; each is logged once (WARNING when it brings the hard stop
  closer, INFO otherwise);
* the **deadline in use**, :attr:`~PreemptionWatcher.deadline_at`, is the user's
  :attr:`~PreemptionWatcher.deadline` after the first notice, capped by a hard
  stop a ``"gce"`` / ``"aws"`` / ``"azure"`` notice announced, or a ``"peer"`` notice relaying one
  another worker of the job got (not by a ``"sigterm"`` one's guess), else :attr:`~PreemptionWatcher.hard_stop_at`.

Metadata polling stops after the first notice: each source announces once,
and the notice that can follow on GCE, the ACPI soft-off, arrives as SIGTERM
(Azure sends none before a Spot eviction: its Scheduled Event is the notice).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Iterable

from ..errors import ConfigError
from . import metadata, signals
from ..moto_mock import moto_mock_active
from .notice import (
    ANNOUNCING_SOURCES,
    DEFAULT_DEADLINES,
    SOURCES,
    PreemptionNotice,
    _record_first_notice,
)
from .notice import deadline_at as notice_deadline_at

__all__ = ["PreemptionWatcher"]

logger = logging.getLogger("cloudckpt.preemption")

_SPECS = ("None", '"sigterm"', '"auto"', "a PreemptionWatcher instance")

# Extra seconds stop() waits for the poller beyond its request in flight.
_JOIN_SLACK = 1.0


class PreemptionWatcher:
    """Watch for spot / preemptible VM termination notices.

    Args:
        sources: Any of ``"sigterm"``, ``"gce"``, ``"aws"``, ``"azure"``.  A single
            string is accepted as a one-source shortcut.
        gce_metadata_url: Base URL of the GCE metadata server.  Defaults to
            ``$CLOUDCKPT_GCE_METADATA_URL`` or ``http://metadata.google.internal``.
        aws_metadata_url: Base URL of the AWS instance metadata service.
            Defaults to ``$CLOUDCKPT_AWS_METADATA_URL`` or ``http://169.254.169.254``.
        azure_metadata_url: Base URL of the Azure instance metadata service (Scheduled
            Events).  Defaults to ``$CLOUDCKPT_AZURE_METADATA_URL`` or ``http://169.254.169.254``.
        poll_interval: Seconds between metadata polls (default 5).
        request_timeout: Seconds for each socket operation of a metadata request.

    Raises:
        ConfigError: (a ``ValueError``) for an unknown source or a non-positive interval/timeout.

    The watcher does nothing until :meth:`start`.  The first notice is kept
    in :attr:`notice` (and process-wide in :func:`last_notice`); later ones
    tighten :attr:`hard_stop_at`.  Metadata sources that cannot be reached
    (connection error, 404, ...) ``3`` times in a row before ever answering are
    assumed absent and no longer polled, so ``"auto"`` is cheap on machines
    outside that cloud (AWS, Azure and GCE share ``169.254.169.254``; each
    cloud's server refuses the other pollers' requests).  Azure counts as
    present once its instance metadata answered the VM's name: the first
    Scheduled Events request may take up to two minutes, and is waited out
    quietly.  Polling stops once a notice has been received.

    SIGTERM (see :mod:`cloudckpt.preemption.signals`): the first SIGTERM the
    watcher's handler receives while running is a notice and does not
    terminate the process (a replaced Python handler is then called); the
    second behaves as the replaced disposition (``SIG_DFL``: the process is
    terminated by SIGTERM); after :meth:`stop` every SIGTERM does.  Code that
    uses the watcher exits once it is done (the platform hard-stops the VM at
    the end of the grace period anyway).  SIGINT is never touched.

    A stopped watcher can be started again; its notices are kept, and so is
    its SIGTERM count.  Usable as a context manager (``start()`` on enter,
    ``stop()`` on exit).

    Attributes:
        deadline: seconds after the first notice by which the work it announces
            must be done, when the user set them (``CheckpointEngine``'s
            ``preemption_deadline`` sets it); ``None`` (default): the platform's.
            A hard stop announced by a ``"gce"`` / ``"aws"`` / ``"azure"`` notice (or relayed by a
            ``"peer"`` one: ``PreemptionNotice.announced``) caps it (a
            ``"sigterm"`` notice's 25 s is a guess and does not): see
            :attr:`deadline_at`, the deadline in use, which the notice's log
            line quotes (with the platform's figure, and a WARNING once when
            the cap applies); :attr:`hard_stop_at` stays the platform's.
    """

    def __init__(
        self,
        sources: Iterable[str] | str = ("sigterm",),
        *,
        gce_metadata_url: str | None = None,
        aws_metadata_url: str | None = None,
        azure_metadata_url: str | None = None,
        poll_interval: float = 5.0,
        request_timeout: float = 1.0,
    ) -> None:
        if isinstance(sources, str):
            sources = (sources,)
        normalized: list[str] = []
        for source in sources:
            if source not in SOURCES:
                raise ConfigError(f"unknown preemption source {source!r}; allowed: {', '.join(SOURCES)}")
            if source not in normalized:
                normalized.append(source)
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval!r}")
        if not request_timeout > 0:
            raise ConfigError(f"request_timeout must be > 0, got {request_timeout!r}")
        self._sources = tuple(normalized)
        self._gce_url = metadata.resolve_url(gce_metadata_url, metadata.GCE_METADATA_URL_ENV,
                                             metadata.DEFAULT_GCE_METADATA_URL)
        self._aws_url = metadata.resolve_url(aws_metadata_url, metadata.AWS_METADATA_URL_ENV,
                                             metadata.DEFAULT_AWS_METADATA_URL)
        self._azure_url = metadata.resolve_url(azure_metadata_url, metadata.AZURE_METADATA_URL_ENV,
                                               metadata.DEFAULT_AZURE_METADATA_URL)
        self._poll_interval = float(poll_interval)
        self._request_timeout = float(request_timeout)

        self._notice: PreemptionNotice | None = None
        # Every notice, first included; list.append is atomic, so trigger() needs no lock for it.
        self._notices: list[PreemptionNotice] = []
        # Held from construction until the first notice: released exactly once
        # by trigger() (Lock.release never blocks, so it is signal-safe).
        self._gate = threading.Lock()
        self._gate.acquire()
        # Acquired (non-blocking) by the first trigger() and never released.
        self._once = threading.Lock()
        # Acquired by the first SIGTERM any of this watcher's handlers receives (see signals.py).
        self._first_sigterm = threading.Lock()
        self._callbacks: list[Callable[[PreemptionNotice], None]] = []
        # Seconds after the first notice by which the work it announces must be done, when the user set them
        # (``CheckpointEngine(preemption_deadline=)`` sets this); None: the platform's, the notice's ``deadline``.
        # A gce/aws/azure notice's hard stop caps it (``deadline_at``, the one in use, quoted by the notice's log line);
        # ``hard_stop_at`` stays the platform's.
        self.deadline: float | None = None
        # Acquired (non-blocking, so signal-safe) by whoever logs that the platform's hard stop caps ``deadline``.
        self._cap_logged = threading.Lock()

        self._lifecycle = threading.Lock()  # never taken from the signal handler
        self._running = False
        self._sigterm_handler: signals.SigtermHandler | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: threading.Event | None = None
        self._pollers: list[metadata.Poller] = []

    # ------------------------------------------------------------------ specs
    @classmethod
    def from_spec(cls, spec: PreemptionWatcher | str | None) -> PreemptionWatcher | None:
        """Build a watcher from the hook's ``preemption=`` argument.

        ``None`` -> ``None`` (off); ``"sigterm"`` -> SIGTERM only; ``"auto"`` ->
        SIGTERM plus GCE, AWS and Azure metadata polling (the clouds the machine
        is not on are given up after a few requests); a :class:`PreemptionWatcher`
        is returned unchanged.

        Raises:
            ConfigError: (a ``ValueError``) for any other value.
        """
        if spec is None:
            return None
        if isinstance(spec, PreemptionWatcher):
            return spec
        if isinstance(spec, str):
            if spec == "sigterm":
                return cls(("sigterm",))
            if spec == "auto":
                return cls(("sigterm", "gce", "aws", "azure"))
        raise ConfigError(f"invalid preemption spec {spec!r}; expected one of {', '.join(_SPECS)}")

    # ------------------------------------------------------------- properties
    @property
    def sources(self) -> tuple[str, ...]:
        """The configured sources."""
        return self._sources

    @property
    def gce_metadata_url(self) -> str:
        """The resolved GCE metadata base URL."""
        return self._gce_url

    @property
    def aws_metadata_url(self) -> str:
        """The resolved AWS instance metadata base URL."""
        return self._aws_url

    @property
    def azure_metadata_url(self) -> str:
        """The resolved Azure instance metadata base URL."""
        return self._azure_url

    @property
    def poll_interval(self) -> float:
        """Seconds between metadata polls."""
        return self._poll_interval

    @property
    def running(self) -> bool:
        """``True`` between :meth:`start` and :meth:`stop`."""
        return self._running

    @property
    def active_sources(self) -> tuple[str, ...]:
        """Sources currently watched: ``"sigterm"`` if our handler is installed and active,
        and the metadata sources still being polled (not given up on)."""
        active: list[str] = []
        handler = self._sigterm_handler
        if handler is not None and handler.active:
            active.append("sigterm")
        thread = self._thread
        if thread is not None and thread.is_alive():
            active.extend(p.source for p in self._pollers if not p.disabled)
        return tuple(active)

    @property
    def notice(self) -> PreemptionNotice | None:
        """The first notice received, or ``None``."""
        return self._notice

    @property
    def notices(self) -> tuple[PreemptionNotice, ...]:
        """Every notice received, in arrival order (the first is :attr:`notice`)."""
        return tuple(self._notices)

    @property
    def hard_stop_at(self) -> float | None:
        """When the machine is expected to be hard-stopped (``time.monotonic()`` seconds), or ``None``.

        The earliest ``received_at + deadline`` over all :attr:`notices`: a later
        notice with a shorter grace period (AWS's 100 s, then SIGTERM's 25 s)
        brings it closer; one that would end later changes nothing.
        """
        notices = tuple(self._notices)
        return min(n.hard_stop_at for n in notices) if notices else None

    @property
    def deadline_at(self) -> float | None:
        """The deadline in use (``time.monotonic()`` seconds), or ``None`` before any notice.

        Without :attr:`deadline`: :attr:`hard_stop_at`.  With it: ``deadline``
        seconds after the first notice, capped by the earliest hard stop that a
        ``"gce"``, ``"aws"`` or ``"azure"`` notice announced, or a ``"peer"`` notice relayed from another
        worker's (the platform's own figure, ``PreemptionNotice.announced``; not
        by a ``"sigterm"`` notice, whose 25 s is only a guess: Kubernetes'
        ``terminationGracePeriodSeconds`` may be longer, and the user's value
        wins there).  See :func:`cloudckpt.preemption.notice.deadline_at`.
        """
        return notice_deadline_at(tuple(self._notices), self.deadline)

    def is_preempted(self) -> bool:
        """Return ``True`` once a notice has been received."""
        return self._notice is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a notice arrives or ``timeout`` seconds pass.

        Returns:
            ``True`` if a notice has been received.
        """
        if self._notice is not None:
            return True
        if timeout is None:
            acquired = self._gate.acquire()
        else:
            timeout = min(max(0.0, float(timeout)), threading.TIMEOUT_MAX)
            acquired = self._gate.acquire(timeout=timeout)
        if acquired:
            self._gate.release()  # let other waiters through
            return True
        return self._notice is not None

    # --------------------------------------------------------------- notices
    def trigger(self, source: str, detail: str, deadline: float, *, announced: bool | None = None) -> None:
        """Record a preemption notice.

        The first call stores it as :attr:`notice`, wakes :meth:`wait`, logs
        one WARNING and runs the callbacks (in the calling thread).  Later calls
        are added to :attr:`notices` and may bring :attr:`hard_stop_at` closer
        (one log line each, no callbacks).  Thread-safe, and safe to call from a
        signal handler: it never blocks on a lock.

        Args:
            source: Where the notice came from (``"sigterm"``, ``"gce"``, ``"aws"``, ``"azure"``).
            detail: Human-readable description.
            deadline: Seconds until the platform hard-stops the machine.
            announced: ``deadline`` is a hard stop a platform announced, which caps ``deadline`` (the
                user's ``preemption_deadline``) when sooner; None (default): so for the sources in
                ``ANNOUNCING_SOURCES`` (``"gce"``, ``"aws"``, ``"azure"``), not for others (a ``"sigterm"``'s
                25 s is a guess). ``distributed.relay_peer_notice`` passes True for a ``"peer"`` notice
                relaying the hard stop another worker's platform announced.
        """
        notice = PreemptionNotice(source=source, received_at=time.monotonic(), detail=detail,
                                  deadline=float(deadline),
                                  announced=source in ANNOUNCING_SOURCES if announced is None else bool(announced))
        if not self._once.acquire(blocking=False):
            self._record_later(notice)
            return
        self._notice = notice
        self._notices.append(notice)
        _record_first_notice(notice)
        self._gate.release()
        user_deadline = self.deadline
        if user_deadline is None:
            logger.warning("Preemption notice from %s: %s (about %.0f s before hard stop)",
                           source, detail, notice.deadline)
        elif notice.announced and notice.deadline < user_deadline:
            # the platform announced its hard stop, before the user's deadline would end: that is the one in use
            self._cap_logged.acquire(blocking=False)
            logger.warning("Preemption notice from %s: %s (deadline %g s: the platform's announced hard stop, which "
                           "comes before preemption_deadline=%g s would end; the final checkpoint cannot use more)",
                           source, detail, notice.deadline, user_deadline)
        else:  # the deadline in use is the user's: quote it, and the platform's hard stop beside it
            logger.warning("Preemption notice from %s: %s (deadline %g s: preemption_deadline; the platform's hard "
                           "stop is about %.0f s away)", source, detail, user_deadline, notice.deadline)
        self._run_callbacks(notice)

    def _record_later(self, notice: PreemptionNotice) -> None:
        before = self.hard_stop_at
        self._notices.append(notice)
        if before is None or notice.hard_stop_at < before:
            logger.warning("Later preemption notice from %s: %s; hard stop now expected in %.0f s",
                           notice.source, notice.detail, notice.deadline)
        else:
            logger.info("Later preemption notice from %s: %s; hard stop still expected in %.0f s",
                        notice.source, notice.detail, before - notice.received_at)
        user_deadline, first = self.deadline, self._notices[0]
        if (user_deadline is not None and notice.announced
                and notice.hard_stop_at < first.received_at + user_deadline
                and self._cap_logged.acquire(blocking=False)):
            logger.warning("The hard stop %s announced comes before preemption_deadline=%g s (after the first "
                           "notice) would end: the deadline in use is now %.0f s after the first notice "
                           "(%.0f s from now)", notice.source, user_deadline,
                           notice.hard_stop_at - first.received_at, notice.deadline)

    def add_callback(self, fn: Callable[[PreemptionNotice], None]) -> None:
        """Register ``fn(notice)`` to be called once, on the first notice.

        The callback runs in the thread that saw the notice -- for SIGTERM that
        is the main thread, inside the signal handler, so keep it short and do
        not block on locks the main thread may hold.  If a notice was already
        received, ``fn`` is called immediately.  Exceptions are logged, not
        raised.
        """
        self._callbacks.append(fn)
        notice = self._notice
        if notice is not None:
            self._run_callbacks(notice)

    def _run_callbacks(self, notice: PreemptionNotice) -> None:
        # list.pop is atomic: every callback is run exactly once, by whoever pops it.
        while True:
            try:
                fn = self._callbacks.pop(0)
            except IndexError:
                return
            try:
                fn(notice)
            except Exception:  # noqa: BLE001 - callbacks must not break the watcher
                logger.exception("preemption callback %r failed", fn)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start watching (idempotent; a stopped watcher can be started again).

        Installs the SIGTERM handler when ``"sigterm"`` is a source and this is
        the main thread (otherwise logs a WARNING), and starts one daemon
        thread polling the configured metadata sources.
        """
        with self._lifecycle:
            if self._running:
                return
            self._running = True
            if "sigterm" in self._sources:
                self._sigterm_handler = signals.install_handler(self._on_sigterm, self._first_sigterm)
            poll_sources = [s for s in self._sources if s in ("gce", "aws", "azure")]
            if poll_sources and moto_mock_active():
                # A test under moto's in-process mock must not reach the real cloud metadata addresses;
                # fake servers (explicit or $CLOUDCKPT_*_METADATA_URL) are still polled.
                real = {"gce": (self._gce_url, metadata.DEFAULT_GCE_METADATA_URL),
                        "aws": (self._aws_url, metadata.DEFAULT_AWS_METADATA_URL),
                        "azure": (self._azure_url, metadata.DEFAULT_AZURE_METADATA_URL)}
                skipped = [s for s in poll_sources if real[s][0] == real[s][1]]
                if skipped:
                    logger.info("moto's mock is active: not polling the real %s metadata server(s)",
                                "/".join(skipped))
                poll_sources = [s for s in poll_sources if s not in skipped]
            if poll_sources:
                stop_event = threading.Event()
                self._stop_event = stop_event
                kinds: dict[str, tuple[type[metadata.Poller], str]] = {
                    "gce": (metadata.GcePoller, self._gce_url),
                    "aws": (metadata.AwsPoller, self._aws_url),
                    "azure": (metadata.AzurePoller, self._azure_url),
                }
                self._pollers = [kinds[s][0](self.trigger, kinds[s][1], self._request_timeout, stop_event)
                                 for s in poll_sources]
                self._thread = threading.Thread(
                    target=metadata.poll_loop,
                    args=(list(self._pollers), stop_event, self._poll_interval, self.is_preempted),
                    name="cloudckpt-preemption-poller", daemon=True,
                )
                self._thread.start()
            logger.debug("preemption watcher started (sources: %s)", ", ".join(self._sources))

    def stop(self) -> None:
        """Stop watching (idempotent; callable from any thread).

        Deactivates the SIGTERM handler, so from now on a SIGTERM behaves as the
        disposition it replaced; restores that disposition when ours is the
        installed handler and this is the main thread.  Then waits for the
        poller thread to end: at most its request in flight (connect and
        response, each bounded by ``request_timeout``) plus 1 s; a WARNING says
        so if it is still alive after that.
        """
        with self._lifecycle:
            if not self._running:
                return
            self._running = False
            handler, self._sigterm_handler = self._sigterm_handler, None
            if handler is not None:
                signals.uninstall_handler(handler)
            if self._stop_event is not None:
                self._stop_event.set()
            thread, self._thread = self._thread, None
            if thread is not None and thread is not threading.current_thread():
                bound = 2 * self._request_timeout + _JOIN_SLACK
                thread.join(timeout=bound)
                if thread.is_alive():
                    logger.warning("preemption poller still in a metadata request %.1f s after stop(); "
                                   "it is a daemon thread and ends with that request", bound)
            logger.debug("preemption watcher stopped")

    def replaced_sigterm_handler(self) -> Callable[[int, Any], Any] | None:
        """The Python SIGTERM handler the running watcher's handler replaced, if a SIGTERM was taken
        as a notice (rule 2 of :mod:`.signals`: it is deferred, not called, on that first SIGTERM);
        None otherwise. Call it once the work the notice asked for is done."""
        handler = self._sigterm_handler
        if handler is None or not any(n.source == "sigterm" for n in self._notices):
            return None
        previous = signals.unwrap(handler.previous)
        return previous if callable(previous) else None

    def stop_polling(self) -> None:
        """Stop the metadata poller (joined, as in :meth:`stop`) but keep the SIGTERM handler.

        For a preemption in progress: after the notice, polling has nothing left to
        tell, while the platform's shutdown SIGTERM may still arrive.
        """
        with self._lifecycle:
            if self._stop_event is not None:
                self._stop_event.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * self._request_timeout + _JOIN_SLACK)

    def _on_sigterm(self) -> None:
        self.trigger("sigterm", "SIGTERM", DEFAULT_DEADLINES["sigterm"])

    def __enter__(self) -> PreemptionWatcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sources={self._sources!r}, "
                f"running={self._running}, notice={self._notice!r})")
