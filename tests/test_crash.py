"""Crash consistency: SIGKILL the training process at random moments while uploads are in flight.

After every kill, the newest committed checkpoint (if any) verifies byte for
byte, every other committed one too, and a restart on an empty disk resumes
from exactly the newest committed step.
"""

from __future__ import annotations

import random
import time
import uuid

import pytest

import cloudckpt
from support.trainer_process import TrainerProcess


def kill_and_resume_trials(moto_server, tmp_path, trials: int, seed: int) -> list[int]:
    """Start, SIGKILL at a random moment, check, repeat. The next trainer is started a trial ahead and waits
    (``--start-when``) with TensorFlow imported, so a trial costs its training time, not an interpreter start."""
    rng = random.Random(seed)
    url = moto_server.create_bucket(f"crash-{uuid.uuid4().hex[:10]}") + "/runs/exp1"
    options = moto_server.storage_options
    expected_first = 0
    resumed_from = []

    def spawn(trial: int) -> tuple[TrainerProcess, str]:
        trigger = str(tmp_path / f"go{trial}")
        return TrainerProcess(url, moto_server.endpoint, str(tmp_path / f"vm{trial}"), "--save-steps", "2",
                              "--start-when", trigger), trigger

    waiting = spawn(0)
    try:
        for trial in range(trials):
            trainer, trigger = waiting
            open(trigger, "w").close()
            waiting = spawn(trial + 1) if trial + 1 < trials else None
            try:
                deadline = time.monotonic() + 120
                while trainer.first_step is None:
                    assert trainer.proc.poll() is None and time.monotonic() < deadline, trainer.stderr
                    time.sleep(0.01)
                assert trainer.first_step == expected_first, f"trial {trial}: resumed from {trainer.first_step}"
                resumed_from.append(trainer.first_step)
                time.sleep(rng.uniform(0.0, 1.2))
            finally:
                trainer.kill()
            committed = cloudckpt.list_checkpoints(url, options)
            for info in committed:
                report = cloudckpt.verify(url, info.step, storage_options=options)
                assert report.ok, f"trial {trial}: committed step {info.step} is corrupt: {report.problems}"
            expected_first = committed[-1].step if committed else 0
    finally:
        if waiting is not None:
            waiting[0].kill()
    return resumed_from


@pytest.mark.timeout(900)  # 12 training processes started and killed; 100 in the slow soak below
def test_sigkill_during_uploads_never_corrupts_committed(moto_server, tmp_path):
    resumed = kill_and_resume_trials(moto_server, tmp_path, trials=12, seed=1234)
    assert len(resumed) == 12
    assert resumed[-1] > 0  # the run made progress across kills


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sigkill_soak(moto_server, tmp_path):
    resumed = kill_and_resume_trials(moto_server, tmp_path, trials=100, seed=99)
    assert len(resumed) == 100
