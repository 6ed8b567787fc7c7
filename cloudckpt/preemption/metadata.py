"""Metadata pollers: the GCE, AWS and Azure endpoints that announce a preemption.

* **GCE**: ``GET /computeMetadata/v1/instance/preempted`` answers ``TRUE`` once
  the VM is preempted, at the same time as the ACPI soft-off, about 30 s
  before the hard stop; ``instance/maintenance-event`` announces host
  maintenance (``TERMINATE_ON_HOST_MAINTENANCE`` is a notice,
  ``MIGRATE_ON_HOST_MAINTENANCE`` a live migration that is not).  Requests
  need ``Metadata-Flavor: Google``
  (https://cloud.google.com/compute/docs/instances/spot#preemption-process,
  https://cloud.google.com/compute/docs/metadata/querying-metadata).
* **AWS**: ``GET /latest/meta-data/spot/instance-action`` is 404 until the
  two-minute spot interruption notice, then JSON ``{"action": ..., "time": ...}``
  (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html).
  IMDSv2 first: ``PUT /latest/api/token`` with a TTL, the token in
  ``X-aws-ec2-metadata-token``; 401 means an expired token (refreshed once),
  403/405 on the PUT means IMDSv1 only.
* **Azure**: no SIGTERM precedes a Spot VM's eviction; the notice is a
  Scheduled Event: ``GET /metadata/scheduledevents?api-version=2020-07-01``
  answers ``{"DocumentIncarnation": n, "Events": [...]}``; an event whose
  ``Resources`` name this VM (``GET /metadata/instance/compute/name``) and whose
  ``EventType`` is ``Preempt`` (Spot eviction, at least 30 s ahead),
  ``Terminate``, ``Reboot`` or ``Redeploy`` is a notice, with the deadline from
  its ``NotBefore`` (an RFC 1123 date; 5 s margin); ``Freeze`` (a pause of
  seconds) is not.  Requests need ``Metadata: true`` (refused without it) and
  must not go through a proxy.  The first scheduledevents request of a VM
  enables the feature and may take up to two minutes to answer: the
  compute-name request is the presence probe, and once it answered, timeouts
  of scheduledevents during the first :data:`_AZURE_ENABLE_SECONDS` are
  logged at DEBUG only.  Events are never acknowledged (that would bring the
  stop forward)
  (https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events,
  https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service).

GCE's metadata server, AWS's IMDS and Azure's IMDS all answer on
``169.254.169.254``: each poller is refused by the other clouds' servers, so it
gives up there as on a machine without one.  On GCE or AWS the Azure probe
gets 403 (no ``Metadata-Flavor: Google``), 401 (no IMDSv2 token) or 404
(unknown path on IMDSv1); on Azure, whose IMDS rejects requests without
``Metadata: true`` (400) and methods other than GET (405), the AWS poller's
token PUT falls back to IMDSv1 and its GET gets 400, and the GCE poller's
host name does not resolve (pointed at Azure's IMDS it gets 400).  Tested
against the fakes of ``tests/support/fake_metadata.py``, which answer as those
documents say; the status codes of the real servers for each other's paths
are not documented.

A source that never answered is given up after :data:`_MAX_FAILURES`
consecutive failures ("not on this cloud", INFO); one that answered before
keeps being polled through an outage (one WARNING).  Requests never use an
HTTP proxy from the environment.  Base URLs come from the watcher, the
``CLOUDCKPT_GCE_METADATA_URL`` / ``CLOUDCKPT_AWS_METADATA_URL`` /
``CLOUDCKPT_AZURE_METADATA_URL`` environment variables, or the providers'
defaults.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from .notice import DEFAULT_DEADLINES

__all__ = ["AWS_METADATA_URL_ENV", "AZURE_METADATA_URL_ENV", "DEFAULT_AWS_METADATA_URL", "DEFAULT_AZURE_METADATA_URL",
           "DEFAULT_GCE_METADATA_URL", "GCE_METADATA_URL_ENV", "AwsPoller", "AzurePoller", "GcePoller", "Poller",
           "poll_loop", "resolve_url"]

logger = logging.getLogger("cloudckpt.preemption")

DEFAULT_GCE_METADATA_URL = "http://metadata.google.internal"
DEFAULT_AWS_METADATA_URL = "http://169.254.169.254"
DEFAULT_AZURE_METADATA_URL = "http://169.254.169.254"

#: Environment variable overriding the GCE metadata base URL.
GCE_METADATA_URL_ENV = "CLOUDCKPT_GCE_METADATA_URL"
#: Environment variable overriding the AWS instance metadata base URL.
AWS_METADATA_URL_ENV = "CLOUDCKPT_AWS_METADATA_URL"
#: Environment variable overriding the Azure instance metadata base URL.
AZURE_METADATA_URL_ENV = "CLOUDCKPT_AZURE_METADATA_URL"

#: ``report(source, detail, deadline_seconds)``: how a poller hands over a notice.
Report = Callable[[str, str, float], None]

# Consecutive failures after which a metadata source that never answered is
# considered absent ("not on this cloud") and is no longer polled.
_MAX_FAILURES = 3

_GCE_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
_GCE_MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
_AWS_TOKEN_PATH = "/latest/api/token"
_AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
_AWS_TOKEN_TTL_SECONDS = 21600  # IMDSv2 maximum (6 h)
_MAX_BODY = 64 * 1024
_AZURE_EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
_AZURE_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
# Seconds from the first scheduledevents request during which its failures (timeouts) are expected: that
# request enables Scheduled Events on the VM and "may take up to two minutes" to answer.
_AZURE_ENABLE_SECONDS = 120.0
# Seconds kept between the deadline and an event's NotBefore (as GCE's 25 s of 30 s).
_AZURE_MARGIN_SECONDS = 5.0
# Event types that stop the VM (and the process); Freeze pauses it for seconds and is not a notice.
_AZURE_STOPPING_EVENTS = ("Preempt", "Terminate", "Reboot", "Redeploy")
# A scale set's events may list many resources.
_AZURE_MAX_BODY = 1024 * 1024

# Metadata requests must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def resolve_url(explicit: str | None, env_var: str, default: str) -> str:
    """The base URL to use: ``explicit``, else ``$env_var``, else ``default``; no trailing slash."""
    url = explicit if explicit is not None else (os.environ.get(env_var) or default)
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


class _Unavailable(Exception):
    """A metadata endpoint could not be used (connection error, bad status...)."""


def _http(method: str, url: str, headers: dict[str, str], timeout: float,
          max_body: int = _MAX_BODY) -> tuple[int, bytes]:
    """Perform one request; return ``(status, at most max_body bytes of the body)``; raise on transport errors."""
    data = b"" if method == "PUT" else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read(max_body)
    except urllib.error.HTTPError as err:
        try:
            body = err.read(_MAX_BODY) or b""
        except Exception:  # noqa: BLE001 - body of an error response is best effort
            body = b""
        finally:
            err.close()
        return err.code, body


class Poller:
    """One metadata source with failure accounting.

    Args:
        report: Called with ``(source, detail, deadline)`` for a notice.
        base_url: The metadata server's base URL.
        timeout: Seconds for each socket operation of a request.
        stop_event: Set when polling should end; checked between requests.
    """

    source = ""
    label = ""

    def __init__(self, report: Report, base_url: str, timeout: float, stop_event: threading.Event) -> None:
        self.report = report
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
            logger.info(
                "%s metadata server at %s unavailable after %d attempts (%s); "
                "assuming not on %s, no longer polling it",
                self.label, self.base_url, self.failures, reason, self.label,
            )
            self.disabled = True  # after the log line: whoever sees the source gone also sees why
        elif self.ever_succeeded and self.failures >= _MAX_FAILURES and not self.outage_reported:
            # It used to work: keep trying, preemption detection matters.
            self.outage_reported = True
            logger.warning(
                "%s metadata server at %s failing (%d consecutive errors, last: %s); still polling",
                self.label, self.base_url, self.failures, reason,
            )
        else:
            logger.debug("%s metadata poll failed (%d): %s", self.label, self.failures, reason)

    def poll(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class GcePoller(Poller):
    """``instance/preempted``, then ``instance/maintenance-event`` (optional endpoint)."""

    source = "gce"
    label = "GCE"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.maintenance_failures = 0
        self.maintenance_disabled = False
        self.last_maintenance_value: str | None = None

    def _get(self, path: str) -> tuple[int, str]:
        status, body = _http("GET", self.base_url + path, {"Metadata-Flavor": "Google"}, self.timeout)
        return status, body.decode("utf-8", "replace").strip()

    def poll(self) -> None:
        status, text = self._get(_GCE_PREEMPTED_PATH)
        if status != 200:
            raise _Unavailable(f"GET {_GCE_PREEMPTED_PATH} -> HTTP {status}")
        if text.upper() == "TRUE":
            self.report("gce", "instance/preempted=TRUE", DEFAULT_DEADLINES["gce"])
            return
        if self.maintenance_disabled or self.stop_event.is_set():
            return
        try:
            status, text = self._get(_GCE_MAINTENANCE_PATH)
            if status != 200:
                raise _Unavailable(f"GET {_GCE_MAINTENANCE_PATH} -> HTTP {status}")
        except Exception as exc:  # noqa: BLE001 - optional endpoint
            self.maintenance_failures += 1
            logger.debug("GCE maintenance-event poll failed (%d): %s", self.maintenance_failures, exc)
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
        self.report("gce", f"instance/maintenance-event={text}", DEFAULT_DEADLINES["gce"])


class AwsPoller(Poller):
    """``spot/instance-action`` through IMDSv2 (token cached, refreshed before expiry), IMDSv1 fallback."""

    source = "aws"
    label = "AWS"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token: str | None = None
        self.token_expires_at = 0.0

    def _fetch_token(self) -> str | None:
        """Get an IMDSv2 token; ``None`` means "fall back to IMDSv1"."""
        ttl = _AWS_TOKEN_TTL_SECONDS
        status, body = _http("PUT", self.base_url + _AWS_TOKEN_PATH,
                             {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)}, self.timeout)
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
            if self.stop_event.is_set():
                return
            token = self._fetch_token()
            if self.stop_event.is_set():
                return
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
        self.report("aws", detail, DEFAULT_DEADLINES["aws"])


class AzurePoller(Poller):
    """Azure Scheduled Events for this VM (``Preempt``, ``Terminate``, ``Reboot``, ``Redeploy``).

    Each poll: the VM's name once (``instance/compute/name``, the presence probe: a 200 there means "on
    Azure", and from then on the source is never given up), then ``scheduledevents``.  Failures of the
    latter during the first :data:`_AZURE_ENABLE_SECONDS` after its first request, before it ever answered,
    are logged at DEBUG only (that request enables the feature and may take up to two minutes); after that
    they count as an outage (one WARNING, still polling).  On GCE or AWS the probe is refused (403, 401,
    404 on ``169.254.169.254``) and the source is given up after :data:`_MAX_FAILURES` attempts.

    Only events whose ``Resources`` include this VM's name count (case-insensitively; an availability set's
    or scale set's events may name others), with ``EventStatus`` ``Scheduled`` or ``Started``.  ``Freeze``
    (memory-preserving maintenance, a pause of seconds) and unknown types are logged once each (INFO) and
    are not notices.  The notice's deadline: seconds until ``NotBefore`` minus 5 s, never negative; without
    a ``NotBefore`` (a started event) :data:`DEFAULT_DEADLINES` ``["azure"]``.  Of several events, the
    earliest deadline is reported.  Events are never acknowledged (``StartRequests`` would bring the stop
    forward).  See https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events and
    https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service.
    """

    source = "azure"
    label = "Azure"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vm_name: str | None = None
        self.events_answered = False
        self.events_first_asked_at: float | None = None
        self._logged_events: set[str] = set()

    def _get(self, path: str, max_body: int = _MAX_BODY) -> tuple[int, bytes]:
        return _http("GET", self.base_url + path, {"Metadata": "true"}, self.timeout, max_body)

    def _probe(self) -> None:
        """Learn this VM's name; a 200 means Azure's IMDS answers (the source is never given up after)."""
        status, body = self._get(_AZURE_NAME_PATH)
        if status != 200:
            raise _Unavailable(f"GET {_AZURE_NAME_PATH} -> HTTP {status}")
        name = body.decode("utf-8", "replace").strip()
        if not name:
            raise _Unavailable("empty VM name from the instance metadata service")
        self.vm_name = name
        self.ever_succeeded = True
        self.failures = 0
        logger.debug("Azure instance metadata answered (VM %r); polling its Scheduled Events", name)

    def _in_enable_window(self) -> bool:
        started = self.events_first_asked_at
        return (self.vm_name is not None and not self.events_answered and started is not None
                and time.monotonic() - started < _AZURE_ENABLE_SECONDS)

    def _failed(self, exc: Exception) -> None:
        if self._in_enable_window():
            logger.debug("Azure scheduledevents not answering yet (%s: %s); its first request enables Scheduled "
                         "Events and may take up to %.0f s", type(exc).__name__, exc, _AZURE_ENABLE_SECONDS)
            return
        super()._failed(exc)

    def poll(self) -> None:
        if self.vm_name is None:
            self._probe()
            if self.stop_event.is_set():
                return
        if self.events_first_asked_at is None:
            self.events_first_asked_at = time.monotonic()
        status, body = self._get(_AZURE_EVENTS_PATH, _AZURE_MAX_BODY)
        if status != 200:
            raise _Unavailable(f"GET {_AZURE_EVENTS_PATH} -> HTTP {status}")
        try:
            payload = json.loads(body.decode("utf-8"))
            events = payload["Events"]
            if not isinstance(events, list):
                raise TypeError("Events is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise _Unavailable(f"unexpected scheduledevents body {body[:200]!r}") from exc
        if not self.events_answered:
            self.events_answered = True
            logger.debug("Azure Scheduled Events answering (DocumentIncarnation %s)",
                         payload.get("DocumentIncarnation"))
        self._handle(events)

    def _handle(self, events: list[Any]) -> None:
        assert self.vm_name is not None
        me = self.vm_name.casefold()
        best: tuple[float, str] | None = None
        for event in events:
            if not isinstance(event, dict):
                continue
            resources = event.get("Resources")
            if not isinstance(resources, list) or me not in {str(r).casefold() for r in resources}:
                continue  # another VM of the availability set / scale set
            kind = str(event.get("EventType") or "")
            status = str(event.get("EventStatus") or "")
            event_id = str(event.get("EventId") or "")
            if kind not in _AZURE_STOPPING_EVENTS:
                if event_id not in self._logged_events:
                    self._logged_events.add(event_id)
                    if kind == "Freeze":
                        duration = event.get("DurationInSeconds")
                        pause = f"about {duration} s" if isinstance(duration, int) and duration > 0 else "seconds"
                        logger.info("Azure scheduled event Freeze for %s (a pause of %s: memory-preserving maintenance "
                                    "or live migration), not a preemption", self.vm_name, pause)
                    else:
                        logger.info("Azure scheduled event %r for %s does not stop the VM; not a preemption",
                                    kind, self.vm_name)
                continue
            if status not in ("Scheduled", "Started"):
                logger.debug("Azure scheduled event %s %s for %s with status %r: not a notice", event_id, kind,
                             self.vm_name, status)
                continue
            not_before = str(event.get("NotBefore") or "").strip()
            deadline = _deadline_until(not_before)
            detail = f"scheduled event {kind} ({status}) for {self.vm_name}"
            if not_before:
                detail += f", NotBefore {not_before}"
            if best is None or deadline < best[0]:
                best = (deadline, detail)
        if best is not None:
            self.report("azure", best[1], best[0])


def _deadline_until(not_before: str, now: datetime | None = None) -> float:
    """Seconds from ``now`` (default: the current UTC time) until an Azure event's ``NotBefore`` (RFC 1123,
    e.g. ``Mon, 19 Sep 2016 18:29:47 GMT``) minus :data:`_AZURE_MARGIN_SECONDS`, never negative;
    :data:`DEFAULT_DEADLINES` ``["azure"]`` when it is empty or cannot be parsed."""
    if not not_before:
        return DEFAULT_DEADLINES["azure"]
    try:
        when = parsedate_to_datetime(not_before)
    except (TypeError, ValueError, IndexError):
        when = None
    if when is None:
        logger.debug("Azure scheduled event NotBefore %r not understood; assuming %g s", not_before,
                     DEFAULT_DEADLINES["azure"])
        return DEFAULT_DEADLINES["azure"]
    if when.tzinfo is None:  # "-0000": UTC
        when = when.replace(tzinfo=timezone.utc)
    now = now if now is not None else datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds() - _AZURE_MARGIN_SECONDS)


def poll_loop(pollers: Sequence[Poller], stop_event: threading.Event, interval: float,
              done: Callable[[], bool]) -> None:
    """Poll every live source each ``interval`` seconds until ``stop_event`` is set or ``done()``.

    Returns once no source is left (all given up).  Never raises: a crash is logged.
    Between requests it checks ``stop_event``, so after it is set the loop ends within
    the request in flight (each socket operation bounded by the pollers' timeout).
    """
    try:
        while not stop_event.is_set() and not done():
            live = [p for p in pollers if not p.disabled]
            if not live:
                logger.debug("no metadata source left to poll; poller exiting")
                return
            for poller in live:
                if stop_event.is_set() or done():
                    return
                poller.poll_once()
            stop_event.wait(interval)
    except BaseException:  # noqa: BLE001 - last resort, never crash noisily
        logger.exception("preemption poller crashed")
