"""cloudckpt.CheckpointManager: tf.train.CheckpointManager's API, every save committed in the background.

Real TF, real servers on 127.0.0.1 (moto's S3 server, the GCS emulator). The SIGKILL and SIGTERM tests run
a custom training loop (tf.function, Keras Adam) in a subprocess (tests/support/tf2_trainer.py).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import cloudckpt
from cloudckpt.remote import RemoteStore
from cloudckpt.testing import assert_committed
from support.checks import newest_writer_id, remote_fs, state_file
from support.forkserver import FORK_SERVERS
from test_engine import cloudckpt_threads

TRAINER = Path(__file__).parent / "support" / "tf2_trainer.py"


# -- a subprocess trainer ---------------------------------------------------------------------------

class Trainer:
    """tests/support/tf2_trainer.py in a subprocess; its stdout lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                             os.environ.get("PYTHONPATH", "")])}
        self.proc = FORK_SERVERS.start(TRAINER, list(args), env)
        self.lines: list[str] = []
        self._stderr: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()  # type: ignore
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()  # type: ignore

    def wait_for(self, predicate, what: str, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if predicate(line):
                    return line.strip()
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"trainer never printed {what} (rc={self.proc.poll()}):\n"
                                     + "".join(self.lines[-20:]) + "".join(self._stderr[-40:]))
            time.sleep(0.02)

    def finish(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.1)
        return rc


def committed_steps_printed(trainer: Trainer) -> list[int]:
    return [int(line.split()[1]) for line in list(trainer.lines) if line.startswith("COMMITTED ")]


def bucket(request, backend: str):
    return request.getfixturevalue("cloudckpt_s3" if backend == "s3" else "cloudckpt_gcs")


# -- acceptance 1: SIGKILL mid-run, a new process with an empty local_dir restores -----------------

@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_sigkill_mid_run_then_a_new_process_restores_the_newest_committed_step(backend, request, tmp_path):
    store = bucket(request, backend)
    url, options = store.url("runs/tf2"), store.storage_options
    expected = tmp_path / "expected"
    expected.mkdir()
    trainer = Trainer("train", url, json.dumps(options), str(tmp_path / "vm1"), str(expected),
                      "--save-every", "5", "--step-sleep", "0.01")
    try:
        trainer.wait_for(lambda line: any(s >= 10 for s in committed_steps_printed(trainer)), "COMMITTED >= 10")
    finally:
        trainer.proc.send_signal(signal.SIGKILL)
        trainer.proc.wait(30)
    assert trainer.proc.returncode == -signal.SIGKILL

    latest = cloudckpt.latest_checkpoint(url, options)
    assert latest is not None and latest.step >= 10 and latest.step % 5 == 0
    assert_committed(url, storage_options=options)

    out = tmp_path / "restored.npz"
    restorer = Trainer("restore", url, json.dumps(options), str(tmp_path / "vm2-empty"), str(out))
    line = restorer.wait_for(lambda line: line.startswith("RESTORED "), "RESTORED")
    assert restorer.finish() == 0
    step, path = line.split(maxsplit=2)[1:]
    assert int(step) == latest.step
    assert path == str(tmp_path / "vm2-empty" / f"ckpt-{latest.step}")
    saved, restored = np.load(expected / f"expected-{latest.step}.npz"), np.load(out)
    assert sorted(restored.files) == sorted(saved.files)
    assert any(k.startswith("optimizer_") for k in saved.files)  # Adam's iterations and slots
    for key in saved.files:
        np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
    older = np.load(expected / f"expected-{latest.step - 5}.npz")  # the comparison can tell checkpoints apart
    assert not all(np.array_equal(older[k], saved[k]) for k in saved.files)


# -- in-process: TF's API and semantics ----------------------------------------------------------------

def variables() -> tuple[tf.Variable, tf.Variable, tf.train.Checkpoint]:
    w = tf.Variable(tf.zeros([4, 4]), name="w")
    b = tf.Variable(tf.zeros([4]), name="b")
    return w, b, tf.train.Checkpoint(w=w, b=b)


def test_saves_like_tf_and_commits_each_save_with_tfs_state_file_fields(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    w, b, ckpt = variables()
    local = tmp_path / "local"
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, local_dir=str(local), storage_options=options,
                                     max_pending=4) as manager:  # none dropped: every save is committed
        assert manager.restore_or_initialize() is None
        assert manager.directory == url
        paths = []
        for i in range(1, 5):
            w.assign(tf.fill([4, 4], float(i)))
            paths.append(manager.save())
        assert paths == [str(local / f"ckpt-{i}") for i in range(1, 5)]  # TF's numbering: save_counter
        assert manager.latest_checkpoint == paths[-1]
        assert manager.checkpoints == paths[-2:]
        manager.wait()
        assert manager.stats().committed == 4
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [3, 4]  # remote max_to_keep
    state = state_file(url, options)
    assert state["model_checkpoint_path"] == ["ckpt-4"]
    assert state["all_model_checkpoint_paths"] == ["ckpt-3", "ckpt-4"]
    fs, root = remote_fs(url, options)
    text = fs.cat_file(posixpath.join(root, "checkpoint")).decode()
    times = [float(line.split(":")[1]) for line in text.splitlines()
             if line.startswith("all_model_checkpoint_timestamps:")]
    preserved = [float(line.split(":")[1]) for line in text.splitlines()
                 if line.startswith("last_preserved_timestamp:")]
    assert len(times) == 2 and times[0] <= times[1] and len(preserved) == 1 and preserved[0] < times[0]
    assert abs(times[1] - time.time()) < 3600  # seconds since the epoch, like TF's


def test_tf_checkpoint_manager_keeps_working_on_a_copy_of_the_bucket(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=3, local_dir=str(tmp_path / "local"),
                                     storage_options=options, max_pending=3) as manager:
        for i in range(1, 4):
            w.assign(tf.fill([4, 4], float(i)))
            manager.save()
    copy = tmp_path / "copy"
    copy.mkdir()
    fs, root = remote_fs(url, options)
    for entry in fs.ls(root, detail=True):
        if entry["type"] == "file":
            (copy / posixpath.basename(entry["name"])).write_bytes(fs.cat_file(entry["name"]))

    w2, b2, ckpt2 = variables()
    stock = tf.train.CheckpointManager(ckpt2, str(copy), max_to_keep=3)
    assert stock.latest_checkpoint == str(copy / "ckpt-3")
    assert stock.checkpoints == [str(copy / f"ckpt-{i}") for i in (1, 2, 3)]  # timestamps kept: all managed
    stock.restore_or_initialize()
    np.testing.assert_array_equal(w2.numpy(), np.full([4, 4], 3.0))
    stock.save(checkpoint_number=4)
    assert stock.checkpoints == [str(copy / f"ckpt-{i}") for i in (2, 3, 4)]
    assert not (copy / "ckpt-1.index").exists()  # TF's sweep manages the copied checkpoints too


def test_enable_async_returns_at_once_and_commits_what_tf_wrote(cloudckpt_s3, tmp_path):
    """TF writes in its async thread; the commit starts from TF's write callback, when the files are
    complete. Plain tf.Variables: TF 2.21's async checkpoint fails on Keras 3 variables at the second
    save (keras/src/backend/tensorflow/core.py _copy_trackable_to_cpu), with or without cloudckpt."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    big = tf.Variable(tf.zeros([256, 1024]))  # 1 MiB: TF's write takes a while
    ckpt = tf.train.Checkpoint(big=big)
    user_options = tf.train.CheckpointOptions(enable_async=True)
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=None, local_dir=str(tmp_path / "local"),
                                     storage_options=options, max_pending=4) as manager:
        for i in range(1, 5):
            big.assign(tf.fill([256, 1024], float(i)))
            assert manager.save(checkpoint_number=10 * i, options=user_options) == str(tmp_path / "local" / f"ckpt-{10 * i}")
        assert user_options.experimental_write_callbacks is None  # the caller's options are not changed
        manager.wait()
        assert manager.latest_checkpoint == str(tmp_path / "local" / "ckpt-40")
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [10, 20, 30, 40]
    for i in range(1, 5):
        assert_committed(url, step=10 * i, storage_options=options)
        pulled = cloudckpt.download_checkpoint(url, str(tmp_path / f"pulled-{i}"), step=10 * i,
                                               storage_options=options)
        value = tf.train.load_checkpoint(pulled).get_tensor("big/.ATTRIBUTES/VARIABLE_VALUE")
        np.testing.assert_array_equal(value, np.full([256, 1024], float(i)))  # the values at save time


def test_should_stop_on_a_notice_and_close_commits_the_final_checkpoint(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    w, b, ckpt = variables()
    watcher = cloudckpt.PreemptionWatcher(("gce",), gce_metadata_url="http://127.0.0.1:9")
    manager = cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, local_dir=str(tmp_path / "local"),
                                          storage_options=options, preemption=watcher, preemption_deadline=60)
    try:
        manager.save(checkpoint_number=1)
        assert not manager.should_stop()
        watcher.trigger("gce", "test notice", 30)
        assert manager.should_stop()
        w.assign(tf.fill([4, 4], 7.0))
        manager.save(checkpoint_number=2)
    finally:
        manager.close()
    assert manager.preempted
    assert cloudckpt.latest_checkpoint(url, options).step == 2
    assert watcher.active_sources == ()  # polling ended with the notice


@pytest.mark.slow  # a second subprocess trainer; in-process, test_should_stop_on_a_notice... covers the logic
def test_sigterm_stops_a_custom_loop_which_commits_its_final_checkpoint(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    trainer = Trainer("train", url, json.dumps(options), str(tmp_path / "vm1"), str(tmp_path),
                      "--save-every", "1000", "--preemption", "sigterm", "--step-sleep", "0.01")
    trainer.wait_for(lambda line: line.startswith("STEP 3"), "STEP 3")
    trainer.proc.send_signal(signal.SIGTERM)
    line = trainer.wait_for(lambda line: line.startswith("PREEMPTED "), "PREEMPTED")
    assert trainer.finish() == 0
    final, committed = (int(x) for x in line.split()[1:])
    assert final == committed >= 3
    assert cloudckpt.latest_checkpoint(url, options).step == final


def job_with_step_1_committed(url: str, options: dict, local_dir: Path) -> cloudckpt.CheckpointManager:
    """A running job's manager (``variables()``) that has committed checkpoint 1 to ``url``."""
    ckpt = variables()[2]
    manager = cloudckpt.CheckpointManager(ckpt, url, max_to_keep=3, local_dir=str(local_dir), storage_options=options)
    manager.restore_or_initialize()
    manager.save(checkpoint_number=1)
    manager.wait()
    return manager


def test_a_second_manager_on_the_url_fences_the_first(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    first = job_with_step_1_committed(url, options, tmp_path / "vm1")
    w2, b2, ckpt2 = variables()
    with cloudckpt.CheckpointManager(ckpt2, url, max_to_keep=3, local_dir=str(tmp_path / "vm2"),
                                     storage_options=options) as second:
        assert second.restore_or_initialize() == str(tmp_path / "vm2" / "ckpt-1")
        first.save(checkpoint_number=2)
        with pytest.raises(cloudckpt.FencedError) as fenced:
            first.wait()
        assert second.writer_id in str(fenced.value)
        for step in (4, 5):  # every later save says so, not only the first: nothing it saves is committed
            with pytest.raises(cloudckpt.FencedError):
                first.save(checkpoint_number=step)
        with pytest.raises(cloudckpt.FencedError):  # its last checkpoint never reached the store
            first.close()
        second.save(checkpoint_number=3)
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [1, 3]


def test_a_checkpoint_of_another_model_is_refused_before_registering(cloudckpt_s3, tmp_path):
    """A second job with another model (a variable of another shape) under the same checkpoint_name: TF
    refuses the restore, and that happens before registering, so the job writing there is not fenced
    (before, the new manager registered first and the healthy job's next commit was fenced)."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    first = job_with_step_1_committed(url, options, tmp_path / "vm1")
    writer = newest_writer_id(url, options)
    other = tf.train.Checkpoint(w=tf.Variable(tf.zeros([3, 3])), b=tf.Variable(tf.zeros([3])))
    with cloudckpt.CheckpointManager(other, url, max_to_keep=3, local_dir=str(tmp_path / "vm2"),
                                     storage_options=options) as second:
        with pytest.raises(cloudckpt.ConfigError, match="could not be restored into this tf.train.Checkpoint") as info:
            second.restore_or_initialize()
    message = str(info.value)
    assert "step 1" in message and url in message and "not fenced" in message and "incompatible" in message
    assert isinstance(info.value.__cause__, ValueError)
    assert newest_writer_id(url, options) == writer
    first.save(checkpoint_number=2)  # the healthy job goes on committing
    first.close()
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [1, 2]


def test_restore_falls_back_past_a_corrupt_committed_checkpoint(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=3, local_dir=str(tmp_path / "vm1"),
                                     storage_options=options) as manager:
        for step in (1, 2):
            w.assign(tf.fill([4, 4], float(step)))
            manager.save(checkpoint_number=step)
    store = RemoteStore(url, options)
    data = next(o for o in store.list_objects() if o.name.startswith("ckpt-2.data-"))
    fs, root = remote_fs(url, options)
    fs.pipe_file(posixpath.join(root, data.name), b"\0" * data.size)  # same size, other bytes

    w2, b2, ckpt2 = variables()
    with cloudckpt.CheckpointManager(ckpt2, url, max_to_keep=3, local_dir=str(tmp_path / "vm2"),
                                     storage_options=options) as manager:
        assert manager.restore_or_initialize() == str(tmp_path / "vm2" / "ckpt-1")
        assert manager.restored is not None and manager.restored.step == 1
    np.testing.assert_array_equal(w2.numpy(), np.full([4, 4], 1.0))


def test_restore_or_initialize_has_tf_read_the_state_file_once(tmp_path, memory_url, caplog):
    """TF's manager reads ``local_dir``'s state file when it is created (with a clock behind the file's
    ``last_preserved_timestamp`` it warns at each read: "time.time() returned a value ... behind"). Resuming
    from the local checkpoint, restore_or_initialize() built one to restore and then another one it threw
    away: two reads, two warnings. One now, and the manager that restored is the one that keeps saving."""
    local = tmp_path / "vm1"
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=3, local_dir=str(local)) as manager:
        for step in (1, 2):
            w.assign(tf.fill([4, 4], float(step)))
            manager.save(checkpoint_number=step)
    state = tf.train.get_checkpoint_state(str(local))
    tf.compat.v1.train.update_checkpoint_state(  # the clock went back an hour since (a VM restored from an image)
        str(local), state.model_checkpoint_path, all_model_checkpoint_paths=list(state.all_model_checkpoint_paths),
        all_model_checkpoint_timestamps=list(state.all_model_checkpoint_timestamps),
        last_preserved_timestamp=time.time() + 3600)

    def reads() -> int:
        return sum("behind the last preserved checkpoint timestamp" in r.getMessage() for r in caplog.records
                   if r.name == "tensorflow")

    w2, b2, ckpt2 = variables()
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        with cloudckpt.CheckpointManager(ckpt2, memory_url, max_to_keep=3, local_dir=str(local)) as manager:
            assert reads() == 1  # the constructor's manager (TF validates its arguments)
            caplog.clear()
            assert manager.restore_or_initialize() == str(local / "ckpt-2")
            assert reads() == 1
            assert manager.restored is None  # the local copy of the head: nothing downloaded
            np.testing.assert_array_equal(w2.numpy(), np.full([4, 4], 2.0))
            assert manager.save(checkpoint_number=3) == str(local / "ckpt-3")
            assert reads() == 1
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url)] == [1, 2, 3]


def test_init_fn_runs_when_nothing_is_committed_and_a_local_path_commits_in_place(tmp_path):
    directory = tmp_path / "run"
    w, b, ckpt = variables()
    calls = []
    with cloudckpt.CheckpointManager(ckpt, str(directory), max_to_keep=2,
                                     init_fn=lambda: calls.append(1)) as manager:
        assert manager.restore_or_initialize() is None and calls == [1]
        for step in (1, 2, 3):
            manager.save(checkpoint_number=step)
        assert manager.local_dir == str(directory)
    assert sorted(p.name for p in directory.glob("*.index")) == ["ckpt-2.index", "ckpt-3.index"]
    assert [c.step for c in cloudckpt.list_checkpoints(str(directory))] == [2, 3]
    assert tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=2).checkpoints == \
        [str(directory / "ckpt-2"), str(directory / "ckpt-3")]


def test_checkpoint_interval_skips_like_tf(tmp_path, memory_url):
    w, b, ckpt = variables()
    step = tf.Variable(0, dtype=tf.int64)
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=5, step_counter=step, checkpoint_interval=10,
                                     local_dir=str(tmp_path), max_pending=3) as manager:
        saved = []
        for s in range(0, 25, 5):
            step.assign(s)
            saved.append(manager.save(checkpoint_number=s) is not None)
    assert saved == [True, False, True, False, True]
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url)] == [0, 10, 20]


def test_numpy_integers_are_taken_as_ints(tmp_path, memory_url):
    """max_to_keep, max_pending and checkpoint_number computed with numpy: taken as the ints they are."""
    import numpy as np

    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=np.int64(1), local_dir=str(tmp_path),
                                     max_pending=np.int64(3)) as manager:
        for number in (np.int64(4), np.int64(8)):
            manager.save(checkpoint_number=number)
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url)] == [8]  # max_to_keep=1 kept the newest



def test_a_negative_or_non_integer_checkpoint_number_is_refused_before_tf_writes(tmp_path, memory_url):
    """TF saves checkpoint_number=-2 as ``ckpt--2``, a name that reads as step 2: it was committed as a
    second checkpoint of step 2 next to ``ckpt-2``. Refused now (an int, a numpy integer, a tensor), with
    nothing written locally or committed; so is a float or a string, where TF fails with
    ``AttributeError: 'float' object has no attribute 'numpy'``, and a float tensor, which TF truncates (3.7:
    ``ckpt-3``; -1.5: ``ckpt--1``, committed as a second checkpoint of step 1), unless it holds a whole
    number (a float step variable), which TF writes exactly. A 0-d numpy integer array, which TF fails on,
    is its int."""
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=5, local_dir=str(tmp_path)) as manager:
        manager.save(checkpoint_number=2)
        for number in (-2, np.int64(-2), tf.constant(-2, tf.int64), 3.0, np.float64(3.0), "3",
                       tf.constant(-1.5), tf.constant(3.7), tf.Variable(4.5), tf.constant(-3.0)):
            with pytest.raises(cloudckpt.ConfigError, match="checkpoint_number must be an integer >= 0") as info:
                manager.save(checkpoint_number=number)
            assert "nothing was saved" in str(info.value)
        for number in (np.int64(3), np.array(4), tf.Variable(5, dtype=tf.int64), tf.Variable(6.0)):
            manager.save(checkpoint_number=number)
            manager.wait(60)  # each committed (back-to-back saves beyond max_pending are dropped, by design)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("ckpt--")]
    assert [(c.step, c.prefix.rsplit("/", 1)[-1]) for c in cloudckpt.list_checkpoints(memory_url)] == [
        (2, "ckpt-2"), (3, "ckpt-3"), (4, "ckpt-4"), (5, "ckpt-5"), (6, "ckpt-6")]

def test_tfs_restore_latest_checkpoint_pattern_resumes_on_a_fresh_vm(tmp_path, memory_url, caplog):
    """TF's tutorial pattern, ``ckpt.restore(manager.latest_checkpoint)`` without restore_or_initialize():
    the first read of latest_checkpoint fetches the newest committed checkpoint to an empty local_dir."""
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=3, local_dir=str(tmp_path / "vm1")) as manager:
        for i in range(1, 4):
            w.assign(tf.fill([4, 4], float(i)))
            manager.save()
    w2, b2, ckpt2 = variables()
    with cloudckpt.CheckpointManager(ckpt2, memory_url, max_to_keep=3, local_dir=str(tmp_path / "vm2")) as fresh:
        assert fresh.latest_checkpoint == str(tmp_path / "vm2" / "ckpt-3")
        ckpt2.restore(fresh.latest_checkpoint).assert_consumed()
        np.testing.assert_array_equal(w2.numpy(), np.full([4, 4], 3.0))
        assert fresh.save() == str(tmp_path / "vm2" / "ckpt-4")  # TF's numbering goes on from the restore
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url)] == [2, 3, 4]
    # save() before any restore does not start a new lineage over the committed ones: it is refused
    # (test_a_first_save_that_did_not_restore_the_head_is_refused)
    w3, b3, ckpt3 = variables()
    with cloudckpt.CheckpointManager(ckpt3, memory_url, max_to_keep=3, local_dir=str(tmp_path / "vm3")) as new:
        with pytest.raises(cloudckpt.ConfigError, match="did not restore checkpoint step 4"):
            new.save()
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url, include_superseded=True)] == [2, 3, 4]


def test_a_manager_left_open_commits_its_last_save_at_interpreter_exit(tmp_path):
    """No close(), no ``with``: the process exits after its last save; atexit commits it (and says so)."""
    url = (tmp_path / "bucket").as_uri()
    script = f"""
import tensorflow as tf, cloudckpt
w = tf.Variable(tf.zeros([256, 256]))
manager = cloudckpt.CheckpointManager(tf.train.Checkpoint(w=w), {url!r}, max_to_keep=5,
                                      local_dir={str(tmp_path / "local")!r}, max_pending=5)
manager.restore_or_initialize()
for i in range(1, 4):
    w.assign_add(tf.ones([256, 256]))
    manager.save()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Interpreter exit with an open cloudckpt.CheckpointManager" in done.stderr
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [1, 2, 3]
    verified = cloudckpt.verify_checkpoints(url, all_steps=True)
    assert len(verified.reports) == 3 and not verified.failed


# -- a first save() that did not restore the resume point is refused -----------------------------------

def stepped() -> tuple[tf.Variable, tf.Variable, tf.train.Checkpoint]:
    """The README's loop state: weights and a step counter that numbers the checkpoints."""
    w, b, ckpt = variables()
    step = tf.Variable(0, dtype=tf.int64)
    ckpt.step = step
    return w, step, ckpt


def commit_steps(url, options, local_dir, steps, max_to_keep=2):
    w, step, ckpt = stepped()
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=max_to_keep, local_dir=str(local_dir),
                                     storage_options=options, max_pending=10) as manager:
        manager.restore_or_initialize()
        for s in steps:
            w.assign(tf.fill([4, 4], float(s)))
            step.assign(s)
            manager.save(checkpoint_number=step)


def all_steps(url, options):
    return [(c.step, c.status) for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)]


def test_a_first_save_that_did_not_restore_the_head_is_refused(cloudckpt_s3, tmp_path):
    """A new manager that saves without restore_or_initialize() (nor checkpoint.restore(manager.latest_checkpoint))
    saves its tf.train.Checkpoint's initial state: step 5 while step 30 is committed. Before, on a fresh VM that
    started a new lineage over 20 and 30 (a WARNING), and retention (max_to_keep=2) deleted both at the next
    commits; on the VM that wrote them it continued 30 with 5 and 10, and retention deleted 20 and 30. Now the
    first save downloads the resume point and is refused below it: nothing is saved or committed; restoring then
    saving goes on from 30."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    commit_steps(url, options, tmp_path / "vm1", (10, 20, 30))
    assert all_steps(url, options) == [(20, "committed"), (30, "committed")]

    local = tmp_path / "vm2"  # a fresh VM
    w, step, ckpt = stepped()
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, local_dir=str(local), storage_options=options,
                                     max_pending=10) as manager:
        step.assign(5)
        with pytest.raises(cloudckpt.ConfigError) as info:
            manager.save(checkpoint_number=step)
        message = str(info.value)
        assert "would write checkpoint step 5 (checkpoint_number)" in message
        assert f"did not restore checkpoint step 30 that cloudckpt downloaded from {url} into {local}" in message
        assert "manager.restore_or_initialize()" in message and f"cloudckpt rollback {url} --step N" in message
        assert not (local / "ckpt-5.index").exists() and int(ckpt.save_counter.numpy()) == 0  # TF wrote nothing
        assert all_steps(url, options) == [(20, "committed"), (30, "committed")]
        assert cloudckpt.latest_checkpoint(url, options).step == 30

        assert manager.restore_or_initialize() == str(local / "ckpt-30")  # the fix the message names
        assert int(step.numpy()) == 30
        step.assign(35)
        assert manager.save(checkpoint_number=step) == str(local / "ckpt-35")
    assert all_steps(url, options) == [(30, "committed"), (35, "committed")]

    # The VM that wrote them, a new process: local_dir holds 30 intact; TF's numbering (save_counter) says 1.
    w, step, ckpt = stepped()
    vm1 = tmp_path / "vm1"
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, local_dir=str(vm1), storage_options=options) as again:
        with pytest.raises(cloudckpt.ConfigError, match=r"would write checkpoint step 1 \(checkpoint.save_counter "
                           r"\+ 1\) from its tf.train.Checkpoint: it did not restore checkpoint step 35 that cloudckpt "
                           "downloaded"):
            again.save()
        assert tf.train.latest_checkpoint(str(vm1)) == str(vm1 / "ckpt-35")  # the local state file did not go back
        assert not (vm1 / "ckpt-1.index").exists()
    assert cloudckpt_threads() == []
    assert all_steps(url, options) == [(30, "committed"), (35, "committed")]


def test_a_restored_manager_numbering_by_save_count_below_the_head_is_told_so(cloudckpt_s3, tmp_path):
    """Earlier runs numbered checkpoints by step (checkpoint_number=); this one restores (save_counter comes back
    as 3) and then saves by TF's default numbering, ckpt-4, below step 30: refused, and the message says the
    checkpoint was restored and names the fix (checkpoint_number=), not restore_or_initialize() again."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    commit_steps(url, options, tmp_path / "vm1", (10, 20, 30))
    w, step, ckpt = stepped()
    local = tmp_path / "vm2"
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, local_dir=str(local), storage_options=options) as manager:
        assert manager.restore_or_initialize() == str(local / "ckpt-30") and int(ckpt.save_counter.numpy()) == 3
        with pytest.raises(cloudckpt.ConfigError) as info:
            manager.save()
        message = str(info.value)
        assert "would write checkpoint step 4 (checkpoint.save_counter + 1): below checkpoint step 30" in message
        assert "which it restored" in message and "pass checkpoint_number=" in message, message
        assert "did not restore" not in message and "restore_or_initialize" not in message, message
        assert not (local / "ckpt-4.index").exists()
        step.assign(31)
        assert manager.save(checkpoint_number=step) == str(local / "ckpt-31")  # the fix the message names
    assert all_steps(url, options) == [(30, "committed"), (31, "committed")]


def test_a_first_save_in_place_that_did_not_restore_is_refused(tmp_path):
    """In place, TF's save at the unrestored ckpt-1 would overwrite committed files (the commit was then refused,
    but step 1 no longer verified): refused before TF writes."""
    directory = str(tmp_path / "run")
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, directory, max_to_keep=3) as manager:
        for i in range(1, 4):
            w.assign(tf.fill([4, 4], float(i)))
            manager.save()
    w2, b2, ckpt2 = variables()
    with cloudckpt.CheckpointManager(ckpt2, directory, max_to_keep=3) as manager:
        with pytest.raises(cloudckpt.ConfigError, match=f"did not restore checkpoint step 3 that {directory} holds"):
            manager.save()
    assert all_steps(directory, None) == [(1, "committed"), (2, "committed"), (3, "committed")]
    assert all(cloudckpt.verify(directory, s).ok for s in (1, 2, 3))
    assert tf.train.latest_checkpoint(directory).endswith("ckpt-3")


def test_rollbacks_on_purpose_still_save_from_the_older_step(cloudckpt_s3, tmp_path):
    """`cloudckpt rollback` and the TF way (the local state file pointed back) make the older step the resume
    point: the manager restores it, and a save above it passes the check; the newer steps become superseded."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    commit_steps(url, options, tmp_path / "vm1", (10, 20, 30), max_to_keep=None)
    cloudckpt.rollback(url, 20, storage_options=options)
    w, step, ckpt = stepped()
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=None, local_dir=str(tmp_path / "vm2"),
                                     storage_options=options) as manager:
        manager.restore_or_initialize()
        assert int(step.numpy()) == 20
        step.assign(25)
        manager.save(checkpoint_number=step)
    assert all_steps(url, options) == [(10, "committed"), (20, "committed"), (25, "committed"),
                                       (30, "superseded")]

    vm2 = str(tmp_path / "vm2")  # holds 20 and 25 of the current lineage: point its state file back at 20
    tf.compat.v1.train.update_checkpoint_state(vm2, os.path.join(vm2, "ckpt-20"))
    w, step, ckpt = stepped()
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=None, local_dir=vm2, storage_options=options) as manager:
        assert manager.restore_or_initialize() == os.path.join(vm2, "ckpt-20")
        step.assign(22)
        manager.save(checkpoint_number=step)
    assert cloudckpt.latest_checkpoint(url, options).step == 22
    assert all_steps(url, options) == [(10, "committed"), (20, "committed"), (22, "committed"),
                                       (25, "superseded"), (30, "superseded")]


@pytest.mark.parametrize("checkpoint", ["model.ckpt", None, tf.Variable(1.0)])
def test_a_checkpoint_that_is_not_a_tf_checkpoint_is_refused_before_anything_starts(checkpoint, memory_url, tmp_path):
    """TF's manager takes anything: the first save failed with an AttributeError from deep in TF, and the
    manager's close at exit printed another traceback."""
    local = tmp_path / "local"
    with pytest.raises(cloudckpt.ConfigError, match="checkpoint must be a tf.train.Checkpoint, got a value of type"):
        cloudckpt.CheckpointManager(checkpoint, memory_url, max_to_keep=1, local_dir=str(local))
    assert not local.exists()


@pytest.mark.parametrize("name", ["", "../ckpt", "sub/ckpt"])
def test_a_checkpoint_name_that_is_no_plain_file_name_is_refused(name, memory_url, tmp_path):
    """Was: every save went unnoticed: nothing committed and no error ('../ckpt' saved outside local_dir)."""
    local = tmp_path / "local"
    with pytest.raises(cloudckpt.ConfigError, match="checkpoint_name must be a plain file name"):
        cloudckpt.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), memory_url, max_to_keep=1,
                                    checkpoint_name=name, local_dir=str(local))
    assert not local.exists()


def test_a_directory_of_tf1_saver_checkpoints_is_refused_at_restore_naming_both_checkpoint_names(cloudckpt_s3,
                                                                                                 tmp_path):
    """Was: restore_or_initialize() 'succeeded' on the TF1 hook's model.ckpt-10 (TF's name-based restore matched
    none of the tf.train.Checkpoint's variables), registered as the writer (fencing the TF1 job), and the first
    save() then said 'call manager.restore_or_initialize()', which the user had just done. Now the restore says
    that the directory holds model.ckpt-* (a TF1 Saver's) while this manager uses checkpoint_name='ckpt', before
    anything is restored or registered; with checkpoint_name='model.ckpt' too (the kind differs)."""
    from support.tf_model import train
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    hooks = []

    def tf1_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / "tf1"),
                                                   storage_options=options))
        return hooks[-1]

    train(tf1_hook, last_step=10)
    v = tf.Variable(tf.zeros([4]))
    ckpt = tf.train.Checkpoint(v=v)
    local = tmp_path / "tf2"
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, local_dir=str(local),
                                     storage_options=options) as manager:
        with pytest.raises(cloudckpt.ConfigError) as info:
            manager.restore_or_initialize()
        message = str(info.value)
        assert f"{url} resumes from checkpoint 'model.ckpt-10' (step 10, a TF1 tf.compat.v1.train.Saver" in message
        assert "continues tf.train.Checkpoint (object-based) checkpoints only" in message
        assert "use a new checkpoint directory" in message and "pass checkpoint_name=" not in message
        assert "did not register as the directory's writer" in message
        assert newest_writer_id(url, options) == hooks[-1].writer_id  # the TF1 job is not fenced
        with pytest.raises(cloudckpt.ConfigError, match="resumes from checkpoint 'model.ckpt-10'"):
            manager.save()  # its first save resumes first: refused the same way, nothing written
        assert not (local / "ckpt-1.index").exists()
    assert [c.step for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)] == [0, 5, 10]

    # Naming it alike changes nothing (a re-check found the earlier hint 'pass checkpoint_name=' fenced the TF1
    # job, then restored nothing): the kind is refused, before registering.
    with cloudckpt.CheckpointManager(ckpt, url, max_to_keep=2, checkpoint_name="model.ckpt", local_dir=str(local),
                                     storage_options=options) as named:
        with pytest.raises(cloudckpt.ConfigError, match="continues tf.train.Checkpoint"):
            named.restore_or_initialize()
        assert newest_writer_id(url, options) == hooks[-1].writer_id
    assert cloudckpt.latest_checkpoint(url, options).step == 10
    assert cloudckpt_threads() == []


def test_a_checkpoint_name_other_than_the_directorys_is_refused_with_the_name_to_pass(memory_url, tmp_path):
    """Same kind (tf.train.Checkpoint), another checkpoint_name: the message names the one to pass, and with it
    the manager resumes the directory's newest checkpoint."""
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=3, local_dir=str(tmp_path / "a")) as manager:
        manager.restore_or_initialize()
        w.assign(tf.fill([4, 4], 7.0))
        manager.save(checkpoint_number=5)
    w2, b2, ckpt2 = variables()
    with cloudckpt.CheckpointManager(ckpt2, memory_url, max_to_keep=3, checkpoint_name="model",
                                     local_dir=str(tmp_path / "b")) as renamed:
        with pytest.raises(cloudckpt.ConfigError, match="pass checkpoint_name='ckpt'"):
            renamed.restore_or_initialize()
    with cloudckpt.CheckpointManager(ckpt2, memory_url, max_to_keep=3, local_dir=str(tmp_path / "b")) as same:
        assert same.restore_or_initialize() == str(tmp_path / "b" / "ckpt-5")
        np.testing.assert_array_equal(w2.numpy(), np.full([4, 4], 7.0))


def test_in_place_tfs_manager_is_the_only_writer_of_the_state_file(tmp_path):
    """In place, ``tf.train.CheckpointManager`` rewrites the ``checkpoint`` state file at each save (its
    ``max_to_keep`` bookkeeping: paths and timestamps), and cloudckpt's uploader rewrote it too after each
    commit and retirement (the committed lineage with cloudckpt's timestamps): two writers racing, and a new
    TF manager (a resume) read whichever came last. Now TF is its one writer there: once the commits (and the
    retirements of what TF swept) are done, the file is the one TF wrote at the save (inode, mtime, bytes)."""
    directory = str(tmp_path / "run")
    path = os.path.join(directory, "checkpoint")

    def read() -> tuple[int, int, bytes]:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_mtime_ns, f.read()

    w, step, ckpt = stepped()
    changed = []
    with cloudckpt.CheckpointManager(ckpt, directory, max_to_keep=2) as manager:
        manager.restore_or_initialize()
        for s in (1, 2, 3, 4, 5):
            step.assign(s)
            manager.save(checkpoint_number=step)
            written = read()  # TF's (the commit of this save has only just been queued)
            manager.wait(timeout=60)
            if read() != written:
                changed.append((s, written[2], read()[2]))
        kept = manager.checkpoints
    if read() != written:  # close(): the final retirement of what TF swept
        changed.append(("close", written[2], read()[2]))
    assert changed == []
    assert kept == [os.path.join(directory, "ckpt-4"), os.path.join(directory, "ckpt-5")]
    assert [c.step for c in cloudckpt.list_checkpoints(directory)] == [4, 5]  # TF's sweep retired 1, 2, 3
    w2, step2, ckpt2 = stepped()
    with cloudckpt.CheckpointManager(ckpt2, directory, max_to_keep=2) as resumed:
        assert resumed.restore_or_initialize() == os.path.join(directory, "ckpt-5")
        assert resumed.checkpoints == kept and int(step2.numpy()) == 5


# -- in place: TF deletes inside save(), before cloudckpt can retire the commit ------------------------

def _kill_after_save_3(directory: Path) -> None:
    """A subprocess: saves 1 and 2 committed in place (max_to_keep=2), saves 3 (TF deletes ckpt-1 inside
    save()), then SIGKILL at once: step 3 uncommitted, step 1's commit not retired."""
    script = f"""
import os, signal, tensorflow as tf, cloudckpt
w = tf.Variable(tf.zeros([1024, 1024]))
manager = cloudckpt.CheckpointManager(tf.train.Checkpoint(w=w), {str(directory)!r}, max_to_keep=2)
manager.restore_or_initialize()
for i in (1, 2):
    w.assign_add(tf.ones([1024, 1024]))
    manager.save(checkpoint_number=i)
manager.wait()
manager.save(checkpoint_number=3)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def test_in_place_a_checkpoint_tf_deleted_before_its_commit_was_retired_is_not_listed_as_committed(tmp_path):
    """kill -9 right after a save() in which TF's max_to_keep deleted ckpt-1: readers never show step 1 as
    committed (every committed checkpoint verifies); gc retires it and keeps TF's resume point."""
    directory = tmp_path / "run"
    _kill_after_save_3(directory)
    assert not list(directory.glob("ckpt-1.index")) and not list(directory.glob("ckpt-1.data-*"))  # TF's max_to_keep
    steps = [c.step for c in cloudckpt.list_checkpoints(str(directory), include_superseded=True)]
    assert 1 not in steps and 2 in steps
    verified = cloudckpt.verify_checkpoints(str(directory), all_steps=True)
    assert not verified.failed and [r.step for r in verified.reports] == steps
    listed = subprocess.run([sys.executable, "-m", "cloudckpt", "ls", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "ckpt-1 " not in listed.stdout and "ckpt-2" in listed.stdout
    result = cloudckpt.gc(str(directory), None, grace_seconds=0.0)
    assert [c.step for c in result.plan.vanishing] == [1]
    assert not list(directory.glob("ckpt-1.*")) and list(directory.glob("ckpt-2.*"))
    # TF's state file was not rewritten by gc: TF still resumes from the newest save
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-3")


def test_in_place_a_checkpoint_the_manager_deleted_uncommitted_by_cloudckpt_is_not_listed(tmp_path):
    """The same state without a race: cloudckpt committed 1 and 2 in place, then TF's own manager (a run
    whose commit of 3 never happened) saved 3 and deleted ckpt-1."""
    directory = tmp_path / "run"
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, str(directory), max_to_keep=2) as manager:
        manager.restore_or_initialize()
        for step in (1, 2):
            manager.save(checkpoint_number=step)
    tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=2).save(checkpoint_number=3)
    assert not list(directory.glob("ckpt-1.index")) and not list(directory.glob("ckpt-1.data-*"))
    assert [c.step for c in cloudckpt.list_checkpoints(str(directory), include_superseded=True)] == [2]
    assert not cloudckpt.verify_checkpoints(str(directory), all_steps=True).failed


def test_in_place_a_resume_point_newer_than_the_last_commit_is_committed_and_gc_keeps_it(tmp_path):
    """A crash between a save and its commit: TF2's manager resumes from that save (its state file names it);
    cloudckpt commits it at the resume, as the TF1 hook does at its first save, so gc never deletes it."""
    directory = tmp_path / "run"
    w, b, ckpt = variables()
    with cloudckpt.CheckpointManager(ckpt, str(directory), max_to_keep=3) as manager:
        manager.restore_or_initialize()
        manager.save(checkpoint_number=1)
    w.assign(tf.fill(w.shape, 7.0))
    tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=3).save(checkpoint_number=2)  # never committed
    w.assign(tf.zeros(w.shape))
    with cloudckpt.CheckpointManager(ckpt, str(directory), max_to_keep=3) as manager:
        assert manager.restore_or_initialize() == str(directory / "ckpt-2")
    np.testing.assert_array_equal(w.numpy(), np.full(w.shape, 7.0))
    assert [c.step for c in cloudckpt.list_checkpoints(str(directory))] == [1, 2]
    assert not cloudckpt.verify_checkpoints(str(directory), all_steps=True).failed
    cloudckpt.gc(str(directory), None, grace_seconds=0.0)
    assert list(directory.glob("ckpt-2.*")) and tf.train.latest_checkpoint(str(directory)) == str(directory / "ckpt-2")
