"""Fault-injection HTTP proxy for tests, to put in front of a moto server.

Fault kinds:
  "500"   InternalError S3 XML error.     "503"   SlowDown S3 XML error.
  "flip"  the request body is forwarded with one byte (the middle one) inverted: what
          a bad NIC, RAM or middlebox does to an upload; the store should refuse it
          (S3 checksums). Only drawn when asked for (``kinds=`` or ``fail_next``).
  "refuse-keys" answers an S3 DeleteObjects (POST ?delete) itself, without forwarding it:
          HTTP 200 with an AccessDenied ``Error`` entry for every key, as AWS answers a
          caller whose policy lacks s3:DeleteObject. Only drawn when asked for.
  "flip_response"  the same done to the response body (a download): the client's own
          checksum must catch it. Only drawn when asked for.
  "reset" TCP RST after about half of the request body; for requests without a
          body, after half of the upstream response body (or, if that is empty,
          before the status line): then the upstream HAS executed the request,
          exactly the ambiguity a real network failure leaves.
  "lose_response" the request is forwarded whole (the upstream executes it) and its answer is
          read, then a TCP RST instead of the status line: a request that arrived, whose answer
          the network lost. Only drawn when asked for.
An outage resets every connection and request until it ends.
``set_bandwidth()`` makes the proxy a slow link: request bodies are read at most so
many bytes per second, all requests together (they share the link).

``rewrite_part_etags()`` makes the store look like one whose part ETags are not
the MD5 of the part and that reports no part checksums (see there).
``refuse_conditional_writes()`` makes it a store without conditional writes (see there).

Determinism: one ``random.Random(seed)`` decides for every eligible request, in
arrival order. A sequential client sees the same faults on every run; concurrent
clients see the same sequence of decisions, dealt out in arrival order.
"""

import http.client
import http.server
import io
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from urllib.parse import urlsplit

KINDS = ("500", "503", "reset")  # the default mix
ALL_KINDS = KINDS + ("flip", "refuse-keys", "flip_response", "lose_response")
_ERRORS = {  # kind -> (reason phrase, S3 error code, message), as real S3 sends them
    "500": ("Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": ("Slow Down", "SlowDown", "Please reduce your request rate."),
}
# Per-connection headers are not forwarded (RFC 9110 7.6.1): the proxy redoes the
# framing, and BaseHTTPRequestHandler answers "Expect: 100-continue" itself.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
               "transfer-encoding", "upgrade", "expect", "content-length"}
_PIECE = 64 * 1024


class _Reset(Exception):
    """Raised inside the handler to abort the client connection with an RST."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue
    timeout = 30  # idle keep-alive connections must not pin threads forever

    def log_message(self, *args):  # keep test output clean
        pass

    def handle(self):
        self.proxy = self.server.fault_proxy
        if self.proxy._in_outage():  # reset at accept time: clients fail at once
            return self._rst()
        try:
            super().handle()
        except ConnectionResetError:  # a client that gave up reset its connection (cancelled transfers do)
            self.close_connection = True

    def _rst(self):
        # SO_LINGER(on, 0) + close() makes the kernel send RST instead of FIN, so
        # the client gets ECONNRESET at once, not a clean EOF or a hang.
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        except OSError:  # already shut (stop() ends held requests so)
            pass
        finally:
            self.rfile.close()  # it holds a socket reference: no close without it
            self.connection.close()
            self.close_connection = True

    def _dispatch(self):
        try:
            self._serve()
        except _Reset:
            self._rst()
        except (OSError, ValueError, http.client.HTTPException):
            self.close_connection = True  # client or upstream went away

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _chunked(self):
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body(self):
        """Yield the request body in pieces: objects are never held in memory."""
        if self._chunked():  # chunked wins over Content-Length (RFC 9112 6.3)
            while size := int(self.rfile.readline().split(b";")[0], 16):
                yield self._read_exact(size)
                self.rfile.readline()  # CRLF closing the chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers are dropped: neither botocore nor moto use them
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                self.proxy._throttle(min(left, _PIECE))
                piece = self._read_exact(min(left, _PIECE))
                left -= len(piece)
                yield piece

    def _read_exact(self, n):
        data = self.rfile.read(n)
        self.proxy._received(len(data))
        if len(data) != n:
            raise ConnectionError("client closed mid-body")
        return data

    def _serve(self):
        if self.proxy._in_outage():  # keep-alive connection reused during an outage
            raise _Reset
        if "If-None-Match" in self.headers and self.proxy._refused_conditional():
            for _ in self._body():  # drain, so the keep-alive connection stays usable
                pass
            return self._send_error(501, "Not Implemented", "NotImplemented",
                                    "A header you provided implies functionality that is not implemented")
        fault, latency, until = self.proxy._decide(self.command, self.path,
                                                   int(self.headers.get("Content-Length") or 0),
                                                   copy="x-amz-copy-source" in self.headers)
        if latency > 0 or until is not None:
            self.proxy._held(self.command, +1)
            try:
                stopped = self.proxy._stopped.wait(latency) if latency > 0 else False
                while until is not None and not stopped and not until.wait(0.02):
                    stopped = self.proxy._stopped.is_set()
            finally:
                self.proxy._held(self.command, -1)
            if stopped:  # the proxy stopped meanwhile: a held request is never sent upstream after its test
                raise _Reset
        body = self._body()
        if self.proxy._refuse_checksums and any(k.lower().startswith("x-amz-checksum") for k in self.headers.keys()):
            for _ in body:  # drain, so the keep-alive connection stays usable
                pass
            with self.proxy._lock:
                self.proxy._stats["refused_checksums"] += 1
            return self._send_error(501, "Not Implemented", "NotImplemented",
                                    "A header you provided implies functionality that is not implemented")
        rewrite = self.proxy._rewrite_etags
        if rewrite and self.command == "POST" and "uploadId=" in self.path:  # CompleteMultipartUpload
            body = iter([_etags_shifted(b"".join(body))])  # the store's own ETags again (same length)
        if fault == "refuse-keys":
            return self._refuse_keys(b"".join(body))
        if fault in _ERRORS:
            for _ in body:  # drain, so the keep-alive connection stays usable
                pass
            return self._send_error(int(fault), *_ERRORS[fault])
        length = int(self.headers.get("Content-Length") or 0)
        if fault == "reset" and (length or self._chunked()):
            got = 0
            for piece in body:
                got += len(piece)
                if got >= length // 2:
                    break
            raise _Reset
        if fault == "flip":
            body = _flipped(body, length // 2)
        self._forward(body, reset=fault == "reset", flip=fault == "flip_response",
                      rewrite=rewrite and self.command == "PUT" and "partNumber=" in self.path,
                      lose=fault == "lose_response")

    def _refuse_keys(self, body):
        errors = "".join(f"<Error><Key>{key.decode()}</Key><Code>AccessDenied</Code><Message>Access Denied"
                         f"</Message></Error>" for key in re.findall(rb"<Key>(.*?)</Key>", body))
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult xmlns="http://s3.amazonaws.com/doc/'
               f'2006-03-01/">{errors}</DeleteResult>').encode()
        self.send_response_only(200, "OK")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        self.wfile.write(xml)

    def _send_error(self, status, reason, code, message):
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
               f"<Message>{message}</Message><RequestId>{request_id}</RequestId>"
               f"<HostId>fault-proxy</HostId></Error>").encode()
        if self.command == "HEAD":
            xml = b""  # HEAD responses have no body, so botocore sees code "500"/"503"
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        self.wfile.write(xml)

    def _forward(self, body, reset, flip=False, rewrite=False, lose=False):
        # A fresh upstream connection per request: simpler than pooling and cheap
        # on loopback; the client side still gets keep-alive. Host is forwarded
        # untouched: it is part of the SigV4 signature.
        up = http.client.HTTPConnection(*self.proxy._upstream, timeout=60)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    up.putheader(name, value)
            chunked = self._chunked()
            if chunked:
                up.putheader("Transfer-Encoding", "chunked")
            elif "Content-Length" in self.headers:
                up.putheader("Content-Length", self.headers["Content-Length"])
            up.putheader("Connection", "close")
            up.endheaders()
            for piece in body:
                up.send(b"%X\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                up.send(b"0\r\n\r\n")
            response = up.getresponse()
            if lose:  # the upstream has answered: the client never hears it
                response.read()
                raise _Reset
            self._relay(response, reset, flip, rewrite)
        finally:
            up.close()

    def _relay(self, resp, reset, flip=False, rewrite=False):
        no_body = self.command == "HEAD" or resp.status in (204, 304)
        length = None if resp.chunked else resp.getheader("Content-Length")
        body = resp
        headers = resp.getheaders()
        if rewrite and resp.status < 300:  # an UploadPart(Copy) answer: small, buffered
            data = re.sub(rb"<Checksum\w*>[^<]*</Checksum\w*>", b"", _etags_shifted(resp.read()))
            body, length = io.BytesIO(data), str(len(data))
            headers = [(name, _etags_shifted(value.encode()).decode() if name.lower() == "etag" else value)
                       for name, value in headers if not name.lower().startswith("x-amz-checksum")]
        if length is None and not no_body:  # rare (moto sends lengths): buffer it
            body = io.BytesIO(resp.read())
            length = str(len(body.getvalue()))
        if reset and (no_body or length == "0"):
            raise _Reset  # nothing to cut in half
        self.send_response_only(resp.status, resp.reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if no_body:
            return
        if reset:
            self.wfile.write(body.read(int(length) // 2))
            # An RST makes the client's kernel drop data it has not read yet: give
            # it a moment, so that it really sees "headers, part of the body, RST".
            time.sleep(0.1)
            raise _Reset
        pieces = iter(lambda: body.read(_PIECE), b"")
        for piece in _flipped(pieces, int(length) // 2) if flip and length is not None else pieces:
            self.wfile.write(piece)


_SHIFT = bytes.maketrans(b"0123456789abcdef", b"89abcdef01234567")  # its own inverse


def _etags_shifted(data):
    """``data`` (a header value or an XML body) with every 32-hex-digit ETag's digits shifted by 8: never the
    MD5 it was, and shifting again gives it back."""
    return re.sub(rb"(^\"?|<ETag>(?:&quot;|\")?)([0-9a-f]{32})(?=&quot;|\"|<|$)",
                  lambda m: m.group(1) + m.group(2).translate(_SHIFT), data)


def _flipped(pieces, position):
    """The body pieces with the byte at ``position`` inverted."""
    seen = 0
    for piece in pieces:
        if seen <= position < seen + len(piece):
            piece = bytearray(piece)
            piece[position - seen] ^= 0xFF
            piece = bytes(piece)
        seen += len(piece)
        yield piece


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fault_proxy):
        self.fault_proxy = fault_proxy
        self.open_sockets = set()  # so that stop() can end idle keep-alive connections
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.open_sockets.discard(request)
        super().shutdown_request(request)


class FaultProxy:
    """Threaded HTTP proxy on 127.0.0.1:<free port> in front of ``upstream``.

    Configuration methods are thread-safe and apply from the next request on.
    ``stats``: ``requests`` (decided), ``forwarded`` (no fault), one count per
    injected kind, ``outage`` (connections/requests reset by an outage), ``copies``
    (requests with ``x-amz-copy-source``: CopyObject, UploadPartCopy).
    ``events``: ``(method, path, kind or None)`` for every decided request.
    ``received_bytes``: bytes of request bodies read from clients (forwarded or not).
    """

    def __init__(self, upstream: str, *, seed: int = 0):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port or 80)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._server = self._thread = None
        self._stats, self._events, self._scripted = Counter(), [], []
        self._outage_until = 0.0
        self._rewrite_etags = False
        self._stopped = threading.Event()  # set by stop(): requests held in their latency are reset
        self._serving = Counter()  # method -> requests held in their latency now
        self._most = Counter()  # method -> the most held at once
        self._refuse_checksums = False
        self._refuse_conditional = False
        self._received_bytes = 0
        self._bandwidth = None  # bytes/s of request bodies, all requests together (set_bandwidth)
        self._link_free_at = 0.0  # time.monotonic() when the throttled link has sent what it was given
        self.set_faults()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        return "http://127.0.0.1:%d" % self._server.server_address[1]

    def start(self) -> "FaultProxy":
        self._stopped.clear()
        self._server = _Server(self)
        # A short poll interval: stop() waits for it, once per test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        for sock in self._server.open_sockets.copy():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_faults(self, error_rate=0.0, kinds=KINDS, latency=0.0,
                   only_methods=None, path_filter=None, min_body=0, until=None, copies=None) -> None:
        """Replace the fault config. An eligible request gets a fault with
        probability ``error_rate``, of a kind drawn from ``kinds``, and first
        sleeps ``latency`` seconds, then, given ``until`` (a ``threading.Event``), waits
        until it is set (a hold the test releases). Eligible: method in ``only_methods`` (default:
        all) and ``path_filter`` (regex searched in path+query, or a callable)
        matches, and the request body has at least ``min_body`` bytes (Content-Length); ``copies``: True, only
        server-side copies (an ``x-amz-copy-source`` header) are eligible, False, only other requests (None:
        both). Filters gate ``fail_next`` too, but not outages."""
        if set(kinds) - set(ALL_KINDS):
            raise ValueError(f"unknown fault kinds in {kinds!r}, expected {ALL_KINDS}")
        if isinstance(path_filter, str):
            path_filter = re.compile(path_filter).search
        with self._lock:
            self._rate, self._kinds, self._latency = float(error_rate), tuple(kinds), latency
            self._until = until
            self._methods = {m.upper() for m in only_methods} if only_methods else None
            self._path_filter = path_filter
            self._min_body = int(min_body)
            self._copies = copies

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Inject ``kind`` into the next ``count`` eligible requests (before random faults)."""
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}, expected {ALL_KINDS}")
        with self._lock:
            self._scripted.extend([kind] * count)

    def rewrite_part_etags(self, on: bool = True) -> None:
        """Be a store whose part ETags are 32 hex digits but not the part's MD5, and that reports no checksum
        of a part: answers to UploadPart and UploadPartCopy (PUT ?partNumber=) get every ETag's hex digits
        shifted by 8 and lose their x-amz-checksum-* headers and Checksum* elements; the ETags a
        CompleteMultipartUpload names are shifted back before it reaches the store (which checks them)."""
        with self._lock:
            self._rewrite_etags = on

    def refuse_checksums(self, on: bool = True) -> None:
        """Be a store without S3's additional checksums: a request carrying any ``x-amz-checksum-*`` header
        is answered 501 NotImplemented (not forwarded), as such S3-compatible stores answer."""
        with self._lock:
            self._refuse_checksums = on

    def refuse_conditional_writes(self, on: bool = True) -> None:
        """Be a store without conditional writes: every request carrying ``If-None-Match`` (a create-only
        PutObject or CompleteMultipartUpload) is answered 501 NotImplemented, as AWS answers a header it does
        not implement, without reaching the store; counted in ``stats["refused-conditional"]``."""
        with self._lock:
            self._refuse_conditional = on

    def set_bandwidth(self, bytes_per_second=None) -> None:
        """Read request bodies at most ``bytes_per_second`` (all requests together, as one slow link; None:
        unlimited), in 64 KiB pieces: a client's upload takes size / bandwidth seconds and its socket
        sends block meanwhile (``received_bytes`` counts what was read)."""
        with self._lock:
            self._bandwidth = bytes_per_second
            self._link_free_at = time.monotonic()

    def outage(self, seconds: float) -> None:
        """Reset every new connection and every request for ``seconds``."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def start_outage(self) -> None:
        self.outage(float("inf"))

    def end_outage(self) -> None:
        with self._lock:
            self._outage_until = 0.0

    def clear(self) -> None:
        """Back to a transparent proxy; ``stats`` and ``events`` are kept."""
        self.set_faults()
        with self._lock:
            self._scripted.clear()
            self._outage_until = 0.0

    @property
    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    @property
    def events(self) -> list:
        with self._lock:
            return list(self._events)

    @property
    def received_bytes(self) -> int:
        """Bytes of request bodies read from clients so far: what they sent, forwarded or not."""
        with self._lock:
            return self._received_bytes

    # -- called from the handler threads --
    def _received(self, count: int) -> None:
        with self._lock:
            self._received_bytes += count

    def _throttle(self, count):
        """Wait until the link has room for ``count`` more body bytes (``set_bandwidth``)."""
        with self._lock:
            if not self._bandwidth:
                return
            now = time.monotonic()
            start = max(now, self._link_free_at)
            self._link_free_at = start + count / self._bandwidth
            delay = self._link_free_at - now
        if self._stopped.wait(delay):
            raise _Reset

    def _refused_conditional(self) -> bool:
        with self._lock:
            if self._refuse_conditional:
                self._stats["refused-conditional"] += 1
            return self._refuse_conditional

    def _in_outage(self) -> bool:
        with self._lock:
            if time.monotonic() < self._outage_until:
                self._stats["outage"] += 1
                return True
            return False

    def _held(self, method, delta):
        """Count ``method`` requests held in their ``latency`` (``most_held`` keeps the most at once)."""
        with self._lock:
            self._serving[method] += delta
            self._most[method] = max(self._most[method], self._serving[method])

    @property
    def most_held(self) -> dict:
        """Method -> the most requests of it held at once in the ``latency`` of ``set_faults`` so far: how
        many the client had in flight (a request counts from its arrival for ``latency`` seconds)."""
        with self._lock:
            return dict(self._most)

    def _decide(self, method, path, length=0, copy=False):
        """(kind or None, latency, event to wait for or None) for one request; the lock fixes the arrival order."""
        with self._lock:
            self._stats["requests"] += 1
            if copy:
                self._stats["copies"] += 1
            fault, latency, until = None, 0.0, None
            if ((self._methods is None or method in self._methods)
                    and (self._path_filter is None or self._path_filter(path)) and length >= self._min_body
                    and (self._copies is None or self._copies == copy)):
                latency, until = self._latency, self._until
                if self._scripted:
                    fault = self._scripted.pop(0)
                elif self._rate > 0 and self._rng.random() < self._rate:
                    fault = self._rng.choice(self._kinds)
            self._stats[fault or "forwarded"] += 1
            self._events.append((method, path, fault))
            return fault, latency, until
