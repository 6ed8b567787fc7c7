"""A GCS endpoint for tests on 127.0.0.1: an in-process gcp-storage-emulator, or one already running.

Starts ``gcp-storage-emulator`` (PyPI; in the ``test`` extra) as a real HTTP
server on 127.0.0.1 and hands out the fsspec ``storage_options`` that point
gcsfs at it with anonymous credentials. If ``STORAGE_EMULATOR_HOST`` is set
(e.g. CI runs fake-gcs-server or gcp-storage-emulator in a container), no
server is started and that endpoint is used instead. The embedded server also
enforces ``ifGenerationMatch`` on uploads like real GCS (so fsspec's
``mode="create"`` behaves as in production), answers a resumable upload
session's status check, completion and cancel as GCS does (what resuming an
interrupted upload relies on), can answer with injected faults and records
every request. The ``cloudckpt_gcs`` pytest fixture
(``cloudckpt.testing``) is built on it.

Import order: gcsfs >= 2026.x by default (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``
unset or true) replaces ``gcsfs.GCSFileSystem`` with ``ExtendedGcsFileSystem``,
which probes every bucket over gRPC for its layout (zonal/HNS); against an
emulator each operation then stalls ~60 s. gcsfs reads the switch once, when it
is imported, so ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` must be in the
environment before anything imports gcsfs. Importing this module sets it
(``setdefault``); ``GcsEmulator.start`` raises ``ConfigError`` if gcsfs was
already imported with the extended class.

Usage::

    with GcsEmulator() as emu:
        emu.make_bucket("ckpt")
        fs = fsspec.filesystem("gs", **emu.storage_options())
        fs.pipe("ckpt/a", b"1")
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from functools import partial
from urllib.parse import parse_qs, unquote, urlparse
from typing import Dict, List, Optional, Tuple

from .errors import ConfigError

# Must happen before gcsfs is imported anywhere (see module docstring).
GCSFS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
for _k, _v in GCSFS_ENV.items():
    os.environ.setdefault(_k, _v)

EMULATOR_ENV_VAR = "STORAGE_EMULATOR_HOST"
DEFAULT_PROJECT = "test"

__all__ = [
    "GcsEmulator",
    "GCSFS_ENV",
    "EMULATOR_ENV_VAR",
    "check_gcsfs_import_order",
]

_UPLOAD_PATH = re.compile(r"/upload/storage/v1/b/(?P<bucket>[^/]+)/o")
_NAME_IN_JSON = re.compile(rb'"name"\s*:\s*("(?:[^"\\]|\\.)*")')


def check_gcsfs_import_order() -> None:
    """Raise ``ConfigError`` if gcsfs was imported with the gRPC-probing ExtendedGcsFileSystem."""
    mod = sys.modules.get("gcsfs")
    if mod is None:
        return
    cls = getattr(mod, "GCSFileSystem", None)
    if cls is not None and cls.__name__ == "ExtendedGcsFileSystem":
        raise ConfigError(
            "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was "
            "set; every gs:// operation against the emulator would stall ~60 s. "
            "Set the variable before anything imports gcsfs: in the CI environment, "
            "or at the top of conftest.py (os.environ.setdefault(...))."
        )


def _normalise_endpoint(host: str) -> str:
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        host = "http://" + host
    return host


class _Fault:
    __slots__ = ("status", "remaining", "method", "path_contains", "message")

    def __init__(self, status, times, method, path_contains, message):
        self.status = status
        self.remaining = times
        self.method = method.upper() if method else None
        self.path_contains = path_contains
        self.message = message

    def matches(self, method: str, path: str) -> bool:
        if self.remaining == 0:
            return False
        if self.method and self.method != method:
            return False
        if self.path_contains and self.path_contains not in path:
            return False
        return True


def _make_handler_class():
    from gcp_storage_emulator.server import RequestHandler

    class _FaultInjectingHandler(RequestHandler):
        """Emulator request handler that can answer with injected failures."""

        def __init__(self, storage, emulator, *args, **kwargs):
            self._emulator = emulator
            super().__init__(storage, *args, **kwargs)

        def _maybe_fault(self, method: str) -> bool:
            self._emulator._log_request(method, self.path)
            fault = self._emulator._take_fault(method, self.path)
            if fault is None:
                return False
            self._drain()  # the request body, so the client sees our status, not EPIPE
            if fault.status == 0:  # simulate a dropped connection
                self.close_connection = True
                return True
            self._send_error_json(fault.status, fault.message)
            return True

        def _precondition_failed(self) -> bool:
            """gcp-storage-emulator ignores ``ifGenerationMatch``; real GCS
            answers 412 (gcsfs: FileExistsError).  Enforce it on uploads so
            ``pipe/put_file(..., mode="create")`` behaves like production."""
            url = urlparse(self.path)
            m = _UPLOAD_PATH.fullmatch(url.path)
            query = parse_qs(url.query)
            if not m or "ifGenerationMatch" not in query or "upload_id" in query:
                return False
            length = self.headers.get("Content-Length")
            if length is None:
                return False
            body = self.rfile.read(int(length))
            self.rfile = io.BytesIO(body)  # let the emulator read it again
            name = query.get("name", [None])[0]
            if name is None:
                nm = _NAME_IN_JSON.search(body[: 1 << 16])
                if not nm:
                    return False
                name = json.loads(nm.group(1))
            want = query["ifGenerationMatch"][0]
            try:
                current = str(
                    self.storage.get_file_obj(unquote(m.group("bucket")), name)[
                        "generation"
                    ]
                )
            except Exception:  # NotFound
                current = None
            if (current is None) if want == "0" else (current == want):
                return False
            self._send_error_json(
                412, "At least one of the pre-conditions you specified did not hold."
            )
            return True

        def _send_error_json(self, status: int, message: str) -> None:
            body = json.dumps(
                {
                    "error": {
                        "code": status,
                        "message": message,
                        "errors": [{"message": message, "reason": "emulated"}],
                    }
                }
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if not self._maybe_fault("GET"):
                super().do_GET()

        def _upload_id(self) -> Optional[str]:
            """The resumable upload session a request is sent to (its session URI's ``upload_id``), or None."""
            url = urlparse(self.path)
            if not _UPLOAD_PATH.fullmatch(url.path):
                return None
            return parse_qs(url.query).get("upload_id", [None])[0]

        def _session_answered(self, upload_id: str) -> bool:
            """Answer what the stock emulator gets wrong about a session, as GCS does
            (https://cloud.google.com/storage/docs/performing-resumable-uploads): a status check
            (``Content-Range: bytes */TOTAL`` or ``*/*``, no body) of a session holding no bytes
            is answered 308 without ``Range`` (stock: ``bytes=0-0``, one byte it does not have), and
            a request to a completed session with the object's resource (stock: 404)."""
            storage = self.storage
            finished = self._emulator._finished_uploads.get(upload_id)
            if finished is not None:
                self._drain()
                self._send_json(200, finished)
                return True
            status_check = re.fullmatch(r"bytes \*/(\d+|\*)", (self.headers.get("Content-Range") or "").strip())
            if status_check is None or status_check.group(1) == "0" or int(self.headers.get("Content-Length") or 0):
                return False
            try:
                storage.get_resumable_file_obj(upload_id)
            except Exception:  # NotFound: the stock answer (404)
                return False
            if storage.get_resumable_byte_count(upload_id):
                return False
            self.send_response(308)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def _session_request(self, serve) -> None:
            """Serve a request to a resumable upload session; remember the object a completed one made."""
            upload_id = self._upload_id()
            if upload_id is None:
                return serve()
            if self._session_answered(upload_id):
                return None
            obj = self.storage.resumable.get(upload_id)
            serve()
            if obj is not None and upload_id not in self.storage.resumable:  # this request completed it
                made = self.storage.objects.get(obj["bucket"], {}).get(obj["name"])
                if made is not None:
                    self._emulator._finished_uploads[upload_id] = dict(made)
            return None

        def _cancel_session(self) -> bool:
            """A DELETE of a session URI cancels the upload: answered 499, as GCS does (stock: 501)."""
            upload_id = self._upload_id()
            if upload_id is None:
                return False
            try:
                self.storage.delete_resumable_file_obj(upload_id)
            except Exception:  # NotFound
                self._send_error_json(404, "No such upload session.")
                return True
            try:
                self.storage._delete_file("_resumable", self.storage.safe_id(upload_id))
            except Exception:  # no bytes received yet
                pass
            self.send_response(499, "Client Closed Request")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def _drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    break
                length -= len(chunk)

        def _send_json(self, status: int, document: dict) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if self._maybe_fault("POST"):
                return
            if self._emulator.enforce_preconditions and self._precondition_failed():
                return
            self._session_request(super().do_POST)

        def do_PUT(self):
            if not self._maybe_fault("PUT"):
                self._session_request(super().do_PUT)

        def do_PATCH(self):
            if not self._maybe_fault("PATCH"):
                super().do_PATCH()

        def do_DELETE(self):
            if not self._maybe_fault("DELETE") and not self._cancel_session():
                super().do_DELETE()

    return _FaultInjectingHandler


class _QuietHTTPServer(http.server.HTTPServer):
    # Single-threaded on purpose: the emulator's Storage is not thread-safe.
    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return  # client went away (e.g. gcsfs session closed) - not a bug
        super().handle_error(request, client_address)


class GcsEmulator:
    """A GCS endpoint for tests: an in-process gcp-storage-emulator, or the
    external one named by ``STORAGE_EMULATOR_HOST``.

    Parameters
    ----------
    host, port:
        Bind address of the embedded server; ``port=0`` picks a free port.
    project:
        GCP project name passed to gcsfs / used when creating buckets.
    default_bucket:
        Optional bucket created on :meth:`start`.
    external:
        Endpoint of an already-running emulator.  ``None`` (default) means
        "use ``$STORAGE_EMULATOR_HOST`` if set, else start one"; ``False``
        forces an embedded server even if the env var is set.
    enforce_preconditions:
        Embedded server only: answer uploads whose ``ifGenerationMatch`` does
        not hold with 412 like real GCS (the stock emulator ignores it, so
        ``mode="create"`` would silently overwrite).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        project: str = DEFAULT_PROJECT,
        default_bucket: Optional[str] = None,
        external: Optional[object] = None,
        enforce_preconditions: bool = True,
    ):
        if external is None:
            env = os.environ.get(EMULATOR_ENV_VAR, "")
            external = env if env not in ("", "default") else False
        self._external: Optional[str] = (
            _normalise_endpoint(external) if external else None
        )
        self._host = host
        self._port = port
        self.project = project
        self.enforce_preconditions = enforce_preconditions
        self._default_bucket = default_bucket
        self._httpd: Optional[http.server.HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._storage = None
        self._endpoint: Optional[str] = None
        self._lock = threading.Lock()
        self._faults: List[_Fault] = []
        # upload_id -> the object resource its completed resumable upload made (GCS answers it to the session)
        self._finished_uploads: Dict[str, dict] = {}
        #: (method, path) of every request the embedded server received.
        self.requests: List[Tuple[str, str]] = []

    # ------------------------------------------------------------ lifecycle
    @property
    def is_external(self) -> bool:
        return self._external is not None

    @property
    def running(self) -> bool:
        return self._endpoint is not None

    def start(self) -> "GcsEmulator":
        if self.running:
            return self
        check_gcsfs_import_order()
        if self._external:
            self._endpoint = self._external
        else:
            try:
                from gcp_storage_emulator.storage import Storage
            except ImportError as exc:
                raise ConfigError(
                    "The GCS emulator needs gcp-storage-emulator: "
                    "pip install 'cloudckpt[test]'."
                ) from exc

            self._storage = Storage(use_memory_fs=True)
            handler = partial(_make_handler_class(), self._storage, self)
            self._httpd = _QuietHTTPServer((self._host, self._port), handler)
            host, port = self._httpd.server_address[:2]
            self._endpoint = f"http://{host}:{port}"
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="gcs-emulator",
                daemon=True,
            )
            self._thread.start()
        if self._default_bucket:
            self.make_bucket(self._default_bucket)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None
        self._storage = None
        self._endpoint = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ client config
    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        if self._endpoint is None:
            raise RuntimeError("GcsEmulator is not started")
        return self._endpoint

    def storage_options(self, **overrides) -> Dict[str, object]:
        """fsspec ``storage_options`` for ``gs://`` URLs (gcsfs kwargs)."""
        opts: Dict[str, object] = {
            "endpoint_url": self.endpoint,
            "token": "anon",
            "project": self.project,
        }
        opts.update(overrides)
        return opts

    def environ(self) -> Dict[str, str]:
        """Env vars for clients that only read the environment (gcsfs without
        ``endpoint_url``, google-cloud-storage)."""
        return {EMULATOR_ENV_VAR: self.endpoint, **GCSFS_ENV}

    def filesystem(self, **overrides):
        """A fresh gcsfs filesystem (own listings cache; bypasses fsspec's
        instance cache so tests can model independent writers)."""
        import gcsfs

        opts = self.storage_options(**overrides)
        opts.setdefault("skip_instance_cache", True)
        return gcsfs.GCSFileSystem(**opts)

    # ------------------------------------------------------------ admin
    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no-op if it already exists)."""
        url = f"{self.endpoint}/storage/v1/b?project={self.project}"
        req = urllib.request.Request(
            url,
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409 = already exists
                raise

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and every object in it (no-op if it does not
        exist).  Objects written while this runs may keep the bucket alive."""
        base = f"{self.endpoint}/storage/v1/b/{urllib.parse.quote(name, safe='')}"
        try:
            page: Dict[str, object] = {}
            while True:
                token = page.get("nextPageToken")
                query = f"?pageToken={urllib.parse.quote(str(token))}" if token else ""
                with urllib.request.urlopen(f"{base}/o{query}", timeout=10) as resp:
                    page = json.load(resp)
                for item in page.get("items", []):  # type: ignore[union-attr]
                    _request("DELETE", f"{base}/o/{urllib.parse.quote(item['name'], safe='')}")
                if not page.get("nextPageToken"):
                    break
            _request("DELETE", base)
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise

    def wipe(self, keep_buckets: bool = True) -> None:
        """Delete all objects (and buckets unless ``keep_buckets``).  Works for
        the embedded server and external gcp-storage-emulator instances."""
        if self._storage is not None:
            self._storage.wipe(keep_buckets=keep_buckets)
            return
        q = "?keep-buckets=1" if keep_buckets else ""
        with urllib.request.urlopen(f"{self.endpoint}/wipe{q}", timeout=10) as r:
            r.read()

    # ------------------------------------------------------------ fault injection
    def inject_fault(
        self,
        status: int,
        times: int = 1,
        method: Optional[str] = None,
        path_contains: Optional[str] = None,
        message: Optional[str] = None,
    ) -> None:
        """Answer the next ``times`` matching requests with HTTP ``status``
        (a GCS-style JSON error body) instead of serving them.  ``status=0``
        drops the connection without a response.  Embedded server only.

        Avoid the word "invalid" in ``message``: gcsfs turns any non-401 error
        whose message contains it into ``ValueError``.
        """
        if self.is_external:
            raise RuntimeError("fault injection needs the embedded emulator")
        msg = message or f"injected HTTP {status}"
        with self._lock:
            self._faults.append(_Fault(status, times, method, path_contains, msg))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Optional[_Fault]:
        with self._lock:
            for f in self._faults:
                if f.matches(method, path):
                    f.remaining -= 1
                    return f
        return None

    def _log_request(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


def _request(method: str, url: str) -> None:
    """Send a body-less request; a 404 is fine (already gone)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
