"""Tests for the fault-injection proxy (tests/support/fault_proxy.py) in front of moto.

Besides checking the proxy, these tests pin down what boto3 / s3fs raise for each
fault kind, which is what cloudckpt's error classification relies on.
"""

import errno
import http.client
import os
import socket
import threading
import time
import xml.etree.ElementTree as ET

import aiohttp
import boto3
import botocore.exceptions
import pytest
import s3fs
from botocore.config import Config
from moto.server import ThreadedMotoServer
from support.fault_proxy import FaultProxy

BUCKET = "bkt"
NO_RETRIES = Config(retries={"max_attempts": 0})  # 1 attempt: each fault is visible
PUBLIC = {"x-amz-acl": "public-read"}  # raw (unsigned) clients may then GET it back


@pytest.fixture(scope="module")
def moto_url():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture
def proxy(moto_url):
    with FaultProxy(moto_url, seed=0) as p:
        yield p


def client(proxy):
    return boto3.client("s3", endpoint_url=proxy.url, config=NO_RETRIES)


def make_fs(proxy, retries=1, **config_kwargs):
    """s3fs with s3fs-level and botocore-level retries turned down."""
    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True,
                           config_kwargs={"retries": {"max_attempts": 0}, **config_kwargs})
    fs.retries = retries  # only a class attribute in s3fs; default 5
    return fs


def connect(proxy):
    return http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=5)


def raw(proxy, method, path, body=None, headers=None):
    """One request on a fresh connection; returns (status, response, body bytes)."""
    conn = connect(proxy)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def outcome(proxy, path):
    """Label what a raw client saw for a HEAD: status code, or 'reset'."""
    try:
        return str(raw(proxy, "HEAD", path)[0])
    except (ConnectionError, http.client.HTTPException):
        return "reset"


# -- pass-through -------------------------------------------------------------

def test_boto3_roundtrip_is_transparent(proxy):
    s3 = client(proxy)
    s3.put_object(Bucket=BUCKET, Key="t/a.txt", Body=b"hello")
    assert s3.get_object(Bucket=BUCKET, Key="t/a.txt")["Body"].read() == b"hello"
    assert s3.head_object(Bucket=BUCKET, Key="t/a.txt")["ContentLength"] == 5
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="t/")["Contents"]] == ["t/a.txt"]
    s3.delete_object(Bucket=BUCKET, Key="t/a.txt")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="t/")["KeyCount"] == 0
    assert proxy.stats == {"requests": 6, "forwarded": 6}
    assert [m for m, _, _ in proxy.events] == ["PUT", "GET", "HEAD", "GET", "DELETE", "GET"]


def test_s3fs_roundtrip_and_multipart_upload(proxy, tmp_path):
    fs = make_fs(proxy)
    data = os.urandom(12 * 2**20 + 123)
    (tmp_path / "big.bin").write_bytes(data)
    fs.put_file(str(tmp_path / "big.bin"), f"{BUCKET}/s3fs/big.bin", chunksize=5 * 2**20)
    fs.pipe_file(f"{BUCKET}/s3fs/small.txt", b"small")
    assert fs.cat_file(f"{BUCKET}/s3fs/big.bin") == data
    assert fs.cat_file(f"{BUCKET}/s3fs/small.txt") == b"small"
    assert sorted(fs.ls(f"{BUCKET}/s3fs", refresh=True)) == [f"{BUCKET}/s3fs/big.bin",
                                                             f"{BUCKET}/s3fs/small.txt"]
    fs.rm(f"{BUCKET}/s3fs", recursive=True)
    assert not fs.exists(f"{BUCKET}/s3fs/big.bin")
    paths = [p for _, p, _ in proxy.events]
    assert any(p.endswith("?uploads") for p in paths)  # CreateMultipartUpload
    assert sum("partNumber=" in p for p in paths) == 3  # 5 + 5 + 2 MiB parts
    assert proxy.stats["forwarded"] == proxy.stats["requests"]


def test_chunked_request_body_and_keep_alive(proxy):
    conn = connect(proxy)
    conn.request("PUT", f"/{BUCKET}/chunked", body=iter([b"abc", b"de" * 40_000]),
                 encode_chunked=True, headers=PUBLIC)
    assert conn.getresponse().read() == b"" and conn.sock is not None
    sock = conn.sock
    conn.request("GET", f"/{BUCKET}/chunked")
    assert conn.getresponse().read() == b"abc" + b"de" * 40_000
    assert conn.sock is sock  # both requests went over one kept-alive connection
    conn.close()


# -- each fault kind, seen by a raw client ------------------------------------

@pytest.mark.parametrize("kind, code, message", [
    ("500", "InternalError", "We encountered an internal error. Please try again."),
    ("503", "SlowDown", "Please reduce your request rate."),
])
def test_error_kinds_send_s3_xml(proxy, kind, code, message):
    conn = connect(proxy)
    proxy.fail_next(kind)
    conn.request("PUT", f"/{BUCKET}/err", body=b"x" * 200_000,
                 headers={"Expect": "100-continue"})
    resp = conn.getresponse()
    error = ET.fromstring(resp.read())
    assert resp.status == int(kind)
    assert resp.getheader("Content-Type") == "application/xml"
    assert resp.getheader("x-amz-request-id") == error.findtext("RequestId")
    assert (error.tag, error.findtext("Code"), error.findtext("Message")) == ("Error", code, message)
    conn.request("HEAD", f"/{BUCKET}/err")  # same connection still usable ...
    assert conn.getresponse().status == 404  # ... and the faulted PUT never reached moto
    assert proxy.stats[kind] == 1 and proxy.stats["forwarded"] == 1


def test_reset_mid_request_body(proxy):
    proxy.fail_next("reset")
    with pytest.raises(ConnectionError):  # ECONNRESET or EPIPE, never a hang
        raw(proxy, "PUT", f"/{BUCKET}/reset-put", body=b"y" * 4 * 2**20)
    assert raw(proxy, "HEAD", f"/{BUCKET}/reset-put")[0] == 404
    assert proxy.stats["reset"] == 1


def test_reset_mid_response_body(proxy):
    assert raw(proxy, "PUT", f"/{BUCKET}/reset-get", body=b"z" * 100_000, headers=PUBLIC)[0] == 200
    proxy.fail_next("reset")
    conn = connect(proxy)
    conn.request("GET", f"/{BUCKET}/reset-get")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == "100000"
    with pytest.raises((ConnectionError, http.client.IncompleteRead)):
        resp.read()
    conn.close()


def test_reset_without_any_body_happens_before_the_status_line(proxy):
    proxy.fail_next("reset")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        raw(proxy, "HEAD", f"/{BUCKET}")


# -- what boto3 / s3fs raise (the contract for cloudckpt's classification) -----

def test_boto3_exceptions_per_kind(proxy):
    s3 = client(proxy)
    s3.put_object(Bucket=BUCKET, Key="k", Body=b"v" * 50_000)
    for kind, code in [("500", "InternalError"), ("503", "SlowDown")]:
        proxy.fail_next(kind)
        with pytest.raises(botocore.exceptions.ClientError) as info:
            s3.put_object(Bucket=BUCKET, Key="k", Body=b"v")
        assert info.value.response["Error"]["Code"] == code
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == int(kind)
    proxy.fail_next("reset")
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=BUCKET, Key="k", Body=b"v" * 50_000)
    proxy.fail_next("reset")
    body = s3.get_object(Bucket=BUCKET, Key="k")["Body"]
    with pytest.raises(botocore.exceptions.ResponseStreamingError):
        body.read()


def test_s3fs_exceptions_per_kind(proxy):
    fs = make_fs(proxy)
    fs.pipe_file(f"{BUCKET}/f", b"w" * 50_000)
    for kind, err, code in [("500", errno.EREMOTEIO, "InternalError"), ("503", errno.EBUSY, "SlowDown")]:
        proxy.fail_next(kind)
        with pytest.raises(OSError) as info:
            fs.pipe_file(f"{BUCKET}/f", b"w")
        assert info.value.errno == err
        assert info.value.__cause__.response["Error"]["Code"] == code
    # aiohttp silently retries idempotent requests once after a reset: 2 needed.
    proxy.fail_next("reset")
    fs.pipe_file(f"{BUCKET}/f", b"w" * 50_000)
    assert [f for _, _, f in proxy.events[-2:]] == ["reset", None]
    proxy.fail_next("reset", count=2)
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        fs.pipe_file(f"{BUCKET}/f", b"w" * 50_000)
    proxy.fail_next("reset")  # POST is not retried by aiohttp
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key="mpu")
    proxy.fail_next("reset")  # a cut GET body is only noticed while reading it
    with pytest.raises(aiohttp.ClientPayloadError):
        fs.cat_file(f"{BUCKET}/f", start=0, end=50_000)


def test_s3fs_retries_slowdown_itself(proxy):
    fs = make_fs(proxy, retries=3)
    proxy.fail_next("503", count=2)
    fs.pipe_file(f"{BUCKET}/slow", b"ok")  # s3fs retries SlowDown: 2 faults, then OK
    assert [f for _, _, f in proxy.events] == ["503", "503", None]
    proxy.fail_next("500")
    with pytest.raises(OSError):  # ... but not InternalError (that is botocore's job)
        fs.pipe_file(f"{BUCKET}/slow", b"ok")
    assert proxy.events[-1][2] == "500" and len(proxy.events) == 4


# -- determinism, filters, latency, outage -------------------------------------

def fault_sequence(moto_url, seed, n=40):
    with FaultProxy(moto_url, seed=seed) as p:
        p.set_faults(error_rate=0.5)
        return [outcome(p, f"/{BUCKET}") for _ in range(n)]


def test_seed_makes_faults_reproducible(moto_url):
    first = fault_sequence(moto_url, seed=7)
    assert first == fault_sequence(moto_url, seed=7)
    assert first != fault_sequence(moto_url, seed=8)
    assert {"200", "500", "503", "reset"} <= set(first)  # all kinds occur at 50 %


def test_lose_response_executes_the_request_and_counts_received_bytes(proxy):
    """"lose_response": the request reaches the store whole and is executed, its answer never reaches the
    client (a reset where the status line would be); ``received_bytes`` counts request bodies read from
    clients, faulted or not."""
    proxy.fail_next("lose_response")
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        raw(proxy, "PUT", f"/{BUCKET}/lost", body=b"x" * 1000, headers=PUBLIC)
    assert raw(proxy, "GET", f"/{BUCKET}/lost")[2] == b"x" * 1000  # it was stored
    proxy.fail_next("503")
    assert raw(proxy, "PUT", f"/{BUCKET}/refused", body=b"y" * 500)[0] == 503
    assert proxy.received_bytes == 1500
    assert proxy.stats == {"requests": 3, "forwarded": 1, "lose_response": 1, "503": 1}


def test_filters_restrict_faults(proxy):
    proxy.set_faults(error_rate=1.0, kinds=("503",), only_methods=("PUT",), path_filter=r"/ckpt/")
    assert raw(proxy, "GET", f"/{BUCKET}?list-type=2")[0] == 200  # wrong method
    assert raw(proxy, "PUT", f"/{BUCKET}/other", body=b"1")[0] == 200  # wrong path
    assert raw(proxy, "PUT", f"/{BUCKET}/ckpt/x", body=b"1")[0] == 503
    proxy.set_faults(error_rate=1.0, kinds=("500",), path_filter=lambda p: p.endswith("y"))
    assert raw(proxy, "GET", f"/{BUCKET}/y")[0] == 500
    proxy.clear()
    assert raw(proxy, "PUT", f"/{BUCKET}/ckpt/x", body=b"1")[0] == 200
    assert proxy.stats == {"requests": 5, "forwarded": 3, "503": 1, "500": 1}
    with pytest.raises(ValueError):
        proxy.set_faults(kinds=("404",))


def test_latency(proxy):
    proxy.set_faults(latency=0.3)
    start = time.monotonic()
    assert raw(proxy, "GET", f"/{BUCKET}?list-type=2")[0] == 200
    assert time.monotonic() - start >= 0.3


def test_until_holds_an_eligible_request_until_the_event_is_set(proxy):
    release = threading.Event()
    proxy.set_faults(only_methods=["PUT"], until=release)
    assert raw(proxy, "GET", f"/{BUCKET}?list-type=2")[0] == 200  # not eligible: not held
    statuses = []
    put = threading.Thread(target=lambda: statuses.append(raw(proxy, "PUT", f"/{BUCKET}/held", b"x")[0]))
    put.start()
    deadline = time.monotonic() + 10
    while not proxy.most_held.get("PUT") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert proxy.most_held.get("PUT") == 1 and statuses == []  # still held
    release.set()
    put.join(10)
    assert statuses == [200]


def test_bandwidth_is_shared_by_concurrent_uploads(proxy):
    """set_bandwidth makes a slow link: two 256 KiB bodies sent at once take (together) 512 KiB / bandwidth."""
    proxy.set_bandwidth(1 << 20)  # 1 MiB/s
    body = b"b" * (256 << 10)
    statuses = []
    start = time.monotonic()
    threads = [threading.Thread(target=lambda key=key: statuses.append(raw(proxy, "PUT", f"/{BUCKET}/{key}", body)[0]))
               for key in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200, 200]
    assert 0.45 <= time.monotonic() - start < 5
    assert proxy.received_bytes == 2 * len(body)
    proxy.set_bandwidth(None)
    start = time.monotonic()
    assert raw(proxy, "PUT", f"/{BUCKET}/c", body)[0] == 200
    assert time.monotonic() - start < 0.4


def test_outage_refuses_then_recovers(proxy):
    s3 = client(proxy)
    s3.head_bucket(Bucket=BUCKET)  # leaves a kept-alive connection in the pool
    proxy.outage(1.0)
    start = time.monotonic()
    with pytest.raises((botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.EndpointConnectionError)):
        s3.head_bucket(Bucket=BUCKET)  # the pooled connection is reset
    with pytest.raises(ConnectionError):  # so is a new one, at accept time
        raw(proxy, "GET", f"/{BUCKET}")
    assert time.monotonic() - start < 0.8  # fails fast, no hang
    assert proxy.stats["outage"] >= 2
    time.sleep(max(0.0, start + 1.05 - time.monotonic()))
    assert s3.head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200
    proxy.start_outage()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        make_fs(proxy).ls(BUCKET)
    proxy.end_outage()
    assert raw(proxy, "GET", f"/{BUCKET}")[0] == 200


def test_a_request_held_when_the_proxy_stops_is_reset_not_forwarded(moto_url):
    """A request held in its latency (a stalled store) must not reach the upstream after the proxy stopped (its test
    ended): it would land in a later test (a moto-mock test's socket guard saw such connections)."""
    with FaultProxy(moto_url) as p:
        p.set_faults(latency=1.5, only_methods=["PUT"])
        held = connect(p)
        held.request("PUT", f"/{BUCKET}/held-after-stop", body=b"x")
        deadline = time.monotonic() + 10
        while not p.most_held.get("PUT") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.most_held.get("PUT") == 1
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        held.getresponse()
    time.sleep(2.5)  # past the latency: a handler thread left sleeping would forward the request now
    assert boto3.client("s3", endpoint_url=moto_url).list_objects_v2(Bucket=BUCKET, Prefix="held-after-stop")[
        "KeyCount"] == 0


def test_stop_closes_the_port_and_idle_connections(moto_url):
    with FaultProxy(moto_url) as p:
        port = int(p.url.rsplit(":", 1)[1])
        idle = connect(p)
        idle.request("GET", f"/{BUCKET}")
        resp = idle.getresponse()
        assert resp.read() and resp.status == 200  # the connection is now idle, kept alive
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        idle.request("GET", f"/{BUCKET}")  # not served by a leftover handler thread
        idle.getresponse()
    with pytest.raises(RuntimeError):
        p.url
