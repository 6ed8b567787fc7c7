"""Preemption detection for spot / preemptible VMs.

Cloud providers give a short warning before they reclaim a spot or
preemptible machine:

* **GCE** sends an ACPI soft-off (processes receive ``SIGTERM``) and hard-stops
  the VM about 30 s later.  The metadata server also exposes
  ``/computeMetadata/v1/instance/preempted`` (``TRUE`` once preempted) and
  ``/computeMetadata/v1/instance/maintenance-event``.
* **AWS** posts a two-minute notice on the instance metadata endpoint
  ``/latest/meta-data/spot/instance-action`` (404 until there is a notice).

:class:`PreemptionWatcher` watches any combination of these sources
(``"sigterm"``, ``"gce"``, ``"aws"``) and records the *first* notice it sees
as a :class:`PreemptionNotice`.  It only uses the standard library and never
imports TensorFlow.

Metadata base URLs can be given explicitly, or through the environment
variables ``CLOUDCKPT_GCE_METADATA_URL`` and ``CLOUDCKPT_AWS_METADATA_URL``
(useful to point a subprocess at a local fake server).

.. note::

   The ``SIGTERM`` handler installed by the watcher does **not** terminate the
   process, even when the previous disposition was ``SIG_DFL``: the whole
   point is to survive long enough to save and upload a final checkpoint.
   Code that uses the watcher is responsible for exiting once it is done
   (the platform hard-stops the VM at the end of the grace period anyway).
   A previously installed Python handler is still called after the notice is
   recorded; if it raises (e.g. ``SystemExit``), that exception propagates.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .errors import ConfigError

__all__ = [
    "AWS_METADATA_URL_ENV",
    "DEFAULT_AWS_METADATA_URL",
    "DEFAULT_DEADLINES",
    "DEFAULT_GCE_METADATA_URL",
    "GCE_METADATA_URL_ENV",
    "SOURCES",
    "PreemptionNotice",
    "PreemptionWatcher",
    "last_notice",
    "was_preempted",
]

logger = logging.getLogger("cloudckpt.preemption")

#: All notice sources understood by :class:`PreemptionWatcher`.
SOURCES: tuple[str, ...] = ("sigterm", "gce", "aws")

#: Seconds the platform gives between the notice and the hard stop, per source.
#: ``sigterm`` uses the GCE soft-off default (SIGTERM, hard stop ~30 s later).
DEFAULT_DEADLINES: dict[str, float] = {"sigterm": 25.0, "gce": 25.0, "aws": 100.0}

DEFAULT_GCE_METADATA_URL = "http://metadata.google.internal"
DEFAULT_AWS_METADATA_URL = "http://169.254.169.254"

#: Environment variable overriding the GCE metadata base URL.
GCE_METADATA_URL_ENV = "CLOUDCKPT_GCE_METADATA_URL"
#: Environment variable overriding the AWS instance metadata base URL.
AWS_METADATA_URL_ENV = "CLOUDCKPT_AWS_METADATA_URL"

_SPECS = ("None", '"sigterm"', '"auto"', "a PreemptionWatcher instance")

# Consecutive failures after which a metadata source that never answered is
# considered absent ("not on this cloud") and is no longer polled.
_MAX_FAILURES = 3

_GCE_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
_GCE_MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
_AWS_TOKEN_PATH = "/latest/api/token"
_AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
_AWS_TOKEN_TTL_SECONDS = 21600  # IMDSv2 maximum (6 h)
_MAX_BODY = 64 * 1024

# Metadata requests must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class PreemptionNotice:
    """A preemption warning received from one of the watched sources.

    Attributes:
        source: ``"sigterm"``, ``"gce"`` or ``"aws"`` (or any string passed to
            :meth:`PreemptionWatcher.trigger`).
        received_at: ``time.monotonic()`` when the notice was recorded.
        detail: Human-readable description, e.g. ``"SIGTERM"``,
            ``"instance/preempted=TRUE"`` or
            ``"spot instance-action: terminate at 2026-11-26T19:00:00Z"``.
        deadline: Seconds the platform grants after the notice before the
            machine is hard-stopped.
    """

    source: str
    received_at: float
    detail: str
    deadline: float

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before :attr:`deadline` expires (may be negative).

        Args:
            now: A ``time.monotonic()`` value; defaults to the current time.
        """
        if now is None:
            now = time.monotonic()
        return self.deadline - (now - self.received_at)


_last_notice: PreemptionNotice | None = None


def was_preempted() -> bool:
    """Return ``True`` if any watcher in this process has received a notice."""
    return _last_notice is not None


def last_notice() -> PreemptionNotice | None:
    """Return the most recent notice recorded by any watcher in this process."""
    return _last_notice


def _reset_last_notice() -> None:
    """Forget the process-wide notice (for tests)."""
    global _last_notice
    _last_notice = None


def _resolve_url(explicit: str | None, env_var: str, default: str) -> str:
    url = explicit if explicit is not None else (os.environ.get(env_var) or default)
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class _SigtermHandler:
    """The installed SIGTERM handler; records a notice, then chains."""

    def __init__(self, watcher: PreemptionWatcher, previous: Any) -> None:
        self.watcher = watcher
        self.previous = previous
        self.active = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        # Keep this signal-safe: trigger() takes no blocking locks.
        previous = self.previous
        if self.active and self.watcher.notice is not None and previous in (signal.SIG_DFL, None):
            # A second SIGTERM (or one after the run failed without reaching end()): the operator
            # means it. Terminate the default way instead of swallowing it.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.active:
            self.watcher.trigger("sigterm", "SIGTERM", DEFAULT_DEADLINES["sigterm"])
        # SIG_DFL / SIG_IGN are ints, None means "installed from C": not callable.
        # Deliberately never re-raise the default termination.
        if callable(previous):
            previous(signum, frame)


class _Unavailable(Exception):
    """A metadata endpoint could not be used (connection error, bad status...)."""


def _http(method: str, url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """Perform one request; return ``(status, body)``; raise on transport errors."""
    data = b"" if method == "PUT" else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read(_MAX_BODY)
    except urllib.error.HTTPError as err:
        try:
            body = err.read(_MAX_BODY) or b""
        except Exception:  # noqa: BLE001 - body of an error response is best effort
            body = b""
        finally:
            err.close()
        return err.code, body


class _Poller:
    """Base class: one metadata source with failure accounting."""

    source = ""
    label = ""

    def __init__(self, watcher: PreemptionWatcher, base_url: str, timeout: float,
                 stop_event: threading.Event) -> None:
        self.watcher = watcher
        self.base_url = base_url
        self.timeout = timeout
        self.stop_event = stop_event
        self.disabled = False
        self.ever_succeeded = False
        self.failures = 0
        self.outage_reported = False

    def poll_once(self) -> None:
        """Poll the source; never raises (except BaseException)."""
        try:
            self.poll()
        except Exception as exc:  # noqa: BLE001 - a poll must never kill the thread
            self._failed(exc)
        else:
            if self.failures and self.ever_succeeded and self.outage_reported:
                logger.info("%s metadata server at %s reachable again", self.label, self.base_url)
            self.failures = 0
            self.outage_reported = False
            self.ever_succeeded = True

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        reason = f"{type(exc).__name__}: {exc}"
        if not self.ever_succeeded and self.failures >= _MAX_FAILURES:
            self.disabled = True
            logger.info(
                "%s metadata server at %s unavailable after %d attempts (%s); "
                "assuming not on %s, no longer polling it",
                self.label, self.base_url, self.failures, reason, self.label,
            )
        elif self.ever_succeeded and self.failures >= _MAX_FAILURES and not self.outage_reported:
            # It used to work: keep trying, preemption detection matters.
            self.outage_reported = True
            logger.warning(
                "%s metadata server at %s failing (%d consecutive errors, last: %s); "
                "still polling",
                self.label, self.base_url, self.failures, reason,
            )
        else:
            logger.debug("%s metadata poll failed (%d): %s", self.label, self.failures, reason)

    def poll(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _GcePoller(_Poller):
    source = "gce"
    label = "GCE"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.maintenance_failures = 0
        self.maintenance_disabled = False
        self.last_maintenance_value: str | None = None

    def _get(self, path: str) -> tuple[int, str]:
        status, body = _http("GET", self.base_url + path, {"Metadata-Flavor": "Google"},
                             self.timeout)
        return status, body.decode("utf-8", "replace").strip()

    def poll(self) -> None:
        status, text = self._get(_GCE_PREEMPTED_PATH)
        if status != 200:
            raise _Unavailable(f"GET {_GCE_PREEMPTED_PATH} -> HTTP {status}")
        if text.upper() == "TRUE":
            self.watcher.trigger("gce", "instance/preempted=TRUE", DEFAULT_DEADLINES["gce"])
            return
        if self.maintenance_disabled or self.stop_event.is_set():
            return
        try:
            status, text = self._get(_GCE_MAINTENANCE_PATH)
            if status != 200:
                raise _Unavailable(f"GET {_GCE_MAINTENANCE_PATH} -> HTTP {status}")
        except Exception as exc:  # noqa: BLE001 - optional endpoint
            self.maintenance_failures += 1
            logger.debug("GCE maintenance-event poll failed (%d): %s",
                         self.maintenance_failures, exc)
            if self.maintenance_failures >= _MAX_FAILURES:
                self.maintenance_disabled = True
            return
        self.maintenance_failures = 0
        value = text.upper()
        if value in ("", "NONE"):
            self.last_maintenance_value = value
            return
        if value.startswith("MIGRATE"):
            # Live migration: the VM keeps running, this is not a preemption.
            if value != self.last_maintenance_value:
                logger.info("GCE maintenance-event=%s (live migration), not a preemption", value)
            self.last_maintenance_value = value
            return
        self.last_maintenance_value = value
        self.watcher.trigger("gce", f"instance/maintenance-event={text}",
                             DEFAULT_DEADLINES["gce"])


class _AwsPoller(_Poller):
    source = "aws"
    label = "AWS"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token: str | None = None
        self.token_expires_at = 0.0

    def _fetch_token(self) -> str | None:
        """Get an IMDSv2 token; ``None`` means "fall back to IMDSv1"."""
        ttl = _AWS_TOKEN_TTL_SECONDS
        status, body = _http(
            "PUT", self.base_url + _AWS_TOKEN_PATH,
            {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)}, self.timeout,
        )
        if status == 200:
            token = body.decode("ascii", "replace").strip()
            if not token:
                raise _Unavailable("empty IMDSv2 token")
            # Refresh a little before the token actually expires.
            margin = min(60.0, ttl * 0.1)
            self.token = token
            self.token_expires_at = time.monotonic() + ttl - margin
            return token
        if status in (403, 405):
            logger.debug("IMDSv2 token request -> HTTP %d; trying IMDSv1", status)
            return None
        raise _Unavailable(f"PUT {_AWS_TOKEN_PATH} -> HTTP {status}")

    def _token(self) -> str | None:
        if self.token is not None and time.monotonic() < self.token_expires_at:
            return self.token
        self.token = None
        return self._fetch_token()

    def _get_action(self, token: str | None) -> tuple[int, bytes]:
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        return _http("GET", self.base_url + _AWS_ACTION_PATH, headers, self.timeout)

    def poll(self) -> None:
        token = self._token()
        if self.stop_event.is_set():
            return
        status, body = self._get_action(token)
        if status == 401:
            # Token expired or revoked: refresh once and retry.
            logger.debug("IMDS returned 401; refreshing the IMDSv2 token")
            self.token = None
            token = self._fetch_token()
            status, body = self._get_action(token)
        if status == 404:
            return  # no interruption notice
        if status != 200:
            raise _Unavailable(f"GET {_AWS_ACTION_PATH} -> HTTP {status}")
        try:
            payload = json.loads(body.decode("utf-8"))
            action = str(payload["action"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _Unavailable(f"unexpected spot/instance-action body {body[:200]!r}") from exc
        when = payload.get("time")
        detail = f"spot instance-action: {action}" + (f" at {when}" if when else "")
        self.watcher.trigger("aws", detail, DEFAULT_DEADLINES["aws"])


class PreemptionWatcher:
    """Watch for spot / preemptible VM termination notices.

    Args:
        sources: Any of ``"sigterm"``, ``"gce"``, ``"aws"``.  A single string
            is accepted as a one-source shortcut.
        gce_metadata_url: Base URL of the GCE metadata server.  Defaults to
            ``$CLOUDCKPT_GCE_METADATA_URL`` or ``http://metadata.google.internal``.
        aws_metadata_url: Base URL of the AWS instance metadata service.
            Defaults to ``$CLOUDCKPT_AWS_METADATA_URL`` or ``http://169.254.169.254``.
        poll_interval: Seconds between metadata polls (default 5).
        request_timeout: Timeout of each metadata HTTP request, in seconds.

    The watcher does nothing until :meth:`start`.  The first notice is kept
    in :attr:`notice` (and process-wide in :func:`last_notice`); later notices
    are ignored.  Metadata sources that cannot be reached (connection error,
    404, ...) ``3`` times in a row before ever answering are assumed absent and
    no longer polled, so ``"auto"`` is cheap on machines outside that cloud.
    Polling stops once a notice has been received.

    Usable as a context manager (``start()`` on enter, ``stop()`` on exit).
    """

    def __init__(
        self,
        sources: Iterable[str] | str = ("sigterm",),
        *,
        gce_metadata_url: str | None = None,
        aws_metadata_url: str | None = None,
        poll_interval: float = 5.0,
        request_timeout: float = 1.0,
    ) -> None:
        if isinstance(sources, str):
            sources = (sources,)
        normalized: list[str] = []
        for source in sources:
            if source not in SOURCES:
                raise ConfigError(
                    f"unknown preemption source {source!r}; allowed: {', '.join(SOURCES)}"
                )
            if source not in normalized:
                normalized.append(source)
        if not poll_interval > 0:
            raise ConfigError(f"poll_interval must be > 0, got {poll_interval!r}")
        if not request_timeout > 0:
            raise ConfigError(f"request_timeout must be > 0, got {request_timeout!r}")
        self._sources = tuple(normalized)
        self._gce_url = _resolve_url(gce_metadata_url, GCE_METADATA_URL_ENV,
                                     DEFAULT_GCE_METADATA_URL)
        self._aws_url = _resolve_url(aws_metadata_url, AWS_METADATA_URL_ENV,
                                     DEFAULT_AWS_METADATA_URL)
        self._poll_interval = float(poll_interval)
        self._request_timeout = float(request_timeout)

        self._notice: PreemptionNotice | None = None
        # Held from construction until the first notice: released exactly once
        # by trigger() (Lock.release never blocks, so it is signal-safe).
        self._gate = threading.Lock()
        self._gate.acquire()
        # Acquired (non-blocking) by the first trigger() and never released.
        self._once = threading.Lock()
        self._callbacks: list[Callable[[PreemptionNotice], None]] = []

        self._lifecycle = threading.Lock()  # never taken from the signal handler
        self._running = False
        self._sigterm_handler: _SigtermHandler | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: threading.Event | None = None
        self._pollers: list[_Poller] = []

    # ------------------------------------------------------------------ specs
    @classmethod
    def from_spec(cls, spec: PreemptionWatcher | str | None) -> PreemptionWatcher | None:
        """Build a watcher from the hook's ``preemption=`` argument.

        ``None`` -> ``None`` (off); ``"sigterm"`` -> SIGTERM only; ``"auto"`` ->
        SIGTERM plus GCE and AWS metadata polling; a :class:`PreemptionWatcher`
        is returned unchanged.

        Raises:
            ValueError: for any other value.
        """
        if spec is None:
            return None
        if isinstance(spec, PreemptionWatcher):
            return spec
        if isinstance(spec, str):
            if spec == "sigterm":
                return cls(("sigterm",))
            if spec == "auto":
                return cls(("sigterm", "gce", "aws"))
        raise ConfigError(
            f"invalid preemption spec {spec!r}; expected one of {', '.join(_SPECS)}"
        )

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
    def poll_interval(self) -> float:
        """Seconds between metadata polls."""
        return self._poll_interval

    @property
    def running(self) -> bool:
        """``True`` between :meth:`start` and :meth:`stop`."""
        return self._running

    @property
    def active_sources(self) -> tuple[str, ...]:
        """Sources currently watched: ``"sigterm"`` if our handler is installed,
        and the metadata sources still being polled (not given up on)."""
        active: list[str] = []
        if self._sigterm_handler is not None and self._sigterm_handler.active:
            active.append("sigterm")
        thread = self._thread
        if thread is not None and thread.is_alive():
            active.extend(p.source for p in self._pollers if not p.disabled)
        return tuple(active)

    @property
    def notice(self) -> PreemptionNotice | None:
        """The first notice received, or ``None``."""
        return self._notice

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
    def trigger(self, source: str, detail: str, deadline: float) -> None:
        """Record a preemption notice.

        Only the first call has an effect: it stores the notice, wakes
        :meth:`wait`, logs one WARNING and runs the callbacks (in the calling
        thread).  Thread-safe, and safe to call from a signal handler: it never
        blocks on a lock.

        Args:
            source: Where the notice came from (``"sigterm"``, ``"gce"``, ``"aws"``).
            detail: Human-readable description.
            deadline: Seconds until the platform hard-stops the machine.
        """
        if not self._once.acquire(blocking=False):
            return  # a notice was already recorded (or is being recorded)
        global _last_notice
        notice = PreemptionNotice(source=source, received_at=time.monotonic(),
                                  detail=detail, deadline=float(deadline))
        self._notice = notice
        _last_notice = notice
        self._gate.release()
        logger.warning("Preemption notice from %s: %s (about %.0f s before hard stop)",
                       source, detail, notice.deadline)
        self._run_callbacks(notice)

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
        """Start watching (idempotent).

        Installs the SIGTERM handler when ``"sigterm"`` is a source and this is
        the main thread (otherwise logs a WARNING), and starts one daemon
        thread polling the configured metadata sources.
        """
        with self._lifecycle:
            if self._running:
                return
            self._running = True
            if "sigterm" in self._sources:
                self._install_sigterm()
            poll_sources = [s for s in self._sources if s in ("gce", "aws")]
            if poll_sources:
                stop_event = threading.Event()
                self._stop_event = stop_event
                self._pollers = [
                    (_GcePoller if s == "gce" else _AwsPoller)(
                        self, self._gce_url if s == "gce" else self._aws_url,
                        self._request_timeout, stop_event)
                    for s in poll_sources
                ]
                self._thread = threading.Thread(
                    target=self._poll_loop, args=(stop_event, list(self._pollers)),
                    name="cloudckpt-preemption-poller", daemon=True,
                )
                self._thread.start()
            logger.debug("preemption watcher started (sources: %s)", ", ".join(self._sources))

    def stop(self) -> None:
        """Stop watching (idempotent).

        Restores the previous SIGTERM handler if ours is still the installed
        one (when another handler was installed on top of ours, ours stays in
        place but only chains to its predecessor), and stops the poller.
        """
        with self._lifecycle:
            if not self._running:
                return
            self._running = False
            self._uninstall_sigterm()
            if self._stop_event is not None:
                self._stop_event.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=self._request_timeout + 1.0)
                if thread.is_alive():
                    logger.debug("preemption poller still finishing a request; not waiting")
            logger.debug("preemption watcher stopped")

    def __enter__(self) -> PreemptionWatcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sources={self._sources!r}, "
                f"running={self._running}, notice={self._notice!r})")

    # ----------------------------------------------------------------- SIGTERM
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "PreemptionWatcher started from a non-main thread: SIGTERM cannot be "
                "watched (signal handlers can only be installed from the main thread)"
            )
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
            handler = _SigtermHandler(self, previous)
            signal.signal(signal.SIGTERM, handler)
        except (ValueError, OSError) as exc:  # e.g. embedded interpreters
            logger.warning("could not install SIGTERM handler: %s", exc)
            return
        self._sigterm_handler = handler

    def _uninstall_sigterm(self) -> None:
        handler = self._sigterm_handler
        if handler is None:
            return
        self._sigterm_handler = None
        handler.active = False  # if it stays installed, it only chains from now on
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionWatcher stopped from a non-main thread: "
                           "cannot restore the previous SIGTERM handler")
            return
        previous = handler.previous
        if previous is None:  # installed from C: cannot be restored, best we can do
            previous = signal.SIG_DFL
        try:
            if signal.getsignal(signal.SIGTERM) is handler:
                signal.signal(signal.SIGTERM, previous)
            else:
                logger.debug("SIGTERM handler was replaced; leaving the current one")
        except (ValueError, OSError) as exc:
            logger.warning("could not restore SIGTERM handler: %s", exc)

    # ----------------------------------------------------------------- polling
    def _poll_loop(self, stop_event: threading.Event, pollers: list[_Poller]) -> None:
        try:
            while not stop_event.is_set() and self._notice is None:
                live = [p for p in pollers if not p.disabled]
                if not live:
                    logger.debug("no metadata source left to poll; poller exiting")
                    return
                for poller in live:
                    if stop_event.is_set() or self._notice is not None:
                        return
                    poller.poll_once()
                stop_event.wait(self._poll_interval)
        except BaseException:  # noqa: BLE001 - last resort, never crash noisily
            logger.exception("preemption poller crashed")
