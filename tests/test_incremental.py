"""Incremental commits (cloudckpt.incremental): unchanged parts copied server-side, on moto and SeaweedFS.

moto (server mode) ignores ``x-amz-copy-source-if-match``, reports no checksum of a copied part and
checks no checksum at completion; SeaweedFS does all three. A source rewritten in the bucket is caught
on both (its ETag no longer is the one its manifest records); copied bytes that differ from the
manifest's part checksum are caught where the store checksums the copy (SeaweedFS).
"""

from __future__ import annotations

import logging
import os
import uuid

import google_crc32c
import numpy as np
import pytest

import cloudckpt
from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
from cloudckpt.errors import RemoteError
from cloudckpt.manifest import PART_SIZE
from cloudckpt.remote import RemoteStore
from cloudckpt.retry import RetryPolicy
from cloudckpt.incremental import MIN_COPY_BYTES
from cloudckpt.s3_transport import CopySource
from cloudckpt.writers import Writer
from support.fault_proxy import FaultProxy

MiB = 1 << 20
DATA = "data-00000-of-00001"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, seed=0)


@pytest.fixture(params=["moto", "seaweedfs"])
def server(request):
    return request.getfixturevalue("moto_server" if request.param == "moto" else "seaweed_server")


@pytest.fixture
def bucket_url(server) -> str:
    return server.create_bucket(f"inc-{uuid.uuid4().hex[:10]}") + "/run"


class Saves:
    """Checkpoints with a data file of ``size`` bytes (random, fixed seed) saved into ``directory``."""

    def __init__(self, directory, size: int) -> None:
        self.directory = directory
        self.data = bytearray(np.random.default_rng(size).bytes(size))

    def save(self, step: int) -> LocalCheckpoint:
        prefix = f"model.ckpt-{step}"
        files = {}
        for suffix, content in ((DATA, bytes(self.data)), ("index", os.urandom(64))):
            path = self.directory / f"{prefix}.{suffix}"
            path.write_bytes(content)
            files[f"{prefix}.{suffix}"] = str(path)
        return LocalCheckpoint(step, prefix, files)


def remote_bytes(server, url: str, name: str) -> bytes:
    bucket, _, root = url[len("s3://"):].partition("/")
    return server.client().get_object(Bucket=bucket, Key=f"{root}/{name}")["Body"].read()


def verified(url: str, server, step: int) -> cloudckpt.VerifyReport:
    return cloudckpt.verify(url, step, storage_options=server.storage_options, use_store_checksums=False)


# -- real TF saves ---------------------------------------------------------------------------------------
def test_fine_tuning_copies_the_frozen_backbone(server, bucket_url, tmp_path):
    """A large frozen variable and a small trainable one (tf.train.Checkpoint, cloudckpt.CheckpointManager
    keeping one checkpoint, so retention deletes each copy's source right after it committed): later
    commits copy the backbone's parts; the bucket's newest checkpoint restores equal tensors, verifies,
    and TF finds it in a downloaded copy."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    backbone = tf.Variable(rng.standard_normal(5 * MiB, dtype=np.float32), trainable=False)  # 20 MiB
    head = tf.Variable(tf.zeros([1000]))
    ckpt = tf.train.Checkpoint(backbone=backbone, head=head)
    options = server.storage_options
    with cloudckpt.CheckpointManager(ckpt, bucket_url, max_to_keep=1, local_dir=str(tmp_path / "local"),
                                     storage_options=options, max_pending=4) as manager:
        for i in range(1, 4):
            head.assign(tf.fill([1000], float(i)))
            manager.save()
            manager.wait()
        stats = manager.stats()
    size = (tmp_path / "local" / f"ckpt-3.{DATA}").stat().st_size
    assert stats.committed == 3 and stats.failed == 0
    assert stats.bytes_copied == 2 * 2 * PART_SIZE  # two commits copied the parts holding only the backbone
    assert stats.last_copied_bytes == 2 * PART_SIZE
    assert size - 2 * PART_SIZE < stats.last_upload_bytes < size - 2 * PART_SIZE + (64 << 10)  # + the .index
    assert [c.step for c in cloudckpt.list_checkpoints(bucket_url, options)] == [3]  # the sources are gone
    assert verified(bucket_url, server, 3).ok
    assert remote_bytes(server, bucket_url, f"ckpt-3.{DATA}") == (tmp_path / "local" / f"ckpt-3.{DATA}").read_bytes()

    copy = cloudckpt.download_checkpoint(bucket_url, str(tmp_path / "copy"), storage_options=options)
    assert tf.train.latest_checkpoint(str(tmp_path / "copy")) == copy
    backbone2, head2 = tf.Variable(tf.zeros([5 * MiB])), tf.Variable(tf.zeros([1000]))
    tf.train.Checkpoint(backbone=backbone2, head=head2).restore(copy).assert_consumed()
    np.testing.assert_array_equal(backbone2.numpy(), backbone.numpy())
    np.testing.assert_array_equal(head2.numpy(), np.full([1000], 3.0))


# -- what is copied, what is uploaded ---------------------------------------------------------------------
def test_changed_parts_are_uploaded_and_the_rest_copied(server, bucket_url, tmp_path):
    saves = Saves(tmp_path, 4 * PART_SIZE + 12345)
    store = RemoteStore(bucket_url, server.storage_options)
    writer = Writer(store)
    first = commit_checkpoint(store, saves.save(1), writer=writer)
    assert first.bytes_copied == 0
    data = next(f for f in first.manifest.files if f.name.endswith(DATA))
    assert len(data.parts) == 5 and data.part_size == PART_SIZE and data.etag
    saves.data[PART_SIZE + 7] ^= 0xFF  # part 1 changes
    second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == 3 * PART_SIZE + 12345
    assert second.bytes_uploaded == second.manifest.total_size - second.bytes_copied
    assert remote_bytes(server, bucket_url, f"model.ckpt-2.{DATA}") == bytes(saves.data)
    assert verified(bucket_url, server, 2).ok and verified(bucket_url, server, 1).ok


@pytest.mark.parametrize("change, copied", [
    ("grew", 3 * PART_SIZE),  # a tf.data iterator's state saved last: every whole part before it is copied
    ("shrank", 2 * PART_SIZE),  # the last part's range changed
    ("every part", 0),  # dense training: a full upload
    ("all but a short tail", 0),  # less than MIN_COPY_BYTES unchanged: not worth a copy
])
def test_parts_are_copied_only_where_their_range_and_bytes_are_unchanged(server, bucket_url, tmp_path, change,
                                                                          copied):
    saves = Saves(tmp_path, 3 * PART_SIZE + (MIN_COPY_BYTES - 1 if change == "all but a short tail" else 0))
    store = RemoteStore(bucket_url, server.storage_options)
    writer = Writer(store)
    commit_checkpoint(store, saves.save(1), writer=writer)
    if change == "grew":
        saves.data += b"more"
    elif change == "shrank":
        del saves.data[-1]
    else:
        for start in range(0, 3 * PART_SIZE, PART_SIZE):
            saves.data[start] ^= 1
    second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == copied
    assert second.bytes_uploaded == second.manifest.total_size - copied
    assert remote_bytes(server, bucket_url, f"model.ckpt-2.{DATA}") == bytes(saves.data)
    assert verified(bucket_url, server, 2).ok


def test_a_source_corrupted_in_the_bucket_is_not_propagated(server, bucket_url, tmp_path):
    """The previous checkpoint's data object rewritten through S3 with one byte flipped (same size): the
    next commit uploads its parts instead of copying them, and verifies."""
    saves = Saves(tmp_path, 3 * PART_SIZE)
    store = RemoteStore(bucket_url, server.storage_options)
    writer = Writer(store)
    commit_checkpoint(store, saves.save(1), writer=writer)
    bucket, _, root = bucket_url[len("s3://"):].partition("/")
    corrupt = bytearray(remote_bytes(server, bucket_url, f"model.ckpt-1.{DATA}"))
    corrupt[100] ^= 0xFF
    server.client().put_object(Bucket=bucket, Key=f"{root}/model.ckpt-1.{DATA}", Body=bytes(corrupt))
    [bad] = verified(bucket_url, server, 1).problems  # the corruption is real; verify names its part
    assert bad.name == f"model.ckpt-1.{DATA}" and bad.bad_parts == (0,) and bad.bad_ranges() == [(0, PART_SIZE)]
    from cloudckpt.cli import _problem_text
    assert _problem_text(bad).endswith(f"; 8 MiB parts differing, from 0: 0 (bytes 0-{PART_SIZE - 1}))")

    saves.data[-1] ^= 1
    second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == 0
    assert remote_bytes(server, bucket_url, f"model.ckpt-2.{DATA}") == bytes(saves.data)
    assert verified(bucket_url, server, 2).ok


def test_a_source_gone_falls_back_to_upload(server, bucket_url, tmp_path):
    saves = Saves(tmp_path, 3 * PART_SIZE)
    store = RemoteStore(bucket_url, server.storage_options)
    writer = Writer(store)
    commit_checkpoint(store, saves.save(1), writer=writer)
    bucket, _, root = bucket_url[len("s3://"):].partition("/")
    server.client().delete_object(Bucket=bucket, Key=f"{root}/model.ckpt-1.{DATA}")
    saves.data[0] ^= 1
    second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == 0 and verified(bucket_url, server, 2).ok


def test_copied_bytes_that_differ_from_the_manifest_are_uploaded_instead(seaweed_server, tmp_path):
    """SeaweedFS checksums each copied part: a source whose bytes are not what the (manifest's) part
    checksum says -- same ETag, so only the copy's checksum can tell -- has that part uploaded."""
    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    seaweed_server.create_bucket(bucket)
    store = RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options)
    transport = store._transport
    source = bytearray(np.random.default_rng(1).bytes(2 * PART_SIZE))
    (tmp_path / "old").write_bytes(bytes(source))
    transport.put_file(str(tmp_path / "old"), bucket, "old")
    etag = transport.head(bucket, "old")["etag"]
    local = bytearray(source)
    local[10] ^= 1  # the local part 0 differs, but the plan says "copy" (as a corrupted source would)
    local[-1] ^= 1  # part 1 is uploaded
    (tmp_path / "new").write_bytes(bytes(local))
    chunks = [(0, PART_SIZE, google_crc32c.value(bytes(local[:PART_SIZE])), True),
              (PART_SIZE, 2 * PART_SIZE, google_crc32c.value(bytes(local[PART_SIZE:])), False)]
    copied = transport.put_file_copying(str(tmp_path / "new"), bucket, "new", chunks, CopySource(bucket, "old", etag),
                                        create=True)
    assert copied == 0  # part 0's copy did not match its checksum: it was uploaded
    assert seaweed_server.client().get_object(Bucket=bucket, Key="new")["Body"].read() == bytes(local)
    assert transport.head(bucket, "new")["crc32c"] == f"{google_crc32c.value(bytes(local)):08x}"


def test_a_failed_incremental_upload_is_aborted_and_never_committed(seaweed_server, tmp_path):
    """Persistent 500s on the uploaded part of an incremental upload: the commit fails, the multipart upload
    is aborted, nothing new is committed; the next attempt commits (copying)."""
    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    url = seaweed_server.create_bucket(bucket) + "/run"
    saves = Saves(tmp_path, 3 * PART_SIZE)
    commit_checkpoint(RemoteStore(url, seaweed_server.storage_options), saves.save(1))
    saves.data[-1] ^= 1  # parts 0-1 copied (one part), part 2 uploaded: partNumber=2
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        proxy.set_faults(error_rate=1.0, kinds=("500",), only_methods=("PUT",), path_filter="partNumber=2")
        store = RemoteStore(url, {**seaweed_server.storage_options, "endpoint_url": proxy.url}, retry=FAST_RETRY)
        writer = Writer(store)
        with pytest.raises(RemoteError):
            commit_checkpoint(store, saves.save(2), writer=writer)
        assert proxy.stats["500"] == 3
        proxy.set_faults(error_rate=0.0)
        assert seaweed_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") in (None, [])
        assert [c.step for c in cloudckpt.list_checkpoints(url, seaweed_server.storage_options)] == [1]
        again = commit_checkpoint(store, saves.save(2), writer=writer)
    assert again.outcome == "uploaded" and again.bytes_copied == 2 * PART_SIZE
    assert verified(url, seaweed_server, 2).ok


def test_a_copy_that_keeps_failing_is_uploaded_instead(server, bucket_url, tmp_path, caplog):
    """UploadPartCopy answered 500 until the retries run out: those bytes are uploaded, the commit succeeds
    (copying is an optimisation) and says so in a warning naming the copy; that transport copies no more
    (each copy would cost the retries again), a new one (process) does."""
    saves = Saves(tmp_path, 3 * PART_SIZE)
    commit_checkpoint(RemoteStore(bucket_url, server.storage_options), saves.save(1))
    saves.data[-1] ^= 1  # parts 0-1 copied (one request: partNumber=1), part 2 uploaded (partNumber=2)
    with FaultProxy(server.endpoint, seed=0) as proxy:
        proxy.set_faults(only_methods=("PUT",), path_filter="partNumber=1&")
        proxy.fail_next("500", count=FAST_RETRY.max_attempts)  # every attempt of the copy
        store = RemoteStore(bucket_url, {**server.storage_options, "endpoint_url": proxy.url}, retry=FAST_RETRY)
        with caplog.at_level("WARNING", logger="cloudckpt"):
            second = commit_checkpoint(store, saves.save(2))
        assert proxy.stats["500"] == FAST_RETRY.max_attempts
        assert second.outcome == "uploaded" and second.bytes_copied == 0
        assert any("Server-side copy of" in r.getMessage() and "uploading those bytes instead" in r.getMessage()
                   for r in caplog.records)
        assert remote_bytes(server, bucket_url, f"model.ckpt-2.{DATA}") == bytes(saves.data)
        assert verified(bucket_url, server, 2).ok
        assert store._transport.copies_off
        saves.data[-1] ^= 1
        third = commit_checkpoint(store, saves.save(3))  # the store copies fine again: this transport does not
        assert third.bytes_copied == 0
    saves.data[-1] ^= 1
    fourth = commit_checkpoint(RemoteStore(bucket_url, server.storage_options), saves.save(4))
    assert fourth.bytes_copied == 2 * PART_SIZE
    assert verified(bucket_url, server, 3).ok and verified(bucket_url, server, 4).ok


def test_a_failing_copy_of_an_abandoned_upload_is_not_uploaded_instead(seaweed_server, tmp_path):
    """The store's owner gave up (``cancel`` set, as an abandoned upload does) while a failing copy waited to be
    retried: the copy ends the upload (aborted, nothing committed) instead of sending its bytes."""
    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    url = seaweed_server.create_bucket(bucket) + "/run"
    saves = Saves(tmp_path, 3 * PART_SIZE)
    commit_checkpoint(RemoteStore(url, seaweed_server.storage_options), saves.save(1))
    saves.data[-1] ^= 1
    with FaultProxy(seaweed_server.endpoint, seed=0) as proxy:
        proxy.set_faults(only_methods=("PUT",), path_filter="partNumber=1&")
        proxy.fail_next("500", count=FAST_RETRY.max_attempts)
        store = RemoteStore(url, {**seaweed_server.storage_options, "endpoint_url": proxy.url}, retry=FAST_RETRY,
                            on_retry=lambda cause: store.cancel.set())
        with pytest.raises(RemoteError):
            commit_checkpoint(store, saves.save(2))
        assert proxy.stats["500"] == 1  # no retry, no upload of the copy's bytes
    assert seaweed_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads") in (None, [])
    assert [c.step for c in cloudckpt.list_checkpoints(url, seaweed_server.storage_options)] == [1]


def test_bit_rot_under_an_unchanged_etag_is_not_copied(moto_server, tmp_path, caplog):
    """moto reports no checksum of a copied part: the copy's ETag (the MD5 of its bytes) is checked against
    the local bytes. One byte of the stored source flipped inside moto, its ETag left as it was (bit rot at
    rest): that part is uploaded, not copied, and no committed checkpoint inherits the damage."""
    from moto.s3.models import s3_backends

    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    url = moto_server.create_bucket(bucket) + "/run"
    saves = Saves(tmp_path, 3 * PART_SIZE)
    store = RemoteStore(url, moto_server.storage_options)
    writer = Writer(store)
    commit_checkpoint(store, saves.save(1), writer=writer)
    stored = next(iter(s3_backends.values()))["global"].get_object(bucket, f"run/model.ckpt-1.{DATA}")
    etag = stored.etag
    with stored.lock:
        stored._value_buffer.seek(PART_SIZE + 123)  # part 1
        byte = stored._value_buffer.read(1)
        stored._value_buffer.seek(PART_SIZE + 123)
        stored._value_buffer.write(bytes([byte[0] ^ 0xFF]))
    assert stored.etag == etag and not verified(url, moto_server, 1).ok

    saves.data[-1] ^= 1  # parts 0-1 unchanged locally: one copy request of 16 MiB, refused by its MD5
    with caplog.at_level("WARNING", logger="cloudckpt"):
        second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == 0
    # the uploaded part's ETag is its MD5: the copy differed (INFO records of the suite's logger level ignored)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "does not hold the bytes its manifest records" in warning
    assert store._transport.copies_off is None  # the store's ETags vouch for copies: later ones are tried
    assert remote_bytes(moto_server, url, f"model.ckpt-2.{DATA}") == bytes(saves.data)
    assert verified(url, moto_server, 2).ok


def test_a_store_whose_etags_are_not_md5s_warns_once_and_uploads_in_full(moto_server, tmp_path, caplog):
    """A store that reports no checksum of a copied part and whose part ETags are 32 hex digits but not the
    MD5 of the part (the fault proxy makes moto one) cannot vouch for any copy. The first incremental commit
    warns once (why, and that nothing is lost), uploads the file in full and turns copies off for the
    transport: the next commit makes no copy request and no warning. Both checkpoints restore byte for byte."""
    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    url = moto_server.create_bucket(bucket) + "/run"
    (tmp_path / "ckpt").mkdir()
    saves = Saves(tmp_path / "ckpt", 3 * PART_SIZE)
    saved: dict[int, bytes] = {}
    copies: list[int] = []
    with FaultProxy(moto_server.endpoint, seed=0) as proxy:
        proxy.rewrite_part_etags()
        store = RemoteStore(url, {**moto_server.storage_options, "endpoint_url": proxy.url})
        writer = Writer(store)
        commit_checkpoint(store, saves.save(1), writer=writer)
        with caplog.at_level("INFO", logger="cloudckpt"):
            for step in (2, 3):
                saves.data[-1] ^= 1  # parts 0-1 unchanged: one copy request, part 2 uploaded
                before = proxy.stats.get("copies", 0)
                result = commit_checkpoint(store, saves.save(step), writer=writer)
                copies.append(proxy.stats.get("copies", 0) - before)
                assert result.outcome == "uploaded" and result.bytes_copied == 0
                assert result.bytes_uploaded == result.manifest.total_size
                saved[step] = bytes(saves.data)
    assert copies == [1, 0]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "copies cannot be verified on this store" in warning and "part ETags are not MD5s" in warning
    assert "uploaded in full" in warning and "no data is lost" in warning
    assert store._transport.copies_off == "copies cannot be verified on this store"
    for step in (2, 3):
        prefix = cloudckpt.download_checkpoint(url, str(tmp_path / f"dl-{step}"), step,
                                               storage_options=moto_server.storage_options)
        assert open(f"{prefix}.{DATA}", "rb").read() == saved[step]


def test_a_source_re_uploaded_with_the_same_bytes_is_still_copied(seaweed_server, tmp_path, caplog):
    """A healed object (re-uploaded in other parts: another ETag, the same bytes): the store's full-object
    crc32c equals the manifest's, so the next commit copies from it, without a warning."""
    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    url = seaweed_server.create_bucket(bucket) + "/run"
    saves = Saves(tmp_path, 3 * PART_SIZE)
    store = RemoteStore(url, seaweed_server.storage_options)
    writer = Writer(store)
    first = commit_checkpoint(store, saves.save(1), writer=writer)
    small_parts = RemoteStore(url, seaweed_server.storage_options)._transport
    small_parts.part_size = small_parts.multipart_threshold = 5 * MiB
    small_parts.put_file(str(tmp_path / f"model.ckpt-1.{DATA}"), bucket, f"run/model.ckpt-1.{DATA}")
    recorded = next(f.etag for f in first.manifest.files if f.name.endswith(DATA))
    assert small_parts.head(bucket, f"run/model.ckpt-1.{DATA}")["etag"] != recorded
    saves.data[-1] ^= 1
    with caplog.at_level("INFO", logger="cloudckpt"):
        second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == 2 * PART_SIZE
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("re-uploaded with the same bytes" in r.getMessage() for r in caplog.records)
    assert verified(url, seaweed_server, 2).ok


# -- backends without range copies ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["memory", "s3fs"])
def test_backends_without_range_copy_upload_in_full(where, memory_url, moto_server, tmp_path):
    if where == "memory":
        url, options = memory_url, None
    else:  # an option cloudckpt's transport does not honour keeps s3:// on s3fs
        url = moto_server.create_bucket(f"inc-{uuid.uuid4().hex[:10]}") + "/run"
        options = {**moto_server.storage_options, "s3_additional_kwargs": {"StorageClass": "STANDARD"}}
    store = RemoteStore(url, options)
    assert not store.copies_parts
    saves = Saves(tmp_path, 2 * PART_SIZE + 5)
    writer = Writer(store)
    commit_checkpoint(store, saves.save(1), writer=writer)
    saves.data[0] ^= 1
    second = commit_checkpoint(store, saves.save(2), writer=writer)
    assert second.bytes_copied == 0 and second.bytes_uploaded == second.manifest.total_size
    assert cloudckpt.verify(url, storage_options=options, use_store_checksums=False).ok


def test_a_copy_from_a_source_rewritten_after_the_check_is_refused_by_the_store(seaweed_server, tmp_path):
    """Between the HEAD and the copy the source is rewritten: the copy's x-amz-copy-source-if-match makes
    SeaweedFS (like S3) refuse it, and the part is left to be uploaded (None)."""
    bucket = f"inc-{uuid.uuid4().hex[:10]}"
    seaweed_server.create_bucket(bucket)
    transport = RemoteStore(f"s3://{bucket}/run", seaweed_server.storage_options)._transport
    (tmp_path / "old").write_bytes(np.random.default_rng(2).bytes(PART_SIZE))
    transport.put_file(str(tmp_path / "old"), bucket, "old")
    source = CopySource(bucket, "old", transport.head(bucket, "old")["etag"])
    crc = google_crc32c.value((tmp_path / "old").read_bytes())
    upload_id = transport._create_upload(bucket, "new", lambda fn: fn())
    try:
        with open(tmp_path / "old", "rb") as local:
            copy = lambda: transport._copy_part(local, bucket, "new", upload_id, 1, 0, PART_SIZE, crc,  # noqa: E731
                                                source, lambda fn: fn())
            assert copy()
            transport.put_bytes(np.random.default_rng(3).bytes(PART_SIZE), bucket, "old")  # same size, new bytes
            assert copy() is None
    finally:
        transport._abort_upload(bucket, "new", upload_id)


def test_send_rate_of_an_incremental_commit_is_not_diluted_by_its_server_side_copy(moto_server, tmp_path):
    """A commit that copies most of its data server-side (the copy held 2 s by the proxy, as a store copying a
    large frozen variable takes its time) and sends one part: ``last_upload_mib_per_second`` is the bytes sent
    over the time spent sending them (``last_send_seconds``), not over the whole commit. Before, it divided by
    the whole commit time, copy included: a collapse of the figure with nothing wrong on the link."""
    from cloudckpt.uploader import UploadJob, Uploader

    url = moto_server.create_bucket(f"inc-{uuid.uuid4().hex[:10]}") + "/run"
    saves = Saves(tmp_path, 3 * PART_SIZE)
    with FaultProxy(moto_server.endpoint) as proxy:
        store = RemoteStore(url, {**moto_server.storage_options, "endpoint_url": proxy.url})
        assert store._transport is not None
        uploader = Uploader(store)
        uploader.start()
        try:
            uploader.submit(UploadJob(saves.save(1)))
            assert uploader.wait(120)
            full = uploader.stats()
            saves.data[-1] ^= 1  # parts 0-1 copied server-side, part 2 sent
            proxy.set_faults(latency=2.0, copies=True)
            uploader.submit(UploadJob(saves.save(2)))
            assert uploader.wait(120)
            incremental = uploader.stats()
        finally:
            uploader.close(60)
        assert proxy.stats["copies"] >= 1
    assert uploader.take_failure() is None and incremental.committed == 2
    assert full.last_copied_bytes == 0 and full.last_send_seconds > 0
    assert full.last_upload_mib_per_second == pytest.approx(full.last_upload_bytes / MiB / full.last_send_seconds)
    assert incremental.last_copied_bytes == 2 * PART_SIZE and incremental.last_upload_bytes == PART_SIZE + 64
    assert incremental.last_upload_seconds >= 2.0  # the held copy
    assert 0 < incremental.last_send_seconds < incremental.last_upload_seconds - 1.5, incremental
    rate = incremental.last_upload_mib_per_second
    assert rate == pytest.approx(incremental.last_upload_bytes / MiB / incremental.last_send_seconds)
    # what the old figure read (bytes sent / the whole commit): at least 4x lower here
    assert rate > 4 * incremental.last_upload_bytes / MiB / incremental.last_upload_seconds


def test_the_commit_log_line_names_copied_bytes_only_when_some_were_copied(moto_server, tmp_path, caplog):
    """The uploader's commit line said "0.0 MB of it copied server-side" for every commit that copied
    nothing, and sized a small checkpoint "0.0 MB": it names copied bytes only when there are some, and sizes
    print in binary units (errors.human_size)."""
    from cloudckpt.errors import human_size
    from cloudckpt.uploader import Uploader, UploadJob

    url = moto_server.create_bucket(f"inc-{uuid.uuid4().hex[:10]}") + "/run"
    saves = Saves(tmp_path, 2 * PART_SIZE + 12345)
    tiny = LocalCheckpoint(3, "model.ckpt-3", {"model.ckpt-3.index": str(tmp_path / "model.ckpt-3.index")})
    (tmp_path / "model.ckpt-3.index").write_bytes(b"x" * 307)
    uploader = Uploader(RemoteStore(url, moto_server.storage_options), max_pending=4)
    uploader.start()
    try:
        with caplog.at_level(logging.INFO, logger="cloudckpt"):
            for checkpoint in (saves.save(1), saves.save(2), tiny):
                uploader.submit(UploadJob(checkpoint))
                assert uploader.wait(60)
    finally:
        uploader.close()
    copied = 2 * PART_SIZE + 12345  # the data file, unchanged: copied whole
    assert uploader.stats().committed == 3 and uploader.stats().bytes_copied == copied
    lines = {int(m.split()[3]): m for m in (r.getMessage() for r in caplog.records)
             if m.startswith("Committed checkpoint step")}
    size = 2 * PART_SIZE + 12345 + 64
    assert f"(2 files, {human_size(size)}, " in lines[1] and "copied" not in lines[1], lines[1]
    assert f"(2 files, {human_size(size)}, {human_size(copied)} of it copied server-side, " in lines[2], lines[2]
    assert human_size(copied) == "16.0 MiB"
    assert "(1 files, 307 B, " in lines[3] and "copied" not in lines[3], lines[3]
