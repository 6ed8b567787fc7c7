"""cloudckpt.s3_transport: the s3:// data path, against SeaweedFS (disk-backed, checks checksums) and moto.

SeaweedFS validates ``x-amz-checksum-crc32c`` (PutObject, UploadPart and a
FULL_OBJECT CompleteMultipartUpload) and answers ``BadDigest``; moto 5 stores
and answers without checking. So the corruption tests run on SeaweedFS, with
the fault proxy flipping one byte of an upload body on its way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

import google_crc32c
import numpy as np
import pytest

import cloudckpt
from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
from cloudckpt.errors import RemoteError
from cloudckpt.manifest import crc32c_of_file
from cloudckpt.remote import RemoteStore
from cloudckpt.retry import RetryPolicy
from cloudckpt import s3_transport
from cloudckpt.s3_transport import LocalFileChanged, S3Transport, crc32c_combine, transport_for
from support.fault_proxy import FaultProxy

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05, seed=0)


@pytest.fixture
def seaweed_bucket(seaweed_server):
    bucket = f"tr-{uuid.uuid4().hex[:10]}"
    seaweed_server.create_bucket(bucket)
    return bucket


@pytest.fixture
def transport(seaweed_server) -> S3Transport:
    t = transport_for(seaweed_server.storage_options, part_size=5 * MiB, multipart_threshold=5 * MiB,
                      range_size=3 * MiB)
    assert t is not None
    yield t
    t.close()


def write(path, size: int, seed: int = 0) -> str:
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return str(path)


# -- pure parts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 1, 4095, 4096, 100_000])
def test_crc32c_combine_equals_crc_of_concatenation(split):
    data = np.random.default_rng(split).bytes(100_001)
    a, b = data[:split], data[split:]
    assert crc32c_combine(google_crc32c.value(a), google_crc32c.value(b), len(b)) == google_crc32c.value(data)


@pytest.mark.parametrize("etag, md5", [
    ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    ('"0123456789abcdef0123456789abcdef"', "0123456789abcdef0123456789abcdef"),  # S3 quotes its ETags
    ("0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcdef"),  # some stores write upper case
    ('"0123456789abcdef0123456789abcdef-3"', None),  # multipart: not the MD5 of the bytes
    ("0123456789abcdef0123456789abcde", None),  # 31 digits
    ("0123456789abcdef0123456789abcdeg", None),
    ('W/"0123456789abcdef0123456789abcdef"', None),
    ("", None),
    (None, None),
])
def test_etag_md5_is_the_md5_a_plain_etag_states(etag, md5):
    assert s3_transport.etag_md5(etag) == md5


@pytest.mark.parametrize("offset, length", [(0, None), (0, 0), (0, 3 * MiB + 5), (1234, None), (1234, MiB + 1),
                                            (3 * MiB + 5, None)])
def test_md5_of_file_is_the_md5_of_the_bytes_it_names(tmp_path, offset, length):
    data = np.random.default_rng(1).bytes(3 * MiB + 5)
    path = write(tmp_path / "f", len(data), seed=1)
    want = hashlib.md5(data[offset:None if length is None else offset + length]).hexdigest()
    assert s3_transport.md5_of_file(path, offset, length) == want
    with open(path, "rb") as f:
        f.seek(7)
        assert s3_transport.md5_of_file(f.fileno(), offset, length) == want
        assert f.tell() == 7  # the descriptor's position is left alone


def test_md5_of_file_past_the_end_of_a_file_is_an_error(tmp_path):
    path = write(tmp_path / "f", 100)
    with pytest.raises(OSError, match="ended at byte 100 of 101"):
        s3_transport.md5_of_file(path, 0, 101)
    with pytest.raises(FileNotFoundError):
        s3_transport.md5_of_file(str(tmp_path / "missing"))


def test_storage_options_map_to_the_transport(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    t = transport_for({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9",
                                                                     "region_name": "eu-west-3"}})
    assert t is not None and t.region == "eu-west-3" and "127.0.0.1:9" in repr(t)
    assert transport_for({"anon": True, "endpoint_url": "http://127.0.0.1:9"}) is not None
    assert transport_for({"username": "k", "password": "s", "endpoint_url": "http://127.0.0.1:9",
                          "use_listings_cache": False}) is not None
    # Options the transport cannot honour leave the data path on s3fs.
    assert transport_for({"key": "k", "secret": "s", "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms"}}) \
        is None
    assert transport_for({"key": "k", "secret": "s", "client_kwargs": {"proxies": {"https": "x"}}}) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert transport_for({"key": "k", "secret": "s"}) is None


def test_no_credentials_anywhere_leaves_s3fs_in_charge(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    assert transport_for({"endpoint_url": "http://127.0.0.1:9"}) is None


def test_environment_credentials_are_read_again_when_the_environment_changes(monkeypatch, tmp_path):
    """Transports share a botocore session (creating one costs 5-12 ms of CPU per store) while the AWS_*
    environment stays the same; new environment credentials are what the next transport signs with."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    first, again = (transport_for({"endpoint_url": "http://127.0.0.1:9"}) for _ in range(2))
    assert first._credentials()[:2] == again._credentials()[:2] == ("first-key", "first-secret")
    assert s3_transport._botocore_session(None) is s3_transport._botocore_session(None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated-secret")
    assert transport_for({"endpoint_url": "http://127.0.0.1:9"})._credentials()[:2] == ("rotated-key",
                                                                                          "rotated-secret")
    assert not any("rotated" in key for key in s3_transport._SESSIONS.keys())  # keys are hashes


def test_keys_rotated_in_the_credentials_file_are_read_again(monkeypatch, tmp_path):
    """A credentials file rewritten (a sidecar rotating keys) gives the next transport a new session, which
    reads the new keys: the shared session is keyed by the file's modification time and size too."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY",
                 "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "credentials"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    credentials.write_text("[default]\naws_access_key_id = first-key\naws_secret_access_key = first-secret\n")
    assert transport_for({"endpoint_url": "http://127.0.0.1:9"})._credentials()[:2] == ("first-key", "first-secret")
    credentials.write_text("[default]\naws_access_key_id = rotated-key-2\naws_secret_access_key = rotated-secret\n")
    stat = credentials.stat()
    os.utime(credentials, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a coarse clock: still newer
    assert transport_for({"endpoint_url": "http://127.0.0.1:9"})._credentials()[:2] == ("rotated-key-2",
                                                                                          "rotated-secret")


@pytest.mark.parametrize("kwargs", [{"part_size": 1 << 20}, {"parts_in_flight": 0}, {"range_size": 10},
                                    {"ranges_in_flight": "4"}, {"multipart_threshold": 1 << 20},
                                    {"multipart_threshold": 6 << 30}, {"multipart_threshold": True},
                                    {"part_size": 6 << 30}, {"part_size": True}])
def test_sizes_are_validated(kwargs):
    with pytest.raises(cloudckpt.ConfigError):
        transport_for({"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9"}, **kwargs)


# -- against SeaweedFS ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1000, 12 * MiB + 7])  # empty, one PUT, three parts
def test_roundtrip_with_full_object_crc32c(transport, seaweed_bucket, tmp_path, size):
    src = write(tmp_path / "src", size, seed=size)
    transport.put_file(src, seaweed_bucket, "d/obj", create=True)
    head = transport.head(seaweed_bucket, "d/obj")
    assert {k: head[k] for k in ("size", "crc32c")} == {"size": size, "crc32c": crc32c_of_file(src)[1]}  # the store checked and keeps the file's crc
    seen = []
    assert transport.get_file(seaweed_bucket, "d/obj", str(tmp_path / "back"), progress=seen.append) == size
    assert (tmp_path / "back").read_bytes() == (tmp_path / "src").read_bytes()
    assert sum(seen) == size


def _manifest_ranges(path: str, part: int = 8 * MiB) -> list[tuple[int, int, int]]:
    """(start, end, crc32c) of each ``part``-byte range of ``path``, as a manifest records them."""
    data = open(path, "rb").read()
    return [(a, min(len(data), a + part), google_crc32c.value(data[a:a + part])) for a in range(0, len(data), part)]


@pytest.mark.parametrize("size", [1000, 20 * MiB + 3])  # one PUT; parts of 16 and 4 MiB (two 8 MiB ranges each)
def test_uploads_send_the_manifest_checksums_without_reading_the_file_again(seaweed_server, seaweed_bucket,
                                                                         tmp_path, size, monkeypatch):
    """Given the checksums the manifest recorded, the transport sends them (the store checks every part
    and the whole object against them) instead of checksumming the file a second time, and a file that
    changed since (same size) is refused by the store, not stored under the manifest's checksum. A part
    size the ranges do not make up (5 MiB) is honoured: those parts are read."""
    import cloudckpt.s3_transport as s3_transport

    transport = transport_for(seaweed_server.storage_options, part_size=16 * MiB, multipart_threshold=16 * MiB)
    src = write(tmp_path / "src", size, seed=3)
    ranges = _manifest_ranges(src) if size > 8 * MiB else [(0, size, google_crc32c.value(open(src, "rb").read()))]
    reads: list[int] = []
    real = s3_transport._crc32c_of_range
    monkeypatch.setattr(s3_transport, "_crc32c_of_range", lambda fd, o, n: reads.append(n) or real(fd, o, n))
    transport.put_file(src, seaweed_bucket, "obj", create=True, checksums=ranges)
    assert reads == []
    assert transport.head(seaweed_bucket, "obj")["crc32c"] == crc32c_of_file(src)[1]
    transport.get_file(seaweed_bucket, "obj", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == (tmp_path / "src").read_bytes()

    changed = write(tmp_path / "changed", size, seed=4)  # same size, other bytes, the old checksums
    with pytest.raises(LocalFileChanged, match=r"changed after its checksum was taken for the manifest"):
        transport.put_file(changed, seaweed_bucket, "obj2", create=True, checksums=ranges)  # not retried
    with pytest.raises(FileNotFoundError):
        transport.head(seaweed_bucket, "obj2")
    assert seaweed_server.client().list_multipart_uploads(Bucket=seaweed_bucket).get("Uploads") in (None, [])
    with pytest.raises(ValueError):
        transport.put_file(src, seaweed_bucket, "obj3", checksums=ranges[:-1])  # not covering the file
    if size > 16 * MiB:
        small = transport_for(seaweed_server.storage_options, part_size=5 * MiB, multipart_threshold=5 * MiB)
        reads.clear()
        small.put_file(src, seaweed_bucket, "obj4", create=True, checksums=ranges)
        assert len(reads) == 5 and transport.head(seaweed_bucket, "obj4")["crc32c"] == crc32c_of_file(src)[1]
        small.close()
    transport.close()


def test_a_file_changed_after_its_manifest_names_the_part_that_changed(seaweed_server, seaweed_bucket, tmp_path):
    """A file sent in one PUT (under the multipart threshold) whose bytes changed after the manifest took
    their checksums: the store refuses it, and ``LocalFileChanged`` names the manifest's 8 MiB part that
    differs, not the whole file (a review's finding)."""
    src = write(tmp_path / "src", 20 * MiB + 3, seed=6)
    ranges = _manifest_ranges(src)
    data = bytearray((tmp_path / "src").read_bytes())
    data[12 * MiB] ^= 1
    (tmp_path / "src").write_bytes(bytes(data))
    transport = transport_for(seaweed_server.storage_options)
    with pytest.raises(LocalFileChanged) as info:
        transport.put_file(src, seaweed_bucket, "obj", create=True, checksums=ranges)
    assert f"bytes {8 * MiB}-{16 * MiB - 1} have crc32c" in str(info.value)
    assert "(1 of the 3 checksummed ranges sent differ)" in str(info.value)
    with pytest.raises(FileNotFoundError):
        transport.head(seaweed_bucket, "obj")
    transport.close()


def test_files_below_the_multipart_threshold_go_in_one_put(seaweed_server, seaweed_bucket, tmp_path):
    """A file smaller than ``multipart_threshold`` is one PutObject even when it spans several parts (the
    store's ETag is an MD5, no ``-N``); one of at least that size is a multipart upload of ``part_size`` parts
    (boto3's ``multipart_threshold`` semantics). Both keep the file's own crc32c as the stored checksum."""
    src = write(tmp_path / "src", 12 * MiB + 7, seed=5)
    crc = crc32c_of_file(src)[1]
    with FaultProxy(seaweed_server.endpoint) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        for threshold, key, parts in ((13 * MiB, "below", 0), (12 * MiB + 7, "at", 3), (5 * MiB, "above", 3)):
            transport = transport_for(options, part_size=5 * MiB, multipart_threshold=threshold)
            start = len(proxy.events)
            transport.put_file(src, seaweed_bucket, key, create=True)
            puts = [p for m, p, _ in proxy.events[start:] if m == "PUT"]
            assert len([p for p in puts if "partNumber=" in p]) == parts, (key, puts)
            assert len(puts) == max(parts, 1)
            head = transport.head(seaweed_bucket, key)
            assert head["crc32c"] == crc and head["size"] == 12 * MiB + 7
            assert head["etag"].endswith("-3") is bool(parts), head["etag"]
            transport.close()
    direct = transport_for(seaweed_server.storage_options)
    assert direct.get_file(seaweed_bucket, "below", str(tmp_path / "back")) == 12 * MiB + 7
    assert (tmp_path / "back").read_bytes() == (tmp_path / "src").read_bytes()
    direct.close()


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_create_only_refuses_an_existing_object_and_aborts(transport, seaweed_server, seaweed_bucket, tmp_path, size):
    first, second = write(tmp_path / "a", size, 1), write(tmp_path / "b", size, 2)
    transport.put_file(first, seaweed_bucket, "obj", create=True)
    with pytest.raises(FileExistsError):
        transport.put_file(second, seaweed_bucket, "obj", create=True)
    transport.get_file(seaweed_bucket, "obj", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == (tmp_path / "a").read_bytes()
    assert seaweed_server.client().list_multipart_uploads(Bucket=seaweed_bucket).get("Uploads") in (None, [])
    transport.put_file(second, seaweed_bucket, "obj")  # without create: replaced
    assert transport.head(seaweed_bucket, "obj")["crc32c"] == crc32c_of_file(second)[1]


def test_missing_object_and_bucket(transport, seaweed_bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        transport.head(seaweed_bucket, "nothing")
    with pytest.raises(FileNotFoundError):
        transport.get_file(seaweed_bucket, "nothing", str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        transport.put_file(write(tmp_path / "a", 10), f"no-{uuid.uuid4().hex[:8]}", "obj")


def test_wrong_secret_is_a_clear_error_without_the_secret(seaweed_server, seaweed_bucket, tmp_path):
    secret = "wrong-secret-" + uuid.uuid4().hex
    store = RemoteStore(f"s3://{seaweed_bucket}/run", {**seaweed_server.storage_options, "secret": secret},
                        retry=FAST_RETRY)
    with pytest.raises(RemoteError) as info:
        store.put_file(write(tmp_path / "a", 100), "obj")
    text = f"{info.value} {info.value.__cause__!r}"
    assert secret not in text
    assert "SignatureDoesNotMatch" in text or "AccessDenied" in text


def test_store_checksums_back_verify(seaweed_server, seaweed_bucket, tmp_path):
    """verify compares the store's own crc32c (no download) and confirms a mismatch by reading the bytes."""
    url, options = f"s3://{seaweed_bucket}/run", seaweed_server.storage_options
    files = {"model.ckpt-1.index": write(tmp_path / "i", 100), "model.ckpt-1.data-00000-of-00001":
             write(tmp_path / "d", 11 * MiB)}
    store = RemoteStore(url, options)
    commit_checkpoint(store, LocalCheckpoint(1, "model.ckpt-1", files))
    [info] = cloudckpt.list_checkpoints(url, options)
    stored = store.stored_crc32c()
    assert all(stored[f.name] == f.crc32c for f in info.files)
    read = []
    from cloudckpt.restore import verify_checkpoint

    assert verify_checkpoint(store, info, read.append, use_store_checksums=True).ok and sum(read) == 0
    assert verify_checkpoint(store, info, read.append, use_store_checksums=False).ok and sum(read) == 11 * MiB + 100


@pytest.mark.parametrize("checksums", [True, False], ids=["crc32c", "store-without-checksums"])
@pytest.mark.parametrize("size", [64 << 10, 11 * MiB])  # flipped in a PutObject / in an UploadPart
def test_corrupted_upload_body_is_rejected_and_resent(seaweed_server, seaweed_bucket, tmp_path, size, checksums):
    """The proxy inverts one byte of the data file's upload: SeaweedFS answers BadDigest, the retry policy
    sends it again, and the committed checkpoint verifies byte for byte. Behind a proxy refusing S3's
    checksum headers (a store without them, 501 NotImplemented) the bodies carry Content-MD5 instead, which
    SeaweedFS checks the same way (review: the flipped byte was committed)."""
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        proxy.refuse_checksums(not checksums)
        proxy.set_faults(only_methods=("PUT",), path_filter=r"\.data-00000")
        proxy.fail_next("flip")
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        url = f"s3://{seaweed_bucket}/run"
        causes: list[str] = []
        store = RemoteStore(url, options, retry=FAST_RETRY, on_retry=causes.append,
                            transfer=cloudckpt.TransferOptions(part_size=5 * MiB, multipart_threshold=5 * MiB))
        files = {"model.ckpt-3.index": write(tmp_path / "i", 100),
                 "model.ckpt-3.data-00000-of-00001": write(tmp_path / "d", size)}
        assert commit_checkpoint(store, LocalCheckpoint(3, "model.ckpt-3", files)).outcome == "uploaded"
        assert proxy.stats.get("flip") == 1
        assert bool(proxy.stats.get("refused_checksums")) is not checksums
    assert causes == ["BadDigest"]
    report = cloudckpt.verify(url, storage_options=seaweed_server.storage_options, use_store_checksums=False)
    assert report.ok and sorted(f.name for f in report.files) == sorted(files)


def test_a_corrupted_download_is_caught_by_the_checksum_of_the_bytes_written(seaweed_server, seaweed_bucket,
                                                                           tmp_path, caplog):
    """The proxy inverts one byte of one ranged GET's body: the crc32c the transport returns is that of the file
    as written (so no read-back is needed). A restore downloads a file that does not match its manifest again
    (a byte corrupted on the way is not there the next time: the restore succeeds, with a WARNING) and refuses
    the checkpoint (IntegrityError) only when every download differs (rot in the store)."""
    files = {"model.ckpt-4.index": write(tmp_path / "i", 100),
             "model.ckpt-4.data-00000-of-00001": write(tmp_path / "d", 7 * MiB + 5)}
    url = f"s3://{seaweed_bucket}/run"
    commit_checkpoint(RemoteStore(url, seaweed_server.storage_options), LocalCheckpoint(4, "model.ckpt-4", files))
    expected = crc32c_of_file(files["model.ckpt-4.data-00000-of-00001"])
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        transport = transport_for(options, range_size=2 * MiB)
        proxy.set_faults(only_methods=("GET",), path_filter=r"\.data-00000")
        proxy.fail_next("flip_response")
        back = str(tmp_path / "back")
        size, crc = transport.get_file_crc32c(seaweed_bucket, "run/model.ckpt-4.data-00000-of-00001", back)
        transport.close()
        assert proxy.stats.get("flip_response") == 1
        assert size == expected[0] and crc != expected[1] and crc32c_of_file(back) == (size, crc)
        proxy.fail_next("flip_response")
        with caplog.at_level(logging.WARNING, logger="cloudckpt"):
            cloudckpt.download_checkpoint(url, str(tmp_path / "once"), storage_options=options)
        assert proxy.stats.get("flip_response") == 2
        assert (tmp_path / "once" / "model.ckpt-4.data-00000-of-00001").read_bytes() == (tmp_path / "d").read_bytes()
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "download 2 of 3 matches its manifest" in warned[0], warned
        proxy.set_faults(error_rate=1.0, kinds=("flip_response",), only_methods=("GET",), path_filter=r"\.data-00000")
        with pytest.raises(cloudckpt.IntegrityError, match="crc32c.*in each of 3 downloads"):
            cloudckpt.download_checkpoint(url, str(tmp_path / "restored"), storage_options=options)
        assert proxy.stats.get("flip_response") >= 2 + 3  # three downloads of the file, each corrupted
    assert not (tmp_path / "restored" / "model.ckpt-4.index").exists()
    cloudckpt.download_checkpoint(url, str(tmp_path / "restored"), storage_options=seaweed_server.storage_options)
    assert (tmp_path / "restored" / "model.ckpt-4.data-00000-of-00001").read_bytes() == (tmp_path / "d").read_bytes()


def test_a_download_has_its_disk_blocks_before_its_bytes_arrive(seaweed_server, seaweed_bucket, tmp_path):
    """A download allocates its file's blocks up front (fallocate): while the bytes still come in (the proxy lets
    2 MiB/s through), the file already holds all of its 6 MiB on disk, and the download's crc32c is the file's.
    Without it, ext4 allocated block by block as bytes were written (the file held what had arrived so far)."""
    size = 6 * MiB
    src = write(tmp_path / "src", size, seed=3)
    transport_for(seaweed_server.storage_options).put_file(src, seaweed_bucket, "slow")
    back = tmp_path / "back"
    arrived = [0]
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        proxy.set_bandwidth(2 * MiB)
        transport = transport_for({**seaweed_server.storage_options, "endpoint_url": proxy.url})
        result: list = []
        thread = threading.Thread(target=lambda: result.append(transport.get_file_crc32c(
            seaweed_bucket, "slow", str(back), progress=lambda n: arrived.__setitem__(0, arrived[0] + n))))
        thread.start()
        allocated_when = None
        while thread.is_alive() and allocated_when is None:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(back).st_blocks * 512 >= size:
                    allocated_when = arrived[0]
            time.sleep(0.005)
        thread.join()
        transport.close()
    assert allocated_when is not None and allocated_when < size // 2, (allocated_when, arrived[0])
    assert result == [crc32c_of_file(src)]


def test_a_download_larger_than_the_disk_fails_before_any_byte(seaweed_server, seaweed_bucket, tmp_path):
    """A file listed larger than the local file system (here tmpfs: /dev/shm) fails at once with ENOSPC, no GET
    sent and nothing of it left allocated: not after downloading what fits and filling the disk."""
    shm = os.statvfs("/dev/shm")
    if not shm.f_blocks:  # mounted without a size limit (size=0): no size is too large for it
        pytest.skip("/dev/shm has no size limit here")
    too_large = shm.f_blocks * shm.f_frsize + 64 * MiB
    transport_for(seaweed_server.storage_options).put_file(write(tmp_path / "small", 100), seaweed_bucket, "big")
    target = f"/dev/shm/cloudckpt-test-{uuid.uuid4().hex}"
    try:
        with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
            transport = transport_for({**seaweed_server.storage_options, "endpoint_url": proxy.url})
            with pytest.raises(OSError) as raised:
                transport.get_files_crc32c(seaweed_bucket, [("big", target, too_large)], streams=2)
            transport.close()
            requests = [e for e in proxy.events if e[0] == "GET"]
        assert raised.value.errno == errno.ENOSPC, raised.value
        assert requests == []
        assert os.stat(target).st_blocks == 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)


def test_a_restore_sizes_files_by_the_listing_and_follows_an_object_replaced_since(seaweed_server, seaweed_bucket,
                                                                                   tmp_path):
    """``download_checkpoint`` sends no HEAD: a file listed at its manifest's size is downloaded by ranged GETs
    at once. Given a size the store's object no longer has (replaced after the listing: larger, smaller or
    empty), the transport HEADs it and downloads it as it is now, its progress counted once."""
    files = {"model.ckpt-4.index": write(tmp_path / "i", 100),
             "model.ckpt-4.data-00000-of-00001": write(tmp_path / "d", 7 * MiB + 5)}
    url = f"s3://{seaweed_bucket}/run"
    commit_checkpoint(RemoteStore(url, seaweed_server.storage_options), LocalCheckpoint(4, "model.ckpt-4", files))
    with FaultProxy(seaweed_server.endpoint) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        cloudckpt.download_checkpoint(url, str(tmp_path / "restored"), storage_options=options)
        requests = [(m, p) for m, p, _ in proxy.events if "/run/model.ckpt-4." in p]
    assert not [r for r in requests if r[0] == "HEAD"], requests
    assert len([r for r in requests if r[0] == "GET"]) >= 2, requests
    assert (tmp_path / "restored" / "model.ckpt-4.data-00000-of-00001").read_bytes() == (tmp_path / "d").read_bytes()
    transport = transport_for(seaweed_server.storage_options, range_size=2 * MiB)
    for size in (5 * MiB + 3, 9 * MiB, 0):
        now = write(tmp_path / f"now-{size}", size, seed=size % 97)
        transport.put_file(now, seaweed_bucket, f"replaced-{size}")
        progress: list[int] = []
        back = tmp_path / f"back-{size}"
        got = transport.get_file_crc32c(seaweed_bucket, f"replaced-{size}", str(back), size=7 * MiB + 5,
                                        progress=progress.append)
        assert got == crc32c_of_file(now), size
        assert back.read_bytes() == (tmp_path / f"now-{size}").read_bytes() and sum(progress) == size
    transport.close()


def test_pooled_reads_name_the_object_that_failed_and_pass_over_one_deleted(seaweed_server, seaweed_bucket, tmp_path):
    """``crc32c_of_objects`` (a verify's re-read): per-part crc32c as ``crc32c_of_object``, None for an object
    deleted since the listing; an object of another size than listed raises ``DownloadFailed`` naming it, as
    does one missing from a download (``get_files_crc32c``)."""
    from cloudckpt.manifest import crc32c_parts_of_stream
    from cloudckpt.s3_transport import DownloadFailed

    a, b = write(tmp_path / "a", 3 * MiB + 1, seed=1), write(tmp_path / "b", 100, seed=2)
    transport = transport_for(seaweed_server.storage_options, range_size=1 * MiB)
    transport.put_file(a, seaweed_bucket, "a")
    transport.put_file(b, seaweed_bucket, "b")
    with open(a, "rb") as f:
        _, crc_a, parts_a = crc32c_parts_of_stream(f, 1 * MiB)
    got = transport.crc32c_of_objects(seaweed_bucket, [("a", 3 * MiB + 1, 1 * MiB), ("gone", 5, None), ("b", 100, None)],
                                      streams=3)
    assert got == [(crc_a, tuple(parts_a)), None, (crc32c_of_file(b)[1], ())]
    with pytest.raises(DownloadFailed) as failed:
        transport.crc32c_of_objects(seaweed_bucket, [("b", 100, None), ("a", 3 * MiB + 2, None)], streams=2)
    assert failed.value.key == "a" and "ObjectChanged" in str(failed.value.__cause__)
    with pytest.raises(DownloadFailed) as failed:
        transport.get_files_crc32c(seaweed_bucket, [("gone", str(tmp_path / "gone"), 5)], streams=2)
    assert failed.value.key == "gone" and isinstance(failed.value.__cause__, FileNotFoundError)
    transport.close()


def test_transient_faults_are_retried_per_request(seaweed_server, seaweed_bucket, tmp_path):
    """503s on ranged GETs and a reset mid-part: each request is retried, counted by cause, the file is whole."""
    src = write(tmp_path / "src", 13 * MiB)
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        causes: list[str] = []
        store = RemoteStore(f"s3://{seaweed_bucket}/run", options, retry=FAST_RETRY, on_retry=causes.append)
        proxy.set_faults(only_methods=("PUT",), path_filter="partNumber=2")
        proxy.fail_next("reset")
        assert store.put_file_if_absent(src, "big") is True
        proxy.set_faults(only_methods=("GET",))
        proxy.fail_next("503", 2)
        progress: list[int] = []
        store.get_file("big", str(tmp_path / "back"), progress.append)
    assert (tmp_path / "back").read_bytes() == (tmp_path / "src").read_bytes()
    assert sum(progress) == 13 * MiB
    assert causes.count("SlowDown") == 2 and len(causes) == 3, causes


def test_cancel_stops_retrying(seaweed_server, seaweed_bucket, tmp_path):
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        store = RemoteStore(f"s3://{seaweed_bucket}/run", options, on_retry=lambda cause: store.cancel.set(),
                            retry=RetryPolicy(max_attempts=50, initial_backoff=5, max_backoff=5, seed=0))
        proxy.set_faults(error_rate=1.0, kinds=("503",))
        with pytest.raises(RemoteError, match="SlowDown") as info:  # cancelled while waiting to retry
            store.put_file(write(tmp_path / "a", 100), "obj")
        assert info.value.transient and proxy.stats["503"] == 1
        with pytest.raises(RemoteError, match="cancelled"):  # once cancelled, no request is sent
            store.put_file(write(tmp_path / "a", 100), "obj")
        assert proxy.stats["503"] == 1


def test_a_cancelled_multipart_upload_is_aborted_even_when_the_first_abort_fails(seaweed_server, seaweed_bucket,
                                                                                 tmp_path):
    """Cancel cuts a part mid-body; the store, still taking a part in, fails the abort (moto answered 500 so in a CI
    run, leaving the upload open): the abort is sent again, and no multipart upload is left."""
    src = write(tmp_path / "src", 24 * MiB)
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        store = RemoteStore(f"s3://{seaweed_bucket}/run", options, retry=FAST_RETRY,
                            transfer=cloudckpt.TransferOptions(multipart_threshold=8 * MiB, part_size=8 * MiB))
        proxy.set_faults(latency=30.0, only_methods=("PUT",), path_filter="partNumber=")

        def cancel_once_a_part_is_held() -> None:
            while not proxy.most_held.get("PUT"):
                threading.Event().wait(0.01)
            proxy.set_faults(only_methods=("DELETE",))
            proxy.fail_next("500")  # the first abort
            store.cancel_transfers()

        canceller = threading.Thread(target=cancel_once_a_part_is_held, daemon=True)
        canceller.start()
        with pytest.raises(RemoteError, match="cancelled"):
            store.put_file_if_absent(src, "big")
        canceller.join(10)
        deletes = [fault for method, _, fault in proxy.events if method == "DELETE"]
    assert deletes == ["500", None], proxy.events  # failed, then sent again
    client = seaweed_server.client()
    assert client.list_multipart_uploads(Bucket=seaweed_bucket).get("Uploads", []) == []


def test_moto_uses_the_transport_and_its_checksums_are_not_trusted_blindly(moto_server, tmp_path):
    """moto stores a wrong FULL_OBJECT crc32c for multipart uploads: verify re-reads and still finds it intact."""
    bucket = f"tr-{uuid.uuid4().hex[:10]}"
    url = moto_server.create_bucket(bucket) + "/run"
    store = RemoteStore(url, moto_server.storage_options)
    assert store._transport is not None
    files = {"model.ckpt-1.index": write(tmp_path / "i", 100),
             "model.ckpt-1.data-00000-of-00001": write(tmp_path / "d", 20 * MiB)}
    commit_checkpoint(store, LocalCheckpoint(1, "model.ckpt-1", files))
    assert cloudckpt.verify(url, storage_options=moto_server.storage_options).ok
    back = cloudckpt.download_checkpoint(url, str(tmp_path / "dl"), storage_options=moto_server.storage_options)
    assert os.path.getsize(back + ".data-00000-of-00001") == 20 * MiB


@pytest.mark.parametrize("case", ["gap", "short", "small part", "too many parts"])
def test_copying_uploads_refuse_chunks_s3_would_not_accept(tmp_path, case):
    """``put_file_copying`` checks its chunks before any request (the endpoint is closed: a request would
    fail otherwise): they must cover the file, in at most 10,000 parts of at least 5 MiB but the last."""
    from cloudckpt.s3_transport import CopySource

    t = transport_for({"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9"})
    part = 5 * MiB
    count = 10_001 if case == "too many parts" else 3
    size = count * part
    with open(tmp_path / "f", "wb") as f:
        f.truncate(size)  # sparse: nothing is read before the check
    bounds = [(i * part, (i + 1) * part) for i in range(count)]
    if case == "gap":
        bounds[1] = (part + 1, 2 * part)
    elif case == "short":
        bounds[-1] = (bounds[-1][0], size - 1)
    elif case == "small part":
        bounds[0], bounds[1] = (0, part - 1), (part - 1, 2 * part)
    chunks = [(a, b, 0, True) for a, b in bounds]
    expected = "break S3's multipart limits" if "part" in case else "do not cover its"
    with pytest.raises(ValueError, match=expected) as info:
        t.put_file_copying(str(tmp_path / "f"), "bucket", "key", chunks, CopySource("bucket", "old", "e"))
    assert "bucket/key" in str(info.value)


# -- HTTP behaviour against a scripted server ------------------------------------------------------------
class _Scripted:
    """A tiny HTTP/1.1 server on 127.0.0.1: answers PUTs by a rule, records (headers, keep_alive) per request.
    ``answer_put(handler, n)``, if given, answers the ``n``th PUT (1-based) itself (its body already read);
    ``answer_head(handler)`` answers HEADs (else: 405)."""

    def __init__(self, refuse_checksums: bool = False, drop_idle: bool = False,
                 answer_put: Callable[[Any, int], None] | None = None,
                 answer_head: Callable[[Any], None] | None = None) -> None:
        import http.server
        import threading

        self.seen: list[dict[str, str]] = []
        self.heads = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # noqa: ANN002
                pass

            def do_PUT(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.seen.append({k.lower(): v for k, v in self.headers.items()})
                if answer_put is not None:
                    return answer_put(self, len(outer.seen))
                if refuse_checksums and any(k.lower().startswith("x-amz-checksum") for k in self.headers):
                    body = b"<Error><Code>NotImplemented</Code><Message>no checksums here</Message></Error>"
                    self.send_response(501)
                else:
                    body = b""
                    self.send_response(200)
                    self.send_header("ETag", '"x"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if drop_idle:
                    self.close_connection = True  # closes without "Connection: close": a stale kept-alive socket

            def do_HEAD(self) -> None:  # noqa: N802
                outer.heads += 1
                if answer_head is not None:
                    return answer_head(self)
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_store_without_checksums_gets_none_after_refusing_them():
    server = _Scripted(refuse_checksums=True)
    try:
        t = transport_for({"key": "k", "secret": "s", "endpoint_url": server.endpoint})
        t.put_bytes(b"abc", "bucket", "a")
        t.put_bytes(b"def", "bucket", "b")
    finally:
        server.close()
    with_checksum = ["x-amz-checksum-crc32c" in h for h in server.seen]
    assert with_checksum == [True, False, False]


def test_a_store_refusing_checksums_on_a_create_only_write_gets_it_without_them():
    """Refused with both If-None-Match and checksum headers, one attempt without the checksums tells which the
    store refused: here the checksums (the write goes through), so they stay off."""
    server = _Scripted(refuse_checksums=True)
    try:
        t = transport_for({"key": "k", "secret": "s", "endpoint_url": server.endpoint})
        t.put_bytes(b"abc", "bucket", "a", create=True)
        t.put_bytes(b"def", "bucket", "b", create=True)
    finally:
        server.close()
    sent = [("x-amz-checksum-crc32c" in h, h.get("if-none-match")) for h in server.seen]
    assert sent == [(True, "*"), (False, "*"), (False, "*")]


def test_a_store_without_conditional_writes_is_refused_at_once(seaweed_server, seaweed_bucket, tmp_path):
    """A store answering 501 NotImplemented to If-None-Match (review 16, item 6): a ConfigError at the first
    create-only write (PutObject or CompleteMultipartUpload), not retried, naming the store, the object and
    what cloudckpt needs; the checksum headers were not what it refused, so they stay on."""
    bucket = seaweed_bucket
    causes: list[str] = []
    with FaultProxy(seaweed_server.endpoint) as proxy:
        proxy.refuse_conditional_writes()
        endpoint = proxy.url
        options = {**seaweed_server.storage_options, "endpoint_url": endpoint}
        store = RemoteStore(f"s3://{bucket}/run", options, retry=RetryPolicy(seed=0), on_retry=causes.append,
                            transfer=cloudckpt.TransferOptions(part_size=5 * MiB, multipart_threshold=5 * MiB))
        with pytest.raises(cloudckpt.ConfigError) as info:
            store.write_if_absent("entry.json", b"{}")
        assert proxy.stats["refused-conditional"] == 2  # with the checksum headers, then once without
        with pytest.raises(cloudckpt.ConfigError) as multipart:
            store.put_file_if_absent(write(tmp_path / "big", 6 * MiB), "big")
        store.write_atomic("plain.json", b"{}")  # no If-None-Match: written, with its crc32c
    assert causes == []
    message = str(info.value)
    assert "does not support conditional writes" in message and "If-None-Match" in message
    assert endpoint in message and f"s3://{bucket}/run/entry.json" in message
    assert f"s3://{bucket}/run/big" in str(multipart.value)
    direct = transport_for(seaweed_server.storage_options)
    assert direct.head(bucket, "run/plain.json")["crc32c"] == f"{google_crc32c.value(b'{}'):08x}"
    assert not seaweed_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted
    listed = RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options).list_objects()
    assert [o.name for o in listed] == ["plain.json"]


def test_a_stale_kept_alive_connection_is_replaced_without_a_retry():
    import time

    server = _Scripted(drop_idle=True)
    calls: list[int] = []

    def call(fn):  # the retry layer's place: counts attempts, retries nothing
        calls.append(1)
        return fn()
    try:
        t = transport_for({"key": "k", "secret": "s", "endpoint_url": server.endpoint})
        t.put_bytes(b"abc", "bucket", "a", call=call)
        time.sleep(0.2)  # the server has closed the connection by now
        t.put_bytes(b"def", "bucket", "b", call=call)
    finally:
        server.close()
    assert len(server.seen) == 2 and len(calls) == 2


def test_a_lost_create_only_put_is_recognised_on_a_store_writing_upper_case_etags(tmp_path):
    """A store that reports no crc32c of an object and writes its ETags in upper case (``etag_md5``: "some stores
    write it upper-case"). A create-only PutObject reaches it, its answer is lost (the connection closes); the
    retry is answered 412. The HEAD that settles it finds the object's size and an ETag that is the MD5 of the
    file's bytes, in upper case: this upload's object, the write succeeds. Was: the ETag was compared with the
    lower-case MD5 as a string, so the upload took its own object for someone else's (FileExistsError)."""
    data = os.urandom(1000)
    path = tmp_path / "f"
    path.write_bytes(data)
    etag = hashlib.md5(data).hexdigest().upper()

    def answer_put(handler, n: int) -> None:
        if n == 1:  # stored; its answer is lost
            handler.close_connection = True
            return
        body = b"<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you " \
               b"specified did not hold</Message></Error>"
        handler.send_response(412)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def answer_head(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", f'"{etag}"')
        handler.end_headers()

    def call(fn):  # the retry layer's place: a second attempt after any failure
        try:
            return fn()
        except Exception:  # noqa: BLE001
            return fn()
    server = _Scripted(answer_put=answer_put, answer_head=answer_head)
    try:
        t = transport_for({"key": "k", "secret": "s", "endpoint_url": server.endpoint})
        t.put_file(str(path), "bucket", "key", create=True, call=call)
    finally:
        server.close()
    assert len(server.seen) >= 2 and server.heads, (server.seen, server.heads)  # the retry's 412, settled by a HEAD
