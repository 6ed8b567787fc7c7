"""Fake GCE, AWS and Azure instance-metadata servers for preemption tests.

    with FakeGceMetadata() as gce, FakeAwsMetadata() as aws, FakeAzureMetadata() as azure:
        watcher = PreemptionWatcher(("gce", "aws", "azure"), gce_metadata_url=gce.url,
                                    aws_metadata_url=aws.url, azure_metadata_url=azure.url,
                                    poll_interval=0.05)
        gce.preempt()                      # instance/preempted -> TRUE
        aws.preempt(action="terminate")    # spot/instance-action -> JSON notice
        aws.invalidate_tokens()            # next GET with the old token -> 401
        azure.preempt()                    # a Preempt scheduled event for this VM, NotBefore now + 30 s

Both serve on 127.0.0.1 (ephemeral port, ``.url``) from a daemon thread and
keep a request log (``.requests``: :class:`Request` records, logged when answered).
``.delay`` (seconds, default 0) holds every answer back, like a slow metadata
server; ``.arrivals`` counts requests as they arrive, before that delay.

GCE: ``GET /computeMetadata/v1/instance/preempted`` ("FALSE"/"TRUE") and
``.../instance/maintenance-event`` ("NONE" or what ``set_maintenance_event``
set).  Requests without ``Metadata-Flavor: Google`` get 403, unknown paths 404.

AWS (IMDSv2): ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds``
(integer 1..21600, else 400) and returns a fresh token valid for that TTL.
``GET /latest/meta-data/spot/instance-action`` needs a valid
``X-aws-ec2-metadata-token`` (else 401); 404 until :meth:`FakeAwsMetadata.preempt`.
With ``imdsv1=True`` the PUT answers 405 and GETs need no token.

Azure: ``GET /metadata/instance/compute/name?api-version=...&format=text`` (the
VM's name, ``vm_name``) and ``GET /metadata/scheduledevents?api-version=...``
(``{"DocumentIncarnation": n, "Events": [...]}``, what :meth:`FakeAzureMetadata.set_events`
/ ``preempt`` set).  Other methods get 405 (checked first: an AWS poller's token PUT
then falls back to IMDSv1), requests without ``Metadata: true`` 400, a missing
``api-version`` 400, unknown paths 404.  ``enable_delay`` seconds: the first
scheduledevents request enables the feature, and every scheduledevents request
is held back until that many seconds after it (Azure: "up to two minutes").
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
from email.utils import format_datetime
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request seen by a fake server."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0

    def header(self, name: str) -> str | None:
        """Case-insensitive header lookup."""
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep test output quiet

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.fake._arrived()
        status, body, headers = self.server.fake.handle(self.command, self.path, self.headers)
        self.server.fake._log(Request(self.command, self.path, dict(self.headers.items()),
                                      status))
        data = body.encode()
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Type" not in headers:
                self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (its timeout): nothing to answer

    do_GET = _dispatch
    do_PUT = _dispatch
    do_POST = _dispatch


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fake: _FakeMetadata


class _FakeMetadata:
    """Common server plumbing: start/stop, ``url``, request log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._arrivals = 0
        self.delay = 0.0
        self._closing = threading.Event()  # set by close(): requests held back (delay, enable_delay) are answered
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[Request]:
        """A copy of the request log."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[Request]:
        """Logged requests whose path is ``path``."""
        return [r for r in self.requests if r.path == path]

    def clear_log(self) -> None:
        """Forget logged requests."""
        with self._lock:
            self._requests.clear()

    def wait_for_requests(self, predicate: Callable[[Request], object], count: int = 1,
                          timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` logged requests satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for r in self.requests if predicate(r)) >= count:
                return True
            time.sleep(0.01)
        return False

    @property
    def arrivals(self) -> int:
        """Requests received so far, counted on arrival (before ``delay``)."""
        with self._lock:
            return self._arrivals

    def _arrived(self) -> None:
        with self._lock:
            self._arrivals += 1
        if self.delay:
            self._closing.wait(self.delay)

    def _log(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def handle(self, method: str, path: str,
               headers: Message) -> tuple[int, str, dict[str, str]]:
        """Answer one request: ``(status, body, extra headers)``."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server (requests held back are answered at once: server_close() waits for them)."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FakeGceMetadata(_FakeMetadata):
    """Fake GCE metadata server (``Metadata-Flavor: Google`` required)."""

    PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
    MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"

    def __init__(self) -> None:
        self._preempted = False
        self._maintenance_event = "NONE"
        super().__init__()

    def preempt(self) -> None:
        """Make ``instance/preempted`` return ``TRUE``."""
        self._preempted = True

    def set_maintenance_event(self, value: str) -> None:
        """Set the ``instance/maintenance-event`` value (e.g. ``TERMINATE_ON_HOST_MAINTENANCE``)."""
        self._maintenance_event = value

    def handle(self, method: str, path: str,
               headers: Message) -> tuple[int, str, dict[str, str]]:
        if headers.get("Metadata-Flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", {}
        reply = {"Metadata-Flavor": "Google"}
        if method != "GET":
            return 405, "method not allowed", reply
        if path == self.PREEMPTED_PATH:
            return 200, "TRUE" if self._preempted else "FALSE", reply
        if path == self.MAINTENANCE_PATH:
            return 200, self._maintenance_event, reply
        return 404, "not found", reply


class FakeAwsMetadata(_FakeMetadata):
    """Fake AWS instance metadata service with IMDSv2 tokens."""

    TOKEN_PATH = "/latest/api/token"
    ACTION_PATH = "/latest/meta-data/spot/instance-action"
    TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
    TOKEN_HEADER = "X-aws-ec2-metadata-token"

    def __init__(self, *, imdsv1: bool = False) -> None:
        self._imdsv1 = imdsv1
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.tokens_issued: list[str] = []
        self._action: dict[str, str] | None = None
        super().__init__()

    def preempt(self, action: str = "terminate", when: datetime | None = None) -> None:
        """Post a spot interruption notice (``when`` defaults to now + 2 min)."""
        if when is None:
            when = datetime.now(timezone.utc) + timedelta(minutes=2)
        self._action = {"action": action,
                        "time": when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    @property
    def action(self) -> dict[str, str] | None:
        """The posted notice JSON (``None`` before :meth:`preempt`)."""
        return self._action

    def invalidate_tokens(self) -> None:
        """Revoke every issued token (the next GET with one gets 401)."""
        with self._lock:
            self._tokens.clear()

    def handle(self, method: str, path: str,
               headers: Message) -> tuple[int, str, dict[str, str]]:
        if path == self.TOKEN_PATH:
            if method != "PUT":
                return 405, "method not allowed", {}
            if self._imdsv1:
                return 405, "IMDSv2 disabled", {}
            raw = headers.get(self.TTL_HEADER) or ""
            try:
                ttl = int(raw)
            except (TypeError, ValueError):
                return 400, "missing or invalid TTL header", {}
            if not 1 <= ttl <= 21600:
                return 400, "TTL out of range", {}
            token = uuid.uuid4().hex
            with self._lock:
                self._tokens[token] = time.monotonic() + ttl
                self.tokens_issued.append(token)
            return 200, token, {self.TTL_HEADER: str(ttl)}
        if method != "GET":
            return 405, "method not allowed", {}
        if not self._imdsv1:
            presented = headers.get(self.TOKEN_HEADER) or ""
            with self._lock:
                expiry = self._tokens.get(presented)
            if expiry is None or time.monotonic() >= expiry:
                return 401, "Unauthorized", {}
        if path == self.ACTION_PATH:
            if self._action is None:
                return 404, "Not Found", {}
            return 200, json.dumps(self._action), {}
        return 404, "Not Found", {}


class FakeAzureMetadata(_FakeMetadata):
    """Fake Azure instance metadata service: the VM's name and Scheduled Events (``Metadata: true`` required).

    Args:
        vm_name: What ``instance/compute/name`` answers (the name events must list in ``Resources``).
        enable_delay: Seconds the first scheduledevents request takes (it "enables" the feature); requests
            arriving meanwhile are answered when it is over.
    """

    NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"

    def __init__(self, *, vm_name: str = "vm-1", enable_delay: float = 0.0) -> None:
        self.vm_name = vm_name
        self.enable_delay = enable_delay
        self._enabled_at: float | None = None
        self._events: list[dict[str, Any]] = []
        self._incarnation = 1
        super().__init__()

    @staticmethod
    def event(event_type: str = "Preempt", *, resources: list[str] | None = None, status: str = "Scheduled",
              not_before: datetime | str | None = None, event_id: str | None = None,
              source: str = "Platform", duration: int = -1) -> dict[str, Any]:
        """One scheduled event as Azure lists it (``resources`` default ``["vm-1"]``; ``not_before`` a
        datetime, an RFC 1123 string, or ``None`` for now + 30 s; ``""`` for none, as once Started)."""
        if not_before is None:
            not_before = datetime.now(timezone.utc) + timedelta(seconds=30)
        if isinstance(not_before, datetime):
            not_before = format_datetime(not_before.astimezone(timezone.utc), usegmt=True)
        return {"EventId": event_id or str(uuid.uuid4()).upper(), "EventType": event_type,
                "ResourceType": "VirtualMachine", "Resources": list(resources or ["vm-1"]),
                "EventStatus": status, "NotBefore": not_before, "Description": f"{event_type} by the fake",
                "EventSource": source, "DurationInSeconds": duration}

    def set_events(self, events: list[dict[str, Any]]) -> None:
        """Replace the scheduled events (``DocumentIncarnation`` goes up by one)."""
        with self._lock:
            self._events = [dict(e) for e in events]
            self._incarnation += 1

    def preempt(self, *, not_before: datetime | str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Schedule a ``Preempt`` (Spot eviction) of this VM, ``NotBefore`` now + 30 s by default; returns it."""
        kwargs.setdefault("resources", [self.vm_name])
        event = self.event("Preempt", not_before=not_before, **kwargs)
        with self._lock:
            self._events = [*self._events, event]
            self._incarnation += 1
        return event

    @property
    def document(self) -> dict[str, Any]:
        """What scheduledevents answers now."""
        with self._lock:
            return {"DocumentIncarnation": self._incarnation, "Events": [dict(e) for e in self._events]}

    def handle(self, method: str, path: str,
               headers: Message) -> tuple[int, str, dict[str, str]]:
        json_reply = {"Content-Type": "application/json; charset=utf-8"}
        if method != "GET":
            return 405, json.dumps({"error": f"Http method not allowed: Method = {method}"}), json_reply
        if (headers.get("Metadata") or "").lower() != "true":
            return 400, json.dumps({"error": "Bad request. Required metadata header not specified"}), json_reply
        parts = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(parts.query)
        if parts.path not in ("/metadata/instance/compute/name", "/metadata/scheduledevents"):
            return 404, json.dumps({"error": "Not found"}), json_reply
        if not query.get("api-version"):
            return 400, json.dumps({"error": "Bad request. api-version was not specified in the request"}), json_reply
        if parts.path == "/metadata/instance/compute/name":
            if query.get("format") != ["text"]:
                return 400, json.dumps({"error": "Bad request. format=text is required for a leaf"}), json_reply
            return 200, self.vm_name, {}
        with self._lock:
            if self._enabled_at is None:
                self._enabled_at = time.monotonic() + self.enable_delay
            wait = self._enabled_at - time.monotonic()
        if wait > 0:
            self._closing.wait(wait)
        return 200, json.dumps(self.document), json_reply
