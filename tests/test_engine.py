"""CheckpointEngine with plain files (no TensorFlow): commit, snapshot, retention, failures, final save,
resume + fencing, preemption, layouts. Against moto's S3 server on 127.0.0.1 and fsspec's memory://."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time

import fsspec
import pytest

import cloudckpt
from cloudckpt import cli
from cloudckpt.engine import STAGING_DIR, CheckpointEngine
from cloudckpt.layout import PrefixLayout, register_layout
from cloudckpt.localdir import LOCK_FILE, URL_FILE
from cloudckpt.retention import RetentionPolicy
from cloudckpt.testing import assert_committed
from support.checks import remote_fs

KERAS = register_layout(PrefixLayout("test-engine-keras", ("keras",), marker="keras"))
FAST = cloudckpt.RetryPolicy(max_attempts=1)


def write_checkpoint(directory, step: int, basename: str = "ckpt", size: int = 1000) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for suffix in ("data-00000-of-00001", "index"):
        path = os.path.join(directory, f"{basename}-{step}.{suffix}")
        with open(path, "wb") as f:
            f.write(bytes([step % 251]) * size + suffix.encode())
        paths.append(path)
    return paths


def cloudckpt_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("cloudckpt")]


def test_the_engine_imports_no_tensorflow():
    code = ("import sys, cloudckpt, cloudckpt.engine, cloudckpt.layout, cloudckpt.resume;"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_submit_snapshots_and_commits_in_the_background(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    local = tmp_path / "local"
    with CheckpointEngine(url, str(local), storage_options=options, max_pending=3) as engine:  # none dropped
        engine.open()
        for step in (1, 2, 3):
            files = write_checkpoint(local, step)
            engine.submit(step, files)
            for path in files:  # the framework may delete its files at once: the snapshot stays
                os.remove(path)
        engine.wait(120)
        stats = engine.stats()
    assert (stats.committed, stats.failed, stats.dropped, stats.last_committed_step) == (3, 0, 0, 3)
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [1, 2, 3]
    assert_committed(url, step=2, storage_options=options)
    assert not os.listdir(local / STAGING_DIR)  # snapshots are released after the commit
    assert not cloudckpt_threads()



def test_stats_queue_depth_counts_no_checkpoint_while_retention_runs_after_its_commit(cloudckpt_s3, tmp_path):
    """``stats().queue_depth`` counts checkpoints not yet committed (waiting or uploading): while retention runs
    after step 2's commit (its DeleteObjects held by the proxy) it reads 0, although the uploader still runs that
    housekeeping (``pending_steps`` names step 2), and 1 once step 3 waits behind it. Before: 1 with nothing
    waiting or uploading (the housekeeping job was counted as in flight)."""
    import time

    from support.fault_proxy import FaultProxy

    local, release = tmp_path / "local", threading.Event()
    with FaultProxy(cloudckpt_s3.endpoint) as proxy:
        options = {**cloudckpt_s3.storage_options, "endpoint_url": proxy.url}
        url = cloudckpt_s3.url("run")
        with CheckpointEngine(url, str(local), storage_options=options,
                              retention=RetentionPolicy(max_to_keep=1)) as engine:
            engine.open()
            engine.submit(1, write_checkpoint(local, 1))
            engine.wait(60)
            proxy.set_faults(only_methods=("POST",), path_filter=r"[?&]delete", until=release)  # DeleteObjects
            try:
                engine.submit(2, write_checkpoint(local, 2))
                deadline = time.monotonic() + 60
                while proxy.most_held.get("POST", 0) < 1:
                    assert time.monotonic() < deadline, "retention's DeleteObjects never came"
                    time.sleep(0.02)
                during, pending = engine.stats(), engine.pending_steps()
                engine.submit(3, write_checkpoint(local, 3))
                waiting = engine.stats()
            finally:
                release.set()
            engine.wait(60)
            after = engine.stats()
    assert (during.committed, during.last_committed_step, pending) == (2, 2, [2]), during  # its retention runs
    assert during.queue_depth == 0, during
    assert waiting.queue_depth == 1, waiting  # step 3 waits (behind step 2's housekeeping)
    assert (after.committed, after.failed, after.housekeeping_failures, after.queue_depth) == (3, 0, 0, 0), after
    assert [c.step for c in cloudckpt.list_checkpoints(url, cloudckpt_s3.storage_options)] == [3]

def test_numpy_integers_are_taken_as_ints(tmp_path, memory_url):
    """A step or option computed with numpy (np.int64) is an integer: taken, and the manifest's JSON gets the int."""
    import numpy as np

    local = tmp_path / "local"
    with CheckpointEngine(memory_url, str(local), max_pending=np.int64(2)) as engine:
        engine.open()
        engine.submit(np.int64(7), write_checkpoint(local, 7))
        engine.wait(60)
        assert engine.stats().committed == 1
    (info,) = cloudckpt.list_checkpoints(memory_url)
    assert info.step == 7 and type(info.step) is int
    with pytest.raises(cloudckpt.ConfigError, match="max_pending"):
        CheckpointEngine(memory_url, str(tmp_path / "other"), max_pending=np.float64(2))


def test_submit_rejects_files_that_are_not_one_checkpoint(tmp_path, memory_url):
    engine = CheckpointEngine(memory_url, str(tmp_path))
    files = write_checkpoint(tmp_path, 4)
    with pytest.raises(cloudckpt.ConfigError, match="step 4, not step 5"):
        engine.submit(5, files)
    with pytest.raises(cloudckpt.ConfigError, match="lack"):
        engine.submit(4, files[:1])  # no .index
    with pytest.raises(cloudckpt.ConfigError):
        engine.submit(-1, files)
    assert engine.pending_steps() == [] and engine.stats().committed == 0


def test_retention_after_each_commit_and_timestamps_in_the_state_file(tmp_path, memory_url):
    with CheckpointEngine(memory_url, str(tmp_path), retention=RetentionPolicy(max_to_keep=2)) as engine:
        for step in range(1, 5):
            engine.submit(step, write_checkpoint(tmp_path, step), saved_at=1000.0 + step)
            engine.wait(60)
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url)] == [3, 4]
    fs, root = remote_fs(memory_url, None)
    text = fs.cat_file(f"{root}/checkpoint").decode()
    assert 'model_checkpoint_path: "ckpt-4"' in text
    assert "all_model_checkpoint_timestamps: 1003.0\nall_model_checkpoint_timestamps: 1004.0\n" in text
    assert "last_preserved_timestamp: 1002.0" in text


def test_a_failed_commit_is_raised_in_the_callers_thread_or_counted(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    raising = CheckpointEngine(url, str(tmp_path / "a"), storage_options=options, retry=FAST)
    warning = CheckpointEngine(url.replace("/run", "/run2"), str(tmp_path / "b"), storage_options=options,
                               retry=FAST, on_error="warn")
    raising.open()
    warning.open()
    fs, _ = remote_fs(url, options)
    fs.rm(cloudckpt_s3.name, recursive=True)  # the bucket goes away: NoSuchBucket, not retried
    try:
        raising.submit(1, write_checkpoint(tmp_path / "a", 1))
        with pytest.raises(cloudckpt.UploadError, match="step 1 was not committed") as failure:
            raising.wait(60)
        assert failure.value.step == 1 and raising.stats().failed == 1
        raising.raise_if_failed()  # reported once
        raising.submit(2, write_checkpoint(tmp_path / "a", 2))
        while raising.pending_steps():
            threading.Event().wait(0.05)
        with pytest.raises(cloudckpt.UploadError, match="step 2"):
            raising.raise_if_failed()  # what a training loop calls every step

        warning.submit(1, write_checkpoint(tmp_path / "b", 1))
        warning.wait(60)  # on_error="warn": counted, not raised
        assert warning.stats().failed == 1
        # ... but the final checkpoint must reach the store, whatever on_error says
        warning.prepare_final_save(2)
        warning.submit(2, write_checkpoint(tmp_path / "b", 2))
        with pytest.raises(cloudckpt.UploadError, match="step 2"):
            warning.finish()
    finally:
        fs.mkdir(cloudckpt_s3.name)  # for the fixture's cleanup
        raising.close(timeout=0)
        warning.close(timeout=0)


def test_finish_resubmits_a_final_checkpoint_that_failed(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    local = tmp_path / "local"
    engine = CheckpointEngine(url, str(local), storage_options=options, retry=FAST, on_error="warn")
    engine.open()
    fs, _ = remote_fs(url, options)
    fs.rm(cloudckpt_s3.name, recursive=True)
    engine.submit(7, write_checkpoint(local, 7))
    engine.wait(60)
    assert engine.stats().failed == 1
    fs.mkdir(cloudckpt_s3.name)  # the store is back
    engine.prepare_final_save(7)
    engine.finish()  # step 7 is the final one, not pending, not committed: submitted again from local_dir
    assert cloudckpt.latest_checkpoint(url, options).step == 7
    assert not cloudckpt_threads()


def test_resume_downloads_the_newest_committed_checkpoint_and_fences_the_old_writer(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    old = CheckpointEngine(url, str(tmp_path / "vm1"), storage_options=options)
    old.open()
    assert old.resume() is None  # nothing committed yet: registers, starts a lineage
    for step in (10, 20):
        old.submit(step, write_checkpoint(tmp_path / "vm1", step))
    old.wait(60)

    new = CheckpointEngine(url, str(tmp_path / "vm2"), storage_options=options)
    new.open()
    restored = new.resume()
    assert restored is not None and restored.step == 20
    assert sorted(set(os.listdir(tmp_path / "vm2")) - {LOCK_FILE, URL_FILE}) == [
        "checkpoint", "ckpt-20.data-00000-of-00001", "ckpt-20.index"]
    assert new.find_saved(20) is not None

    old.submit(30, write_checkpoint(tmp_path / "vm1", 30))
    with pytest.raises(cloudckpt.FencedError) as fenced:
        old.wait(60)
    assert new.writer_id in str(fenced.value) and new.writer_id in old.stats().fenced_by
    new.submit(30, write_checkpoint(tmp_path / "vm2", 30))
    new.prepare_final_save(30)
    new.finish()
    old.close(timeout=0)
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [10, 20, 30]
    assert cloudckpt.latest_checkpoint(url, options).writer_id == new.writer_id


def test_preemption_notice_stops_and_bounds_the_final_commit(tmp_path, memory_url):
    watcher = cloudckpt.PreemptionWatcher(("gce",), gce_metadata_url="http://127.0.0.1:9", poll_interval=60)
    engine = CheckpointEngine(memory_url, str(tmp_path), preemption=watcher, preemption_deadline=20)
    engine.open()
    engine.start_watching()
    assert watcher.running and not engine.should_stop() and engine.preemption_deadline_at() is None
    engine.submit(1, write_checkpoint(tmp_path, 1))
    watcher.trigger("gce", "test notice", 25)
    assert engine.should_stop()
    deadline = engine.preemption_deadline_at()
    assert deadline == pytest.approx(engine.notice.received_at + 20)  # preemption_deadline, not the platform's
    engine.prepare_final_save(2)
    engine.submit(2, write_checkpoint(tmp_path, 2))
    engine.finish()
    engine.close()
    assert engine.preempted and watcher.active_sources == ()  # polling ended
    assert cloudckpt.latest_checkpoint(memory_url).step == 2


@pytest.mark.parametrize("source, platform", [("gce", 25.0), ("aws", 100.0), ("azure", 34.0)])
def test_a_hard_stop_the_platform_announced_caps_preemption_deadline(tmp_path, memory_url, caplog, source, platform):
    """A GCE / AWS / Azure notice announces the real hard stop: preemption_deadline=200 after it would plan the final
    commit (close()'s wait, favour_final, the multi-worker agreement) for time the VM does not have. Before,
    preemption_deadline_at() was received_at + 200 and close() waited that long for a stuck upload."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    watcher = cloudckpt.PreemptionWatcher((source,), gce_metadata_url="http://127.0.0.1:9",
                                          aws_metadata_url="http://127.0.0.1:9",
                                          azure_metadata_url="http://127.0.0.1:9", poll_interval=60)
    engine = CheckpointEngine(memory_url, str(tmp_path), preemption=watcher, preemption_deadline=200)
    try:
        engine.open()
        engine.start_watching()
        watcher.trigger(source, "test notice", platform)
        notice = engine.notice
        assert engine.preemption_deadline_at() == notice.received_at + platform  # not + 200
        assert watcher.deadline_at == engine.preemption_deadline_at()  # what the notice's log line quotes
    finally:
        engine.close()
    lines = [r.getMessage() for r in caplog.records if "before preemption_deadline" in r.getMessage()]
    assert len(lines) == 1 and f"deadline {platform:g} s" in lines[0] and "preemption_deadline=200 s" in lines[0]


def test_a_sigterm_notice_leaves_preemption_deadline_as_given_until_a_metadata_notice_caps_it(tmp_path, memory_url):
    """SIGTERM's 25 s is only a guess (Kubernetes' terminationGracePeriodSeconds may be 120 s): the user's 90 s
    is the deadline then. An AWS notice that follows, announcing a hard stop before those 90 s, caps it."""
    watcher = cloudckpt.PreemptionWatcher(("sigterm", "aws"), aws_metadata_url="http://127.0.0.1:9", poll_interval=60)
    engine = CheckpointEngine(memory_url, str(tmp_path), preemption=watcher, preemption_deadline=90)
    try:
        watcher.trigger("sigterm", "SIGTERM", 25.0)
        first = engine.notice
        assert engine.preemption_deadline_at() == first.received_at + 90 > watcher.hard_stop_at
        watcher.trigger("aws", "spot instance-action: terminate", 40.0)
        assert engine.preemption_deadline_at() == watcher.notices[1].received_at + 40 < first.received_at + 90
    finally:
        engine.close()


def test_a_layout_for_keras_files(tmp_path, memory_url):
    local = tmp_path / "local"
    local.mkdir()
    model = local / "model-3.keras"
    model.write_bytes(b"zip bytes of a keras model" * 100)
    with CheckpointEngine(memory_url, str(local), layout=KERAS) as engine:
        engine.open()
        assert engine.resume() is None
        engine.submit(3, [str(model)])
        engine.wait(60)
    [info] = cloudckpt.list_checkpoints(memory_url)
    assert (info.step, info.layout, [f.name for f in info.files]) == (3, "test-engine-keras", ["model-3.keras"])
    pulled = tmp_path / "pulled"
    assert cloudckpt.download_checkpoint(memory_url, str(pulled)) == str(pulled / "model-3")
    assert sorted(os.listdir(pulled)) == ["model-3.keras"]  # no TF state file for a Keras layout
    assert (pulled / "model-3.keras").read_bytes() == model.read_bytes()

    engine = CheckpointEngine(memory_url, str(tmp_path / "vm2"), layout=KERAS)
    restored = engine.resume()
    assert restored is not None and restored.step == 3 and engine.find_saved(3).prefix == "model-3"
    engine.close()


def test_a_local_path_is_committed_in_place(tmp_path):
    directory = tmp_path / "run"
    engine = CheckpointEngine(str(directory), str(directory), retention=RetentionPolicy(max_to_keep=2))
    engine.open()
    assert engine.in_place
    threads = []
    for step in (1, 2):
        engine.submit(step, write_checkpoint(directory, step),
                      on_committed=lambda result: threads.append(threading.current_thread().name))
    engine.wait()
    assert threads == ["cloudckpt-uploader"] * 2  # checksums and scans stay off the training thread
    assert [c.step for c in cloudckpt.list_checkpoints(str(directory))] == [1, 2]
    stats = engine.stats()  # nothing was sent: no bytes, no throughput (a review saw 64 MiB "at 3730 MiB/s")
    assert stats.committed == 2 and stats.bytes_uploaded == 0 and stats.last_upload_mib_per_second is None, stats
    for name in os.listdir(directory):
        if name.startswith("ckpt-1."):
            os.remove(directory / name)  # the framework's own max_to_keep
    engine.prepare_final_save(2)
    engine.finish()
    assert [c.step for c in cloudckpt.list_checkpoints(str(directory))] == [2]  # no manifest vouches for gone files
    assert not (directory / STAGING_DIR).exists()


HOLDER = """
import json, os, sys
sys.path.insert(0, sys.argv[4])
from test_engine import write_checkpoint
from cloudckpt.engine import CheckpointEngine
engine = CheckpointEngine(sys.argv[1], sys.argv[2], storage_options=json.loads(sys.argv[3]))
engine.open()
print("OPEN", os.getpid(), flush=True)
for line in sys.stdin:
    step = int(line)
    engine.submit(step, write_checkpoint(sys.argv[2], step))
    engine.wait(120)
    print("COMMITTED", step, flush=True)
"""


def start_holder(url: str, local, options: dict) -> subprocess.Popen:
    """A process training with ``local`` as its local_dir: commits the step of each line it reads."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(local), json.dumps(options), tests],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = holder.stdout.readline()
    assert line.startswith("OPEN "), line
    return holder


def holder_commits(holder: subprocess.Popen, step: int) -> None:
    holder.stdin.write(f"{step}\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == f"COMMITTED {step}\n"


def test_a_second_process_on_the_same_local_dir_is_refused_until_the_first_is_gone(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    local = tmp_path / "local"
    holder = start_holder(url, local, options)
    try:
        holder_commits(holder, 1)
        pending = local / STAGING_DIR / "ckpt-2-snapshot"  # as if the holder had a snapshot uploading
        pending.mkdir(parents=True)
        second = CheckpointEngine(url, str(local), storage_options=options)
        with pytest.raises(cloudckpt.ConfigError) as refused:
            second.open()
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and str(local) in message and "local_dir=" in message, message
        assert pending.is_dir()  # the refused process removed nothing
        second.close()
        holder_commits(holder, 2)  # the first one's commits continue
        assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [1, 2]
    finally:
        holder.kill()  # SIGKILL: no close(), the lock goes with the process
        holder.wait(60)
    with CheckpointEngine(url, str(local), storage_options=options) as relaunched:
        relaunched.open()
        assert not pending.exists()  # what the killed run left is cleared, now under the lock
        assert relaunched.resume().step == 2  # resumes where the killed run left off
        relaunched.submit(3, write_checkpoint(local, 3))
        relaunched.wait(120)
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [1, 2, 3]


def test_engines_of_one_process_share_its_local_dir_and_hold_it_until_the_last_closes(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    local = tmp_path / "local"
    first = CheckpointEngine(url, str(local), storage_options=options)
    second = CheckpointEngine(url, str(local), storage_options=options)
    first.open()
    second.open()  # a Keras callback reopened, a second manager: re-entrant within the process
    first.open()  # opening again holds it once
    first.close()
    refused = open_in_another_process(url, local, options)
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr, refused.stderr
    second.close()
    assert open_in_another_process(url, local, options).returncode == 0  # released by the last one


def open_in_another_process(url: str, local, options: dict | None = None) -> subprocess.CompletedProcess:
    """``CheckpointEngine.open()`` on ``local`` in a new process (its ConfigError on stderr)."""
    code = ("import json, sys; from cloudckpt.engine import CheckpointEngine\n"
            "CheckpointEngine(sys.argv[1], sys.argv[2], storage_options=json.loads(sys.argv[3])).open()")
    return subprocess.run([sys.executable, "-c", code, url, str(local), json.dumps(options)],
                          capture_output=True, text=True, timeout=120)


def test_a_local_dir_belongs_to_one_url(tmp_path, memory_url):
    local = tmp_path / "local"
    with CheckpointEngine(memory_url, str(local)) as engine:
        engine.open()
        engine.submit(30, write_checkpoint(local, 30))
        engine.wait(60)
    other = memory_url + "-other"
    engine = CheckpointEngine(other, str(local))
    with pytest.raises(cloudckpt.ConfigError) as refused:
        engine.open()
    message = str(refused.value)
    assert memory_url in message and other in message and "local_dir=" in message, message
    engine.close()
    with CheckpointEngine(memory_url, str(local)) as engine:  # the same URL again: fine
        engine.open()
        assert engine.resume().step == 30
    # A local_dir of an older version (nothing recorded) is used as it is, and gets the record.
    os.remove(local / URL_FILE)
    with CheckpointEngine(memory_url, str(local)) as engine:
        engine.open()
    with pytest.raises(cloudckpt.ConfigError):
        CheckpointEngine(other, str(local)).open()
    # Neither file is a checkpoint file: never uploaded, listed or retained.
    names = [o.name for o in CheckpointEngine(memory_url, str(local)).store.list_objects()]
    assert not [n for n in names if n.startswith(".cloudckpt")], names


def test_a_pull_into_another_runs_directory_is_refused(tmp_path, memory_url):
    """A checkpoint of URL B pulled into the local directory of URL A (or into A's directory committed in place)
    was taken by A's next resume as its newest local checkpoint: run A continued from run B's weights and
    committed them (fresh-user trial: `cloudckpt pull s3://b/run ~/.cache/cloudckpt/<A>`). Refused, like a
    local_dir reused for another URL; a download into a run's own directory stays allowed."""
    import fcntl

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with CheckpointEngine(memory_url, str(ours)) as engine:
        engine.open()
        engine.submit(30, write_checkpoint(ours, 30))
        engine.wait(60)
    other = memory_url + "-other"
    with CheckpointEngine(other, str(theirs)) as engine:
        engine.open()
        engine.submit(60, write_checkpoint(theirs, 60))
        engine.wait(60)
    in_place = tmp_path / "in-place"
    with CheckpointEngine(str(in_place), str(in_place)) as engine:
        engine.open()
        engine.submit(10, write_checkpoint(in_place, 10))
        engine.wait(60)
    before = {d: sorted(os.listdir(d)) for d in (ours, in_place)}
    for download in (cloudckpt.pull_checkpoint, cloudckpt.download_checkpoint):
        with pytest.raises(cloudckpt.ConfigError) as refused:
            download(other, str(ours))
        message = str(refused.value)
        assert memory_url in message and other in message and URL_FILE in message, message
        with pytest.raises(cloudckpt.ConfigError, match="committed in place") as refused:
            download(other, str(in_place))
        assert other in str(refused.value) and str(in_place) in str(refused.value)
    assert {d: sorted(os.listdir(d)) for d in (ours, in_place)} == before  # nothing written
    with CheckpointEngine(memory_url, str(ours)) as engine:  # so A still resumes from its own step
        engine.open()
        assert engine.resume().step == 30
    # Its own URL, a directory into itself, a fresh directory: as before.
    assert cloudckpt.pull_checkpoint(memory_url, str(ours)).checkpoint.step == 30
    assert cloudckpt.pull_checkpoint(str(in_place), str(in_place)).checkpoint.step == 10
    assert cloudckpt.pull_checkpoint(other, str(tmp_path / "fresh")).checkpoint.step == 60
    # A directory another process trains in (holds its lock), even for the same URL.
    fd = os.open(ours / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process's engine does
        with pytest.raises(cloudckpt.ConfigError, match="training with cloudckpt"):
            cloudckpt.pull_checkpoint(memory_url, str(ours))
    finally:
        os.close(fd)


def test_a_pull_into_a_runs_directory_takes_its_url_however_spelled(tmp_path, monkeypatch):
    """The URL recorded in a local_dir and the one a pull names are compared as locations, not strings: a
    run on file:///nfs/run with local_dir /scratch pulled again as /nfs/run, nfs/run (relative), a symlink
    to it or file:///nfs/run/ was refused as "the local directory of file:///nfs/run, not of /nfs/run"; so
    was s3a:// for s3:// and gcs:// for gs://. Another directory stays refused."""
    from cloudckpt.localdir import check_download_target

    store, scratch = tmp_path / "nfs" / "run", tmp_path / "scratch"
    with CheckpointEngine(f"file://{store}", str(scratch)) as engine:
        engine.open()
        engine.submit(30, write_checkpoint(scratch, 30))
        engine.wait(60)
    (tmp_path / "link").symlink_to(store)
    monkeypatch.chdir(tmp_path)
    for spelling in (f"file://{store}/", str(store), f"{store}/", "nfs/run", str(tmp_path / "link")):
        assert cloudckpt.pull_checkpoint(spelling, str(scratch)).checkpoint.step == 30, spelling
    with pytest.raises(cloudckpt.ConfigError, match="is the local directory"):
        cloudckpt.pull_checkpoint(str(tmp_path / "nfs"), str(scratch))
    recorded = tmp_path / "recorded"
    for url, same, other in (("s3://b/run", "s3a://b/run/", "s3://b/run2"), ("gs://b/run", "gcs://b/run", "gs://c/run")):
        recorded.mkdir(exist_ok=True)
        (recorded / URL_FILE).write_text(json.dumps({"url": url}))
        check_download_target(str(recorded), same)
        with pytest.raises(cloudckpt.ConfigError, match="is the local directory"):
            check_download_target(str(recorded), other)


def test_a_pulls_look_at_the_lock_does_not_refuse_a_training_start(tmp_path):
    """check_download_target takes the lock file's shared flock for an instant to see whether a process trains
    there; a training process starting at that instant (its exclusive flock, non-blocking) was refused with
    "in use by another process training with cloudckpt". A lock held that briefly is waited for."""
    import fcntl

    from cloudckpt import localdir

    directory = tmp_path / "run"
    directory.mkdir()
    (directory / LOCK_FILE).write_text("")
    fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as a pull's check does, in another process
    timer = threading.Timer(0.03, os.close, (fd,))
    timer.start()
    try:
        localdir.claim(str(directory)).release()
    finally:
        timer.join()


def test_a_pull_onto_a_full_or_read_only_disk_names_the_local_directory(tmp_path, memory_url, monkeypatch):
    """A full disk under `cloudckpt pull` said "download s3://.../ckpt-550.data-... failed: OSError: No space left
    on device (cause: OSError; rerun with logging at DEBUG for details)": the store's object, not the directory
    being filled, and no way out; a read-only one "[Errno 30] Read-only file system: '<dir>/.cloudckpt-download-…'";
    and the directory pull had created stayed behind, empty (fresh-user trial). Now the error names the local
    directory, the cause and the fix, and a directory the pull created is removed again."""
    import errno

    from fsspec.implementations.memory import MemoryFileSystem

    from cloudckpt.remote import remote_error

    local = tmp_path / "vm"
    with CheckpointEngine(memory_url, str(local)) as engine:
        engine.open()
        engine.submit(30, write_checkpoint(local, 30))
        engine.wait(60)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(MemoryFileSystem, "get_file", full)
    target = tmp_path / "new" / "pulled"
    with pytest.raises(cloudckpt.RemoteError) as failed:
        cloudckpt.pull_checkpoint(memory_url, str(target))
    message = str(failed.value)
    assert str(target) in message and "disk is full" in message and "step 30" in message, message
    assert "rerun with logging" not in message, message
    assert not (tmp_path / "new").exists()  # as it was: not there
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(cloudckpt.RemoteError, match="disk is full"):
        cloudckpt.download_checkpoint(memory_url, str(existing))
    assert existing.is_dir() and os.listdir(existing) == []  # there before: kept, and left as it was
    # Elsewhere (a gc or rollback writing a read-only local directory's log) the hint says the same.
    error = remote_error("create", str(tmp_path / "run"), OSError(errno.EROFS, "Read-only file system"))
    assert "file system is read-only" in str(error) and "rerun with logging" not in str(error), str(error)


def test_an_in_place_directory_records_nothing_and_lists_only_checkpoints(tmp_path, memory_url):
    directory = tmp_path / "run"
    with CheckpointEngine(str(directory), str(directory)) as engine:
        engine.open()
        engine.submit(1, write_checkpoint(directory, 1))
        engine.wait(60)
        assert (directory / LOCK_FILE).exists() and not (directory / URL_FILE).exists()
        assert [c.step for c in cloudckpt.list_checkpoints(str(directory))] == [1]
        scan = cloudckpt.verify(str(directory))
        assert scan.ok, scan
    with CheckpointEngine(memory_url, str(tmp_path / "cache")) as engine:
        engine.open()  # a local_dir of memory_url...
    cache = str(tmp_path / "cache")
    with pytest.raises(cloudckpt.ConfigError, match="local directory"):
        CheckpointEngine(cache, cache).open()  # ... is not a checkpoint directory of its own


def test_a_commit_landing_while_resuming_is_resumed_from_without_a_rollback_warning(memory_url, tmp_path, caplog):
    """Another writer commits while this one resumes: registering decides again, and the local state file then
    names the checkpoint the first attempt downloaded. Was: a WARNING that the state file 'points at committed
    step 1 ... To go back to step 1 on purpose, run cloudckpt rollback' -- about this run's own download."""
    a_local, b_local = tmp_path / "a", tmp_path / "b"
    attempts = []
    with CheckpointEngine(memory_url, str(a_local)) as a:
        a.open()
        a.resume()
        a.submit(1, write_checkpoint(a_local, 1))
        a.wait(60)

        def commit_meanwhile(downloaded) -> None:  # runs in each decision of b's resume, before b registers
            attempts.append(len(attempts))
            if len(attempts) == 1:
                a.submit(2, write_checkpoint(a_local, 2))
                a.wait(60)

        with CheckpointEngine(memory_url, str(b_local)) as b:
            b.open()
            with caplog.at_level(logging.INFO, logger="cloudckpt"):
                restored = b.resume(check=commit_meanwhile)
    assert len(attempts) == 2 and restored is not None and restored.step == 2
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert not [m for level, m in messages if level >= logging.WARNING and "on purpose" in m], messages
    assert any("committed step 2 while this run resumed from step 1" in m for _, m in messages), messages


def test_nothing_committed_in_a_runs_parent_names_the_subdirectories_that_hold_checkpoints(tmp_path, memory_url,
                                                                                           capsys):
    """On a parent such as s3://b/k6 whose backup/ and models/ hold checkpoints, `ls` said "No checkpoints in
    ..." and verify / pull "No committed checkpoint in ...", none naming where they are (fresh-user trial)."""
    for sub, step in (("backup", 30), ("models", 60)):
        with CheckpointEngine(f"{memory_url}/{sub}", str(tmp_path / sub)) as engine:
            engine.open()
            engine.submit(step, write_checkpoint(tmp_path / sub, step))
            engine.wait(60)
    fsspec.filesystem("memory").pipe(f"{memory_url}/notes/readme.txt".removeprefix("memory://"), b"no checkpoints")
    hint = f"Its subdirectories backup/ and models/ hold checkpoints: pass one ({memory_url}/backup)."
    for attempt in (lambda: cloudckpt.pull_checkpoint(memory_url, str(tmp_path / "dest")),
                    lambda: cloudckpt.download_checkpoint(memory_url, str(tmp_path / "dest")),
                    lambda: cloudckpt.verify_checkpoints(memory_url)):
        with pytest.raises(cloudckpt.CheckpointNotFoundError) as missing:
            attempt()
        assert str(missing.value).startswith(f"No committed checkpoint in {memory_url}") \
            and str(missing.value).endswith(hint), str(missing.value)
    assert cli.main(["ls", memory_url]) == cli.EXIT_OK
    assert capsys.readouterr().out == f"No checkpoints in {memory_url}. {hint}\n"
    assert cli.main(["ls", f"{memory_url}/notes"]) == cli.EXIT_OK  # nothing below either: the plain message
    assert capsys.readouterr().out == f"No checkpoints in {memory_url}/notes.\n"
    with pytest.raises(cloudckpt.CheckpointNotFoundError) as missing:
        cloudckpt.verify_checkpoints(f"{memory_url}/backup/nothing-here")
    assert "subdirector" not in str(missing.value)


def test_a_step_committed_under_two_names_selects_the_newer(tmp_path, memory_url):
    """A Keras template with a metric (model-{epoch}-{val_loss}) fit again from scratch commits a second
    checkpoint at a step under another name: `pull --step 6` / download_checkpoint(step=6) took the older
    one, from the first run, silently (fresh-user trial). The newer commit is taken, as for the newest."""
    with CheckpointEngine(memory_url, str(tmp_path / "vm")) as engine:
        engine.open()
        for basename in ("first", "second"):
            engine.submit(6, write_checkpoint(tmp_path / "vm", 6, basename=basename))
            engine.wait(60)
    assert [c.name for c in cloudckpt.list_checkpoints(memory_url) if c.step == 6] == ["first-6", "second-6"]
    pulled = cloudckpt.pull_checkpoint(memory_url, str(tmp_path / "dest"), step=6)
    assert pulled.checkpoint.name == "second-6"
    assert cloudckpt.download_checkpoint(memory_url, str(tmp_path / "other"), step=6).endswith("second-6")


def test_the_subdirectories_hint_names_a_few_and_counts_the_others(tmp_path, memory_url, capsys):
    """A parent of 16 runs holding checkpoints: the "nothing committed here" hint of `ls` / verify / pull
    named all 16 (one long line); it names the first three and counts the others, and says when the
    directory has more subdirectories than it looked at."""
    runs = [f"run-{i:02d}" for i in range(16)]
    for sub in runs:
        with CheckpointEngine(f"{memory_url}/{sub}", str(tmp_path / sub)) as engine:
            engine.open()
            engine.submit(1, write_checkpoint(tmp_path / sub, 1))
            engine.wait(60)
    hint = f"Its subdirectories run-00/, run-01/, run-02/ and 13 more hold checkpoints: pass one ({memory_url}/run-00)."
    with pytest.raises(cloudckpt.CheckpointNotFoundError) as missing:
        cloudckpt.verify_checkpoints(memory_url)
    assert str(missing.value).endswith(f"nothing to verify. {hint}"), str(missing.value)
    assert "run-03" not in str(missing.value)
    assert cli.main(["ls", memory_url]) == cli.EXIT_OK
    assert capsys.readouterr().out == f"No checkpoints in {memory_url}. {hint}\n"

    memory = fsspec.filesystem("memory")
    for i in range(4):  # not looked at (after the first 16 by name): the count says of how many
        memory.pipe(f"{memory_url}/zz-{i}/readme.txt".removeprefix("memory://"), b"no checkpoints")
    with pytest.raises(cloudckpt.CheckpointNotFoundError) as missing:
        cloudckpt.pull_checkpoint(memory_url, str(tmp_path / "dest"))
    assert str(missing.value).endswith(
        "Its subdirectories run-00/, run-01/, run-02/ and 13 more (of the first 16 of 20 subdirectories by name) "
        f"hold checkpoints: pass one ({memory_url}/run-00)."), str(missing.value)


def test_during_an_outage_stats_and_summaries_show_what_a_preemption_would_lose(cloudckpt_s3, tmp_path):
    """The store goes down after step 10 committed: step 20's commit keeps retrying, step 30 waits and is dropped
    for step 40. Meanwhile ``uncommitted_seconds`` / ``uncommitted_steps`` (read when ``stats()`` is called) grow
    with the training step, while the commit lag (measured at step 10's commit) stays as it was; the drop writes
    TensorBoard points at once (no commit needed). Before: no read-time figures, and no point until a commit."""
    import time

    pytest.importorskip("tensorflow")
    from support.checks import read_scalars
    from support.fault_proxy import FaultProxy

    local, summaries = tmp_path / "local", tmp_path / "tb"
    training = {"step": 10}
    retry = cloudckpt.RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.1, deadline=120)
    with FaultProxy(cloudckpt_s3.endpoint) as proxy:
        options = {**cloudckpt_s3.storage_options, "endpoint_url": proxy.url}
        with CheckpointEngine(cloudckpt_s3.url("run"), str(local), storage_options=options, max_pending=1,
                              retry=retry, summary_dir=str(summaries)) as engine:
            engine.step_source = lambda: training["step"]
            engine.open()
            assert (engine.stats().uncommitted_seconds, engine.stats().uncommitted_steps) == (None, None)
            saved_10 = time.time()
            engine.submit(10, write_checkpoint(local, 10))
            engine.wait(60)
            committed = engine.stats()
            assert (committed.last_committed_step, committed.last_commit_lag_steps, committed.uncommitted_steps) \
                == (10, 0, 0)
            proxy.start_outage()
            try:
                training["step"] = 20
                engine.submit(20, write_checkpoint(local, 20))
                deadline = time.monotonic() + 30
                while engine.stats().retries < 2:  # step 20 is in flight, retrying
                    assert time.monotonic() < deadline, "no retry during the outage"
                    time.sleep(0.02)
                training["step"] = 30
                engine.submit(30, write_checkpoint(local, 30))
                training["step"] = 40
                engine.submit(40, write_checkpoint(local, 40))  # step 30 is dropped
                training["step"] = 45
                time.sleep(0.5)
                during = engine.stats()
                while "dropped" not in read_scalars(summaries) or 30 not in read_scalars(summaries)["dropped"]:
                    assert time.monotonic() < deadline, "no summary written for the drop during the outage"
                    time.sleep(0.05)
                scalars = read_scalars(summaries)
            finally:
                proxy.end_outage()
            engine.wait(120)
            after = engine.stats()
    assert (during.last_committed_step, during.dropped, during.committed) == (10, 1, 1), during
    # the commit lag is the one measured at step 10's commit; what a preemption now would lose is not
    assert during.last_commit_lag_steps == 0 and during.last_commit_lag_seconds == committed.last_commit_lag_seconds
    assert during.uncommitted_steps == 35
    assert during.uncommitted_seconds >= 0.5 and during.uncommitted_seconds >= time.time() - saved_10 - 60
    assert during.uncommitted_seconds > committed.last_commit_lag_seconds
    assert scalars["dropped"][30] == 1.0 and scalars["uncommitted_steps"][30] >= 30  # 40 (or 45) - 10
    assert scalars["uncommitted_seconds"][30] > 0
    assert 30 not in scalars.get("commit_lag_seconds", {})
    assert (after.last_committed_step, after.committed, after.failed) == (40, 3, 0), after
    assert after.uncommitted_steps == 5 and after.uncommitted_seconds < during.uncommitted_seconds + 60


@pytest.mark.parametrize("interrupted", [False, True], ids=["close", "ctrl_c_in_close"])
def test_close_delivers_the_last_drops_to_the_summaries_and_leaves_no_observer_thread(cloudckpt_s3, tmp_path,
                                                                                      interrupted):
    """A checkpoint dropped just before close() (store down, max_pending=1) still gets its TensorBoard point, the
    thread that delivers drops to the observer has ended when close() returns, and the event file is closed (no
    descriptor of this process left on it). Before: that thread lived on up to 1 s after close (one more cloudckpt
    thread left running) and could write after the summary writer closed. ``ctrl_c_in_close``: close() interrupted
    by a Ctrl-C while it waits for the upload in flight; the KeyboardInterrupt propagates, the event file is closed
    all the same (before: the interrupt skipped closing it)."""
    import signal
    import time

    pytest.importorskip("tensorflow")
    from support.checks import read_scalars
    from support.fault_proxy import FaultProxy

    local, summaries = tmp_path / "local", tmp_path / "tb"
    retry = cloudckpt.RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.1, deadline=120)

    def open_event_files() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(str(summaries)):
                    found.append(target)
        return found

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with FaultProxy(cloudckpt_s3.endpoint) as proxy:
        options = {**cloudckpt_s3.storage_options, "endpoint_url": proxy.url}
        engine = CheckpointEngine(cloudckpt_s3.url("run"), str(local), storage_options=options, max_pending=1,
                                  retry=retry, summary_dir=str(summaries))
        try:
            engine.open()
            proxy.start_outage()
            engine.submit(20, write_checkpoint(local, 20))
            deadline = time.monotonic() + 30
            while engine.stats().retries < 1:  # step 20 is in flight, retrying
                assert time.monotonic() < deadline, "no retry during the outage"
                time.sleep(0.02)
            engine.submit(30, write_checkpoint(local, 30))
            engine.submit(40, write_checkpoint(local, 40))  # step 30 is dropped
            assert engine.stats().dropped == 1
            if interrupted:
                while not open_event_files():  # the observer thread writes the drop of step 30
                    assert time.monotonic() < deadline, "the drop of step 30 opened no event file"
                    time.sleep(0.02)
                sender = threading.Thread(target=_ctrl_c_in_uploader_close)
                sender.start()
                with pytest.raises(KeyboardInterrupt):
                    engine.close(timeout=60)  # until committed: only the Ctrl-C ends it
                sender.join()
            else:
                engine.close(timeout=0)
            observers = [t.name for t in threading.enumerate() if t.name == "cloudckpt-observer"]
            still_open = open_event_files()
        finally:
            signal.signal(signal.SIGINT, previous)
            engine.close(timeout=0)
            proxy.end_outage()
    assert observers == [], observers
    assert still_open == [], still_open
    assert read_scalars(summaries)["dropped"][30] == 1.0


def _ctrl_c_in_uploader_close() -> None:
    """Once the main thread is inside ``Uploader.close`` (30 s at most), interrupt it as the terminal's SIGINT does:
    a KeyboardInterrupt there."""
    import _thread

    from cloudckpt.uploader import Uploader

    def in_close() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None and frame.f_code is not Uploader.close.__code__:
            frame = frame.f_back
        return frame is not None

    deadline = time.monotonic() + 30
    while not in_close() and time.monotonic() < deadline:
        time.sleep(0.01)
    _thread.interrupt_main()


def test_a_ctrl_c_in_close_still_delivers_the_last_drops_and_leaves_no_observer_thread(cloudckpt_s3, tmp_path):
    """The same with ``Uploader.close()`` interrupted by a Ctrl-C while it waits for the upload in flight (the store
    down): the KeyboardInterrupt propagates, the drop waiting still reaches the observer, and the thread delivering
    drops has ended when it does. Before: the interrupt skipped ending that thread (it lived on up to 1 s, and
    could call the observer after the caller closed what it writes to)."""
    import signal

    from cloudckpt.commit import LocalCheckpoint
    from cloudckpt.remote import RemoteStore
    from cloudckpt.uploader import Uploader, UploadJob
    from support.fault_proxy import FaultProxy

    local = tmp_path / "local"
    observed: list[int] = []
    retry = cloudckpt.RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.1, deadline=120)

    def checkpoint(step: int) -> LocalCheckpoint:
        paths = write_checkpoint(local, step)
        return LocalCheckpoint(step=step, prefix=f"ckpt-{step}", files={os.path.basename(p): p for p in paths})

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with FaultProxy(cloudckpt_s3.endpoint) as proxy:
        options = {**cloudckpt_s3.storage_options, "endpoint_url": proxy.url}
        retried = threading.Event()
        store = RemoteStore(cloudckpt_s3.url("run"), options, retry=retry, on_retry=lambda cause: retried.set())
        uploader = Uploader(store, max_pending=1, observer=lambda step, stats: observed.append(step))
        try:
            uploader.start()
            proxy.start_outage()
            uploader.submit(UploadJob(checkpoint(20)))
            assert retried.wait(30), "no retry during the outage"  # step 20 is in flight, retrying
            uploader.submit(UploadJob(checkpoint(30)))
            uploader.submit(UploadJob(checkpoint(40)))  # step 30 is dropped
            sender = threading.Thread(target=_ctrl_c_in_uploader_close)
            sender.start()
            with pytest.raises(KeyboardInterrupt):
                uploader.close()  # until committed: only the Ctrl-C ends it
            observers = [t.name for t in threading.enumerate() if t.name == "cloudckpt-observer"]
            sender.join()
        finally:
            signal.signal(signal.SIGINT, previous)
            uploader.close()  # the abandoned worker's grace
            proxy.end_outage()
    assert observers == [], observers
    assert 30 in observed, observed


def _held(proxy, step: int) -> threading.Event:
    """Have the store hold every PUT of checkpoint ``step`` until the event returned is set; wait for the first."""
    hold = threading.Event()
    proxy.set_faults(only_methods=["PUT"], path_filter=f"ckpt-{step}\\.", until=hold)
    return hold


def _wait_held(proxy, step: int) -> None:
    deadline = time.monotonic() + 60
    while not any(m == "PUT" and f"ckpt-{step}." in p for m, p, _ in proxy.events):
        assert time.monotonic() < deadline, f"step {step}'s upload never reached the store"
        time.sleep(0.05)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("cloudckpt")]


def test_closing_with_uploads_abandoned_says_which_steps_and_what_a_restart_resumes_from(
        cloudckpt_s3, moto_server, tmp_path, caplog):
    """The interrupt's close (the TF1 hook's and the Keras callbacks' Ctrl-C path: ``close(timeout=0)``) with an
    upload held by the store and one waiting: ONE WARNING names both steps (not committed), the store's URL and
    the latest committed step there, which a restart resumes from -- also when this run committed none (the
    resume's scan knows it). Before, the uploader's "Abandoning upload of checkpoint step(s) ..." named no
    committed step, and the hook's own line (closing_note) only a step this run had committed. Nothing pending:
    nothing is said."""
    from support.fault_proxy import FaultProxy

    url = cloudckpt_s3.url("run")
    holds: list[threading.Event] = []
    with FaultProxy(moto_server.endpoint) as proxy:
        options = {**cloudckpt_s3.storage_options, "endpoint_url": proxy.url}
        first = CheckpointEngine(url, str(tmp_path / "vm1"), storage_options=options, retry=FAST)
        second = CheckpointEngine(url, str(tmp_path / "vm2"), storage_options=options, retry=FAST)
        try:
            first.open()
            assert first.resume() is None
            first.submit(5, write_checkpoint(tmp_path / "vm1", 5))
            first.wait(60)
            holds.append(_held(proxy, 7))
            first.submit(7, write_checkpoint(tmp_path / "vm1", 7))
            first.submit(9, write_checkpoint(tmp_path / "vm1", 9))  # waits behind it
            _wait_held(proxy, 7)
            caplog.clear()
            caplog.set_level(logging.DEBUG, logger="cloudckpt")
            first.close(timeout=0, reason="interrupted")  # what CheckpointSaverHook does on KeyboardInterrupt
            assert _warnings(caplog) == [
                f"Closing cloudckpt (interrupted): abandoned the upload of checkpoint step(s) [7, 9] to {url} "
                "(not committed); the latest committed checkpoint there is step 5, which a restart resumes from."]

            # the restart: resumes from step 5, commits nothing before the next Ctrl-C
            second.open()
            assert second.resume().step == 5
            holds.append(_held(proxy, 11))
            second.submit(11, write_checkpoint(tmp_path / "vm2", 11))
            _wait_held(proxy, 11)
            caplog.clear()
            second.close(timeout=0, reason="Training ended with KeyboardInterrupt")  # the Keras callbacks' reason
            assert _warnings(caplog) == [
                f"Closing cloudckpt (Training ended with KeyboardInterrupt): abandoned the upload of checkpoint "
                f"step(s) [11] to {url} (not committed); the latest committed checkpoint there is step 5, which a "
                "restart resumes from."]
        finally:
            for hold in holds:
                hold.set()
            first.close(timeout=0)
            second.close(timeout=0)
    assert [c.step for c in cloudckpt.list_checkpoints(url, cloudckpt_s3.storage_options)] == [5]

    # nothing pending: closing says nothing
    third = CheckpointEngine(url, str(tmp_path / "vm3"), storage_options=cloudckpt_s3.storage_options)
    third.open()
    third.resume()
    caplog.clear()
    third.close(timeout=0, reason="interrupted")
    assert _warnings(caplog) == []
