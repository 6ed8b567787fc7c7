"""The hook's lifecycle: close() after a clean end, after an exception and on Ctrl-C; the final checkpoint.

TF calls hooks' end() only on a clean exit; whatever ends the session, the
hook must end up closed: no cloudckpt thread left, SIGTERM handler restored,
the final checkpoint committed or a failure raised.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid

import pytest
import tensorflow as tf

import cloudckpt
from support.checks import assert_all_committed_intact
from support.fake_metadata import FakeGceMetadata
from support.moto_iam import IamMoto
from support.tf_model import RaiseAt, train
from support.trainer_process import TrainerProcess, foreign_thread




def started_since(before: set[threading.Thread]) -> list[str]:
    """Names of threads alive now that were not before (other libraries' long-lived threads aside)."""
    return sorted(t.name for t in threading.enumerate() if t not in before and not foreign_thread(t.name))


def test_exception_in_training_closes_the_hook(memory_url, tmp_path):
    disposition = signal.getsignal(signal.SIGTERM)
    local = tmp_path / "local"
    with FakeGceMetadata() as gce:
        before = set(threading.enumerate())
        watcher = cloudckpt.PreemptionWatcher(("sigterm", "gce"), gce_metadata_url=gce.url, poll_interval=0.05)
        hook = cloudckpt.CheckpointSaverHook(memory_url, save_steps=2, local_dir=str(local), preemption=watcher)
        with pytest.raises(RuntimeError, match="training failed at step 7"):
            train(lambda scaffold: hook, last_step=50, extra_hooks=[RaiseAt(7)])
        assert started_since(before) == []  # uploader, upload pool and metadata poller all ended
        assert signal.getsignal(signal.SIGTERM) is disposition
        assert not watcher.running
        last_saved = int(tf.train.latest_checkpoint(str(local)).rsplit("-", 1)[1])
        assert last_saved >= 4
        # checkpoints still uploading when training failed were committed before the session closed
        assert cloudckpt.latest_checkpoint(memory_url).step == last_saved
        assert_all_committed_intact(memory_url, None)
        hook.close()  # idempotent
        hook.close()


def test_session_that_fails_to_be_created_leaves_nothing_running(memory_url, tmp_path):
    """TF tells hooks nothing when session creation fails after begin() (here a Scaffold init_fn)."""
    disposition = signal.getsignal(signal.SIGTERM)
    before = set(threading.enumerate())

    def failing_init(scaffold, session):
        raise RuntimeError("init_fn failed")

    with tf.Graph().as_default():
        tf.compat.v1.train.get_or_create_global_step()
        tf.compat.v1.get_variable("w", shape=[4])
        hook = cloudckpt.CheckpointSaverHook(memory_url, save_steps=1, local_dir=str(tmp_path), preemption="sigterm")
        with pytest.raises(RuntimeError, match="init_fn failed"):
            tf.compat.v1.train.MonitoredTrainingSession(
                checkpoint_dir=hook.local_dir, save_checkpoint_secs=None, save_summaries_steps=None,
                scaffold=tf.compat.v1.train.Scaffold(init_fn=failing_init), hooks=[hook])
    assert started_since(before) == []
    assert signal.getsignal(signal.SIGTERM) is disposition


def test_hook_as_context_manager_and_close_is_idempotent(memory_url, tmp_path):
    before = set(threading.enumerate())
    disposition = signal.getsignal(signal.SIGTERM)
    with cloudckpt.CheckpointSaverHook(memory_url, save_steps=3, local_dir=str(tmp_path), preemption="sigterm") \
            as hook:
        train(lambda scaffold: hook, last_step=7)
        assert cloudckpt.latest_checkpoint(memory_url).step == 7
    hook.close()
    assert started_since(before) == []
    assert signal.getsignal(signal.SIGTERM) is disposition


def test_hook_can_run_a_second_session_after_close(memory_url, tmp_path):
    hook = cloudckpt.CheckpointSaverHook(memory_url, save_steps=3, local_dir=str(tmp_path))
    train(lambda scaffold: hook, last_step=4)
    result = train(lambda scaffold: hook, last_step=8)  # same hook, new session: restores and commits again
    assert result.first_step == 4 and result.last_step == 8
    assert cloudckpt.latest_checkpoint(memory_url).step == 8


@pytest.fixture
def iam_moto():
    with IamMoto() as aws:
        yield aws


@pytest.mark.parametrize("last_step", [11, 10], ids=["final-save-in-end", "final-step-saved-by-the-timer"])
def test_final_checkpoint_not_committed_raises_even_with_warn(iam_moto, tmp_path, last_step):
    """Credentials revoked mid-run: intermediate failures only warn, the final one raises UploadError."""
    url = f"s3://{iam_moto.bucket}/{uuid.uuid4().hex[:8]}"
    hooks: list[cloudckpt.CheckpointSaverHook] = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / "local"),
                                                   storage_options=iam_moto.trainer_options, on_error="warn"))
        return hooks[0]

    revoked: list[bool] = []

    def revoke_once_step_5_is_committed(step: int) -> None:
        if step >= 7 and not revoked:
            hooks[0].wait(60)
            iam_moto.revoke_trainer()
            revoked.append(True)

    with pytest.raises(cloudckpt.UploadError) as info:
        train(make_hook, last_step=last_step, step_callback=revoke_once_step_5_is_committed)
    assert f"step {last_step}" in str(info.value)
    stats = hooks[0].stats()
    assert stats.last_committed_step == 5
    assert stats.failed >= 1
    committed = assert_all_committed_intact(url, iam_moto.admin_options)
    assert max(committed) == 5  # the bucket still holds the previous committed checkpoint


def test_sigterm_after_a_training_exception_terminates(moto_server, s3_url, tmp_path):
    """After training raised, nothing of cloudckpt is left: SIGTERM terminates as SIG_DFL does (143)."""
    with FakeGceMetadata() as gce:
        trainer = TrainerProcess(s3_url, moto_server.endpoint, str(tmp_path / "vm"), "--save-steps", "2",
                                 "--preemption", "sigterm,gce", "--raise-at", "5",
                                 env={"CLOUDCKPT_GCE_METADATA_URL": gce.url})
        try:
            line = trainer.wait_for_line("RAISED")
            assert line.endswith("threads left: []"), line
            trainer.terminate()
            assert trainer.wait() == -signal.SIGTERM, trainer.stderr
        finally:
            if trainer.proc.poll() is None:  # it waits for a signal forever: never leave it behind
                trainer.kill()
    assert "The training session ended with an exception (RuntimeError)" in trainer.stderr
    assert_all_committed_intact(s3_url, moto_server.storage_options)


def test_ctrl_c_interrupts_promptly_and_leaves_nothing_half_written(moto_server, s3_url, tmp_path):
    options = moto_server.storage_options
    size = ("--size", str(1 << 21))  # 8 MB: an upload is often in flight when Ctrl-C comes
    trainer = TrainerProcess(s3_url, moto_server.endpoint, str(tmp_path / "vm"), "--save-steps", "3",
                             "--preemption", "sigterm", *size)
    trainer.wait_for_step(20)
    # Something committed first (under load the first commits can trail step 20): the restart below needs one
    deadline = time.monotonic() + 60
    while not cloudckpt.list_checkpoints(s3_url, options) and time.monotonic() < deadline:
        time.sleep(0.2)
    trainer.proc.send_signal(signal.SIGINT)
    assert trainer.wait(60) == -signal.SIGINT, trainer.stderr  # Python's KeyboardInterrupt exit
    assert "KeyboardInterrupt" in trainer.stderr
    committed = assert_all_committed_intact(s3_url, options)
    assert committed
    err = trainer.all_stderr
    assert "Interrupted; closing cloudckpt." in err, err[-12000:]
    # an upload in flight (often: 8 MB per checkpoint) is said once, with the step the restart resumes from
    said = re.findall(r"Closing cloudckpt \(interrupted\): abandoned the upload of checkpoint step\(s\) \[([\d, ]+)\] "
                      r"to \S+ \(not committed\); the latest committed checkpoint there is step (\d+), which a restart "
                      r"resumes from\.", err)
    assert len(said) <= 1, err[-12000:]
    if said:
        assert int(said[0][1]) == max(committed), (said, committed)
        assert all(int(step) > max(committed) for step in said[0][0].split(", ")), (said, committed)
    restart = TrainerProcess(s3_url, moto_server.endpoint, str(tmp_path / "new-vm"), "--save-steps", "50",
                             "--last-step", str(max(committed) + 2), *size)
    assert restart.wait() == 0, restart.stderr
    assert restart.first_step == max(committed)


def test_the_scripts_own_sigterm_handler_runs_after_the_final_commit(moto_server, s3_url, tmp_path):
    """A training script's `signal.signal(SIGTERM, ...: sys.exit(3))` must not cut the final save short."""
    trainer = TrainerProcess(s3_url, moto_server.endpoint, str(tmp_path / "vm"), "--save-steps", "50",
                             "--preemption", "sigterm", "--user-sigterm-exit", "3")
    trainer.wait_for_step(10)
    trainer.terminate()
    assert trainer.wait() == 3, trainer.stderr  # the script's handler ran, and decided the exit status
    assert trainer.wait_for_line("USER_HANDLER")
    assert cloudckpt.latest_checkpoint(s3_url, moto_server.storage_options).step == trainer.step
    assert_all_committed_intact(s3_url, moto_server.storage_options)
