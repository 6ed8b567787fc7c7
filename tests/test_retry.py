"""Error classification (one place for S3, GCS and the network) and the backoff policy."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from cloudckpt.errors import ConfigError, RemoteError
from cloudckpt.retry import RetryPolicy, describe_cause, is_connection_failure, is_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def translated(code: str, status: int, exc_type=OSError) -> Exception:
    """What s3fs raises: a Python exception whose __cause__ is botocore's ClientError."""
    exc = exc_type(errno.EIO, "translated")
    exc.__cause__ = client_error(code, status)
    return exc


class FakeGcsHttpError(Exception):
    """Shaped like gcsfs.retry.HttpError (name and integer ``code``)."""


FakeGcsHttpError.__name__ = "HttpError"


def gcs_error(code: int) -> Exception:
    exc = FakeGcsHttpError(f"HTTP {code}")
    exc.code = code
    return exc


@pytest.mark.parametrize("exc, transient, cause", [
    (translated("SlowDown", 503), True, "SlowDown"),
    (translated("InternalError", 500), True, "InternalError"),
    (translated("503", 503), True, "503"),  # HEAD errors carry the status as the code
    (translated("RequestTimeout", 400), True, "RequestTimeout"),
    (translated("AccessDenied", 403, PermissionError), False, "AccessDenied"),
    (translated("NoSuchBucket", 404, FileNotFoundError), False, "NoSuchBucket"),
    (translated("NotImplemented", 501), False, "NotImplemented"),  # a feature the store lacks: every time
    (translated("InvalidAccessKeyId", 403, PermissionError), False, "InvalidAccessKeyId"),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True, "EndpointConnectionError"),
    (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), True, "ConnectionClosedError"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True, "ConnectionResetError"),
    (TimeoutError("timed out"), True, "TimeoutError"),
    (gcs_error(503), True, "HTTP 503"),
    (gcs_error(429), True, "HTTP 429"),
    (gcs_error(403), False, "HTTP 403"),
    (OSError("Forbidden: gs://b/x"), False, "OSError"),  # gcsfs's 403
    (FileNotFoundError("gone"), False, "FileNotFoundError"),
    (ValueError("bug"), False, "ValueError"),
    (RemoteError("x", url="s3://b", transient=True), True, "RemoteError"),
])
def test_classification(exc, transient, cause):
    assert is_transient(exc) is transient
    assert describe_cause(exc) == cause


@pytest.mark.parametrize("exc, unreached", [
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), True),
    (TimeoutError("timed out"), True),
    (translated("SlowDown", 503), False),  # the store answered
    (translated("InternalError", 500), False),
    (gcs_error(503), False),
    (translated("AccessDenied", 403, PermissionError), False),
])
def test_connection_failures_are_told_from_answers(exc, unreached):
    """What ``remote_error`` says to check: the endpoint (nothing answered), or the store's own answer."""
    assert is_connection_failure(exc) is unreached


def test_aiohttp_payload_error_is_transient():
    aiohttp = pytest.importorskip("aiohttp")
    assert is_transient(aiohttp.ClientPayloadError("cut"))
    assert is_transient(aiohttp.ServerDisconnectedError())


def test_what_gcsfs_retried_itself_is_transient():
    """gcsfs's retry loop is off under cloudckpt's policy (remote._single_attempt_gcsfs): what it retried beyond
    5xx/429/connection errors stays retried, by the policy: a download whose bytes do not match the store's
    checksum, and google-auth failures their library marks retryable (a token endpoint's 5xx); not a refusal."""
    gcsfs_retry = pytest.importorskip("gcsfs.retry")
    auth = pytest.importorskip("google.auth.exceptions")
    assert is_transient(gcsfs_retry.ChecksumError("md5 mismatch"))
    assert is_transient(auth.RefreshError("temporarily unavailable", retryable=True))
    assert not is_transient(auth.RefreshError("invalid_grant: Bad Request", retryable=False))


def test_backoff_is_full_jitter_and_capped():
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=5.0, seed=3)
    for retry in range(1, 10):
        cap = min(5.0, 2 ** (retry - 1))
        waits = [policy.backoff(retry) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap * 0.8  # the whole range is used, not a fixed delay


def test_call_retries_transient_then_succeeds():
    calls, seen = [], []
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.0, max_backoff=0.0)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise translated("SlowDown", 503)
        return "ok"

    assert policy.call(flaky, on_retry=lambda attempt, exc, delay: seen.append(attempt)) == "ok"
    assert len(calls) == 3 and seen == [1, 2]


def test_call_does_not_retry_fatal():
    calls = []

    def denied():
        calls.append(1)
        raise translated("AccessDenied", 403, PermissionError)

    with pytest.raises(PermissionError):
        RetryPolicy(max_attempts=5, initial_backoff=0.0).call(denied)
    assert len(calls) == 1


def test_call_gives_up_after_max_attempts_and_deadline():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionResetError()

    with pytest.raises(ConnectionResetError):
        RetryPolicy(max_attempts=4, initial_backoff=0.0).call(down)
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(ConnectionResetError):  # the next wait (up to 10 s) would pass the 0.5 s deadline
        RetryPolicy(max_attempts=100, initial_backoff=10.0, max_backoff=10.0, deadline=0.5, seed=1).call(down)
    assert len(calls) < 100


def test_call_does_not_report_a_retry_once_cancelled():
    """A Ctrl-C shuts the sockets of the requests in flight: their connection errors are transient by
    type, but once ``cancel`` is set they are re-raised, not logged and counted as retries ("Retrying
    upload ... after TransferCancelled" in the log and the retries_by_cause of an abandoned upload)."""
    import threading

    cancel, calls, seen = threading.Event(), [], []

    def cut():
        calls.append(1)
        cancel.set()  # given up while this request was in flight
        raise ConnectionResetError(errno.ECONNRESET, "shut by abort_requests")

    with pytest.raises(ConnectionResetError):
        RetryPolicy(max_attempts=5, initial_backoff=0.0).call(
            cut, on_retry=lambda attempt, exc, delay: seen.append(attempt), cancel=cancel)
    assert calls == [1] and seen == []


def test_call_retries_only_what_retry_if_accepts():
    """``retry_if``: a transient error it refuses is re-raised at once (a gs:// upload whose chunk's own retries
    ran out is not started again as a whole: remote.RemoteStore._run)."""
    calls, seen = [], []

    def down():
        calls.append(1)
        raise ConnectionResetError()

    with pytest.raises(ConnectionResetError):
        RetryPolicy(max_attempts=5, initial_backoff=0.0).call(
            down, on_retry=lambda attempt, exc, delay: seen.append(attempt), retry_if=lambda exc: len(calls) < 2)
    assert len(calls) == 2 and seen == [1]


def test_acall_retries_a_coroutine_on_the_loop_as_call_does():
    """``acall`` (gcsfs's requests run on fsspec's event loop thread): the same attempts, backoff and ``on_retry``;
    the waits are asyncio sleeps, so other tasks of the loop run meanwhile; fatal errors are not retried."""
    import asyncio

    calls, seen, ticks = [], [], []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError()
        return "done"

    async def ticker():
        for _ in range(5):
            ticks.append(1)
            await asyncio.sleep(0.01)

    async def both():
        tick = asyncio.ensure_future(ticker())
        result = await RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.05, seed=1).acall(
            flaky, on_retry=lambda attempt, exc, delay: seen.append((attempt, type(exc).__name__)))
        await tick
        return result

    assert asyncio.run(both()) == "done"
    assert len(calls) == 3 and seen == [(1, "ConnectionResetError"), (2, "ConnectionResetError")]
    assert len(ticks) == 5

    async def denied():
        calls.append(1)
        raise PermissionError("denied")

    calls.clear()
    with pytest.raises(PermissionError):
        asyncio.run(RetryPolicy(max_attempts=5, initial_backoff=0.0).acall(denied))
    assert len(calls) == 1


def test_acall_ends_its_wait_when_cancelled():
    """Setting ``cancel`` (another thread: ``RemoteStore.cancel_transfers``) during ``acall``'s wait ends it within
    ~``_CANCEL_POLL`` and re-raises the last error; no attempt follows."""
    import asyncio
    import threading
    import time

    cancel, calls = threading.Event(), []

    async def down():
        calls.append(1)
        raise ConnectionResetError()

    threading.Timer(0.2, cancel.set).start()
    began = time.monotonic()
    with pytest.raises(ConnectionResetError):
        asyncio.run(RetryPolicy(max_attempts=5, initial_backoff=30.0, max_backoff=30.0, seed=1).acall(
            down, cancel=cancel))
    assert calls == [1] and time.monotonic() - began < 5  # the wait drawn was up to 30 s


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"initial_backoff": -1}, {"deadline": 0},
                                    {"max_attempts": 3.0}, {"max_attempts": True}, {"max_attempts": np.True_},
                                    {"max_attempts": "3"}, {"max_attempts": np.int64(0)}, {"deadline": "x"},
                                    {"initial_backoff": "1"}, {"max_backoff": None}, {"deadline": float("nan")},
                                    {"max_backoff": True}, {"deadline": 10**400}])
def test_policy_validation(kwargs):
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def test_policy_takes_numpy_integers_as_ints():
    policy = RetryPolicy(max_attempts=np.int64(3), seed=np.int64(7))
    assert (policy.max_attempts, policy.seed) == (3, 7) and type(policy.max_attempts) is type(policy.seed) is int
    same = RetryPolicy(max_attempts=3, seed=7)
    assert policy == same and [policy.backoff(1) for _ in range(3)] == [same.backoff(1) for _ in range(3)]


def test_policy_takes_numpy_seconds_as_floats():
    policy = RetryPolicy(initial_backoff=np.float32(0.25), max_backoff=np.int64(4), deadline=np.float64(30))
    assert (policy.initial_backoff, policy.max_backoff, policy.deadline) == (0.25, 4.0, 30.0)
    assert {type(policy.initial_backoff), type(policy.max_backoff), type(policy.deadline)} == {float}


def test_the_deadline_bounds_a_stalled_request_on_the_s3_transport(cloudckpt_s3, tmp_path):
    """The store stops answering (the proxy holds every PUT, as a SIGSTOPped server would): with
    ``deadline=3`` the upload fails after about 3 s (each attempt's socket timeout cut to what the deadline
    leaves, at least ``MIN_ATTEMPT_TIMEOUT``), not after the transport's 60 s read timeout. Before: the first
    attempt waited the whole read timeout ("retried 0 times over 60 s")."""
    import threading
    import time

    from cloudckpt.errors import RemoteError
    from cloudckpt.remote import RemoteStore
    from cloudckpt.retry import MIN_ATTEMPT_TIMEOUT, attempt_timeout
    from support.fault_proxy import FaultProxy

    assert attempt_timeout(60.0) == 60.0  # outside any policy call
    local = tmp_path / "f"
    local.write_bytes(b"x" * 1000)
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.2, max_backoff=2, deadline=3)
    release = threading.Event()
    outcome: dict[str, object] = {}
    with FaultProxy(cloudckpt_s3.endpoint) as proxy:
        store = RemoteStore(cloudckpt_s3.url("run"), {**cloudckpt_s3.storage_options, "endpoint_url": proxy.url},
                            retry=policy)
        assert store._transport is not None
        proxy.set_faults(only_methods=("PUT",), until=release)

        def upload() -> None:
            started = time.monotonic()
            try:
                store.put_file(str(local), "object")
            except RemoteError as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - started
        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        thread.join(20)
        release.set()
        thread.join(60)
    assert "seconds" in outcome, "the stalled upload outlived its deadline by far"
    assert isinstance(outcome.get("error"), RemoteError), outcome
    assert 3 - 0.5 <= outcome["seconds"] <= 3 + MIN_ATTEMPT_TIMEOUT + 2, outcome
    assert outcome["error"].transient
