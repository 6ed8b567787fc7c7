"""Fake GCE and AWS instance-metadata servers for preemption tests.

    with FakeGceMetadata() as gce, FakeAwsMetadata() as aws:
        watcher = PreemptionWatcher(("gce", "aws"), gce_metadata_url=gce.url,
                                    aws_metadata_url=aws.url, poll_interval=0.05)
        gce.preempt()                      # instance/preempted -> TRUE
        aws.preempt(action="terminate")    # spot/instance-action -> JSON notice
        aws.invalidate_tokens()            # next GET with the old token -> 401

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
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import Message
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
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

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
            time.sleep(self.delay)

    def _log(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def handle(self, method: str, path: str,
               headers: Message) -> tuple[int, str, dict[str, str]]:
        """Answer one request: ``(status, body, extra headers)``."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the server."""
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
