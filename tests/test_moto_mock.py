"""cloudckpt inside moto's in-process mock (``moto.mock_aws``), the way users' CI runs it (issue 18).

Real graph-mode TF training through MonitoredTrainingSession with the hook,
restore, retention and the CLI, all under ``mock_aws`` with no S3 server at
all. Independent checks read the mocked bucket with boto3 and google-crc32c.
Every test runs behind a socket guard: under the mock cloudckpt makes no
network connection whatsoever, and s3fs / aiobotocore (which the mock cannot
serve) are never used.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid

import aiobotocore.session
import boto3
import google_crc32c
import moto
import numpy as np
import pytest
import s3fs
import tensorflow as tf

import cloudckpt
from cloudckpt import cli
from cloudckpt.moto_mock import moto_mock_active, mock_transport
from cloudckpt.remote import RemoteStore
from cloudckpt.transfer import TransferOptions
from cloudckpt.retry import is_transient
from cloudckpt.s3_botocore import BotocoreS3FileSystem
from cloudckpt.testing import assert_committed
from support import net_guard
from support.tf_model import train

S3_PART_SIZE = TransferOptions().part_size


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """Refuse (and record) any connection that is not to 127.0.0.1; the test fails if one was attempted."""
    record = net_guard.install(monkeypatch)
    yield record
    assert record.violations == [], f"test traffic left 127.0.0.1: {record.violations}"


@pytest.fixture
def no_s3fs(monkeypatch):
    """Fail the test if s3fs or aiobotocore (which moto's in-process mock cannot serve) is used at all."""
    def refuse(name):
        def used(*args, **kwargs):
            raise AssertionError(f"{name} was used while moto's mock was active")
        return used

    monkeypatch.setattr(s3fs.S3FileSystem, "__init__", refuse("s3fs.S3FileSystem"))
    monkeypatch.setattr(aiobotocore.session.AioSession, "create_client", refuse("aiobotocore"))


@pytest.fixture
def mocked_bucket(no_s3fs):
    """A bucket in moto's in-process mock; yields (boto3 client, bucket name) while the mock is active."""
    with moto.mock_aws():
        client = boto3.client("s3")
        bucket = f"ci-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        yield client, bucket


def objects(client, bucket, prefix="run/"):
    """name -> bytes of every object under ``prefix``, read with boto3 (not cloudckpt)."""
    out = {}
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        out[obj["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def committed_intact(client, bucket, prefix="run/"):
    """Steps whose manifest lists files that are all present with the listed size and crc32c."""
    found = objects(client, bucket, prefix)
    steps = []
    for name, data in found.items():
        if m := re.fullmatch(r"model\.ckpt-(\d+)\.manifest\.json", name):
            for entry in json.loads(data)["files"]:
                body = found[entry["name"]]
                assert len(body) == entry["size"] and f"{google_crc32c.value(body):08x}" == entry["crc32c"], entry
            steps.append(int(m.group(1)))
    return sorted(steps)


def hook(url, local_dir, **kwargs):
    return lambda scaffold: cloudckpt.CheckpointSaverHook(url, save_steps=10, scaffold=scaffold,
                                                         local_dir=str(local_dir), max_pending=100, **kwargs)


def test_training_commits_every_save_and_retention_deletes(mocked_bucket, tmp_path, guard):
    client, bucket = mocked_bucket
    url = f"s3://{bucket}/run"
    holder = []

    def make(scaffold):
        holder.append(hook(url, tmp_path / "vm", remote_max_to_keep=0)(scaffold))
        return holder[-1]

    result = train(make, last_step=35)
    assert result.last_step == 35
    assert committed_intact(client, bucket) == [0, 10, 20, 30, 35]  # every save, read back independently
    stats = holder[0].stats()
    assert stats.committed == 5 and stats.failed == 0

    train(hook(url, tmp_path / "vm", remote_max_to_keep=2), last_step=55)  # saves 35, 45, 55; keeps 2
    assert committed_intact(client, bucket) == [45, 55]
    names = objects(client, bucket)
    assert {n.split(".")[1] for n in names if n.startswith("model.ckpt-")} == {"ckpt-45", "ckpt-55"}, sorted(names)
    assert b'model_checkpoint_path: "model.ckpt-55"' in names["checkpoint"]
    assert guard.connections == [], "\n".join(guard.origins)  # the mock path opens no socket at all


def test_restore_latest_verify_and_download(mocked_bucket, tmp_path, guard):
    client, bucket = mocked_bucket
    url = f"s3a://{bucket}/run"  # s3a:// takes the same path
    first = train(hook(url, tmp_path / "vm1"), last_step=20)

    latest = cloudckpt.latest_checkpoint(url)
    assert latest is not None and latest.step == 20 and latest.prefix == f"{url}/model.ckpt-20"
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [0, 10, 20]
    report = cloudckpt.verify(url, use_store_checksums=False)
    assert report.ok and report.step == 20 and len(report.files) == 3
    assert assert_committed(url, step=10).step == 10  # the plugin's helper works under the mock too

    prefix = cloudckpt.download_checkpoint(url, str(tmp_path / "pulled"), step=10)
    assert prefix == str(tmp_path / "pulled" / "model.ckpt-10")
    assert tf.train.latest_checkpoint(str(tmp_path / "pulled")) == prefix

    second = train(hook(url, tmp_path / "vm2"), last_step=30)  # a new VM: restore on start
    assert second.first_step == 20
    np.testing.assert_array_equal(second.first_weights, first.last_weights)
    assert committed_intact(client, bucket) == [0, 10, 20, 30]

    key = "run/model.ckpt-30.data-00000-of-00001"  # corrupt one byte: verify must see it
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    bad = cloudckpt.verify(url, use_store_checksums=False)
    assert [(p.name, p.status) for p in bad.problems] == [("model.ckpt-30.data-00000-of-00001", "checksum mismatch")]
    assert guard.connections == [], "\n".join(guard.origins)


def test_cli_in_process(mocked_bucket, tmp_path, capsys):
    client, bucket = mocked_bucket
    url = f"s3://{bucket}/run"
    train(hook(url, tmp_path / "vm", remote_max_to_keep=0), last_step=30)

    assert cli.main(["ls", url, "--json"]) == 0
    assert [r["step"] for r in json.loads(capsys.readouterr().out)] == [0, 10, 20, 30]
    assert cli.main(["verify", url, "--all"]) == 0
    assert "4 of 4 checkpoint(s) in " in capsys.readouterr().out
    assert cli.main(["pull", url, str(tmp_path / "pulled"), "--step", "20"]) == 0
    assert tf.train.latest_checkpoint(str(tmp_path / "pulled")).endswith("model.ckpt-20")
    assert cli.main(["gc", url, "--keep", "1"]) == 0
    assert committed_intact(client, bucket) == [30]
    capsys.readouterr()
    assert cli.main(["ls", f"s3://no-such-{bucket}/run"]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_mock_selects_botocore_for_s3_only(no_s3fs):
    assert not moto_mock_active() and mock_transport("s3") is None
    with moto.mock_aws():
        assert moto_mock_active()
        assert mock_transport("s3") is mock_transport("s3a") is BotocoreS3FileSystem
        assert mock_transport("gs") is None and mock_transport("memory") is None
        with moto.mock_aws():  # nested mocks are counted
            pass
        assert moto_mock_active()
    assert not moto_mock_active()


def test_create_only_writes_are_refused_by_the_store(mocked_bucket, tmp_path):
    client, bucket = mocked_bucket
    store = RemoteStore(f"s3://{bucket}/run")
    fs = store.fs
    fs.pipe_file(store.path("lease"), b"first", mode="create")
    with pytest.raises(FileExistsError) as info:
        fs.pipe_file(store.path("lease"), b"second", mode="create")
    assert info.value.__cause__.response["Error"]["Code"] == "PreconditionFailed"
    assert not is_transient(info.value)
    assert store.read_bytes("lease") == b"first"

    big = tmp_path / "big"
    big.write_bytes(os.urandom(2 * S3_PART_SIZE + 100))  # 3 parts
    store.put_file(str(big), "big")
    assert client.head_object(Bucket=bucket, Key="run/big")["ETag"].endswith('-3"')  # a multipart upload
    with pytest.raises(FileExistsError):
        fs.put_file(str(big), store.path("big"), chunksize=S3_PART_SIZE, mode="create")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # the refused one was aborted
    fs.put_file(str(big), store.path("big2"), chunksize=S3_PART_SIZE, mode="create", ContentType="x/ckpt")
    assert objects(client, bucket)["big2"] == big.read_bytes()
    assert client.head_object(Bucket=bucket, Key="run/big2")["ContentType"] == "x/ckpt"  # passed on, as in s3fs


def test_reads_errors_and_storage_options(mocked_bucket, tmp_path):
    client, bucket = mocked_bucket
    store = RemoteStore(f"s3://{bucket}/run", {"s3_additional_kwargs": {"ServerSideEncryption": "AES256"},
                                               "client_kwargs": {"region_name": "us-east-1"},
                                               "use_listings_cache": False})
    store.check_usable()  # an empty prefix in an existing bucket
    assert store.list_objects() == [] and store.read_bytes("nothing") is None and store.size("nothing") is None
    data = os.urandom(3 * 1024 * 1024 + 7)
    store.write_atomic("blob", data)
    assert client.head_object(Bucket=bucket, Key="run/blob")["ServerSideEncryption"] == "AES256"
    assert [(o.name, o.size) for o in store.list_objects()] == [("blob", len(data))]
    with store.open_read("blob") as f:
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
    progress = []
    store.get_file("blob", str(tmp_path / "blob"), progress.append)
    assert sum(progress) == len(data) and (tmp_path / "blob").read_bytes() == data
    assert store.fs.cat_file(store.path("blob"), 5, 9) == data[5:9]
    assert store.fs.cat_file(store.path("blob"), -4) == data[-4:]
    assert store.fs.isfile(store.path("blob")) and not store.fs.isfile(store.root)
    assert store.fs.info(store.root)["type"] == "directory"
    with pytest.raises(FileNotFoundError):
        store.fs.info(store.path("nothing"))
    store.delete(["blob", "nothing"])  # a missing one is ignored
    assert store.list_objects() == []

    with pytest.raises(cloudckpt.ConfigError, match="does not exist"):
        RemoteStore(f"s3://no-such-{bucket}/run").check_usable()
    with pytest.raises(cloudckpt.ConfigError, match=r"\['version_aware'\].*cloudckpt_s3"):
        RemoteStore(f"s3://{bucket}/run", {"version_aware": True, "key": "k", "secret": "s3cr3t-value"})
    with pytest.raises(cloudckpt.ConfigError, match="Invalid storage_options"):
        RemoteStore(f"s3://{bucket}/run", {"config_kwargs": {"no_such_option": 1}})


def test_store_opened_before_the_mock_fails_with_a_config_error(tmp_path):
    store = RemoteStore("s3://ci-bucket/run")  # s3fs, built outside the mock
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="ci-bucket")
        with pytest.raises(cloudckpt.ConfigError, match="opened before moto's mock_aws.*cloudckpt_s3"):
            store.list_objects()


def test_store_built_under_the_mock_sends_nothing_after_it_ends(guard, no_s3fs):
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="ci-bucket")
        store = RemoteStore("s3://ci-bucket/run")
        store.write_atomic("a", b"1")
    with pytest.raises(cloudckpt.ConfigError, match="mock_aws\\(\\) ended"):
        store.read_bytes("a")
    assert guard.connections == [], "\n".join(guard.origins)


def test_the_guard_refuses_and_records_other_hosts(guard):
    import socket

    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="only 127.0.0.1"):
        s.connect(("192.0.2.1", 443))  # TEST-NET-1: refused before anything is sent
    assert guard.violations == [("192.0.2.1", 443)]
    guard.violations.clear()  # this one was on purpose


def test_preemption_auto_under_the_mock_stays_off_the_network(guard):
    """preemption="auto" polls the real cloud metadata addresses; under the mock it must not."""
    with moto.mock_aws():
        watcher = cloudckpt.PreemptionWatcher.from_spec("auto")
        watcher.start()
        try:
            assert watcher.active_sources == ("sigterm",)
        finally:
            watcher.stop()
    assert guard.connections == [], "\n".join(guard.origins)


def test_non_aws_endpoint_under_the_mock_is_a_config_error(guard):
    with moto.mock_aws():
        with pytest.raises(cloudckpt.ConfigError, match="answers only for AWS endpoints"):
            cloudckpt.list_checkpoints("s3://ci-bucket/run",
                                       storage_options={"endpoint_url": "http://minio.example.internal:9000"})
    assert guard.connections == [], "\n".join(guard.origins)


# -- conditional writes decided atomically (moto_mock.serialize_conditional_writes) ------------------------

def _two_racing_creates(url: str, options: dict | None, monkeypatch) -> list[bool]:
    """Two threads write one new object create-only (``RemoteStore.write_if_absent``: how a commit log entry
    is appended) while moto's store step waits until both requests are past its If-None-Match check, unless
    the server decides atomically (then the second waits for the first, and the barrier gives up after 2 s)."""
    from moto.s3.models import S3Backend

    name = f"race-{uuid.uuid4().hex}.json"
    both_checked = threading.Barrier(2, timeout=2)
    store_object = S3Backend.put_object

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        if key_name.endswith(name):
            try:
                both_checked.wait()
            except threading.BrokenBarrierError:
                pass
        return store_object(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", put_object)
    store = RemoteStore(url, options)
    created: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: created.append(store.write_if_absent(name, b"writer %d" % i)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return created


def test_create_only_writes_have_one_winner_on_the_embedded_server(moto_server, monkeypatch):
    """moto checks If-None-Match and stores afterwards, unlocked: two concurrent create-only writes of one key
    were both answered 200 (the later overwrote the earlier, whose writer believed it had appended a log
    entry). The embedded server decides them atomically, as S3 does."""
    url = moto_server.create_bucket(f"cond-{uuid.uuid4().hex[:10]}") + "/run"
    assert sorted(_two_racing_creates(url, moto_server.storage_options, monkeypatch)) == [False, True]


def test_create_only_writes_have_one_winner_under_mock_aws(mocked_bucket, monkeypatch):
    """The same inside moto's in-process mock_aws (a user's CI): cloudckpt's transport for it serializes
    moto's conditional writes too."""
    client, bucket = mocked_bucket
    assert sorted(_two_racing_creates(f"s3://{bucket}/run", None, monkeypatch)) == [False, True]
