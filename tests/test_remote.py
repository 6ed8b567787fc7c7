"""cloudckpt.remote.RemoteStore: what is not a backend's conformance (test_conformance.py runs that on every
backend): here, the s3fs instances stores share, and gcsfs under cloudckpt's retry layer."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import uuid

import pytest

import cloudckpt
from cloudckpt.embedded import free_port
from cloudckpt.remote import RemoteStore
from support.fault_proxy import FaultProxy
from support.gcs_emulator import record_gcsfs_backoff


def test_stores_with_the_same_options_share_one_s3fs_client(cloudckpt_s3):
    """Every RemoteStore used to build an s3fs filesystem of its own, whose first request built its aiobotocore
    client (30-50 ms: a third of a small download_checkpoint). Stores with the same options now share one, and
    its client: a second store's first listing costs what a used one's does. Other options (another key), another
    instance: what a store sends is never decided by another's options."""
    first = RemoteStore(cloudckpt_s3.url("a"), cloudckpt_s3.storage_options)
    first.write_atomic("x", b"1")
    assert [o.name for o in first.list_objects()] == ["x"]
    client = first.fs._s3
    assert client is not None
    second = RemoteStore(cloudckpt_s3.url("b"), dict(cloudckpt_s3.storage_options))
    assert second.fs is first.fs
    assert second.list_objects() == []
    assert second.fs._s3 is client  # no client built for it
    assert [o.name for o in RemoteStore(cloudckpt_s3.url("a"), cloudckpt_s3.storage_options).list_objects()] == ["x"]
    other = RemoteStore(cloudckpt_s3.url("a"), {**cloudckpt_s3.storage_options, "secret": "another"})
    assert other.fs is not first.fs


def test_stores_given_their_own_event_loop_do_not_share_a_client(cloudckpt_s3):
    """Options are told apart by their text: two event loops print alike, so options holding objects (a loop, a
    session) are never shared; a store would otherwise run its requests on another store's loop."""
    import asyncio

    loops = [asyncio.new_event_loop() for _ in range(2)]
    try:
        a, b = (RemoteStore(cloudckpt_s3.url("a"), {**cloudckpt_s3.storage_options, "loop": loop}) for loop in loops)
        assert a.fs is not b.fs
        assert (a.fs.loop, b.fs.loop) == (loops[0], loops[1])
    finally:
        for loop in loops:
            loop.close()


def test_a_store_whose_credentials_fail_is_not_shared_again(seaweed_server, monkeypatch):
    """A shared s3fs client keeps the credentials it resolved at its first request: after a request fails for want
    of valid ones, new stores get a new client (as each store had before), and a change of the AWS_* environment
    gives them another too."""
    bucket = "cred-" + uuid.uuid4().hex[:8]
    seaweed_server.create_bucket(bucket)
    wrong = {**seaweed_server.storage_options, "secret": "not-the-secret"}
    first = RemoteStore(f"s3://{bucket}/run", wrong)
    assert RemoteStore(f"s3://{bucket}/other", wrong).fs is first.fs
    with pytest.raises(cloudckpt.RemoteError):
        first.list_objects()
    assert RemoteStore(f"s3://{bucket}/run", wrong).fs is not first.fs
    right = RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options).fs is not right.fs


# -- the default credential chain on the s3fs path (no server: a client is built, never used) -------------------
def _default_chain_only(monkeypatch, tmp_path, config: str = "") -> None:
    """No credential but what the test sets: no metadata service, no profile, empty config files."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def _s3fs_signs_with(store: RemoteStore) -> str:
    """The access key the store's s3fs client signs with (building the client: no request is sent)."""
    store.fs.connect()
    return store.fs.s3._request_signer._credentials.access_key


def test_a_store_made_after_environment_keys_rotate_lists_with_the_new_keys(monkeypatch, tmp_path):
    """Listings, small objects and deletes go through s3fs; a new store's s3fs client must sign with the AWS_*
    environment of now, not with what the process's first client resolved (the shared aiobotocore session
    keeps the default chain's credentials once resolved)."""
    _default_chain_only(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    options = {"endpoint_url": "http://127.0.0.1:9"}
    first = RemoteStore("s3://bucket/run", options)
    assert _s3fs_signs_with(first) == "first-key"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-secret")
    store = RemoteStore("s3://bucket/run", options)
    assert store._transport is not None and store._transport._credentials()[0] == "rotated-key"
    assert _s3fs_signs_with(store) == "rotated-key"  # was first-key: the two halves of one store disagreed
    # a session of its own, but not a second parse of botocore's S3 model (0.2-0.5 CPU-s): one loader
    assert store.fs.session is not first.fs.session
    assert store.fs.session.get_component("data_loader") is first.fs.session.get_component("data_loader")


def test_a_store_made_after_a_credential_failure_resolves_the_credentials_again(monkeypatch, tmp_path):
    """After a request is refused for its credentials the shared client is dropped (``_forget_s3fs``) so that
    the next store "builds a client that resolves credentials again": with credentials from the default chain
    (here a credential_process handing out a new key at each call) it must really resolve them again."""
    counter = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        "import json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': f'key-{n}', 'SecretAccessKey': 's'}))\n")
    _default_chain_only(monkeypatch, tmp_path, f"[default]\ncredential_process = {sys.executable} {script}\n")
    options = {"endpoint_url": "http://127.0.0.1:9"}
    first = RemoteStore("s3://bucket/run", options)
    signed = _s3fs_signs_with(first)
    assert signed.startswith("key-")  # (the transport of a store resolves them too: not necessarily key-1)
    from cloudckpt.remote import _forget_s3fs

    _forget_s3fs(first.fs)  # what RemoteStore._run does on InvalidAccessKeyId, ExpiredToken...
    again = RemoteStore("s3://bucket/run", options)
    assert again.fs is not first.fs
    assert _s3fs_signs_with(again) != signed  # was the same: the shared session kept what it first resolved
    assert again._transport is not None and first._transport is not None
    assert again._transport._credentials()[0] != first._transport._credentials()[0]  # the transport's session too


# -- gs://: cloudckpt's RetryPolicy is the one retry layer (gcsfs's own is off), requests end ----------------------
# gcsfs retried each request 6 times (1+2+4+8+16 s of backoff, ~35 s) inside each of the policy's attempts, and
# logged a traceback at ERROR for each: an unreachable gs:// store took ~5 minutes (the policy's deadline) to fail.
# record_gcsfs_backoff: gcsfs's backoff sleeps, if it still slept, are recorded, not slept (a failure is quick).

FAST = cloudckpt.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)


def _request_counter():
    """An aiohttp TraceConfig (gcsfs's ``session_kwargs``) and the list of the URLs of the requests it saw start."""
    import aiohttp

    started: list[str] = []

    async def on_request_start(session, context, params):
        started.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    return trace, started


def _backend_noise(caplog) -> list[str]:
    return [f"{r.name} {r.levelname}: {r.getMessage()[:100]}" for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.split(".")[0] in ("gcsfs", "aiohttp", "fsspec")]


def test_an_unreachable_gs_store_is_sent_one_request_per_policy_attempt(monkeypatch, caplog, tmp_path):
    """Connection refused on 127.0.0.1: each operation sends its requests once per policy attempt (was 6 times,
    72 for a download's 2: gcsfs's download retry loop around its request retry loop), gcsfs never backs off, nothing
    is logged by gcsfs or aiohttp, and the error is a RemoteError naming the URL, the endpoint, the retries
    and what to check."""
    backoff = record_gcsfs_backoff(monkeypatch)
    trace, started = _request_counter()
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = RemoteStore("gs://bucket/run", {"endpoint_url": endpoint, "token": "anon",
                                            "session_kwargs": {"trace_configs": [trace]}}, retry=FAST)
    operations = {  # operation: (call, requests an attempt sends)
        "list": (store.list_objects, 1),
        "read": (lambda: store.read_bytes("model.ckpt-1.manifest.json"), 1),
        "write": (lambda: store.write_atomic("checkpoint", b"x"), 1),
        # gcsfs's download asks for the object's metadata first: GETs of the object and of its "directory" at once
        "download": (lambda: store.get_file("model.ckpt-1.index", str(tmp_path / "x")), 2)}
    caplog.set_level(logging.DEBUG)
    for op, (call, requests) in operations.items():
        started.clear()
        with pytest.raises(cloudckpt.RemoteError) as info:
            call()
        assert len(started) == requests * FAST.max_attempts, (op, len(started))
        message = str(info.value)
        assert info.value.transient and "gs://bucket/run" in message, message
        assert f"could not be reached at {endpoint}; retried 2 times over" in message, message
        assert "check endpoint_url" in message
    assert backoff == []
    assert _backend_noise(caplog) == []
    said = [r for r in caplog.records if r.name == "cloudckpt" and r.getMessage().startswith("Retrying")]
    assert len(said) == len(operations) * (FAST.max_attempts - 1)  # what is retried is said by cloudckpt, once


class _Stall:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers; ``accepted`` counts them."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)  # accept() wakes up to see close()
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._server.accept()
            except OSError:  # socket.timeout included
                continue
            self._held.append(connection)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._server.close()
        for connection in self._held:
            connection.close()


def test_a_gs_store_that_never_answers_times_out_once_per_policy_attempt(monkeypatch, caplog):
    """A store that accepts the connection and never answers: with a small requests_timeout (gcsfs's per-request
    timeout), one connection per policy attempt, then a RemoteError naming the URL. Without one given, cloudckpt
    sets aiohttp's sock_connect / sock_read (10 s / 60 s, as botocore's for s3://): gcsfs's default was no
    timeout at all, a stalled store held the request, and the checkpoint commit, forever."""
    import aiohttp

    backoff = record_gcsfs_backoff(monkeypatch)
    stall = _Stall()
    caplog.set_level(logging.DEBUG)
    try:
        timeout = aiohttp.ClientTimeout(sock_connect=1, sock_read=0.3)
        store = RemoteStore("gs://bucket/run", {"endpoint_url": stall.endpoint, "token": "anon",
                                                "requests_timeout": timeout}, retry=FAST)
        with pytest.raises(cloudckpt.RemoteError) as info:
            store.list_objects()
        assert stall.accepted == FAST.max_attempts
        default = RemoteStore("gs://bucket/run", {"endpoint_url": stall.endpoint, "token": "anon"}, retry=FAST)
        assert default.fs.requests_timeout == aiohttp.ClientTimeout(sock_connect=10, sock_read=60)
    finally:
        stall.close()
    message = str(info.value)
    assert info.value.transient and "list gs://bucket/run failed" in message and stall.endpoint in message, message
    assert backoff == [] and _backend_noise(caplog) == []


@pytest.mark.parametrize("server", ["fake_gcs_server", "gcs_emulator"])
def test_a_503_once_on_gs_is_retried_by_the_policy_and_succeeds(server, request, monkeypatch, tmp_path):
    """gcsfs's retries are off, not the resilience: one 503 (fault proxy in front of the GCS server) on a listing,
    an upload, a read and a download is retried by the policy, counted by cause (``on_retry``: what the hook's
    stats count), and the operation succeeds. gcsfs absorbed it before, unseen by the policy."""
    gcs = request.getfixturevalue(server)
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)  # were gcsfs still retrying, it would not wait 1-2 s for it
    causes: list[str] = []
    with FaultProxy(gcs.endpoint, seed=0) as proxy:
        store = RemoteStore(f"gs://{bucket}/run", {**gcs.storage_options(), "endpoint_url": proxy.url}, retry=FAST,
                            on_retry=causes.append)
        data = uuid.uuid4().bytes * 1000
        (tmp_path / "up").write_bytes(data)
        operations = {
            "upload": (r"/upload/", lambda: store.put_file_if_absent(str(tmp_path / "up"), "a.index"), True),
            "list": (r"/b/[^/]+/o\?", lambda: [o.name for o in store.list_objects()], ["a.index"]),
            "read": (r"alt=media", lambda: store.read_bytes("a.index"), data),
            "download": (r"alt=media", lambda: (store.get_file("a.index", str(tmp_path / "down")),
                                                 (tmp_path / "down").read_bytes())[1], data)}
        for op, (path, call, expected) in operations.items():
            causes.clear()
            proxy.set_faults(path_filter=path)
            proxy.fail_next("503")
            before = proxy.stats.get("503", 0)
            assert call() == expected, op
            assert proxy.stats.get("503", 0) == before + 1, op
            assert causes == ["HTTP 503"], (op, causes)


_EXTENDED_GCSFS_SCRIPT = r"""
import json, logging, sys, time
import aiohttp
import cloudckpt
from cloudckpt.remote import RemoteStore

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.name, record.levelname, record.exc_info is not None))
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.DEBUG)
started = []
async def on_request_start(session, context, params):
    started.append(str(params.url))
trace = aiohttp.TraceConfig()
trace.on_request_start.append(on_request_start)
store = RemoteStore("gs://bucket/run", {"endpoint_url": sys.argv[1], "token": "anon",
                                        "session_kwargs": {"trace_configs": [trace]}},
                    retry=cloudckpt.RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01))
out = {"classes": [c.__name__ for c in type(store.fs).__mro__]}
for op, call in (("list", store.list_objects), ("download", lambda: store.get_file("a.index", sys.argv[2]))):
    started.clear()
    began = time.monotonic()
    try:
        call()
    except cloudckpt.RemoteError as exc:
        out[op] = {"error": str(exc), "requests": len(started), "seconds": time.monotonic() - began}
out["noise"] = [r for r in records if r[0].split(".")[0] in ("gcsfs", "aiohttp") and (r[1] == "ERROR" or r[2])]
print(json.dumps(out))
"""


def test_gcsfs_extended_filesystem_probes_once_and_sends_one_request_per_attempt(tmp_path):
    """gcsfs's default filesystem (unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read when gcsfs is imported:
    a process of its own) probes each bucket's layout over gRPC, retried for 60 s before it falls back to the
    JSON API, on every operation (a failed probe is not cached): an unreachable store took 60 s per attempt. Now
    one probe; and its downloads, which call the core class's through super(), send their requests once too."""
    import json
    import os
    import subprocess

    pytest.importorskip("gcsfs.extended_gcsfs")
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    endpoint = f"http://127.0.0.1:{free_port()}"
    run = subprocess.run([sys.executable, "-c", _EXTENDED_GCSFS_SCRIPT, endpoint, str(tmp_path / "x")], env=env,
                         capture_output=True, text=True, timeout=60)  # main: > 2 minutes (60 s a probe)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert "ExtendedGcsFileSystem" in out["classes"]
    for op in ("list", "download"):  # one request an attempt (the download's metadata GET: its first request)
        assert out[op]["requests"] == 2, (op, out[op])  # were 6 and 42 an attempt (after the 60 s probe)
        assert f"could not be reached at {endpoint}; retried 1 time" in out[op]["error"]
        assert out[op]["seconds"] < 20, out[op]  # a probe's retries alone took 60 s
    assert out["noise"] == []


# -- gs:// resumable uploads: a failed chunk is resumed where the session stands, not the file restarted ---------
# gcsfs sends a file of >= 5 MiB as a resumable upload session in chunks (part_size). With one retry layer (above),
# the policy retried a failed chunk by uploading the whole file again, from byte 0 in a new session: a GiB re-sent
# for one 503 in a multi-GiB shard. Now the chunk is retried on its own: the session is asked what it holds
# (308 + Range) and the chunk's missing bytes follow (cloudckpt/gcs_resumable.py).

CHUNK = 5 << 20  # TransferOptions' smallest part_size: gcsfs's chunk
SIZE = 3 * CHUNK + (1 << 20)  # four chunks: 5, 5, 5 and 1 MiB
DATA_FILE = "model.ckpt-1.data-00000-of-00001"


def _gs_via(proxy: FaultProxy, gcs, bucket: str, **kwargs) -> RemoteStore:
    return RemoteStore(f"gs://{bucket}/run", {**gcs.storage_options(), "endpoint_url": proxy.url}, retry=FAST,
                       transfer=cloudckpt.TransferOptions(part_size=CHUNK), **kwargs)


def _chunk_requests(*numbers: int):
    """A proxy path filter matching the chunk requests (with set_faults' only_methods=("POST",), min_body=1: gcsfs
    POSTs its chunks to the session URI, which carries upload_id) numbered ``numbers``, counting from 0 in the
    order they arrive, retries included."""
    seen = [0]

    def match(path: str) -> bool:
        if "upload_id=" not in path:
            return False
        seen[0] += 1
        return seen[0] - 1 in numbers
    return match


def _session_requests(events) -> dict[str, int]:
    """How many resumable upload sessions were opened, status queries (PUT to a session URI) and cancels sent."""
    return {"opened": sum(m == "POST" and "uploadType=resumable" in p and "upload_id=" not in p for m, p, _ in events),
            "status queries": sum(m == "PUT" and "upload_id=" in p for m, p, _ in events),
            "cancelled": sum(m == "DELETE" and "upload_id=" in p for m, p, _ in events)}


def _upload_file(tmp_path, seed: int = 0) -> tuple[str, bytes]:
    import numpy as np

    data = np.random.default_rng(seed).bytes(SIZE)
    (tmp_path / DATA_FILE).write_bytes(data)
    return str(tmp_path / DATA_FILE), data


@pytest.mark.parametrize("kind, chunk, resent", [
    ("503", 1, CHUNK),  # the proxy answers 503 (the chunk never reaches the store): the chunk is sent again
    ("503", 0, CHUNK),  # the first: the session holds nothing yet (308 without Range)
    ("503", 3, 1 << 20),  # the last (1 MiB), whose answer is the object
    ("reset", 1, CHUNK // 2),  # the connection dropped after half the chunk: the chunk is sent again
    ("lose_response", 1, 0),  # the chunk arrived, its 308 was lost: the session holds it, nothing is sent again
    ("lose_response", 3, 0),  # the last chunk arrived, its answer (the object) was lost: the session says done
])
def test_a_failed_chunk_of_a_gs_upload_is_resumed_not_the_file(kind, chunk, resent, gcs_emulator, monkeypatch,
                                                               tmp_path):
    """A multi-chunk upload (16 MiB in 5 MiB chunks) with one chunk failing: the upload completes in its one
    session, resumed from the offset the store reports, re-sending at most that chunk (bytes counted at the
    proxy); the retry is the policy's, counted by cause once. Before: a new session and the whole file again."""
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)
    local, data = _upload_file(tmp_path)
    causes: list[str] = []
    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, gcs_emulator, bucket, on_retry=causes.append)
        proxy.set_faults(only_methods=("POST",), path_filter=_chunk_requests(chunk), min_body=1)
        proxy.fail_next(kind)
        assert store.put_file_if_absent(local, DATA_FILE) is True
        assert proxy.stats.get(kind) == 1
        sent, events = proxy.received_bytes, proxy.events
        assert store.read_bytes(DATA_FILE) == data
    assert _session_requests(events) == {"opened": 1, "status queries": 1, "cancelled": 0}
    extra = sent - SIZE  # beyond the file once: the session's opening (its JSON, < 100 bytes) and what was resent
    assert resent <= extra < resent + (64 << 10) + 100, (extra, resent)  # a reset happens after a 64 KiB piece
    assert causes == (["HTTP 503"] if kind == "503" else ["ClientOSError"])


def test_a_gs_chunk_that_keeps_failing_ends_the_upload_without_starting_it_again(gcs_emulator, monkeypatch,
                                                                                 tmp_path):
    """Every request to the session fails: the chunk gets the policy's attempts (the first, then status queries),
    each counted; then the upload fails with a RemoteError saying how often it was retried, and its session is
    cancelled. The file is not uploaded again from byte 0 (the store failed max_attempts times in a row, as a
    part's exhausted retries end an s3:// upload); before: a new session per policy attempt."""
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)
    local, _ = _upload_file(tmp_path)
    causes: list[str] = []
    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, gcs_emulator, bucket, on_retry=causes.append)
        proxy.set_faults(error_rate=1.0, kinds=("503",), only_methods=("POST", "PUT"), path_filter=r"upload_id=")
        with pytest.raises(cloudckpt.RemoteError) as info:
            store.put_file_if_absent(local, DATA_FILE)
        events = proxy.events
    assert _session_requests(events) == {"opened": 1, "status queries": FAST.max_attempts - 1, "cancelled": 1}
    assert causes == ["HTTP 503"] * (FAST.max_attempts - 1)
    assert info.value.transient and f"retried {FAST.max_attempts - 1} times" in str(info.value), str(info.value)


def test_a_stalled_gs_chunk_ends_by_the_policy_deadline(gcs_emulator, tmp_path):
    """The store accepts a chunk of a resumable upload and never answers (the proxy holds it): with
    ``RetryPolicy(deadline=3)`` the chunk's attempt is cut when the deadline passes (``RetryPolicy.acall``
    bounds each attempt by the time left) and the upload fails with a transient RemoteError within a few
    seconds. Before: the attempt waited for aiohttp's 60 s read timeout (gcsfs's requests_timeout), here
    until the test released the hold after 20 s, and the upload then succeeded."""
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    local, _ = _upload_file(tmp_path)
    release = threading.Event()
    policy = cloudckpt.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01, deadline=3)
    timer = threading.Timer(20, release.set)  # the test never waits longer than this for the old behaviour
    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = RemoteStore(f"gs://{bucket}/run", {**gcs_emulator.storage_options(), "endpoint_url": proxy.url},
                            retry=policy, transfer=cloudckpt.TransferOptions(part_size=CHUNK))
        proxy.set_faults(only_methods=("POST",), path_filter=_chunk_requests(1), min_body=1, until=release)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(cloudckpt.RemoteError) as info:
                store.put_file_if_absent(local, DATA_FILE)
            elapsed = time.monotonic() - started
        finally:
            release.set()
            timer.cancel()
    assert elapsed < 8, elapsed
    assert info.value.transient and "deadline passed" in str(info.value), str(info.value)


def test_cancel_ends_a_gs_chunk_retry_between_attempts(gcs_emulator, monkeypatch, tmp_path):
    """store.cancel_transfers() (Ctrl-C, an abandoned upload) while a chunk waits for its next attempt: the wait
    ends, no status query follows, the session is cancelled and the upload fails; a chunk retried before it
    had been resumed in the same session."""
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)
    local, _ = _upload_file(tmp_path)
    causes: list[str] = []

    def on_retry(cause: str) -> None:
        causes.append(cause)
        if len(causes) == 2:  # before the second chunk's wait: what a Ctrl-C during it does
            store.cancel_transfers()

    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, gcs_emulator, bucket, on_retry=on_retry)
        # chunk requests: 0, 1 (503), 1 again, 2 (503)
        proxy.set_faults(only_methods=("POST",), path_filter=_chunk_requests(1, 3), min_body=1)
        proxy.fail_next("503", 2)
        with pytest.raises(cloudckpt.RemoteError):
            store.put_file_if_absent(local, DATA_FILE)
        events = proxy.events
    assert causes == ["HTTP 503", "HTTP 503"]
    assert _session_requests(events) == {"opened": 1, "status queries": 1, "cancelled": 1}


@pytest.mark.parametrize("whole_store, delete_fails", [(False, False), (True, False), (False, True)],
                         ids=["scope", "store", "scope-cancel-503"])
def test_a_cancelled_gs_upload_sends_no_further_chunk(whole_store, delete_fails, gcs_emulator, tmp_path):
    """A gs:// upload cancelled in the middle of its second chunk (its TransferScope, as a preemption abandoning
    an older checkpoint does, or the whole store, as a Ctrl-C or close does) ends that chunk and sends no other:
    no byte beyond it reaches the store, the session is cancelled (DELETE) and the upload fails with the error
    an s3:// upload cancelled so raises ("cancelled on purpose"), also when that DELETE fails (503); nothing is
    stored. A scope's cancel leaves the store's next upload alone. Before: the upload went on chunk after chunk
    to the file's end, and committed."""
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    local, data = _upload_file(tmp_path)
    outcome: dict[str, object] = {}
    started = threading.Event()

    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, gcs_emulator, bucket)

        def upload() -> None:
            with store.transfer_scope() as scope:
                outcome["scope"] = scope
                started.set()
                try:
                    outcome["created"] = store.put_file_if_absent(local, DATA_FILE)
                except Exception as exc:  # noqa: BLE001 - asserted below
                    outcome["error"] = exc

        if delete_fails:
            proxy.set_faults(error_rate=1.0, kinds=("503",), only_methods=("DELETE",), path_filter=r"upload_id=")
        proxy.set_bandwidth(CHUNK)  # a slow link: 1 s a chunk, 3.2 s the file
        thread = threading.Thread(target=upload, name="test-gs-upload")
        thread.start()
        assert started.wait(10)
        deadline = time.monotonic() + 30
        while proxy.received_bytes < CHUNK + CHUNK // 2:  # half of the second chunk is through
            assert time.monotonic() < deadline and thread.is_alive(), "the upload did not get to its second chunk"
            time.sleep(0.005)
        store.cancel_transfers(None if whole_store else outcome["scope"])
        at_cancel = proxy.received_bytes
        thread.join(60)
        assert not thread.is_alive()
        received, events = proxy.received_bytes, proxy.events
        chunks = [p for m, p, _ in events if m == "POST" and "upload_id=" in p]
        # the chunk in flight (the second, unless this test was slow to cancel) ended; no other was sent
        assert len(chunks) <= at_cancel // CHUNK + 1 and received < SIZE, (len(chunks), at_cancel, received)
        assert received - at_cancel <= CHUNK, (received, at_cancel)  # within one chunk of the cancel
        proxy.set_bandwidth(None)
        proxy.clear()
        store.cancel.clear()  # (the whole store's cancel is undone for what follows; a scope's stays with it)
        assert store.list_objects() == []  # nothing stored: no object assembled from part of the file
        assert store.put_file_if_absent(local, DATA_FILE) is True  # the store's next upload is not cancelled
        assert store.read_bytes(DATA_FILE) == data

    error = outcome.get("error")
    assert "created" not in outcome and isinstance(error, cloudckpt.RemoteError), outcome
    assert "cancelled on purpose" in str(error) and not error.transient, str(error)
    assert _session_requests(events) == {"opened": 1, "status queries": 0, "cancelled": 1}


def test_a_gs_upload_whose_session_is_gone_starts_again(gcs_emulator, monkeypatch, tmp_path):
    """The session cannot be resumed (here cancelled behind the client's back; on GCS also an expired one): the
    status query's 404 makes the chunk's first error (503) the upload's, and the policy uploads the file again
    in a new session, as for any failed operation; both retries are counted."""
    import urllib.error
    import urllib.request

    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)
    local, data = _upload_file(tmp_path)
    causes: list[str] = []

    def on_retry(cause: str) -> None:
        causes.append(cause)
        if len(causes) == 1:  # the session is cancelled at the store before the chunk is resumed
            session = next(p for m, p, _ in reversed(proxy.events) if "upload_id=" in p)
            with pytest.raises(urllib.error.HTTPError, match="499"):  # GCS's answer to a cancel
                urllib.request.urlopen(urllib.request.Request(gcs_emulator.endpoint + session, method="DELETE"))

    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, gcs_emulator, bucket, on_retry=on_retry)
        proxy.set_faults(only_methods=("POST",), path_filter=_chunk_requests(1), min_body=1)
        proxy.fail_next("503")
        assert store.put_file_if_absent(local, DATA_FILE) is True
        events = proxy.events
        assert store.read_bytes(DATA_FILE) == data
    assert causes == ["HTTP 503", "HTTP 503"]  # the chunk's retry (the status query), then the file's
    assert _session_requests(events) == {"opened": 2, "status queries": 1, "cancelled": 1}


def test_a_byte_corrupted_in_a_resumed_gs_chunk_is_not_committed(gcs_emulator, monkeypatch, tmp_path):
    """The bytes of a resumed upload are checked as any: GCS computes the object's crc32c from what it holds, the
    commit compares it with the manifest's, so a resumed chunk whose bytes were damaged on the way (fault proxy)
    is caught before the commit point."""
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint

    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)
    local, _ = _upload_file(tmp_path)
    (tmp_path / "model.ckpt-1.index").write_bytes(b"index")
    files = {DATA_FILE: local, "model.ckpt-1.index": str(tmp_path / "model.ckpt-1.index")}
    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, gcs_emulator, bucket)
        proxy.set_faults(only_methods=("POST",), path_filter=_chunk_requests(1, 2), min_body=1)
        proxy.fail_next("503")  # chunk 1; then its resumed send has a byte flipped
        proxy.fail_next("flip")
        with pytest.raises(cloudckpt.IntegrityError, match="crc32c .* expected .*corrupted on the way"):
            commit_checkpoint(store, LocalCheckpoint(1, "model.ckpt-1", files))
        events = proxy.events
    assert _session_requests(events)["opened"] == 1
    assert cloudckpt.list_checkpoints(f"gs://{bucket}/run", gcs_emulator.storage_options()) == []


def test_fake_gcs_server_finalises_at_a_status_query_so_gs_uploads_start_again(fake_gcs_server, monkeypatch,
                                                                                 tmp_path):
    """fake-gcs-server does not implement a session's status query: it answers 200 with the object made of the
    bytes it holds (finalised short). That answer is not taken as the upload's end (the object's size is not the
    upload's): the upload starts again, from byte 0, and the committed checkpoint is intact (the crc32c the store
    computed agrees with the manifest's)."""
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint

    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    fake_gcs_server.make_bucket(bucket)
    record_gcsfs_backoff(monkeypatch)
    local, data = _upload_file(tmp_path)
    (tmp_path / "model.ckpt-1.index").write_bytes(b"index")
    files = {DATA_FILE: local, "model.ckpt-1.index": str(tmp_path / "model.ckpt-1.index")}
    causes: list[str] = []
    with FaultProxy(fake_gcs_server.endpoint, seed=0) as proxy:
        store = _gs_via(proxy, fake_gcs_server, bucket, on_retry=causes.append)
        proxy.set_faults(only_methods=("POST",), path_filter=_chunk_requests(1), min_body=1)
        proxy.fail_next("503")
        commit_checkpoint(store, LocalCheckpoint(1, "model.ckpt-1", files))
        events = proxy.events
    assert causes == ["HTTP 503", "HTTP 503"]  # the chunk's retry (the status query), then the file's
    assert _session_requests(events)["opened"] == 2
    [committed] = cloudckpt.list_checkpoints(f"gs://{bucket}/run", fake_gcs_server.storage_options())
    direct = RemoteStore(f"gs://{bucket}/run", fake_gcs_server.storage_options())
    assert direct.read_bytes(DATA_FILE) == data
    stored = direct.stored_crc32c()
    assert all(stored[f.name] == f.crc32c for f in committed.files)
