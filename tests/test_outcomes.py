"""Honest outcomes: every save ends as uploaded, healed, already committed or refused; stats() counts each,
only real uploads are logged "Committed"; housekeeping failures are counted; graph.pbtxt follows changes."""

from __future__ import annotations

import logging
import uuid

import fsspec
import pytest
import tensorflow as tf
from fsspec.implementations.memory import MemoryFileSystem

import cloudckpt
from cloudckpt.commit import LocalCheckpoint
from cloudckpt.remote import RemoteStore
from cloudckpt.uploader import Uploader, UploadJob
from cloudckpt.writers import Writer
from support.checks import assert_all_committed_intact
from support.tf_model import train


def hook_run(url, local_dir, last_step, hooks, **kwargs):
    def make(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(local_dir), max_pending=100,
                                                   **kwargs))
        return hooks[-1]
    return train(make, last_step=last_step, extra_hooks=kwargs.pop("extra_hooks", ()))


def committed_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Committed checkpoint step")]


def test_uploaded_already_committed_and_healed_on_restarts(tmp_path, caplog):
    url = f"memory://outcomes-{uuid.uuid4().hex[:8]}/run"
    hooks: list = []
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        hook_run(url, tmp_path / "vm", 10, hooks)
    first = hooks[-1].stats()
    assert (first.committed, first.already_committed, first.healed, first.refused) == (3, 0, 0, 0)
    assert len(committed_logs(caplog)) == 3

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        hook_run(url, tmp_path / "vm", 12, hooks)  # restart: TF re-saves step 10 right after restoring it
    second = hooks[-1].stats()
    assert (second.committed, second.already_committed, second.healed, second.refused) == (1, 1, 0, 0)
    assert [m.split(" to ")[0] for m in committed_logs(caplog)] == ["Committed checkpoint step 12"]
    assert any("step 10 is already committed" in r.getMessage() and "nothing uploaded" in r.getMessage()
               for r in caplog.records)

    fs, root = fsspec.core.url_to_fs(url)
    fs.rm_file(f"{root}/model.ckpt-12.data-00000-of-00001")  # lost from the bucket
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        hook_run(url, tmp_path / "vm", 13, hooks)  # the same VM still has step 12 intact
    third = hooks[-1].stats()
    assert (third.committed, third.already_committed, third.healed, third.refused) == (1, 0, 1, 0)
    assert third.bytes_uploaded > 0
    assert [m.split(" to ")[0] for m in committed_logs(caplog)] == ["Committed checkpoint step 13"]
    assert any(m.startswith("Healed committed checkpoint step 12") for m in (r.getMessage() for r in caplog.records))
    assert set(assert_all_committed_intact(url)) == {0, 5, 10, 12, 13}


def fake(root, step: int, payload: bytes) -> LocalCheckpoint:
    directory = root / uuid.uuid4().hex[:8]
    directory.mkdir()
    (directory / f"model.ckpt-{step}.index").write_bytes(b"index")
    (directory / f"model.ckpt-{step}.data-00000-of-00001").write_bytes(payload)
    return LocalCheckpoint(step, f"model.ckpt-{step}", {n.name: str(n) for n in directory.iterdir()})


def test_refused_save_is_counted_with_its_reason_and_not_logged_committed(tmp_path, caplog):
    store = RemoteStore(f"memory://outcomes-{uuid.uuid4().hex[:8]}/run")
    uploader = Uploader(store)
    uploader.start()
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        uploader.submit(UploadJob(fake(tmp_path, 3, b"a" * 100)))
        assert uploader.wait(30)
        uploader.submit(UploadJob(fake(tmp_path, 3, b"b" * 100)))  # same step, other tensors
        assert uploader.wait(30)
    uploader.close()
    stats = uploader.stats()
    assert (stats.committed, stats.refused, stats.failed) == (1, 1, 0)
    assert "different tensor data" in stats.last_refusal and "step 3" in stats.last_refusal
    assert len(committed_logs(caplog)) == 1
    assert uploader.take_failure() is None  # a refusal is an outcome, not an error


def test_replace_committed_replaces_a_different_save_and_only_when_asked(tmp_path, caplog):
    """``replace_committed`` (what Keras' ModelCheckpoint asks for): a save of a committed step with other tensors
    replaces it, identical bytes stay "already committed"; without it (every other adapter, the default) the same
    save is still refused and the committed checkpoint stays."""
    url = f"memory://outcomes-{uuid.uuid4().hex[:8]}/run"
    fs, root = fsspec.core.url_to_fs(url)
    uploader = Uploader(RemoteStore(url))
    uploader.start()

    def save(payload, **kwargs):
        uploader.submit(UploadJob(fake(tmp_path, 3, payload), **kwargs))
        assert uploader.wait(30)
        return fs.cat_file(f"{root}/model.ckpt-3.data-00000-of-00001")

    try:
        assert save(b"a" * 100) == b"a" * 100
        commit_a = cloudckpt.latest_checkpoint(url).commit_id
        with caplog.at_level(logging.WARNING, logger="cloudckpt"):
            assert save(b"a" * 100, replace_committed=True) == b"a" * 100  # identical: nothing uploaded
            assert save(b"b" * 100, replace_committed=True) == b"b" * 100
        # (WARNING and up: an earlier test may have left the cloudckpt logger letting INFO through)
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert save(b"c" * 100) == b"b" * 100  # the default: refused, the committed checkpoint stays
    finally:
        uploader.close()
    stats = uploader.stats()
    assert (stats.committed, stats.replaced, stats.already_committed, stats.refused, stats.failed) == (2, 1, 1, 1, 0)
    assert "different tensor data" in stats.last_refusal
    committed = cloudckpt.list_checkpoints(url, include_superseded=True)
    assert [c.step for c in committed] == [3] and committed[0].commit_id != commit_a
    assert set(assert_all_committed_intact(url)) == {3}


class NoDataDeletes(MemoryFileSystem):
    """In-memory store where deleting checkpoint data is denied (a bucket policy without DeleteObject)."""

    protocol = "nodatadeletes"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("nodatadeletes://", "memory://", 1))

    def rm_file(self, path):
        if ".data-" in path and ".tmp-" not in path:  # (memory:// create-only moves a temporary object)
            raise PermissionError("Access Denied")
        return super().rm_file(path)


fsspec.register_implementation("nodatadeletes", NoDataDeletes, clobber=True)


def test_housekeeping_failures_are_counted_with_the_last_error(tmp_path):
    root = f"outcomes-{uuid.uuid4().hex[:8]}/run"
    hooks: list = []
    result = hook_run(f"nodatadeletes://{root}", tmp_path / "vm", 15, hooks, remote_max_to_keep=1,
                      retry=cloudckpt.RetryPolicy(max_attempts=1))
    assert result.last_step == 15  # training went on
    stats = hooks[-1].stats()
    assert stats.committed == 4 and stats.failed == 0
    assert stats.housekeeping_failures >= 1
    assert "Access Denied" in stats.last_housekeeping_error
    assert [c.step for c in cloudckpt.list_checkpoints(f"memory://{root}")] == [15]  # retired all the same
    assert set(assert_all_committed_intact(f"memory://{root}")) == {15}


class AddOp(tf.compat.v1.train.SessionRunHook):
    """Adds an op to the graph before it is finalized: the graph of the next run is different."""

    def begin(self):
        tf.constant(1.0, name="new_in_the_second_run")


def test_graph_is_uploaded_whenever_it_changed_also_after_a_resume(tmp_path):
    url = f"memory://outcomes-{uuid.uuid4().hex[:8]}/run"
    fs, root = fsspec.core.url_to_fs(url)
    hook_run(url, tmp_path / "vm1", 5, [])
    first = fs.cat_file(f"{root}/graph.pbtxt")
    assert b"new_in_the_second_run" not in first
    hook_run(url, tmp_path / "vm2", 10, [], extra_hooks=[AddOp()])  # resumes at 5: re-save already committed
    assert b"new_in_the_second_run" in fs.cat_file(f"{root}/graph.pbtxt")


def test_fenced_raises_even_with_on_error_warn(tmp_path):
    url = f"memory://outcomes-{uuid.uuid4().hex[:8]}/run"
    hooks: list = []

    class NewerWriterStarts(tf.compat.v1.train.CheckpointSaverListener):
        def after_save(self, session, step):
            if step == 5:
                Writer(RemoteStore(url)).register(None)  # another job starts on the same directory

    with pytest.raises(cloudckpt.FencedError) as info:
        hook_run(url, tmp_path / "vm", 100, hooks, on_error="warn", listeners=[NewerWriterStarts()])
    assert url in str(info.value)
    stats = hooks[-1].stats()
    assert stats.fenced_by and stats.committed <= 2
    assert all(c.step <= 5 for c in cloudckpt.list_checkpoints(url, include_superseded=True))
