"""End-to-end: real graph-mode TF training through MonitoredTrainingSession with cloudckpt's hook."""

from __future__ import annotations

import logging
import os
import time
import uuid

import fsspec
import pytest
import tensorflow as tf
from fsspec.implementations.memory import MemoryFileSystem

import cloudckpt
from cloudckpt._saver_check import restore_mismatches, restoring_var_list
from support.checks import assert_all_committed_intact, log_entries, newest_writer_id, state_file
from support.tf_model import train
from test_engine import cloudckpt_threads, open_in_another_process


@pytest.fixture(params=["local", "memory", "s3"])
def target(request, tmp_path, memory_url, moto_server):
    """(checkpoint_dir, storage_options) for each backend the core must support."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    if request.param == "memory":
        return memory_url, None
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(bucket)
    return f"s3://{bucket}/runs/exp1", moto_server.storage_options


def test_every_save_is_committed_intact(target, tmp_path):
    url, options = target
    hooks = []

    def make_hook(scaffold):
        local = None if "://" not in url else str(tmp_path / "local")
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=10, scaffold=scaffold, local_dir=local,
                                                   storage_options=options, max_pending=100))
        return hooks[-1]

    result = train(make_hook, last_step=35)
    assert result.last_step == 35

    committed = assert_all_committed_intact(url, options)
    assert set(committed) == {0, 10, 20, 30, 35}
    state = state_file(url, options)
    if "://" in url:  # cloudckpt's state file: the committed lineage, relative paths
        assert state["model_checkpoint_path"] == ["model.ckpt-35"]
        assert state["all_model_checkpoint_paths"] == [f"model.ckpt-{s}" for s in (0, 10, 20, 30, 35)]
        assert all("/" not in p for p in state["all_model_checkpoint_paths"])
    else:  # in place the state file is the Saver's own (absolute paths: its save_relative_paths=False)
        assert state["model_checkpoint_path"] == [os.path.join(url, "model.ckpt-35")]
        assert state["all_model_checkpoint_paths"] == [os.path.join(url, f"model.ckpt-{s}")
                                                       for s in (0, 10, 20, 30, 35)]
    latest = cloudckpt.latest_checkpoint(url, options)
    assert latest is not None and latest.step == result.last_step
    assert latest.prefix == url.rstrip("/") + "/model.ckpt-35"
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [0, 10, 20, 30, 35]
    stats = hooks[0].stats()
    assert stats.committed == 5 and stats.failed == 0 and stats.last_committed_step == 35
    if "://" not in url:  # a local directory stays a valid TF checkpoint directory
        assert tf.train.latest_checkpoint(url) == os.path.join(url, "model.ckpt-35")
        assert not os.path.exists(os.path.join(url, ".cloudckpt-staging"))  # no staging copy in place


def test_graph_is_uploaded_next_to_checkpoints(memory_url, tmp_path):
    train(lambda s: cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, local_dir=str(tmp_path)), last_step=5)
    fs, root = fsspec.core.url_to_fs(memory_url)
    assert fs.exists(f"{root}/graph.pbtxt")
    assert b"node" in fs.cat_file(f"{root}/graph.pbtxt")


@pytest.mark.parametrize("kwargs, message", [
    ({}, "One of save_steps or save_secs should be set: exactly one must be set, and neither was given."),
    ({"save_steps": 10, "save_secs": 10}, "One of save_steps or save_secs should be set, not both: exactly one must "
                                          "be set, but both were given (save_steps=10, save_secs=10)."),
    ({"save_steps": 10, "saver": object(), "scaffold": object()}, "At most one of saver or scaffold should be set."),
])
def test_seed_value_errors(kwargs, message, memory_url):
    """TF's exception type (ValueError) and, opening the message, TF's wording (code matching on it still
    matches); with both save_steps and save_secs TF's "One of ... should be set." read as if neither was
    set: the message says exactly one must be, and which case this is."""
    with pytest.raises(ValueError) as info:
        cloudckpt.CheckpointSaverHook(memory_url, **kwargs)
    assert str(info.value) == message
    if "save_steps" not in kwargs or "save_secs" in kwargs:
        assert str(info.value).startswith("One of save_steps or save_secs should be set")
        with pytest.raises(ValueError):  # TF's own hook refuses the same arguments with the same type
            tf.compat.v1.train.CheckpointSaverHook("/nonexistent", **kwargs)


def test_hook_is_a_tf_checkpoint_saver_hook(memory_url, tmp_path):
    hook = cloudckpt.CheckpointSaverHook(memory_url, save_steps=1, local_dir=str(tmp_path))
    assert isinstance(hook, tf.compat.v1.train.CheckpointSaverHook)
    assert hook.local_dir == str(tmp_path)


def test_default_local_dir_is_stable_per_url(monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDCKPT_CACHE_DIR", str(tmp_path))
    a1 = cloudckpt.CheckpointSaverHook("memory://a/run", save_steps=1).local_dir
    a2 = cloudckpt.CheckpointSaverHook("memory://a/run/", save_steps=1).local_dir
    b = cloudckpt.CheckpointSaverHook("memory://b/run", save_steps=1).local_dir
    assert a1 == a2 != b
    assert os.path.dirname(a1) == str(tmp_path)


class RecordingListener(tf.compat.v1.train.CheckpointSaverListener):
    def __init__(self, log, name, stop_at=None):
        self.log, self.name, self.stop_at = log, name, stop_at

    def begin(self):
        self.log.append((self.name, "begin", None))

    def before_save(self, session, step):
        self.log.append((self.name, "before_save", int(step)))

    def after_save(self, session, step):
        self.log.append((self.name, "after_save", int(step)))
        return self.stop_at is not None and step >= self.stop_at

    def end(self, session, step):
        self.log.append((self.name, "end", int(step)))


def test_listeners_are_called_in_order(memory_url, tmp_path):
    log = []
    listeners = [RecordingListener(log, "a"), RecordingListener(log, "b")]
    train(lambda s: cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, listeners=listeners,
                                                  local_dir=str(tmp_path)), last_step=15)
    expected = [("a", "begin", None), ("b", "begin", None)]
    for step in (0, 10, 15):
        expected += [("a", "before_save", step), ("b", "before_save", step),
                     ("a", "after_save", step), ("b", "after_save", step)]
    expected += [("a", "end", 15), ("b", "end", 15)]
    assert log == expected


def test_after_save_returning_true_stops_training(memory_url, tmp_path):
    log = []
    result = train(lambda s: cloudckpt.CheckpointSaverHook(
        memory_url, save_steps=10, listeners=[RecordingListener(log, "stopper", stop_at=20)],
        local_dir=str(tmp_path)), last_step=100)
    assert result.last_step == 20
    assert cloudckpt.latest_checkpoint(memory_url).step == 20


class SlowMemoryFileSystem(MemoryFileSystem):
    """An in-memory store whose uploads take a while (a slow link), to race the Saver's max_to_keep."""

    protocol = "slowmemory"
    delay = 0.3

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("slowmemory://", "memory://", 1))

    def put_file(self, lpath, rpath, *args, **kwargs):
        time.sleep(self.delay)
        return super().put_file(lpath, rpath, *args, **kwargs)


fsspec.register_implementation("slowmemory", SlowMemoryFileSystem, clobber=True)


def test_saver_max_to_keep_cannot_race_a_slow_upload(tmp_path):
    url = f"slowmemory://ckpt-{uuid.uuid4().hex[:8]}/run"
    local = tmp_path / "local"
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, scaffold=scaffold, local_dir=str(local),
                                                   max_pending=100, remote_max_to_keep=0))  # 0: keep all
        return hooks[0]

    train(make_hook, last_step=30, max_to_keep=1)
    # The Saver kept one checkpoint locally, so it deleted the others while their uploads were slow ...
    assert len(list(local.glob("model.ckpt-*.index"))) == 1
    # ... yet every checkpoint reached the store whole.
    committed = assert_all_committed_intact(url)
    assert set(committed) == {0, 5, 10, 15, 20, 25, 30}
    assert not any((local / ".cloudckpt-staging").iterdir())


def test_fatal_upload_failure_surfaces_in_training_thread(moto_server, tmp_path):
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    url = moto_server.create_bucket(bucket) + "/runs/exp1"
    client = moto_server.client()
    holder = {}

    class DeleteBucket(tf.compat.v1.train.CheckpointSaverListener):
        def after_save(self, session, step):
            if step == 10:
                holder["hook"].wait()  # step 0 committed; now the bucket goes away
                for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
                client.delete_bucket(Bucket=bucket)

    def make_hook(scaffold):
        holder["hook"] = cloudckpt.CheckpointSaverHook(
            url, save_steps=10, listeners=[DeleteBucket()], local_dir=str(tmp_path),
            storage_options=moto_server.storage_options, retry=cloudckpt.RetryPolicy(max_attempts=2, initial_backoff=0.01))
        return holder["hook"]

    with pytest.raises(cloudckpt.UploadError) as info:
        train(make_hook, last_step=1000)
    message = str(info.value)
    assert url in message and "step 10" in message
    assert "NoSuchBucket" in message or "does not exist" in message
    assert holder["hook"].stats().failed >= 1


class FailStepTenLater(MemoryFileSystem):
    """In-memory store where step 10's upload fails (access denied) after a while."""

    protocol = "failtenmemory"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("failtenmemory://", "memory://", 1))

    def put_file(self, lpath, rpath, *args, **kwargs):
        if "model.ckpt-10." in rpath:
            time.sleep(1.0)
            raise PermissionError("Access Denied")
        return super().put_file(lpath, rpath, *args, **kwargs)


fsspec.register_implementation("failtenmemory", FailStepTenLater, clobber=True)


def test_end_after_a_failed_upload_still_saves_and_commits_the_final_checkpoint(tmp_path):
    root = f"ckpt-{uuid.uuid4().hex[:8]}/run"
    local = tmp_path / "local"
    with pytest.raises(cloudckpt.UploadError) as info:
        train(lambda s: cloudckpt.CheckpointSaverHook(f"failtenmemory://{root}", save_steps=10, local_dir=str(local)),
              last_step=12)
    assert "step 10" in str(info.value) and "Access Denied" in str(info.value)
    assert (local / "model.ckpt-12.index").exists()  # the failure did not prevent the final save ...
    assert cloudckpt.latest_checkpoint(f"memory://{root}").step == 12  # ... nor its commit


def test_a_session_that_did_not_restore_the_download_is_refused(cloudckpt_s3, tmp_path):
    """The hook downloads step 20 into a fresh local_dir, but the session was created without
    checkpoint_dir=hook.local_dir: it starts at step 0. Committing step 0 on top of step 20 would supersede
    20 (retention then deletes it), so the hook raises before saving anything; with checkpoint_dir the same
    local_dir resumes at 20."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    hooks = []

    def make_hook(local, **kwargs):
        def make(scaffold):
            hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / local),
                                                       storage_options=options, max_pending=100, **kwargs))
            return hooks[-1]
        return make

    train(make_hook("vm1", remote_max_to_keep=0), last_step=20)
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [0, 5, 10, 15, 20]
    local = str(tmp_path / "vm2")
    with pytest.raises(cloudckpt.ConfigError) as info:
        train(make_hook("vm2", remote_max_to_keep=1), last_step=30, restore=False)
    message = str(info.value)
    assert "starts at global step 0" in message
    assert f"did not restore checkpoint step 20 that cloudckpt downloaded from {url} into {local}" in message
    assert f"checkpoint_dir={local!r}" in message
    assert hooks[-1].restored is not None and hooks[-1].restored.step == 20
    assert not os.path.exists(os.path.join(local, "model.ckpt-0.index"))  # nothing was saved
    assert cloudckpt_threads() == []  # nothing keeps running
    # nothing was committed: step 20 is still the head, nothing superseded or deleted
    assert [c.step for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)] == [0, 5, 10, 15, 20]
    assert cloudckpt.latest_checkpoint(url, options).step == 20

    resumed = train(make_hook("vm2", remote_max_to_keep=0), last_step=25)
    assert resumed.first_step == 20
    assert [c.step for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)] == \
        [0, 5, 10, 15, 20, 25]
    assert_all_committed_intact(url, options)


def test_a_session_that_did_not_restore_in_place_is_refused(tmp_path):
    """In place: the directory still holds model.ckpt-0 (the Saver keeps five), yet a session starting at
    step 0 while the state file names step 10 did not restore step 10, and is refused; so is TF's stock hook
    with cloudckpt's UploadListener, at its first save."""
    ckpt_dir = str(tmp_path / "ckpt")

    def in_place(scaffold):
        return cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=5, remote_max_to_keep=0, max_pending=100)

    train(in_place, last_step=10)
    assert [c.step for c in cloudckpt.list_checkpoints(ckpt_dir)] == [0, 5, 10]
    assert os.path.exists(os.path.join(ckpt_dir, "model.ckpt-0.index"))
    with pytest.raises(cloudckpt.ConfigError, match=f"did not restore checkpoint step 10 that {ckpt_dir} holds"):
        train(in_place, last_step=12, restore=False)

    def stock(scaffold):
        listener = cloudckpt.UploadListener(ckpt_dir, ckpt_dir)
        return tf.compat.v1.train.CheckpointSaverHook(ckpt_dir, save_steps=5, listeners=[listener])

    with pytest.raises(cloudckpt.ConfigError, match="starts at global step 0: it did not restore checkpoint step 10"):
        train(stock, last_step=12, restore=False)
    assert [c.step for c in cloudckpt.list_checkpoints(ckpt_dir, include_superseded=True)] == [0, 5, 10]
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("model.ckpt-10")
    assert train(in_place, last_step=12).first_step == 10


@pytest.mark.parametrize("basename", ["", "../model.ckpt", "sub/model.ckpt", ".."])
def test_a_checkpoint_basename_that_is_no_plain_file_name_is_refused(basename, memory_url, tmp_path):
    """Was: '' and '../model.ckpt' trained and committed nothing, silently ('../' saved outside local_dir);
    'sub/model.ckpt' failed at the first save with TF's "Parent directory ... doesn't exist"."""
    with pytest.raises(cloudckpt.ConfigError, match="checkpoint_basename must be a plain file name"):
        cloudckpt.CheckpointSaverHook(memory_url, save_steps=2, checkpoint_basename=basename,
                                      local_dir=str(tmp_path / "l"))
    assert not (tmp_path / "l").exists()


def test_a_directory_of_a_tf2_checkpoint_manager_is_refused_before_the_hook_registers(cloudckpt_s3, tmp_path):
    """A TF1 job pointed at the directory a TF2 CheckpointManager is writing: the session's Saver died with TF's
    bare 'NotFoundError: Key w not found in checkpoint' after the hook had registered as the directory's writer,
    fencing the healthy TF2 job. Now begin() refuses the resume point ckpt-3 (not model.ckpt-*) with a
    ConfigError naming both names, before registering: the TF2 job goes on committing."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    v = tf.Variable(tf.zeros([4]))
    with cloudckpt.CheckpointManager(tf.train.Checkpoint(v=v), url, max_to_keep=2, local_dir=str(tmp_path / "tf2"),
                                     storage_options=options) as manager:
        manager.restore_or_initialize()
        manager.save(checkpoint_number=3)
        manager.wait()

        def tf1_hook(scaffold):
            return cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / "tf1"),
                                                 storage_options=options)

        with pytest.raises(cloudckpt.ConfigError) as info:
            train(tf1_hook, last_step=10)
        message = str(info.value)
        with pytest.raises(cloudckpt.ConfigError, match="continues TF1 Saver"):  # named alike: still refused
            train(lambda scaffold: cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / "tf1b"),
                                                                 storage_options=options, checkpoint_basename="ckpt"),
                  last_step=10)
        assert f"{url} resumes from checkpoint 'ckpt-3' (step 3, a TF2 tf.train.Checkpoint checkpoint" in message
        assert "continues TF1 Saver (name-based) checkpoints only" in message
        assert "use a new checkpoint directory" in message and "pass checkpoint_basename=" not in message
        assert not os.path.exists(tmp_path / "tf1" / "model.ckpt-0.index")  # no session, nothing saved
        manager.save(checkpoint_number=4)  # not fenced: it commits
        manager.wait()
    assert [c.step for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)] == [3, 4]
    assert cloudckpt_threads() == []


def test_tf_stock_hook_with_upload_listener_holds_local_dir_until_closed(moto_server, tmp_path):
    """The listener's process holds local_dir from begin() on; a second process is refused (naming the
    pid) until UploadListener.close()."""
    url, options = moto_server.create_bucket(f"hold-{uuid.uuid4().hex[:10]}") + "/run", moto_server.storage_options
    local = str(tmp_path / "local")
    listener = cloudckpt.UploadListener(url, local, storage_options=options)
    train(lambda scaffold: tf.compat.v1.train.CheckpointSaverHook(local, save_steps=5, listeners=[listener]),
          last_step=5)
    refused = open_in_another_process(url, local, options)
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr, refused.stderr
    listener.close()
    assert open_in_another_process(url, local, options).returncode == 0
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [0, 5]


def partitioned(rows: int = 8, dtype: tf.DType = tf.float32):
    """``extra_variables`` for ``train``: a variable ``p`` [rows, 2] in two partitions (saved as one tensor)."""
    def make():
        tf.compat.v1.get_variable("p", shape=[rows, 2], dtype=dtype, initializer=tf.compat.v1.zeros_initializer(),
                                  partitioner=tf.compat.v1.fixed_size_partitioner(2))
    return make


def variable_b(dtype: tf.DType = tf.float32):
    """``extra_variables`` for ``train``: a variable ``b`` [3]."""
    return lambda: tf.compat.v1.get_variable("b", shape=[3], dtype=dtype)


@pytest.mark.parametrize("first, second, mismatch", [
    ({}, {"size": 32}, "'w' is float32 [32] in the graph, float32 [64] in the checkpoint"),
    ({}, {"extra_variables": variable_b()}, "'b' (float32 [3]) is not in the checkpoint"),
    ({"extra_variables": variable_b()}, {"extra_variables": variable_b(tf.float64)},
     "'b' is float64 [3] in the graph, float32 [3] in the checkpoint"),
    ({"extra_variables": partitioned()}, {"extra_variables": partitioned(rows=6)},
     "'p' is float32 [6, 2] in the graph, float32 [8, 2] in the checkpoint"),
], ids=["shape", "missing", "dtype", "partitioned-shape"])
def test_a_graph_the_checkpoint_does_not_fit_is_refused_before_the_hook_registers(first, second, mismatch,
                                                                                  cloudckpt_s3, tmp_path):
    """Job B, another model pointed at the directory job A is writing: before, B's hook registered in begin()
    and TF's Saver then failed in the session (NotFoundError, InvalidArgumentError), or restored a resource
    variable of another shape silently and the first step failed; either way A was fenced at its next commit.
    Now begin() compares B's Saver's variables with the checkpoint's index before registering: ConfigError
    naming the variable, and A goes on committing."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    hooks, refusals = [], []

    def make_hook(local):
        def make(scaffold):
            hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / local),
                                                       storage_options=options, max_pending=100))
            return hooks[-1]
        return make

    def job_b(step):  # runs once in job A's training loop, with step 5 committed
        if step < 6 or refusals:  # the step read with the training op may be the one before or after it
            return
        hooks[0].wait()
        assert cloudckpt.latest_checkpoint(url, options).step == 5
        writer = newest_writer_id(url, options)
        try:
            train(make_hook("vm2"), last_step=20, **second)
        except Exception as exc:  # noqa: BLE001 (checked below, once the writer is)
            refusals.append(exc)
        else:
            refusals.append(None)
        assert newest_writer_id(url, options) == writer, "job B registered: job A is fenced"

    assert train(make_hook("vm1"), last_step=10, step_callback=job_b, **first).last_step == 10
    assert len(refusals) == 1 and isinstance(refusals[0], cloudckpt.ConfigError), refusals
    message = str(refusals[0])
    assert mismatch in message, message
    assert f"Checkpoint step 5 of {url} (downloaded into {tmp_path / 'vm2'})" in message
    assert "did not register as the directory's writer" in message and "not fenced" in message
    assert "checkpoint_dir of its own" in message
    assert ("only added variables" in message) == mismatch.endswith("is not in the checkpoint"), message
    assert hooks[0].stats().fenced_by is None
    assert [c.step for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)] == [0, 5, 10]
    assert cloudckpt_threads() == []


def test_many_mismatched_variables_are_listed_up_to_five(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options

    def make_hook(local):
        return lambda scaffold: cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / local),
                                                              storage_options=options)

    def seven():
        for i in range(7):
            tf.compat.v1.get_variable(f"v{i}", shape=[2])

    train(make_hook("vm1"), last_step=2)
    with pytest.raises(cloudckpt.ConfigError) as info:
        train(make_hook("vm2"), last_step=4, extra_variables=seven)
    message = str(info.value)
    assert all(f"'v{i}' (float32 [2]) is not in the checkpoint" in message for i in range(5))
    assert "'v5'" not in message and "and 2 more" in message
    assert "Checkpoint step 2 of" in message


def test_a_hook_saver_that_fits_while_the_default_saver_does_not_is_warned_about(cloudckpt_s3, tmp_path, caplog):
    """The hook saves with ``saver=Saver([w, global_step])``; the session restores with its own Scaffold's
    Saver, which the hook cannot see: the default one (Adam's new slots included) fails in TF's restore. The
    hook's Saver fits, so begin() goes on (the session's Scaffold may hold that Saver), but says that a
    session restoring by default will fail after it registered (a review's case)."""
    tf1 = tf.compat.v1
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options

    def run(local: str, last: int, adam: bool, subset: bool) -> None:
        with tf.Graph().as_default():
            step = tf1.train.get_or_create_global_step()
            w = tf1.get_variable("w", [3, 2], initializer=tf1.ones_initializer())
            loss = tf.reduce_sum(tf.matmul(tf1.random_normal([4, 3], seed=1), w) ** 2)
            optimizer = tf1.train.AdamOptimizer(0.01) if adam else tf1.train.GradientDescentOptimizer(0.01)
            train_op = optimizer.minimize(loss, global_step=step)
            hook = cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / local),
                                                 storage_options=options,
                                                 saver=tf1.train.Saver(var_list=[w, step]) if subset else None)
            with tf1.train.MonitoredTrainingSession(checkpoint_dir=hook.local_dir, hooks=[hook],
                                                    save_checkpoint_secs=None, save_summaries_steps=None,
                                                    save_summaries_secs=None, log_step_count_steps=None) as session:
                while not session.should_stop() and session.run(step) < last:
                    session.run(train_op)

    run("vm1", 5, adam=False, subset=False)
    with caplog.at_level(logging.WARNING, logger="cloudckpt"), pytest.raises(tf.errors.NotFoundError):
        run("vm2", 10, adam=True, subset=True)
    warned = [r.getMessage() for r in caplog.records if "fits this hook's saver=" in r.getMessage()]
    assert len(warned) == 1 and "beta1_power" in warned[0] and "scaffold=" in warned[0], warned


def test_a_partitioned_variable_resumes(cloudckpt_s3, tmp_path):
    """The check names a partitioned variable as TF's Saver does (its full name and shape): it resumes."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options

    def make_hook(local):
        return lambda scaffold: cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / local),
                                                              storage_options=options)

    train(make_hook("vm1"), last_step=5, extra_variables=partitioned())
    resumed = train(make_hook("vm2"), last_step=8, extra_variables=partitioned())
    assert resumed.first_step == 5 and resumed.last_step == 8
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [0, 5, 8]


def test_the_scaffold_saver_is_checked_and_in_place_the_local_resume_point(tmp_path):
    """The Saver of the scaffold (``train(max_to_keep=...)``) is the one checked; in place (a local
    checkpoint_dir) the resume point is the directory's own checkpoint, named as such."""
    ckpt_dir = str(tmp_path / "ckpt")

    def in_place(scaffold):
        assert scaffold is not None and scaffold.saver is not None
        return cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=5, scaffold=scaffold)

    train(in_place, last_step=5, max_to_keep=3)
    with pytest.raises(cloudckpt.ConfigError) as info:
        train(in_place, last_step=8, max_to_keep=3, size=16)
    message = str(info.value)
    assert f"Checkpoint 'model.ckpt-5' in {ckpt_dir} (the resume point of {ckpt_dir}, step 5) cannot be restored " \
        "by this session's Saver: 'w' is float32 [16] in the graph, float32 [64] in the checkpoint." in message
    assert train(in_place, last_step=8, max_to_keep=3).first_step == 5


def saved_checkpoint(directory, make) -> str:
    """Save the variables ``make()`` creates (in a graph of their own) with a default Saver; the prefix."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        make()
        saver = tf.compat.v1.train.Saver()
        session.run(tf.compat.v1.global_variables_initializer())
        return saver.save(session, os.path.join(directory, "model.ckpt"), global_step=1)


def test_only_what_the_saver_restores_is_compared(tmp_path):
    """A Saver with a var_list restores those variables only: others the checkpoint lacks are not refused
    (TF's restore would not fail); reshape=True restores another shape of as many elements, as TF does."""
    prefix = saved_checkpoint(str(tmp_path), lambda: tf.compat.v1.get_variable("w", shape=[4, 2]))
    with tf.Graph().as_default() as graph:
        w = tf.compat.v1.get_variable("w", shape=[4, 2])
        tf.compat.v1.get_variable("new", shape=[3])
        var_list, reshape = restoring_var_list(tf.compat.v1.train.Saver(var_list=[w]), graph)
        assert restore_mismatches(var_list, prefix, reshape=reshape) == []
        var_list, reshape = restoring_var_list(None, graph)  # the default Saver: every global variable
        assert [str(m) for m in restore_mismatches(var_list, prefix, reshape=reshape)] == \
            ["'new' (float32 [3]) is not in the checkpoint"]
    def sliced_and_ref(rows, ref_shape):
        def make():
            partitioned(rows=rows)()
            tf.compat.v1.get_variable("r", shape=ref_shape, use_resource=False)  # a reference variable
        return make

    sliced = saved_checkpoint(str(tmp_path / "p"), sliced_and_ref(8, [3]))
    with tf.Graph().as_default() as graph:
        sliced_and_ref(6, [2])()
        saver = tf.compat.v1.train.Saver()
        ops = len(graph.get_operations())
        var_list, reshape = restoring_var_list(saver, graph)
        assert [str(m) for m in restore_mismatches(var_list, sliced, reshape=reshape)] == \
            ["'p' is float32 [6, 2] in the graph, float32 [8, 2] in the checkpoint",
             "'r' is float32 [2] in the graph, float32 [3] in the checkpoint"]
        assert len(graph.get_operations()) == ops  # the check adds nothing to the graph
    for shape, fits in (([8], True), ([9], False)):
        with tf.Graph().as_default() as graph:
            tf.compat.v1.get_variable("w", shape=shape)
            var_list, reshape = restoring_var_list(tf.compat.v1.train.Saver(reshape=True), graph)
            assert reshape and (restore_mismatches(var_list, prefix, reshape=reshape) == []) == fits


def test_in_place_the_savers_max_to_keep_is_the_only_deleter_of_its_files(tmp_path, monkeypatch):
    """In place (a local checkpoint_dir) TF's Saver deletes its old checkpoints (``max_to_keep``) file after file
    (``.meta``, ``.index``, then the ``.data-*`` it globbed) in the training thread; cloudckpt retires the commit
    of a checkpoint whose files are going, from the uploader thread. It deleted the checkpoint's remaining files
    too, so TF, deleting a file it had just globbed, logged "Hit NotFoundError when deleting '...data-...',
    possibly because another process/thread is also deleting/moving the same file" (about 1 run in 4 with
    ~100 MiB checkpoints). Made deterministic: each commit is slowed by 0.3 s (so one is in flight while TF
    deletes) and TF, having globbed the data files it is deleting, waits for cloudckpt's uploader to finish;
    cloudckpt now un-commits such a checkpoint (its manifest goes) and leaves every file of it to TF."""
    from tensorflow.python.lib.io import file_io

    import cloudckpt.commit

    ckpt_dir = str(tmp_path / "ckpt")
    hooks: list[cloudckpt.CheckpointSaverHook] = []
    overlaps = []  # checkpoints whose commit cloudckpt retired while TF was deleting their files

    def slow_build_manifest(*args, _build=cloudckpt.commit.build_manifest, **kwargs):
        time.sleep(0.3)
        return _build(*args, **kwargs)

    def glob_then_let_cloudckpt_catch_up(pattern, _glob=file_io.get_matching_files):
        found = _glob(pattern)
        if found and pattern.endswith(".data-?????-of-?????") and hooks:
            prefix = pattern[:-len(".data-?????-of-?????")]
            committed = os.path.exists(f"{prefix}.manifest.json")
            hooks[0].wait(timeout=30)  # the commit in flight and its retirement of what TF is deleting
            if committed and not os.path.exists(f"{prefix}.manifest.json"):
                overlaps.append(os.path.basename(prefix))
        return found

    monkeypatch.setattr(cloudckpt.commit, "build_manifest", slow_build_manifest)
    monkeypatch.setattr(file_io, "get_matching_files", glob_then_let_cloudckpt_catch_up)
    tf_warnings: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                tf_warnings.append(record.getMessage())

    capture = Capture()
    logging.getLogger("tensorflow").addHandler(capture)
    try:
        def in_place(scaffold):
            hooks.append(cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=1, scaffold=scaffold, max_pending=100))
            return hooks[-1]

        train(in_place, last_step=8, max_to_keep=2)
    finally:
        logging.getLogger("tensorflow").removeHandler(capture)

    assert len(overlaps) >= 3, overlaps  # the race was run: retired while TF was deleting its files
    assert not [m for m in tf_warnings if "NotFoundError" in m], tf_warnings
    assert tf.train.get_checkpoint_state(ckpt_dir).all_model_checkpoint_paths == \
        [os.path.join(ckpt_dir, f"model.ckpt-{s}") for s in (7, 8)]
    assert sorted(n for n in os.listdir(ckpt_dir) if n.startswith("model.ckpt-")) == sorted(
        f"model.ckpt-{s}{x}" for s in (7, 8) for x in (".index", ".data-00000-of-00001", ".meta", ".manifest.json"))
    assert sorted(assert_all_committed_intact(ckpt_dir, None)) == [7, 8]  # what TF keeps is committed, intact
    deletions = [e for e in log_entries(ckpt_dir) if e["type"] == "delete"]
    assert deletions and all(e["retire"] for e in deletions)
    assert [n for e in deletions for n in e["names"] if not n.endswith(".manifest.json")] == []  # no TF file


class StateFileWatch(tf.compat.v1.train.CheckpointSaverListener):
    """Reads the ``checkpoint`` state file (inode, mtime, bytes) right after each save, before cloudckpt's
    listener (it comes after the user's) queues the save: what TF's Saver wrote. Before the next save, once
    every commit and retirement of cloudckpt's has finished (``wait``), the file must be unchanged."""

    def __init__(self, directory: str, hooks: list) -> None:
        self.path = os.path.join(directory, "checkpoint")
        self.hooks = hooks
        self.after_save_seen: list[tuple[int, tuple[int, int, bytes]]] = []
        self.changed: list[tuple[int, bytes, bytes]] = []  # (step of the save, TF's bytes, the file's later)

    def read(self) -> tuple[int, int, bytes]:
        with open(self.path, "rb") as f:
            return os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_mtime_ns, f.read()

    def after_save(self, session, step):
        self.after_save_seen.append((int(step), self.read()))

    def before_save(self, session, step):
        if self.after_save_seen:
            self.check()

    def check(self) -> None:
        self.hooks[0].wait(timeout=60)  # the previous save's commit, and its retirement of what TF deleted
        step, seen = self.after_save_seen[-1]
        now = self.read()
        if now != seen:
            self.changed.append((step, seen[2], now[2]))


def test_in_place_the_saver_is_the_only_writer_of_the_state_file(tmp_path):
    """In place, TF's Saver rewrites the ``checkpoint`` state file after each save (training thread), and
    cloudckpt's uploader rewrote it too after each commit and retirement (the committed lineage, relative paths):
    two writers racing, so readers (``tf.train.latest_checkpoint``, a new ``tf.train.CheckpointManager``) saw
    either view. Now TF is its one writer there: between TF's saves, and after training ends, the file is the
    one TF wrote (same inode, mtime and bytes); the commits and retirements still happen."""
    ckpt_dir = str(tmp_path / "ckpt")
    hooks: list[cloudckpt.CheckpointSaverHook] = []
    watch = StateFileWatch(ckpt_dir, hooks)

    def in_place(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=2, scaffold=scaffold, listeners=[watch],
                                                   max_pending=100))
        return hooks[-1]

    train(in_place, last_step=9, max_to_keep=2)  # saves 0, 2, 4, 6, 8 and the final 9
    watch.check()  # after end(): the final commit and the retirement at the end are done
    assert [step for step, _ in watch.after_save_seen] == [0, 2, 4, 6, 8, 9]
    assert watch.changed == []
    last = watch.after_save_seen[-1][1][2].decode()
    assert last.startswith(f'model_checkpoint_path: "{os.path.join(ckpt_dir, "model.ckpt-9")}"'), last  # TF's
    assert tf.train.latest_checkpoint(ckpt_dir) == os.path.join(ckpt_dir, "model.ckpt-9")
    assert sorted(assert_all_committed_intact(ckpt_dir, None)) == [8, 9]  # committed; TF's deletions retired
    stats = hooks[0].stats()
    assert stats.committed == 6 and stats.failed == 0 and stats.housekeeping_failures == 0


def test_in_place_a_crash_between_a_save_and_its_commit_resumes_from_that_save_as_plain_tf_does(tmp_path):
    """The process dies after TF's Saver wrote checkpoint 13 and its state file, before cloudckpt committed it.
    TF's state file names step 13, so plain TF (``tf.train.latest_checkpoint``) restores it; the commit log's
    latest is step 10 (what ``cloudckpt pull`` / ``download_checkpoint`` take elsewhere). Resumed in place, the
    hook goes on from the local checkpoint too (ahead of the store) and commits it with the session's first save."""
    ckpt_dir = str(tmp_path / "ckpt")

    def in_place(scaffold):
        return cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=5, scaffold=scaffold, max_pending=100)

    train(in_place, last_step=10)
    with tf.Graph().as_default():  # the dying run's last save: TF wrote it, cloudckpt never saw it
        step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", shape=[64], initializer=tf.compat.v1.zeros_initializer())
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            saver.restore(session, tf.train.latest_checkpoint(ckpt_dir))
            session.run([step.assign(13), w.assign(tf.fill([64], 13.0))])
            saver.save(session, os.path.join(ckpt_dir, "model.ckpt"), global_step=13)
    assert tf.train.latest_checkpoint(ckpt_dir) == os.path.join(ckpt_dir, "model.ckpt-13")
    assert cloudckpt.latest_checkpoint(ckpt_dir).step == 10

    resumed = train(in_place, last_step=15)
    assert resumed.first_step == 13
    assert (resumed.first_weights == 13.0).all()
    assert sorted(assert_all_committed_intact(ckpt_dir, None)) == [0, 5, 10, 13, 15]
    assert cloudckpt.latest_checkpoint(ckpt_dir).step == 15


def test_in_place_a_checkpoint_the_saver_deleted_before_its_commit_was_retired_is_not_listed(tmp_path):
    """TF's Saver deletes by max_to_keep inside save(); cloudckpt retires the commit only after the next
    commit. The process dies in between (here: the dying run's save written by a plain Saver): readers must
    not show the deleted step as committed, and every committed checkpoint verifies."""
    ckpt_dir = str(tmp_path / "ckpt")

    def in_place(scaffold):
        return cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=5, scaffold=scaffold, max_pending=100)

    train(in_place, last_step=10, max_to_keep=2)  # keeps 5 and 10, both committed
    assert [c.step for c in cloudckpt.list_checkpoints(ckpt_dir)] == [5, 10]
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", shape=[64], initializer=tf.compat.v1.zeros_initializer())
        saver = tf.compat.v1.train.Saver(max_to_keep=2)
        saver.recover_last_checkpoints(tf.train.get_checkpoint_state(ckpt_dir).all_model_checkpoint_paths)
        with tf.compat.v1.Session() as session:
            saver.restore(session, tf.train.latest_checkpoint(ckpt_dir))
            session.run([step.assign(13), w.assign(tf.fill([64], 13.0))])
            saver.save(session, os.path.join(ckpt_dir, "model.ckpt"), global_step=13)  # deletes model.ckpt-5
    assert not os.path.exists(os.path.join(ckpt_dir, "model.ckpt-5.index"))
    assert [c.step for c in cloudckpt.list_checkpoints(ckpt_dir, include_superseded=True)] == [10]
    verified = cloudckpt.verify_checkpoints(ckpt_dir, all_steps=True)
    assert [r.step for r in verified.reports] == [10] and not verified.failed

    resumed = train(in_place, last_step=15, max_to_keep=2)  # commits 13 at its first save, retires step 5
    assert resumed.first_step == 13
    assert sorted(assert_all_committed_intact(ckpt_dir, None)) == [13, 15]
    assert not os.path.exists(os.path.join(ckpt_dir, "model.ckpt-5.manifest.json"))
