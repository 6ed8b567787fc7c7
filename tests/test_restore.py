"""Resume anywhere: restore the newest committed checkpoint that verifies, never a corrupt one."""

from __future__ import annotations

import logging
import os
import shutil
import uuid

import fsspec
import numpy as np
import pytest
import tensorflow as tf
from fsspec.implementations.memory import MemoryFileSystem

import cloudckpt
from support.tf_model import train


@pytest.fixture
def s3(moto_server):
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    return f"s3://{bucket}/runs/exp1", moto_server.storage_options, moto_server.client(), bucket


def run(url, options, local_dir, last_step, **kwargs):
    return train(lambda scaffold: cloudckpt.CheckpointSaverHook(
        url, save_steps=10, local_dir=str(local_dir), storage_options=options, **kwargs), last_step=last_step)


def flip_byte(client, bucket, key):
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def test_resume_on_empty_disk_continues_from_committed_step(s3, tmp_path):
    url, options, _, _ = s3
    first = run(url, options, tmp_path / "vm1", 30)
    saved_w = tf.train.load_variable(str(tmp_path / "vm1" / "model.ckpt-30"), "w")
    shutil.rmtree(tmp_path / "vm1")  # the VM is gone

    second = run(url, options, tmp_path / "vm2", 50)
    assert second.first_step == 30
    assert second.last_step == 50
    np.testing.assert_array_equal(second.first_weights, saved_w)  # values, not just the step
    np.testing.assert_array_equal(second.first_weights, first.last_weights)
    assert cloudckpt.latest_checkpoint(url, options).step == 50


def test_uncommitted_newer_files_are_ignored(s3, tmp_path):
    url, options, client, bucket = s3
    run(url, options, tmp_path / "vm1", 30)
    # A crash mid-upload of step 40: its files are in the bucket, its manifest is not.
    for suffix in (".index", ".data-00000-of-00001", ".meta"):
        client.copy_object(Bucket=bucket, Key=f"runs/exp1/model.ckpt-40{suffix}",
                           CopySource={"Bucket": bucket, "Key": f"runs/exp1/model.ckpt-30{suffix}"})
    assert cloudckpt.latest_checkpoint(url, options).step == 30
    second = run(url, options, tmp_path / "vm2", 45)
    assert second.first_step == 30


def test_corrupt_newest_raises_and_hook_falls_back(s3, tmp_path, caplog):
    url, options, client, bucket = s3
    run(url, options, tmp_path / "vm1", 30)
    flip_byte(client, bucket, "runs/exp1/model.ckpt-30.data-00000-of-00001")

    with pytest.raises(cloudckpt.IntegrityError) as info:
        cloudckpt.download_checkpoint(url, str(tmp_path / "dl"), storage_options=options)
    message = str(info.value)
    assert f"{url}/model.ckpt-30.data-00000-of-00001" in message
    assert "expected crc32c" in message and "found" in message
    assert tf.train.latest_checkpoint(str(tmp_path / "dl")) is None  # nothing TF would pick up

    report = cloudckpt.verify(url, storage_options=options)
    assert not report.ok and report.step == 30
    assert [(f.name, f.status) for f in report.problems] == [("model.ckpt-30.data-00000-of-00001",
                                                              "checksum mismatch")]
    assert cloudckpt.verify(url, step=20, storage_options=options).ok

    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        second = run(url, options, tmp_path / "vm2", 35)
    assert second.first_step == 20
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("step 30 failed verification" in m and "Falling back" in m for m in errors)
    assert any("Restored step 20" in r.getMessage() and "instead of" in r.getMessage() for r in caplog.records)


def test_refuses_to_restart_from_zero_when_nothing_verifies(s3, tmp_path):
    url, options, client, bucket = s3
    run(url, options, tmp_path / "vm1", 10)  # commits steps 0 and 10
    for step in (0, 10):
        flip_byte(client, bucket, f"runs/exp1/model.ckpt-{step}.data-00000-of-00001")
    with pytest.raises(cloudckpt.IntegrityError, match="will not silently restart from step 0"):
        run(url, options, tmp_path / "vm2", 20)
    fresh = run(url, options, tmp_path / "vm3", 5, restore=False)  # an explicit opt-out still works
    assert fresh.first_step == 0


def test_nothing_committed_starts_fresh(s3, tmp_path):
    url, options, _, _ = s3
    assert run(url, options, tmp_path / "vm", 5).first_step == 0


def test_missing_and_truncated_files_are_reported(s3, tmp_path):
    url, options, client, bucket = s3
    run(url, options, tmp_path / "vm1", 10)
    client.delete_object(Bucket=bucket, Key="runs/exp1/model.ckpt-10.index")
    client.put_object(Bucket=bucket, Key="runs/exp1/model.ckpt-10.meta", Body=b"short")
    statuses = {f.name: f.status for f in cloudckpt.verify(url, storage_options=options).files}
    assert statuses == {"model.ckpt-10.index": "missing", "model.ckpt-10.meta": "size mismatch",
                        "model.ckpt-10.data-00000-of-00001": "ok"}
    with pytest.raises(cloudckpt.IntegrityError, match="model.ckpt-10.index: the manifest names it but it does not"):
        cloudckpt.download_checkpoint(url, str(tmp_path / "dl"), storage_options=options)


class InterruptedDownloadFileSystem(MemoryFileSystem):
    """In-memory store whose download of data files dies half-way (a killed process, a pulled cable)."""

    protocol = "interruptedmemory"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("interruptedmemory://", "memory://", 1))

    def get_file(self, rpath, lpath, *args, **kwargs):
        if ".data-" in rpath:
            data = self.cat_file(rpath)
            with open(lpath, "wb") as f:
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated interruption")
        return super().get_file(rpath, lpath, *args, **kwargs)


fsspec.register_implementation("interruptedmemory", InterruptedDownloadFileSystem, clobber=True)


def test_interrupted_download_leaves_latest_checkpoint_unchanged(tmp_path):
    root = f"ckpt-{uuid.uuid4().hex[:8]}/run"
    run(f"memory://{root}", None, tmp_path / "vm1", 20)
    local = tmp_path / "restored"
    cloudckpt.download_checkpoint(f"memory://{root}", str(local), step=10)
    before = tf.train.latest_checkpoint(str(local))
    assert before == str(local / "model.ckpt-10")

    with pytest.raises(KeyboardInterrupt):
        cloudckpt.download_checkpoint(f"interruptedmemory://{root}", str(local))
    assert tf.train.latest_checkpoint(str(local)) == before
    assert not list(local.glob("model.ckpt-20*"))
    assert [p.name for p in local.iterdir() if p.name.startswith(".")] == []  # temporary files cleaned up


def test_resave_after_restore_keeps_the_committed_checkpoint(tmp_path, caplog):
    url = f"memory://ckpt-{uuid.uuid4().hex[:8]}/run"
    run(url, None, tmp_path / "vm1", 10)
    fs, root = fsspec.core.url_to_fs(url)
    before = fs.cat_file(f"{root}/model.ckpt-10.manifest.json")
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        second = run(url, None, tmp_path / "vm2", 15)  # TF re-saves step 10 right after restoring it
    assert second.first_step == 10
    assert fs.cat_file(f"{root}/model.ckpt-10.manifest.json") == before  # never un-committed or rewritten
    assert not any("different" in r.getMessage() for r in caplog.records)
    assert [c.step for c in cloudckpt.list_checkpoints(url)][-2:] == [10, 15]


def test_newest_unreadable_manifest_is_never_skipped_silently(memory_url, tmp_path):
    """verify(url) / download_checkpoint(url) of "the latest" must not quietly pick an older step."""
    train(lambda s: cloudckpt.CheckpointSaverHook(memory_url, save_steps=5, local_dir=str(tmp_path / "a")),
          last_step=10)
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{root}/model.ckpt-10.manifest.json", b"{not json")
    with pytest.raises(cloudckpt.ManifestError, match="model.ckpt-10.manifest.json"):
        cloudckpt.verify(memory_url)
    with pytest.raises(cloudckpt.ManifestError):
        cloudckpt.download_checkpoint(memory_url, str(tmp_path / "b"))
    assert cloudckpt.verify(memory_url, 5).ok  # an explicit older step is still checkable


def test_a_restore_opens_as_many_connections_as_its_download_streams(s3, tmp_path):
    """``TransferOptions.max_download_streams`` (``cloudckpt pull --streams``) bounds a restore's concurrent GETs:
    1 stream fetches one file at a time; 4 fetch the 5 files 4 at a time (each GET held 0.5 s by the proxy)."""
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore
    from support.fault_proxy import FaultProxy

    url, options, _, _ = s3
    files = {}
    for name in ["model.ckpt-7.index", *(f"model.ckpt-7.data-0000{i}-of-00004" for i in range(4))]:
        files[name] = str(tmp_path / name)
        (tmp_path / name).write_bytes(np.random.default_rng(len(files)).bytes(256 << 10))
    commit_checkpoint(RemoteStore(url, options), LocalCheckpoint(7, "model.ckpt-7", files))
    with FaultProxy(options["endpoint_url"]) as proxy:
        proxied = {**options, "endpoint_url": proxy.url}
        proxy.set_faults(latency=0.5, only_methods=("GET",), path_filter=r"model\.ckpt-7\.(index|data)")
        most = {}
        for streams in (1, 4):  # 1 first: the proxy's count is the most at once over its life
            cloudckpt.download_checkpoint(url, str(tmp_path / f"back{streams}"), storage_options=proxied,
                                          transfer=cloudckpt.TransferOptions(max_download_streams=streams))
            most[streams] = proxy.most_held.get("GET", 0)
            for name, path in files.items():
                assert (tmp_path / f"back{streams}" / name).read_bytes() == open(path, "rb").read()
    assert most[1] == 1 and 2 <= most[4] <= 4, most
    with pytest.raises(cloudckpt.ConfigError, match="max_download_streams"):
        cloudckpt.TransferOptions(max_download_streams=0)


def test_one_large_data_file_downloads_over_every_stream(s3, tmp_path):
    """TF writes one data shard by default, next to a small ``.index`` and ``.meta``. A restore's ranged GETs of
    every file share one pool of ``max_download_streams`` connections, so the data file's three 32 MiB ranges
    download at once, not one at a time on its share of per-file streams (4 // 3 files = 1)."""
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore
    from support.fault_proxy import FaultProxy

    url, options, _, _ = s3
    sizes = {"model.ckpt-3.index": 1000, "model.ckpt-3.meta": 3000, "model.ckpt-3.data-00000-of-00001": (66 << 20) + 5}
    files = {}
    for i, (name, size) in enumerate(sizes.items()):
        files[name] = str(tmp_path / name)
        (tmp_path / name).write_bytes(np.random.default_rng(i).bytes(size))
    commit_checkpoint(RemoteStore(url, options), LocalCheckpoint(3, "model.ckpt-3", files))
    with FaultProxy(options["endpoint_url"]) as proxy:
        proxied = {**options, "endpoint_url": proxy.url}
        proxy.set_faults(latency=0.5, only_methods=("GET",), path_filter=r"model\.ckpt-3\.data")
        cloudckpt.download_checkpoint(url, str(tmp_path / "back"), storage_options=proxied,
                                      transfer=cloudckpt.TransferOptions(max_download_streams=4))
        assert proxy.most_held.get("GET") == 3, proxy.most_held
    for name, path in files.items():
        assert (tmp_path / "back" / name).read_bytes() == open(path, "rb").read()


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_pull_progress_adds_up_to_the_checkpoint_on_fsspec_stores(tmp_path, scheme):
    """``pull_checkpoint``'s progress counts every byte on stores read through fsspec too (its local ``get_file``
    calls no callback: what it did not report is reported when the file is written)."""
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore

    url = f"file://{tmp_path}/remote" if scheme == "file" else f"memory://pp-{uuid.uuid4().hex[:8]}/run"
    sizes = {"model.ckpt-3.index": 100, "model.ckpt-3.data-00000-of-00001": (3 << 20) + 7}
    files = {}
    for i, (name, size) in enumerate(sizes.items()):
        files[name] = str(tmp_path / name)
        (tmp_path / name).write_bytes(np.random.default_rng(i).bytes(size))
    commit_checkpoint(RemoteStore(url), LocalCheckpoint(3, "model.ckpt-3", files))
    seen: list[int] = []
    cloudckpt.pull_checkpoint(url, str(tmp_path / "back"), progress=lambda _info, n: seen.append(n))
    assert sum(seen) == sum(sizes.values()), seen
    for name, path in files.items():
        assert (tmp_path / "back" / name).read_bytes() == open(path, "rb").read()


def test_a_pull_into_a_tf_directory_keeps_tfs_manager_managing_every_checkpoint(tmp_path, memory_url):
    """A pull into a directory of TF's own CheckpointManager rewrote its state file without
    ``all_model_checkpoint_timestamps`` / ``last_preserved_timestamp``: TF's manager (zip of paths and
    timestamps) then forgot every listed checkpoint, so max_to_keep swept none of them (fresh-user trial:
    five kept with max_to_keep=3). The timestamps are each checkpoint's .index mtime, as after a resume."""
    v = tf.Variable(1.0)
    ckpt = tf.train.Checkpoint(v=v)
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=3, local_dir=str(tmp_path / "vm")) as manager:
        manager.save(checkpoint_number=5)
    plain = tmp_path / "plain"
    stock = tf.train.CheckpointManager(ckpt, str(plain), max_to_keep=3)
    for number in (1, 2):
        stock.save(checkpoint_number=number)
    cloudckpt.pull_checkpoint(memory_url, str(plain))
    state = tf.train.get_checkpoint_state(str(plain))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-1", "ckpt-2", "ckpt-5"]
    assert len(state.all_model_checkpoint_timestamps) == 3 and state.last_preserved_timestamp > 0
    again = tf.train.CheckpointManager(ckpt, str(plain), max_to_keep=3)
    assert [os.path.basename(p) for p in again.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-5"]
    again.save(checkpoint_number=6)  # max_to_keep=3 sweeps the oldest, as TF would have
    assert not tf.io.gfile.glob(str(plain / "ckpt-1.*"))
    assert [os.path.basename(p) for p in again.checkpoints] == ["ckpt-2", "ckpt-5", "ckpt-6"]
