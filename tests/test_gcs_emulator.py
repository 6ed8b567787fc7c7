"""gcsfs against the in-process GCS emulator (issue 8).

Proves the fixture works and pins down the gcsfs/emulator behaviour the library
relies on: uploads (incl. multi-chunk resumable), crc32c metadata, listing-cache
staleness, rm/mv, and which exceptions gcsfs raises for which HTTP errors and how
often it retries them internally.
"""

import base64
import os
import uuid

# The support module must be imported before gcsfs (it sets
# GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false).
try:
    from support.gcs_emulator import (
        EMULATOR_ENV_VAR,
        GcsEmulator,
        record_gcsfs_backoff,
        set_gcsfs_retries,
    )
except ModuleNotFoundError:  # tests/ is a package
    from tests.support.gcs_emulator import (
        EMULATOR_ENV_VAR,
        GcsEmulator,
        record_gcsfs_backoff,
        set_gcsfs_retries,
    )

import aiohttp
import fsspec
import gcsfs
import gcsfs.retry
import google_crc32c
import pytest
import requests

pytestmark = pytest.mark.timeout(30)

MiB = 2**20


# gcs_emulator: the session's emulator (tests/conftest.py, from cloudckpt.testing's cloudckpt_gcs_server).


@pytest.fixture
def bucket(gcs_emulator):
    name = f"b-{uuid.uuid4().hex[:12]}"
    gcs_emulator.make_bucket(name)
    return name


@pytest.fixture
def fs(gcs_emulator):
    return gcs_emulator.filesystem()


@pytest.fixture
def embedded(gcs_emulator):
    """Tests that inject faults or read the request log need the in-process server."""
    if gcs_emulator.is_external:
        pytest.skip("needs the embedded emulator")
    gcs_emulator.clear_faults()
    gcs_emulator.requests.clear()
    yield gcs_emulator
    gcs_emulator.clear_faults()


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


# --------------------------------------------------------------------- setup


def test_gcsfs_uses_plain_http_filesystem():
    # Extended (gRPC bucket-layout probing) class would stall 60 s per op.
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem


def test_storage_options_shape(gcs_emulator):
    opts = gcs_emulator.storage_options()
    assert opts == {
        "endpoint_url": gcs_emulator.endpoint,
        "token": "anon",
        "project": "test",
    }
    assert gcs_emulator.endpoint.startswith("http://")


def test_pipe_cat_through_fsspec_gs_urls(gcs_emulator, bucket):
    opts = gcs_emulator.storage_options()
    url = f"gs://{bucket}/ckpt/step-1/manifest.json"
    with fsspec.open(url, "wb", **opts) as f:
        f.write(b'{"step": 1}')
    with fsspec.open(url, "rb", **opts) as f:
        assert f.read() == b'{"step": 1}'

    fs, path = fsspec.core.url_to_fs(url, **opts)
    assert isinstance(fs, gcsfs.GCSFileSystem)
    assert path == f"{bucket}/ckpt/step-1/manifest.json"
    fs.pipe(f"gs://{bucket}/x.bin", b"\x00\x01\x02")
    assert fs.cat(f"gs://{bucket}/x.bin") == b"\x00\x01\x02"
    assert fs.cat_file(f"gs://{bucket}/x.bin", start=1, end=3) == b"\x01\x02"


# --------------------------------------------------------------------- uploads


def test_put_file_multichunk_resumable_and_crc32c(embedded, fs, bucket, tmp_path):
    data = os.urandom(21 * MiB)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    key = f"{bucket}/big.bin"

    embedded.requests.clear()
    # put_file: < 5 MiB -> one multipart request; >= 5 MiB -> resumable upload
    # sent in `chunksize` pieces (default 50 MiB, must be a multiple of 256 KiB).
    fs.put_file(str(local), key, chunksize=8 * MiB)
    uploads = [p for m, p in embedded.requests if m == "POST" and "/upload/" in p]
    assert "uploadType=resumable" in uploads[0] and "upload_id" not in uploads[0]
    assert len([p for p in uploads if "upload_id=" in p]) == 3  # 8 + 8 + 5 MiB

    info = fs.info(key)
    assert info["size"] == len(data)
    assert info["type"] == "file"
    # crc32c: base64 of the 4-byte BIG-endian CRC32C, exactly like real GCS.
    assert info["crc32c"] == crc32c_b64(data)
    raw = base64.b64decode(info["crc32c"])
    assert int.from_bytes(raw, "big") == google_crc32c.value(data)
    import hashlib

    assert base64.b64decode(info["md5Hash"]) == hashlib.md5(data).digest()

    out = tmp_path / "back.bin"
    fs.get_file(key, str(out))
    assert out.read_bytes() == data

    # Default chunksize (50 MiB) -> the same 21 MiB file goes in ONE chunk.
    embedded.requests.clear()
    fs.put_file(str(local), f"{bucket}/big2.bin")
    assert len([p for m, p in embedded.requests if "upload_id=" in p]) == 1


def test_open_wb_block_size_controls_chunks(embedded, fs, bucket):
    data = os.urandom(3 * MiB + 123)
    embedded.requests.clear()
    with fs.open(f"{bucket}/stream.bin", "wb", block_size=MiB) as f:
        for i in range(0, len(data), 300_000):
            f.write(data[i : i + 300_000])
    assert len([p for m, p in embedded.requests if "upload_id=" in p]) >= 4
    assert fs.cat(f"{bucket}/stream.bin") == data
    assert fs.info(f"{bucket}/stream.bin")["crc32c"] == crc32c_b64(data)


def test_create_mode_is_exclusive(embedded, fs, bucket, tmp_path):
    # Real GCS and the embedded emulator (enforce_preconditions=True) answer
    # 412; the stock gcp-storage-emulator does not (see next test).
    key = f"{bucket}/manifest.json"
    fs.pipe(key, b"v1", mode="create")
    with pytest.raises(FileExistsError):  # HTTP 412
        fs.pipe(key, b"v2", mode="create")
    big = tmp_path / "b"
    big.write_bytes(os.urandom(6 * MiB))  # resumable path
    fs.put_file(str(big), f"{bucket}/big", mode="create")
    with pytest.raises(FileExistsError):
        fs.put_file(str(big), f"{bucket}/big", mode="create")
    assert fs.cat(key) == b"v1"


def test_resumable_session_status_completion_and_cancel_answer_as_gcs(embedded, bucket):
    """What resuming an interrupted upload relies on, answered as GCS documents
    (https://cloud.google.com/storage/docs/performing-resumable-uploads): a status check
    (``Content-Range: bytes */TOTAL``, no body) is answered 308 with ``Range: bytes=0-LAST``, and
    without ``Range`` while the session holds nothing (the stock emulator said ``bytes=0-0``: one
    byte it did not have); a completed session answers with its object (stock: 404); a DELETE of the
    session URI cancels it, answered 499 (stock: 501, not implemented)."""
    start = requests.post(
        f"{embedded.endpoint}/upload/storage/v1/b/{bucket}/o",
        params={"uploadType": "resumable", "name": "r"},
        json={"name": "r"},
        timeout=10,
    )
    session = start.headers["Location"]
    part = 256 << 10

    def put(body: bytes, content_range: str) -> requests.Response:
        return requests.put(session, data=body, headers={"Content-Range": content_range}, timeout=10)

    status = put(b"", f"bytes */{2 * part}")
    assert status.status_code == 308 and "Range" not in status.headers
    assert put(b"a" * part, f"bytes 0-{part - 1}/{2 * part}").headers["Range"] == f"bytes=0-{part - 1}"
    status = put(b"", f"bytes */{2 * part}")
    assert status.status_code == 308 and status.headers["Range"] == f"bytes=0-{part - 1}"
    done = put(b"b" * part, f"bytes {part}-{2 * part - 1}/{2 * part}")
    assert done.status_code == 200
    status = put(b"", f"bytes */{2 * part}")
    assert status.status_code == 200 and status.json()["generation"] == done.json()["generation"]
    assert status.json()["size"] == str(2 * part)

    cancelled = requests.post(
        f"{embedded.endpoint}/upload/storage/v1/b/{bucket}/o",
        params={"uploadType": "resumable", "name": "c"},
        json={"name": "c"},
        timeout=10,
    ).headers["Location"]
    requests.put(cancelled, data=b"c" * part, headers={"Content-Range": f"bytes 0-{part - 1}/*"}, timeout=10)
    assert requests.delete(cancelled, timeout=10).status_code == 499
    assert requests.put(cancelled, headers={"Content-Range": "bytes */*"}, timeout=10).status_code == 404
    assert requests.delete(cancelled, timeout=10).status_code == 404


def test_stock_emulator_ignores_if_generation_match():
    with GcsEmulator(external=False, enforce_preconditions=False) as emu:
        emu.make_bucket("b")
        fs = emu.filesystem()
        fs.pipe("b/k", b"v1", mode="create")
        fs.pipe("b/k", b"v2", mode="create")  # real GCS: 412
        assert fs.cat("b/k") == b"v2"


# --------------------------------------------------------------------- listing cache


def test_listing_cache_goes_stale_across_instances(gcs_emulator, bucket):
    writer = gcs_emulator.filesystem()
    reader = gcs_emulator.filesystem()  # separate instance = separate dircache
    d = f"{bucket}/ckpts"

    writer.pipe(f"{d}/a", b"1")
    assert reader.ls(d) == [f"{d}/a"]  # populates reader's cache

    writer.pipe(f"{d}/b", b"22")
    assert reader.ls(d) == [f"{d}/a"]  # STALE
    assert reader.find(d) == [f"{d}/a", f"{d}/b"]  # find always lists
    assert reader.glob(f"{d}/*") == [f"{d}/a", f"{d}/b"]  # glob uses find
    assert reader.ls(d, refresh=True) == [f"{d}/a", f"{d}/b"]

    # info()/exists() are answered from the cached parent listing too:
    writer.pipe(f"{d}/a", b"111111")
    assert reader.info(f"{d}/a")["size"] == 1  # STALE size (and crc32c)
    writer.rm(f"{d}/b")
    assert reader.exists(f"{d}/b")  # STALE: deleted by the other writer
    with pytest.raises(FileNotFoundError):
        reader.cat(f"{d}/b")  # data reads never use the cache

    reader.invalidate_cache()  # or invalidate_cache(d)
    assert reader.ls(d) == [f"{d}/a"]
    assert not reader.exists(f"{d}/b")
    assert reader.info(f"{d}/a")["size"] == 6
    assert reader.info(f"{d}/a")["crc32c"] == crc32c_b64(b"111111")

    nocache = gcs_emulator.filesystem(use_listings_cache=False)
    nocache.ls(d)
    writer.pipe(f"{d}/c", b"3")
    assert nocache.ls(d) == [f"{d}/a", f"{d}/c"]


def test_same_storage_options_share_one_instance_and_cache(gcs_emulator, bucket):
    opts = gcs_emulator.storage_options()
    f1 = fsspec.filesystem("gs", **opts)
    f2 = fsspec.filesystem("gs", **opts)
    assert f1 is f2  # fsspec instance cache: same process never sees staleness
    f1.ls(bucket)
    f2.pipe(f"{bucket}/new", b"x")  # writes through the instance update its cache
    assert f"{bucket}/new" in f1.ls(bucket)


# --------------------------------------------------------------------- rm / mv


def test_rm(fs, bucket):
    fs.pipe({f"{bucket}/d/1": b"1", f"{bucket}/d/2": b"2", f"{bucket}/keep": b"k"})
    fs.rm(f"{bucket}/d/1")
    assert fs.find(bucket) == [f"{bucket}/d/2", f"{bucket}/keep"]
    fs.rm(f"{bucket}/d", recursive=True)  # batch delete endpoint
    assert fs.find(bucket) == [f"{bucket}/keep"]
    with pytest.raises(FileNotFoundError):
        fs.rm(f"{bucket}/nope")


def test_mv_falls_back_to_copy_delete_after_retrying_501(
    embedded, fs, bucket, monkeypatch
):
    backoff = record_gcsfs_backoff(monkeypatch)
    fs.pipe(f"{bucket}/src", b"payload")
    embedded.requests.clear()
    fs.mv(f"{bucket}/src", f"{bucket}/dst")
    assert fs.cat(f"{bucket}/dst") == b"payload"
    assert not fs.exists(f"{bucket}/src")
    # moveTo is not implemented (HTTP 501, which gcsfs counts as retriable):
    # 6 attempts with 1+2+4+8+16 s (+jitter) backoff ~ 31-36 s of real time,
    # then gcsfs logs a warning and falls back to rewriteTo + DELETE.
    move = [p for m, p in embedded.requests if "/moveTo/" in p]
    assert len(move) == 6
    assert len(backoff) == 5 and sum(backoff) >= 31
    assert any("/rewriteTo/" in p for m, p in embedded.requests)
    assert ("DELETE", f"/storage/v1/b/{bucket}/o/src") in embedded.requests

    # copy + rm is the fast path on the emulator.
    backoff.clear()
    fs.copy(f"{bucket}/dst", f"{bucket}/dst2")
    fs.rm(f"{bucket}/dst")
    assert fs.cat(f"{bucket}/dst2") == b"payload" and backoff == []


# --------------------------------------------------------------------- errors


def test_missing_bucket_and_object_raise_file_not_found(fs, bucket, tmp_path):
    missing = f"nobucket-{uuid.uuid4().hex[:8]}"
    for call in (
        lambda: fs.cat(f"{missing}/x"),
        lambda: fs.info(f"{missing}/x"),
        lambda: fs.ls(missing),
        lambda: fs.info(missing),
        lambda: fs.pipe(f"{missing}/x", b"1"),
        lambda: fs.cat(f"{bucket}/nope"),
        lambda: fs.info(f"{bucket}/nope"),
        lambda: fs.ls(f"{bucket}/nodir"),
        lambda: fs.rm(f"{bucket}/nope"),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (5 * MiB))
    with pytest.raises(FileNotFoundError):
        fs.put_file(str(big), f"{missing}/x")  # resumable initiation 404
    assert not fs.exists(f"{missing}/x")
    assert not fs.exists(f"{bucket}/nope")


# status -> (exception type, gcsfs.retry.is_retriable, attempts made by gcsfs)
ERROR_TABLE = {
    500: (gcsfs.retry.HttpError, True, 6),
    503: (gcsfs.retry.HttpError, True, 6),
    504: (gcsfs.retry.HttpError, True, 6),
    429: (gcsfs.retry.HttpError, True, 6),
    408: (gcsfs.retry.HttpError, True, 6),
    502: (requests.exceptions.ProxyError, True, 6),
    401: (gcsfs.retry.HttpError, False, 1),
    400: (gcsfs.retry.HttpError, False, 1),
    409: (gcsfs.retry.HttpError, False, 1),
    403: (OSError, False, 1),  # plain OSError("Forbidden: ..."), not PermissionError
    404: (FileNotFoundError, False, 1),
    412: (FileExistsError, False, 1),
}


@pytest.mark.parametrize("status", sorted(ERROR_TABLE))
def test_http_error_classes_and_internal_retries(
    embedded, fs, bucket, monkeypatch, status
):
    backoff = record_gcsfs_backoff(monkeypatch)
    fs.pipe(f"{bucket}/obj", b"data")
    exc_type, retriable, attempts = ERROR_TABLE[status]
    embedded.requests.clear()
    embedded.inject_fault(status, times=100, path_contains="/o/obj")
    with pytest.raises(Exception) as ei:
        fs.cat(f"{bucket}/obj")
    assert type(ei.value) is exc_type
    if exc_type is gcsfs.retry.HttpError:
        assert ei.value.code == status
    assert gcsfs.retry.is_retriable(ei.value) is retriable
    assert len(embedded.requests) == attempts
    assert len(backoff) == attempts - 1


def test_bad_request_mentioning_invalid_becomes_value_error(embedded, fs, bucket):
    fs.pipe(f"{bucket}/obj", b"data")
    embedded.inject_fault(400, path_contains="/o/obj", message="invalid argument")
    with pytest.raises(ValueError, match="Bad Request"):
        fs.cat(f"{bucket}/obj")


def test_dropped_connection_is_aiohttp_client_error(embedded, fs, bucket, monkeypatch):
    backoff = record_gcsfs_backoff(monkeypatch)
    fs.pipe(f"{bucket}/obj", b"data")
    embedded.requests.clear()
    embedded.inject_fault(0, times=100, path_contains="/o/obj")
    with pytest.raises(aiohttp.ClientError) as ei:
        fs.cat(f"{bucket}/obj")
    assert gcsfs.retry.is_retriable(ei.value)
    assert len(backoff) == 5
    # aiohttp itself re-sends an idempotent request once on a dropped
    # keep-alive connection, so the server sees up to 12 requests.
    assert 6 <= len(embedded.requests) <= 12


def test_transient_errors_are_absorbed_by_gcsfs(embedded, fs, bucket, monkeypatch):
    backoff = record_gcsfs_backoff(monkeypatch)
    embedded.inject_fault(503, times=2, method="POST")
    fs.pipe(f"{bucket}/ok", b"x" * 100)
    assert fs.cat(f"{bucket}/ok") == b"x" * 100
    assert len(backoff) == 2

    # ...including a failed chunk in the middle of a resumable upload.
    data = os.urandom(12 * MiB)
    backoff.clear()
    embedded.requests.clear()
    embedded.inject_fault(429, times=1, method="POST", path_contains="upload_id")
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        fs.put_file(f.name, f"{bucket}/resumable", chunksize=4 * MiB)
    assert fs.cat(f"{bucket}/resumable") == data
    assert len(backoff) == 1
    assert len([p for m, p in embedded.requests if "upload_id=" in p]) == 4


def test_internal_retry_count_is_configurable_only_by_redecorating(
    embedded, fs, bucket, monkeypatch
):
    backoff = record_gcsfs_backoff(monkeypatch)
    fs.pipe(f"{bucket}/obj", b"data")

    fs.retries = 1  # no effect: count was bound at class definition
    embedded.requests.clear()
    embedded.inject_fault(503, times=100, path_contains="/o/obj")
    with pytest.raises(gcsfs.retry.HttpError):
        fs.cat(f"{bucket}/obj")
    assert len(embedded.requests) == 6

    set_gcsfs_retries(monkeypatch, 2)
    embedded.requests.clear()
    backoff.clear()
    with pytest.raises(gcsfs.retry.HttpError):
        fs.cat(f"{bucket}/obj")
    assert len(embedded.requests) == 2 and len(backoff) == 1


# --------------------------------------------------------------------- external emulator


@pytest.mark.parametrize("with_scheme", [True, False])
def test_honours_external_storage_emulator_host(embedded, monkeypatch, with_scheme):
    host = embedded.endpoint if with_scheme else embedded.endpoint[len("http://") :]
    monkeypatch.setenv(EMULATOR_ENV_VAR, host)
    with GcsEmulator() as ext:
        assert ext.is_external
        assert ext.endpoint == embedded.endpoint
        ext.make_bucket("ext-bucket")
        ext.make_bucket("ext-bucket")  # idempotent
        embedded.requests.clear()
        fs = ext.filesystem()
        fs.pipe("ext-bucket/k", b"v")
        assert embedded.requests  # traffic went to the already-running server
        with pytest.raises(RuntimeError):
            ext.inject_fault(503)

        # gcsfs itself also reads the env var when no endpoint_url is given.
        bare = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
        assert bare.cat("ext-bucket/k") == b"v"

        ext.wipe(keep_buckets=True)  # HTTP /wipe on an external emulator
        fs.invalidate_cache()
        assert fs.find("ext-bucket") == []
    assert embedded.running  # stopping the external handle leaves it alone


def test_stop_releases_port():
    emu = GcsEmulator(external=False, default_bucket="d").start()
    fs = emu.filesystem()
    fs.pipe("d/k", b"1")
    endpoint = emu.endpoint
    emu.stop()
    assert not emu.running
    with pytest.raises(RuntimeError):
        emu.endpoint
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint + "/", timeout=2)
