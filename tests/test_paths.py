"""Issue 12, "Paths": a checkpoint_dir without ``scheme://`` is a local path whatever its characters; URLs are
never chained (``::`` is part of the key); any basename TF's own hook accepts round-trips.

Real TF training through cloudckpt.CheckpointSaverHook; facts checked with the OS, boto3, plain fsspec
and TF's own readers of the ``checkpoint`` state file.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pytest
import tensorflow as tf

import cloudckpt
from cloudckpt.commit import render_state_file
from cloudckpt.manifest import manifest_name, parse_checkpoint_file_name, parse_manifest_name
from cloudckpt.remote import RemoteStore, is_local_path
from support.checks import assert_all_committed_intact, remote_fs
from support.tf_model import train


def manifest_steps(directory) -> list[int]:
    return sorted(parsed[1] for name in os.listdir(directory) if (parsed := parse_manifest_name(name)))


def tree(root) -> set[str]:
    """Every directory and file under ``root``, relative."""
    found = set()
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


# -- what is a URL -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, local", [
    ("runs/sweep::lr=0.1", True), ("data:2026-01-01", True), ("a#b c", True), ("näme/ü", True),
    ("/abs/x::y", True), ("s3:/one-slash", True), ("::", True), ("1s3://x", True),
    ("s3://bucket/a::b", False), ("file:///tmp/x", False), ("git+ssh://h/x", False), ("S3://B/x", False),
])
def test_is_local_path(path, local):
    assert is_local_path(path) is local


@pytest.mark.parametrize("path", ["s3:/bucket/run", "gs:bucket/run", "S3:/b/r", "memory:/x",
                                  "s3:/key:secretsecret@bucket/run"])
def test_url_with_a_slash_missing_is_refused_not_made_a_local_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cloudckpt.ConfigError, match="slash missing") as info:
        cloudckpt.CheckpointSaverHook(path, save_steps=1)
    assert "secretsecret" not in str(info.value)
    assert os.listdir(tmp_path) == []  # nothing created
    assert RemoteStore(f"./{path}").is_local  # written as a local path on purpose: fine


def test_local_paths_are_never_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("runs/sweep::lr=0.1", "data:2026-01-01", "x::memory://y", "a#b c/näme"):
        store = RemoteStore(path)
        assert store.is_local and store.url == path
        assert store.root == os.path.normpath(os.path.join(str(tmp_path), path))
    assert RemoteStore(f"file://{tmp_path}/a::b").root == f"{tmp_path}/a::b"
    assert RemoteStore("memory://host/a::b").root.endswith("host/a::b")


# -- local paths: committed in place, exactly there ----------------------------------------------------

@pytest.mark.parametrize("path", ["data:2026-01-01", "run#3 with spaces", "näme-ü/λ:1"])
def test_odd_local_path_is_committed_in_place(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(lambda s: cloudckpt.CheckpointSaverHook(path, save_steps=2), last_step=3)

    assert manifest_steps(tmp_path / path) == [0, 2, 3]
    top = path.split("/")[0]
    assert {p.split(os.sep)[0] for p in tree(tmp_path)} == {top}  # nothing created anywhere else
    assert tree(os.environ["CLOUDCKPT_CACHE_DIR"]) == set()  # in place: no upload cache
    assert [c.step for c in cloudckpt.list_checkpoints(path)] == [0, 2, 3]
    # the state file is the Saver's own in place: absolute paths (the hook's directory, made absolute)
    assert tf.train.latest_checkpoint(path) == os.path.join(str(tmp_path), path, "model.ckpt-3")
    assert cloudckpt.verify(path).ok


def test_two_sweeps_never_share_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = "runs/sweep::lr=0.1", "runs/sweep::lr=0.2"
    train(lambda s: cloudckpt.CheckpointSaverHook(first, save_steps=2), last_step=4)
    train(lambda s: cloudckpt.CheckpointSaverHook(second, save_steps=3), last_step=3)

    assert set(os.listdir(tmp_path / "runs")) == {"sweep::lr=0.1", "sweep::lr=0.2"}  # no runs/sweep
    assert [c.step for c in cloudckpt.list_checkpoints(first)] == [0, 2, 4]
    assert [c.step for c in cloudckpt.list_checkpoints(second)] == [0, 3]
    assert manifest_steps(tmp_path / first) == [0, 2, 4] and manifest_steps(tmp_path / second) == [0, 3]
    # A restart of the first sweep resumes from its own step 4, not from the other sweep's.
    result = train(lambda s: cloudckpt.CheckpointSaverHook(first, save_steps=2), last_step=6)
    assert result.first_step == 4


# -- a key with '::' in S3 ---------------------------------------------------------------------------

def test_s3_key_with_double_colon(moto_server, tmp_path):
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    url, options = f"s3://{bucket}/a::b", moto_server.storage_options
    train(lambda s: cloudckpt.CheckpointSaverHook(url, save_steps=2, local_dir=str(tmp_path / "vm1"),
                                                  storage_options=options), last_step=3)

    keys = {o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert "a::b/model.ckpt-3.manifest.json" in keys and "a::b/checkpoint" in keys
    assert all(k.startswith("a::b/") for k in keys), keys
    infos = cloudckpt.list_checkpoints(url, options)
    assert [c.step for c in infos] == [0, 2, 3] and infos[-1].prefix == f"{url}/model.ckpt-3"
    assert cloudckpt.verify(url, storage_options=options).ok
    local = cloudckpt.download_checkpoint(url, str(tmp_path / "dl"), step=2, storage_options=options)
    assert tf.train.latest_checkpoint(str(tmp_path / "dl")) == local
    # A new VM resumes from the bucket.
    result = train(lambda s: cloudckpt.CheckpointSaverHook(url, save_steps=2, local_dir=str(tmp_path / "vm2"),
                                                           storage_options=options), last_step=5)
    assert result.first_step == 3


# -- basenames: file-name parsing and the TF state file ------------------------------------------------

ODD_BASENAMES = ['q"uote näme #1', "back\\slash", "it's a\ttab", "x-5::y"]


@pytest.mark.parametrize("basename", [*ODD_BASENAMES, "line\nbreak"])
def test_file_name_parsing_takes_any_basename(basename):
    assert parse_checkpoint_file_name(f"{basename}-30.index") == (f"{basename}-30", 30)
    assert parse_checkpoint_file_name(f"{basename}-30.data-00000-of-00001") == (f"{basename}-30", 30)
    assert parse_manifest_name(manifest_name(f"{basename}-7")) == (f"{basename}-7", 7)
    assert parse_checkpoint_file_name(f"{basename}-30.index\n") is None
    assert parse_checkpoint_file_name(f"{basename}-30.tmp") is None


@pytest.mark.parametrize("basename", [*ODD_BASENAMES, "line\nbreak", "ctrl\x01\x7f"])
def test_state_file_is_what_tf_writes_and_reads(basename, tmp_path):
    prefixes = [f"{basename}-0", f"{basename}-10"]
    tf.compat.v1.train.update_checkpoint_state(str(tmp_path), prefixes[-1], prefixes)
    assert render_state_file(prefixes) == (tmp_path / "checkpoint").read_bytes()
    (tmp_path / "checkpoint").write_bytes(render_state_file(prefixes))
    state = tf.compat.v1.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [os.path.join(str(tmp_path), p) for p in prefixes]


def copy_remote_directory(url: str, options: dict | None, destination) -> None:
    fs, root = remote_fs(url, options)
    os.makedirs(destination)
    for entry in fs.ls(root, detail=True):
        if entry["type"] != "file":  # the commit log (.cloudckpt/) is not part of TF's layout
            continue
        path = entry["name"]
        with open(os.path.join(destination, posixpath.basename(path)), "wb") as f:
            f.write(fs.cat_file(path))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_odd_basename_round_trips(backend, moto_server, tmp_path):
    basename = 'q"uote näme #1'
    if backend == "local":
        url, options, local = str(tmp_path / "ckpt dir"), None, None
    else:
        bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
        moto_server.create_bucket(bucket)
        url, options, local = f"s3://{bucket}/runs/ä b", moto_server.storage_options, str(tmp_path / "vm1")
    train(lambda s: cloudckpt.CheckpointSaverHook(url, save_steps=2, checkpoint_basename=basename, local_dir=local,
                                                  storage_options=options), last_step=3)

    committed = assert_all_committed_intact(url, options)
    assert set(committed) == {0, 2, 3} and committed[3]["prefix"] == f"{basename}-3"
    assert cloudckpt.latest_checkpoint(url, options).prefix == f"{url}/{basename}-3"
    copy = tmp_path / "copy"
    if backend == "local":  # in place the state file is the Saver's own (absolute paths): read where it is
        copy = tmp_path / "ckpt dir"
    else:
        copy_remote_directory(url, options, copy)  # the directory as stored, read back by TF itself
    state = tf.compat.v1.train.get_checkpoint_state(str(copy))
    assert list(state.all_model_checkpoint_paths) == [os.path.join(str(copy), f"{basename}-{s}") for s in (0, 2, 3)]
    assert tf.train.latest_checkpoint(str(copy)) == os.path.join(str(copy), f"{basename}-3")
    pulled = cloudckpt.download_checkpoint(url, str(tmp_path / "pulled"), storage_options=options)
    assert tf.train.latest_checkpoint(str(tmp_path / "pulled")) == pulled
    if backend == "s3":  # a new VM resumes from the bucket under the same basename
        result = train(lambda s: cloudckpt.CheckpointSaverHook(
            url, save_steps=2, checkpoint_basename=basename, local_dir=str(tmp_path / "vm2"),
            storage_options=options), last_step=4)
        assert result.first_step == 3
