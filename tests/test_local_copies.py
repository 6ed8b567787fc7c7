"""Local copies are checked, not trusted: a restart on the same VM compares the local checkpoint with its
committed manifest and downloads the committed copy when they differ (issue example 3)."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest
import tensorflow as tf

import cloudckpt
from support.tf_model import train

DATA = "model.ckpt-10.data-00000-of-00001"


@pytest.fixture
def s3(moto_server):
    url = moto_server.create_bucket(f"local-{uuid.uuid4().hex[:10]}") + "/runs/exp1"
    return url, moto_server.storage_options, moto_server.client(), url.split("/")[2]


def run(url, options, local_dir, last_step, **kwargs):
    return train(lambda scaffold: cloudckpt.CheckpointSaverHook(
        url, save_steps=5, local_dir=str(local_dir), storage_options=options, max_pending=100, **kwargs),
        last_step=last_step)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "cloudckpt"]


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = bytearray()  # the 0-byte file a hard stop can leave behind
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_damaged_local_copy_is_replaced_by_the_committed_one(s3, tmp_path, caplog, how):
    url, options, _, _ = s3
    vm = tmp_path / "vm"
    first = run(url, options, vm, 10)  # commits 0, 5, 10; the same VM restarts after a hard stop
    damage(vm / DATA, how)
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        second = run(url, options, vm, 12)
    assert second.first_step == 10  # TF restored step 10 (a 0-byte .data file makes TF fail otherwise)
    np.testing.assert_array_equal(second.first_weights, first.last_weights)
    assert any("does not match its committed manifest" in m and DATA in m for m in warnings_of(caplog))
    assert not any("up to date" in r.getMessage() for r in caplog.records)
    assert cloudckpt.latest_checkpoint(url, options).step == 12
    assert cloudckpt.verify(url, step=10, storage_options=options).ok  # the committed copy was never touched


def test_falls_back_to_an_older_committed_copy_that_verifies(s3, tmp_path, caplog):
    url, options, client, bucket = s3
    vm = tmp_path / "vm"
    run(url, options, vm, 10)
    at_five = tf.train.load_variable(str(vm / "model.ckpt-5"), "w")
    damage(vm / DATA, "truncated")
    body = bytearray(client.get_object(Bucket=bucket, Key=f"runs/exp1/{DATA}")["Body"].read())
    body[0] ^= 0xFF  # the committed copy of step 10 is corrupt too
    client.put_object(Bucket=bucket, Key=f"runs/exp1/{DATA}", Body=bytes(body))
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        second = run(url, options, vm, 7)
    assert second.first_step == 5
    np.testing.assert_array_equal(second.first_weights, at_five)
    assert any("step 10 failed verification" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_nothing_verifies_and_the_local_copy_is_damaged_refuses_to_restart_from_zero(s3, tmp_path):
    url, options, client, bucket = s3
    vm = tmp_path / "vm"
    run(url, options, vm, 5)  # commits 0 and 5
    damage(vm / "model.ckpt-5.data-00000-of-00001", "truncated")
    for step in (0, 5):
        key = f"runs/exp1/model.ckpt-{step}.data-00000-of-00001"
        client.put_object(Bucket=bucket, Key=key, Body=b"garbage")
    with pytest.raises(cloudckpt.IntegrityError, match="will not silently restart from step 0"):
        run(url, options, vm, 8)


def test_intact_local_copy_is_used_without_a_download(s3, tmp_path, caplog):
    url, options, _, _ = s3
    vm = tmp_path / "vm"
    run(url, options, vm, 10)
    run(url, options, vm, 10)  # a restart: TF re-saves the restored step (writing its .meta again)
    latest = cloudckpt.latest_checkpoint(url, options).step
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        third = run(url, options, vm, latest + 1)
    assert third.first_step == latest
    assert any(f"step {latest}" in r.getMessage() and "up to date" in r.getMessage() for r in caplog.records)
    assert not any("Restored checkpoint" in r.getMessage() for r in caplog.records)
    assert not warnings_of(caplog)


def test_local_checkpoint_newer_than_anything_committed_is_kept(s3, tmp_path, caplog):
    url, options, _, _ = s3
    vm = tmp_path / "vm"
    run(url, options, vm, 10)
    # The VM trained on after its last commit (TF's own hook, nothing uploaded): step 13 is local only.
    train(lambda scaffold: tf.compat.v1.train.CheckpointSaverHook(str(vm), save_steps=100), last_step=13)
    caplog.clear()  # the first run's records too are captured when the logger is at INFO already
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        again = run(url, options, vm, 15)
    assert again.first_step == 13
    assert any("newer than anything committed" in r.getMessage() for r in caplog.records)
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)][-2:] == [13, 15]
    # the registration names the store's committed checkpoint the new commits follow, not a resume point
    (registered,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Registered as")]
    assert "its commits follow model.ckpt-10 (step 10, commit " in registered, registered
    assert "resuming" not in registered, registered


def test_a_local_checkpoint_with_nothing_committed_is_not_contradicted_by_the_registration(s3, tmp_path, caplog):
    """Local step 20 (TF's own hook), nothing committed: "Local checkpoint step 20 ... resuming from it" was
    followed by "Registered as the writer ... resuming from nothing". The registration line now says what it
    means: no committed checkpoint of the store precedes this writer's commits (a new lineage)."""
    url, options, _, _ = s3
    vm = tmp_path / "vm"
    train(lambda scaffold: tf.compat.v1.train.CheckpointSaverHook(str(vm), save_steps=100), last_step=20)
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        again = run(url, options, vm, 22)
    assert again.first_step == 20
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Local checkpoint step 20 ") and "resuming from it" in m for m in messages), messages
    (registered,) = [m for m in messages if m.startswith("Registered as")]
    assert "no checkpoint committed in the store precedes its commits: its first commit starts a new lineage" \
        in registered, registered
    assert "resuming" not in registered, registered


def test_a_local_dir_of_one_url_is_refused_for_another(s3, tmp_path):
    """Two experiments, one explicit local_dir: the second would silently start from the first's weights."""
    url, options, _, _ = s3
    vm = tmp_path / "vm"
    run(url, options, vm, 10)
    other = url.rsplit("/", 1)[0] + "/exp2"
    with pytest.raises(cloudckpt.ConfigError) as refused:
        run(other, options, vm, 10)
    message = str(refused.value)
    assert url in message and other in message and "local_dir=" in message, message
    assert cloudckpt.list_checkpoints(other, options) == []
    assert run(other, options, tmp_path / "vm2", 5).first_step == 0  # its own local_dir: a fresh start
    assert run(url, options, vm, 12).first_step == 10  # the same URL again resumes as before
