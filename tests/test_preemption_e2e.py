"""Preemption end to end: a training subprocess gets a shutdown notice and commits a final checkpoint."""

from __future__ import annotations

import random
import signal
import time
import uuid

import pytest

import cloudckpt
from support.fake_metadata import FakeAwsMetadata, FakeAzureMetadata, FakeGceMetadata
from support.trainer_process import TrainerProcess


@pytest.fixture
def bucket_url(moto_server):
    return moto_server.create_bucket(f"preempt-{uuid.uuid4().hex[:10]}") + "/runs/exp1"


def assert_everything_verifies(url, options):
    for info in cloudckpt.list_checkpoints(url, options):
        assert cloudckpt.verify(url, info.step, storage_options=options).ok, info.step


def assert_restart_resumes(moto_server, url, tmp_path, expected_step, *args):
    trainer = TrainerProcess(url, moto_server.endpoint, str(tmp_path / "new-vm"), "--save-steps", "50",
                             "--last-step", str(expected_step + 3), *args)
    assert trainer.wait() == 0, trainer.stderr
    assert trainer.first_step == expected_step


def metadata_env(gce, aws, azure) -> dict[str, str]:
    """The CLOUDCKPT_*_METADATA_URL variables pointing a trainer at the fake servers."""
    return {"CLOUDCKPT_GCE_METADATA_URL": gce.url, "CLOUDCKPT_AWS_METADATA_URL": aws.url,
            "CLOUDCKPT_AZURE_METADATA_URL": azure.url}


@pytest.mark.parametrize("source", ["sigterm", "gce", "aws", "azure"])
def test_notice_commits_the_step_it_stopped_at(source, moto_server, bucket_url, tmp_path):
    """azure: preemption="auto" on a simulated Azure Spot VM: every metadata URL is Azure's instance metadata
    service (the three clouds share 169.254.169.254), whose first Scheduled Events request takes 2 s (it
    enables the feature); the GCE and AWS pollers are refused and give up, the Preempt event is the notice
    (Azure sends no SIGTERM before an eviction)."""
    options = moto_server.storage_options
    stop_after = random.Random(source).randint(60, 140)  # not a multiple of the save interval, mostly
    with FakeGceMetadata() as gce, FakeAwsMetadata() as aws, FakeAzureMetadata(enable_delay=2.0) as azure:
        env = metadata_env(azure, azure, azure) if source == "azure" else metadata_env(gce, aws, azure)
        trainer = TrainerProcess(bucket_url, moto_server.endpoint, str(tmp_path / "vm"), "--save-steps", "50",
                                 "--preemption", "auto" if source == "azure" else source, env=env)
        trainer.wait_for_step(stop_after)
        if source == "azure":
            assert azure.wait_for_requests(lambda r: r.path == FakeAzureMetadata.EVENTS_PATH, timeout=30)
        {"sigterm": trainer.terminate, "gce": gce.preempt, "aws": aws.preempt, "azure": azure.preempt}[source]()
        assert trainer.wait() == 0, trainer.stderr  # a clean exit, not a kill
        if source == "aws":  # the IMDSv2 dance: a token first, then the notice fetched with it
            assert aws.requests_to("/latest/api/token")
            assert all(r.header("X-aws-ec2-metadata-token") for r in
                       aws.requests_to("/latest/meta-data/spot/instance-action"))
        if source == "azure":  # asked with "Metadata: true"; the GCE and AWS pollers were refused, at most 3 times
            ours = [r for r in azure.requests if r.path.startswith("/metadata/")]
            assert ours[0].path == FakeAzureMetadata.NAME_PATH and all(r.status == 200 for r in ours)
            assert all(r.header("Metadata") == "true" for r in ours)
            theirs = [r for r in azure.requests if not r.path.startswith("/metadata/")]
            assert theirs and all(r.status in (400, 405) for r in theirs)
            assert len([r for r in theirs if r.path.startswith("/computeMetadata/")]) <= 3
            assert "Preemption notice from azure: scheduled event Preempt (Scheduled) for vm-1" in trainer.stderr
    stopped_at = trainer.step
    assert stopped_at > stop_after - 1
    assert trainer.done == f"DONE {stopped_at} preempted=True"
    latest = cloudckpt.latest_checkpoint(bucket_url, options)
    assert latest.step == stopped_at  # the final checkpoint, not the last periodic save
    assert "Preemption: committed final checkpoint step" in trainer.stderr
    assert_everything_verifies(bucket_url, options)
    assert_restart_resumes(moto_server, bucket_url, tmp_path, stopped_at)


def test_deadline_too_short_keeps_previous_checkpoint(moto_server, bucket_url, tmp_path):
    options = moto_server.storage_options
    size = ["--size", str(1 << 22)]  # 16 MB: no upload finishes within the 1 ms deadline
    trainer = TrainerProcess(bucket_url, moto_server.endpoint, str(tmp_path / "vm"), "--save-steps", "1000000",
                             "--preemption", "sigterm", "--deadline", "0.001", *size)
    deadline = time.monotonic() + 120
    while cloudckpt.latest_checkpoint(bucket_url, options) is None:  # the periodic save at step 0 is in
        assert time.monotonic() < deadline and trainer.proc.poll() is None, trainer.stderr
        time.sleep(0.1)
    trainer.wait_for_step(trainer.step + 5)
    trainer.terminate()
    assert trainer.wait() == 0, trainer.stderr
    assert 0 < trainer.step < 1000000  # no periodic save after step 0
    assert cloudckpt.latest_checkpoint(bucket_url, options).step == 0  # the previous periodic one
    assert f"final checkpoint (step {trainer.step}) was not committed" in trainer.stderr
    assert "the latest committed checkpoint is step 0" in trainer.stderr
    # the deadline ended the wait, not upload_timeout (None): no advice to raise that (spot-VM trial)
    assert "The preemption deadline passed first" in trainer.stderr, trainer.stderr[-3000:]
    assert "Raise upload_timeout" not in trainer.stderr
    assert_everything_verifies(bucket_url, options)
    assert_restart_resumes(moto_server, bucket_url, tmp_path, 0, *size)


# Notice sequences as they happen on real VMs: GCE's metadata flag and the shutdown script's SIGTERM in
# either order, AWS's two-minute notice followed by the OS shutdown's SIGTERM, an operator's second
# SIGTERM. (sources, [(event, seconds after the previous event)], expected exit status)
SEQUENCES = {
    "gce-then-sigterm-0.1s": ("sigterm,gce", [("gce", 0.0), ("sigterm", 0.1)], 0),
    "gce-then-sigterm-3s": ("sigterm,gce", [("gce", 0.0), ("sigterm", 3.0)], 0),
    "sigterm-then-gce": ("sigterm,gce", [("sigterm", 0.0), ("gce", 0.1)], 0),
    "aws-then-sigterm": ("sigterm,aws", [("aws", 0.0), ("sigterm", 0.5)], 0),
    # Azure sends no SIGTERM before a Spot eviction, but a shutdown that follows it may
    "azure-then-sigterm": ("sigterm,azure", [("azure", 0.0), ("sigterm", 0.5)], 0),
    # the second SIGTERM once the first was handled (sent earlier, two could merge into one pending signal
    # while the trainer waits for a core), while the final commit of a 32 MB checkpoint runs
    "two-sigterms": ("sigterm", [("sigterm", 0.0), ("sigterm", None)], -signal.SIGTERM),
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_notice_sequences(name, moto_server, bucket_url, tmp_path):
    """Any notice source and SIGTERM, in either order: the final checkpoint is committed and the exit is
    clean; a second SIGTERM terminates (143) and the latest committed checkpoint stays intact."""
    sources, events, expected_rc = SEQUENCES[name]
    options = moto_server.storage_options
    # 8 MB (32 MB with two SIGTERMs): the final commit takes a moment, so signals land during it
    size = ("--size", str(1 << 23 if name == "two-sigterms" else 1 << 21))
    with FakeGceMetadata() as gce, FakeAwsMetadata() as aws, FakeAzureMetadata() as azure:
        trainer = TrainerProcess(bucket_url, moto_server.endpoint, str(tmp_path / "vm"), "--save-steps", "20",
                                 "--preemption", sources, *size, env=metadata_env(gce, aws, azure))
        trainer.wait_for_step(25)
        deadline = time.monotonic() + 120
        while cloudckpt.latest_checkpoint(bucket_url, options) is None:  # a periodic commit to fall back on
            assert time.monotonic() < deadline and trainer.proc.poll() is None, trainer.stderr
            time.sleep(0.1)
        for event, delay in events:
            if delay is None:  # as soon as the trainer has logged the notice
                trainer.wait_for_text("Preemption notice from", timeout=60)
            else:
                time.sleep(delay)
            {"sigterm": trainer.terminate, "gce": gce.preempt, "aws": aws.preempt, "azure": azure.preempt}[event]()
        assert trainer.wait() == expected_rc, trainer.stderr
    assert_everything_verifies(bucket_url, options)
    latest = cloudckpt.latest_checkpoint(bucket_url, options)
    assert latest is not None
    if expected_rc == 0:
        assert trainer.done == f"DONE {trainer.step} preempted=True"
        assert latest.step == trainer.step  # the final checkpoint, committed within the deadline
        assert "Preemption: committed final checkpoint step" in trainer.stderr
    assert_restart_resumes(moto_server, bucket_url, tmp_path, latest.step, *size)
