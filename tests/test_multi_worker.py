"""Multi-worker training on TF's own distributed runtime (issue 15): 2-3 TF processes on 127.0.0.1.

* ``MultiWorkerMirroredStrategy`` custom loop with ``cloudckpt.CheckpointManager``: only the chief
  commits; killed and restarted with empty local dirs, every worker resumes at the latest committed step
  with equal variables; a preemption notice to one non-chief worker stops all of them at one step, which is
  committed; a hard stop announced on worker 1 (Azure) caps the chief's ``preemption_deadline`` through the
  ``"peer"`` notice it relays (tests/support/mw_tf2_trainer.py).
* TF1 between-graph replication with a parameter server (``MonitoredTrainingSession``,
  ``chief_only_hooks``): the chief commits complete checkpoints although the variables live on the PS,
  whose disk the chief never sees (tests/support/mw_tf1_trainer.py).
* tf-keras ``model.fit`` + ``cloudckpt.keras.BackupAndRestore`` under MWMS (tests/support/mw_keras_trainer.py).
* A cloudckpt failure on one worker (the chief's commits through a fault proxy in an outage; a flipped byte
  in the chief's or another worker's download during the restore) while that process stays alive
  (``--linger``): every worker raises at the same step, the others ``WorkerFailedError`` naming it, within
  ``AGREED_WITHIN`` seconds (without the agreement they block in the next collective: the test fails on
  that timeout).

Workers are forked with TF imported (tests/support/forkserver.py); a parameter server runs in its own mount
namespace, so it imports TF itself (5-10 s on the shared machine): the tests keep the number of processes small.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import cloudckpt
from cloudckpt.distributed import LOGGERS
from support.checks import log_entries, read_scalars
from support.cluster import PROXY_VARIABLES, Task, cluster_spec, task_env

SUPPORT = Path(__file__).parent / "support"
TF2_TRAINER = SUPPORT / "mw_tf2_trainer.py"


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _task_names_stay_in_the_test():
    """A task name given to cloudckpt's loggers in this process is taken away afterwards."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    before = [list(logger.filters) for logger in loggers]
    yield
    for logger, filters in zip(loggers, before):
        for f in [f for f in logger.filters if f not in filters]:
            logger.removeFilter(f)


class Cluster:
    """The tasks started by a test; every one still running is killed at the end."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def start(self, script: Path, args: list[str], env: dict[str, str], prefix: list[str] | None = None) -> Task:
        task = Task(script, args, env, prefix)
        self.tasks.append(task)
        return task

    def stop(self) -> None:
        for task in self.tasks:
            task.stop()


@pytest.fixture
def cluster():
    started = Cluster()
    try:
        yield started
    finally:
        started.stop()


def start_tf2_workers(cluster: Cluster, url: str, options: dict | list[dict], root: Path, run: str, *flags: str,
                      env: dict | None = None) -> list[Task]:
    """Two workers of ``TF2_TRAINER``; ``options``: the storage options of both, or of each."""
    spec = cluster_spec(2)
    out = root / run
    out.mkdir(parents=True, exist_ok=True)
    each = options if isinstance(options, list) else [options, options]
    return [cluster.start(TF2_TRAINER, [url, json.dumps(each[i]), str(root / f"{run}-local-{i}"), str(out), *flags],
                          task_env(spec, "worker", i, **(env or {}).get(i, {})))
            for i in range(2)]


def finished(task: Task) -> dict:
    """Wait for a worker to exit cleanly; its STATS line."""
    rc = task.finish()
    assert rc == 0, task.stderr
    return json.loads(task.lines("STATS ")[-1][len("STATS "):])


def load(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_mwms_chief_commits_a_notice_on_one_worker_stops_both_and_both_resume(cluster, s3_url, s3_options,
                                                                                tmp_path):
    """Acceptance 1 and 2 (default suite): committed steps as scheduled, written only by the chief; SIGTERM to
    worker 1 only -> both stop at the same step, the chief commits it, both exit 0; restarted with empty
    local dirs, both resume at that step with equal variables."""
    summaries = tmp_path / "tb"  # one summary_dir for the job, as in a shared bucket
    workers = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run1", "--save-every", "5",
                                "--step-sleep", "0.05", "--preemption", "sigterm", "--summary-dir", str(summaries))
    wait_for_commit(workers[0], s3_url, s3_options, 10)
    workers[1].sigterm()
    stats = [finished(w) for w in workers]
    stopped = [int(w.lines("PREEMPTED")[0].split()[1]) for w in workers]
    assert stopped[0] == stopped[1] > 10, stopped
    assert all(s["preempted"] for s in stats)
    committed = [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)]
    assert committed[-1] == stopped[0] and all(s % 5 == 0 for s in committed[:-1]), committed
    assert_chief_only(s3_url, s3_options, workers[0])
    assert [s["task"] for s in stats] == ["worker:0", "worker:1"]
    assert stats[0]["is_chief"] and stats[0]["last_committed_step"] == stopped[0]
    assert not stats[1]["is_chief"] and stats[1]["committed"] == 0
    assert "not this one" in workers[0].stderr and "this one among them" in workers[1].stderr
    # the chief took worker 1's notice (and its deadline) as its own: the final commit is deadline-bound
    assert "Preemption notice from peer" in workers[0].stderr and "Preemption notice from peer" not in workers[1].stderr
    assert "[worker:1]" in workers[1].stderr  # the log names the task
    assert not [p for p in (tmp_path / "run1-local-1").rglob("*") if p.is_file()]  # the temporary dir is gone
    # Commit scalars come from the chief alone: worker 1 commits nothing and leaves no empty event file.
    events = list(summaries.glob("events.out.tfevents.*"))
    assert len(events) == 1 and f".{workers[0].proc.pid}." in events[0].name, events
    recorded = set(read_scalars(summaries)["commit_lag_seconds"])  # every commit, also those retention deleted
    assert set(committed) <= recorded and all(s % 5 == 0 for s in recorded - {stopped[0]}), recorded

    # New VMs: empty local directories; both restore the committed step from the bucket.
    assert_both_resume(cluster, s3_url, s3_options, tmp_path, stopped[0])
    assert_same(load(tmp_path / "run1" / "last-worker-0.npz"), load(tmp_path / "run2" / "first-worker-1.npz"))


@pytest.mark.slow
def test_mwms_both_resume_after_sigkill(cluster, s3_url, s3_options, tmp_path):
    """Acceptance 1 with SIGKILL: both workers killed while training; restarted with empty local dirs, both
    resume at the latest committed step with equal variables."""
    workers = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run1", "--save-every", "5",
                                "--step-sleep", "0.05")
    wait_for_commit(workers[0], s3_url, s3_options, 10)
    for w in workers:
        w.kill()
    committed = [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)]
    assert committed and all(s % 5 == 0 for s in committed) and committed[-1] >= 10, committed
    assert_chief_only(s3_url, s3_options, workers[0])
    assert_both_resume(cluster, s3_url, s3_options, tmp_path, committed[-1])


@pytest.mark.slow
def test_mwms_gce_notice_on_the_chief_stops_both(cluster, s3_url, s3_options, tmp_path):
    """A GCE preemption notice (fake metadata server) reaching only the chief stops both at one committed step."""
    from support.fake_metadata import FakeGceMetadata

    with FakeGceMetadata() as gce:
        # "auto" polls AWS's and Azure's metadata too: at a closed local port, given up (not 169.254.169.254)
        closed = {"CLOUDCKPT_AWS_METADATA_URL": "http://127.0.0.1:9", "CLOUDCKPT_AZURE_METADATA_URL": "http://127.0.0.1:9"}
        env = {0: {"CLOUDCKPT_GCE_METADATA_URL": gce.url, **closed},
               1: {"CLOUDCKPT_GCE_METADATA_URL": "http://127.0.0.1:9", **closed}}
        workers = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run1", "--save-every", "5",
                                    "--step-sleep", "0.05", "--preemption", "auto", env=env)
        wait_for_commit(workers[0], s3_url, s3_options, 5)
        gce.preempt()
        stats = [finished(w) for w in workers]
    stopped = [int(w.lines("PREEMPTED")[0].split()[1]) for w in workers]
    assert stopped[0] == stopped[1] and all(s["preempted"] for s in stats), stopped
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == stopped[0]


def test_mwms_a_hard_stop_announced_on_worker_1_caps_the_chiefs_preemption_deadline(cluster, s3_url, s3_options,
                                                                                   tmp_path):
    """An Azure Spot eviction (fake metadata server) announced to worker 1 only, ``NotBefore`` 90 s away, in a job
    with ``preemption_deadline=600``: the chief, without a notice of its own, relays it as a ``"peer"`` notice
    marked announced whose deadline is that hard stop, which caps its 600 s (worker 1's machine, and the job's
    collective ops, stop then); both stop at one step, which the chief commits."""
    from support.fake_metadata import FakeAzureMetadata

    with FakeAzureMetadata() as azure:
        # "auto" polls every metadata service: the others at a closed local port, given up (not 169.254.169.254)
        closed = {"CLOUDCKPT_GCE_METADATA_URL": "http://127.0.0.1:9", "CLOUDCKPT_AWS_METADATA_URL": "http://127.0.0.1:9"}
        env = {0: {"CLOUDCKPT_AZURE_METADATA_URL": "http://127.0.0.1:9", **closed},
               1: {"CLOUDCKPT_AZURE_METADATA_URL": azure.url, **closed}}
        workers = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run1", "--save-every", "5",
                                    "--step-sleep", "0.05", "--preemption", "auto", "--preemption-deadline", "600",
                                    env=env)
        wait_for_commit(workers[0], s3_url, s3_options, 5)
        azure.preempt(not_before=datetime.now(timezone.utc) + timedelta(seconds=90))  # a deadline of 85 s
        stats = [finished(w) for w in workers]
    stopped = [int(w.lines("PREEMPTED")[0].split()[1]) for w in workers]
    assert stopped[0] == stopped[1] and all(s["preempted"] for s in stats), stopped
    own, relayed = (json.loads(w.lines("NOTICE ")[-1][len("NOTICE "):]) for w in reversed(workers))
    assert own["source"] == "azure" and 60 < own["deadline"] <= 85, own
    assert own["deadline_in_use"] == pytest.approx(own["deadline"])  # its platform's hard stop caps the 600 s
    # the chief's notice: the hard stop worker 1's platform announced (less the time it took to agree), which
    # capped the chief's preemption_deadline: its final commit was bound by it, not by 600 s
    assert relayed["source"] == "peer" and 60 < relayed["deadline"] <= own["deadline"], (relayed, own)
    assert relayed["deadline_in_use"] == pytest.approx(relayed["deadline"]), relayed
    assert relayed["announced"] is True and own["announced"] is True, (relayed, own)
    assert "whose platform announced its hard stop" in relayed["detail"]
    assert (f"Preemption notice from peer: {relayed['detail']} (deadline {relayed['deadline']:g} s: the platform's "
            "announced hard stop, which comes before preemption_deadline=600 s would end") in workers[0].stderr
    assert stats[0]["is_chief"] and stats[0]["last_committed_step"] == stopped[0]
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == stopped[0]


# A worker whose cloudckpt call failed stays alive this long (a slow cleanup, a close() waiting on uploads):
# without the failure agreement, the other workers would block in the job's next collective all that time.
LINGER = 300
# How long the other workers may take to raise (TF's collectives abort only once the failed process exits).
AGREED_WITHIN = 90


def failure_of(task: Task, timeout: float = AGREED_WITHIN) -> tuple[int, str, str]:
    """``(step, error type, message)`` of a worker that ended with an error (exit 3), within ``timeout``."""
    line = task.wait_for_line("ERROR ", timeout)
    _, step, kind, message = line.split(" ", 3)
    return int(step), kind, message


def restore_failed_on(bad: int, workers: list[Task], first_line: str) -> tuple[int, str]:
    """Worker ``bad`` (of two) raised IntegrityError in the restore and stays alive; the other raised
    WorkerFailedError naming it within ``AGREED_WITHIN`` seconds and exited; neither printed ``first_line``
    (training began). Stops worker ``bad``; returns the other's ``(step, message)``."""
    failed, other = workers[bad], workers[1 - bad]
    _, failed_error, _ = failure_of(failed, 300)
    step, error, message = failure_of(other)
    assert other.finish(30) == 3 and failed.proc.poll() is None
    assert (failed_error, error) == ("IntegrityError", "WorkerFailedError"), (failed_error, message)
    assert f"worker:{bad} (IntegrityError)" in message, message
    assert not workers[0].lines(first_line) and not workers[1].lines(first_line)
    failed.stop()
    return step, message


def test_mwms_a_failure_on_one_worker_stops_every_worker_with_its_name(cluster, moto_server, s3_url, s3_options,
                                                                       tmp_path):
    """The chief's commit fails (its store goes away) while it stays alive: both workers raise at the same
    step, the chief its UploadError, worker 1 a WorkerFailedError naming worker:0, instead of worker 1
    blocking in the next collective until the chief exits. Then worker 1's verified download fails during
    the restore: the chief raises WorkerFailedError naming worker:1 instead of training on alone; then the
    chief's own download fails: worker 1 raises WorkerFailedError naming worker:0 instead of waiting for the
    chief's step. Then the chief's final commit in close() fails: worker 1's close() raises WorkerFailedError
    too."""
    from support.fault_proxy import FaultProxy

    with FaultProxy(moto_server.endpoint) as proxy:
        proxied = {**s3_options, "endpoint_url": proxy.url}
        workers = start_tf2_workers(cluster, s3_url, [proxied, s3_options], tmp_path, "run1", "--save-every", "5",
                                    "--step-sleep", "0.05", "--retry-attempts", "1", "--linger", str(LINGER))
        wait_for_commit(workers[0], s3_url, s3_options, 5)
        proxy.start_outage()  # the chief's store is gone: its next commit fails
        chief_step, chief_error, _ = failure_of(workers[0], 300)
        step, error, message = failure_of(workers[1])
        assert workers[1].finish(30) == 3 and workers[0].proc.poll() is None  # the chief lingers
        assert chief_error == "UploadError" and error == "WorkerFailedError", (chief_error, message)
        assert step == chief_step, (step, chief_step)
        assert "worker:0 (UploadError)" in message and "[worker:0]" in message and "worker:1" in message, message
        # the log the message points at: the chief's cause, under its task name
        assert "[worker:0] cloudckpt (" in workers[0].stderr and "every worker of the job stops" in workers[0].stderr
        workers[0].stop()
        committed = cloudckpt.latest_checkpoint(s3_url, s3_options).step

        # Restore: worker 1's downloads of checkpoint data arrive with a flipped byte, then the chief's.
        for bad, run in ((1, "run2"), (0, "run2b")):
            proxy.clear()
            proxy.set_faults(error_rate=1.0, kinds=("flip_response",), only_methods=("GET",), path_filter=r"\.data-")
            workers = start_tf2_workers(cluster, s3_url, [proxied if i == bad else s3_options for i in range(2)],
                                        tmp_path, run, "--retry-attempts", "1", "--linger", str(LINGER))
            step, message = restore_failed_on(bad, workers, "FIRST_STEP")
            assert step == -1, message  # in the restore, before any step
            assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == committed

        # The final commit in close() fails: worker 1 does not return from close() as if all were well.
        proxy.clear()
        last = committed + 10
        workers = start_tf2_workers(cluster, s3_url, [proxied, s3_options], tmp_path, "run3", "--save-every", "1000",
                                    "--last-step", str(last), "--step-sleep", "0.1", "--retry-attempts", "1",
                                    "--linger", str(LINGER))
        workers[0].wait_for_line("FIRST_STEP", 300)  # restored and registered through the proxy
        proxy.start_outage()
        chief_step, chief_error, _ = failure_of(workers[0], 300)
        step, error, message = failure_of(workers[1])
        assert workers[1].finish(30) == 3 and workers[0].proc.poll() is None
    assert (chief_error, error) == ("UploadError", "WorkerFailedError") and step == chief_step == last, message
    assert not workers[1].lines("DONE") and "worker:0 (UploadError)" in message, message


def test_mwms_a_loop_without_should_stop_learns_a_failed_commit_at_the_next_save(cluster, moto_server, s3_url,
                                                                                s3_options, tmp_path):
    """A loop that never calls should_stop(): the chief's failed commit is raised on both workers by the same
    save() (the next one that writes a checkpoint), not hours later in close()."""
    from support.fault_proxy import FaultProxy

    with FaultProxy(moto_server.endpoint) as proxy:
        proxied = {**s3_options, "endpoint_url": proxy.url}
        workers = start_tf2_workers(cluster, s3_url, [proxied, s3_options], tmp_path, "run1", "--save-every", "5",
                                    "--step-sleep", "0.05", "--retry-attempts", "1", "--linger", str(LINGER),
                                    "--no-should-stop")
        wait_for_commit(workers[0], s3_url, s3_options, 5)
        proxy.start_outage()  # the chief's store is gone: its next commit fails
        chief_step, chief_error, _ = failure_of(workers[0], 300)
        step, error, message = failure_of(workers[1])
        assert workers[1].finish(30) == 3
    assert (chief_error, error) == ("UploadError", "WorkerFailedError"), message
    assert step == chief_step and step % 5 == 0, (step, chief_step)  # at a save, the same one on both
    assert "worker:0 (UploadError)" in message, message


def test_mwms_close_on_the_chief_alone_is_a_clear_error(cluster, s3_url, s3_options, tmp_path):
    """close() is a collective: worker 1 leaves without calling it; the chief's close() commits its final
    checkpoint and then raises WorkerFailedError saying to call close() on every worker, not TF's bare
    'Collective ops is aborted'."""
    workers = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run1", "--save-every", "5",
                                "--last-step", "12", env={1: {"CLOUDCKPT_TEST_SKIP_CLOSE": "1"}})
    assert workers[1].finish(300) == 0 and workers[1].lines("SKIPPED_CLOSE 12")
    step, error, message = failure_of(workers[0], 300)
    assert error == "WorkerFailedError" and step == 12, message
    assert "call it on every worker" in message and "final checkpoint was committed" in message, message
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == 12


def test_mwms_a_job_that_did_not_restore_is_refused_on_every_worker(cluster, s3_url, s3_options, tmp_path):
    """Step 10 is committed; a new job forgets restore_or_initialize() and saves step 5: every worker refuses the
    same save (no worker left in a collective), each message naming the job's resume point and the fix, not a
    worker's temporary directory."""
    first = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run1", "--save-every", "5", "--last-step",
                              "10")
    assert [finished(w)["task"] for w in first] == ["worker:0", "worker:1"]
    workers = start_tf2_workers(cluster, s3_url, s3_options, tmp_path, "run2", "--save-every", "5", "--no-restore")
    failures = [failure_of(w, 300) for w in workers]
    assert [w.finish(30) for w in workers] == [3, 3]
    for (step, error, message), local in zip(failures, ("run2-local-0", "run2-local-1")):
        assert (step, error) == (5, "ConfigError"), message
        assert "did not restore checkpoint step 10" in message and "restore_or_initialize()" in message, message
    assert str(tmp_path / "run2-local-1") not in failures[1][2], failures[1][2]
    assert "every worker of the job resumes from" in failures[1][2], failures[1][2]
    assert [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)][-1] == 10  # nothing committed


def wait_for_commit(chief: Task, url: str, options: dict, step: int, timeout: float = 300) -> None:
    """Let training go on until a checkpoint of ``step`` or later is committed."""
    end = time.monotonic() + timeout
    while (latest := cloudckpt.latest_checkpoint(url, options)) is None or latest.step < step:
        if chief.proc.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"no commit of step {step} (rc={chief.proc.poll()}):\n{chief.stderr}")
        time.sleep(0.1)


def assert_chief_only(url: str, options: dict, chief: Task) -> None:
    """One writer registered in the commit log, the chief's process, and every commit is its."""
    writers = [e for e in log_entries(url, options) if e["type"] == "writer"]
    assert len(writers) == 1 and writers[0]["pid"] == chief.proc.pid, writers
    commits = [e for e in log_entries(url, options) if e["type"] == "commit"]
    assert commits and {e["writer_id"] for e in commits} == {writers[0]["writer_id"]}


def assert_both_resume(cluster: Cluster, url: str, options: dict, root: Path, latest: int) -> None:
    """Both workers restart with empty local dirs, resume at ``latest`` with equal variables, and go on."""
    restarted = start_tf2_workers(cluster, url, options, root, "run2", "--save-every", "5",
                                  "--last-step", str(latest + 2))
    stats = [finished(w) for w in restarted]
    for w in restarted:
        assert w.lines("FIRST_STEP") == [f"FIRST_STEP {latest}"], w.stderr
        assert w.lines("DONE") == [f"DONE {latest + 2}"]
    first = [load(root / "run2" / f"first-worker-{i}.npz") for i in range(2)]
    assert int(first[0]["step"]) == latest
    assert_same(first[0], first[1])
    assert_same(load(root / "run2" / "last-worker-0.npz"), load(root / "run2" / "last-worker-1.npz"))
    assert stats[0]["last_committed_step"] == latest + 2 == cloudckpt.latest_checkpoint(url, options).step


TF1_TRAINER = SUPPORT / "mw_tf1_trainer.py"


def own_disk(*paths: Path) -> list[str]:
    """A command prefix that runs a task in its own mount namespace where ``paths`` are empty tmpfs mounts:
    like a parameter server on another host, it cannot see (or write into) the chief's directories."""
    mounts = " && ".join(f'mount -t tmpfs tmpfs "{p}"' for p in paths)
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def test_tf1_parameter_server_chief_commits_complete_checkpoints(cluster, s3_url, s3_options, tmp_path):
    """Acceptance 3: 1 PS + 2 workers, MonitoredTrainingSession with chief_only_hooks: every committed
    checkpoint holds every variable (they live on the PS, whose disk the chief never sees); a restarted
    cluster resumes from the bucket."""
    options = json.dumps(s3_options)

    def start(run: str, last_step: int, workers: int = 2) -> tuple[Task, list[Task]]:
        spec = cluster_spec(2, ps=1)
        chief_local = tmp_path / f"{run}-worker-0"
        chief_local.mkdir()
        ps = cluster.start(TF1_TRAINER, [s3_url, options, str(tmp_path / f"{run}-ps")], task_env(spec, "ps", 0),
                           prefix=own_disk(chief_local))
        # Workers start in a moment (forked with TF imported), the PS (its own namespace) imports TF first:
        # workers started before it serves would wait out gRPC's reconnect back-off.
        ps.wait_for_line("SERVING")
        workers = [cluster.start(TF1_TRAINER, [s3_url, options, str(tmp_path / f"{run}-worker-{i}"),
                                               "--last-step", str(last_step)], task_env(spec, "worker", i))
                   for i in range(workers)]
        return ps, workers

    ps, workers = start("run1", 20)
    for w in workers:
        assert w.finish() == 0, w.stderr
    ps.stop()
    stats = json.loads(workers[0].lines("STATS ")[-1][len("STATS "):])
    assert stats["task"] == stats["hook_task"] == "worker:0" and stats["committed"] >= 2, stats
    assert not workers[1].lines("STATS")  # the hook ran on the chief only
    committed = cloudckpt.list_checkpoints(s3_url, s3_options)
    assert committed and committed[-1].step >= 20
    for info in committed:  # one .data file: written whole by the chief
        assert sorted(f.name.split(".")[-1] for f in info.files) == ["data-00000-of-00001", "index", "meta"]
    import tensorflow as tf
    pulled = cloudckpt.pull_checkpoint(s3_url, str(tmp_path / "pulled"), storage_options=s3_options)
    reader = tf.train.load_checkpoint(pulled.local_prefix)
    shapes = reader.get_variable_to_shape_map()
    assert {"w", "b", "w/Momentum", "b/Momentum", "global_step"} <= set(shapes), shapes
    assert int(reader.get_tensor("global_step")) == committed[-1].step
    assert not np.allclose(reader.get_tensor("w"), 1.0)  # trained values, not the initial ones

    latest = committed[-1].step
    ps, workers = start("run2", latest + 10, workers=1)  # the chief alone goes on (worker 1 is optional)
    for w in workers:
        assert w.finish() == 0, w.stderr
    ps.stop()
    assert workers[0].lines("RESTORED") == [f"RESTORED {latest}"]
    assert int(workers[0].lines("FIRST_STEP")[0].split()[1]) >= latest
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step >= latest + 10


def test_tf1_sharded_saver_with_parameter_servers_is_refused(cluster, s3_url, s3_options, tmp_path):
    """A sharded Saver would make the PS write its shard on its own disk: begin() refuses it, naming the fix,
    before the session is created (so no PS needs to run), and nothing is committed."""
    chief = cluster.start(TF1_TRAINER, [s3_url, json.dumps(s3_options), str(tmp_path / "worker-0"), "--sharded-saver"],
                          task_env(cluster_spec(1, ps=1), "worker", 0))
    assert chief.finish() == 2, chief.stderr
    error = chief.lines("ERROR")[0]
    assert "ps:0" in error and "sharded" in error and "Saver(sharded=False)" in error, error
    assert cloudckpt.list_checkpoints(s3_url, s3_options) == []


KERAS_TRAINER = SUPPORT / "mw_keras_trainer.py"


def test_tf_keras_fit_backup_and_restore_under_mwms(cluster, s3_url, s3_options, tmp_path):
    """Acceptance 4: tf-keras model.fit + cloudckpt.keras.BackupAndRestore, 2 workers: a notice on worker 1
    stops both at the same batch; the chief alone commits that backup; restarted with empty local dirs,
    both restore it (equal weights and optimizer state) and finish the remaining epochs."""
    # Not in the test extra: tf-keras requires the `tensorflow` distribution, which would go next to
    # tensorflow-cpu (README: Installation); scripts/test installs it without dependencies.
    assert importlib.util.find_spec("tf_keras") is not None, (
        "tf-keras is not installed: run scripts/test (it installs tf-keras matching TensorFlow, --no-deps)")
    options = json.dumps(s3_options)

    def start(run: str, *flags: str, shared: bool = False) -> list[Task]:
        spec = cluster_spec(2)
        (tmp_path / run).mkdir()
        return [cluster.start(KERAS_TRAINER, [s3_url, options, str(tmp_path / f"{run}-local-{0 if shared else i}"),
                                              str(tmp_path / run), *flags],
                              task_env(spec, "worker", i, TF_USE_LEGACY_KERAS="1"))
                for i in range(2)]

    # Long enough that only the notice ends run 1, however slow the machine (the notice comes after epoch 0).
    workers = start("run1", "--epochs", "40", "--steps", "6", "--preemption", "sigterm", "--batch-sleep", "0.25")
    wait_for_commit(workers[0], s3_url, s3_options, 6)  # the backup of epoch 0
    workers[1].sigterm()
    for w in workers:
        assert w.finish() == 0, w.stderr
    done = [w.lines("DONE")[0] for w in workers]
    assert done[0] == done[1] and "preempted=True" in done[0], done
    stopped_at = int(done[0].rsplit("=", 1)[1])
    assert 6 < stopped_at < 240
    epoch = (stopped_at - 1) // 6  # a backup within an epoch resumes at its start
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == stopped_at
    assert_chief_only(s3_url, s3_options, workers[0])
    stats = [json.loads(w.lines("STATS ")[0][len("STATS "):]) for w in workers]
    assert [s["task"] for s in stats] == ["worker:0", "worker:1"] and stats[1]["committed"] == 0

    epochs = epoch + 2  # run 2 finishes the interrupted epoch and one more
    # Both workers on one VM with one local_dir: only the chief writes (and locks) it.
    restarted = start("run2", "--epochs", str(epochs), "--steps", "6", shared=True)
    for w in restarted:
        assert w.finish() == 0, w.stderr
        assert w.lines("RESTORED") == [f"RESTORED {stopped_at}"]
        assert w.lines("START_EPOCH") == [f"START_EPOCH {epoch}"]
        assert w.lines("DONE") == [f"DONE preempted=False iterations={stopped_at + (epochs - epoch) * 6}"]
    first = [load(tmp_path / "run2" / f"first-worker-{i}.npz") for i in range(2)]
    assert_same(first[0], first[1])
    assert_same(first[0], load(tmp_path / "run1" / "last-worker-0.npz"))
    assert_same(load(tmp_path / "run2" / "last-worker-0.npz"), load(tmp_path / "run2" / "last-worker-1.npz"))


def test_tf_keras_fit_a_failure_on_one_worker_stops_every_worker_with_its_name(cluster, moto_server, s3_url,
                                                                               s3_options, tmp_path):
    """BackupAndRestore under MWMS: the chief's backup commit fails while it stays alive: both workers raise
    in fit at the same batch (the chief UploadError, worker 1 WorkerFailedError naming worker:0); then
    worker 1's verified download fails in the restore: the chief raises WorkerFailedError naming worker:1;
    then the chief's own download fails: worker 1 raises WorkerFailedError naming worker:0; then the final
    backup's commit fails at the end of fit: worker 1's fit raises WorkerFailedError too."""
    from support.fault_proxy import FaultProxy

    assert importlib.util.find_spec("tf_keras") is not None, "tf-keras is not installed: run scripts/test"

    def start(run: str, options: list[dict], *flags: str) -> list[Task]:
        spec = cluster_spec(2)
        (tmp_path / run).mkdir()
        return [cluster.start(KERAS_TRAINER, [s3_url, json.dumps(options[i]), str(tmp_path / f"{run}-local-{i}"),
                                              str(tmp_path / run), "--retry-attempts", "1", "--linger", str(LINGER),
                                              *flags], task_env(spec, "worker", i, TF_USE_LEGACY_KERAS="1"))
                for i in range(2)]

    with FaultProxy(moto_server.endpoint) as proxy:
        proxied = {**s3_options, "endpoint_url": proxy.url}
        workers = start("run1", [proxied, s3_options], "--epochs", "40", "--steps", "6", "--batch-sleep", "0.1")
        wait_for_commit(workers[0], s3_url, s3_options, 6)  # the backup of epoch 0
        proxy.start_outage()  # the chief's store is gone: its next backup fails to commit
        chief_step, chief_error, _ = failure_of(workers[0], 300)
        step, error, message = failure_of(workers[1])
        assert workers[1].finish(30) == 3 and workers[0].proc.poll() is None  # the chief lingers
        assert chief_error == "UploadError" and error == "WorkerFailedError", (chief_error, message)
        assert step == chief_step > 6, (step, chief_step)  # the same batch (optimizer.iterations)
        assert "worker:0 (UploadError)" in message and "BackupAndRestore" in message, message
        workers[0].stop()

        # Restore: worker 1's downloads of the weights arrive with a flipped byte, then the chief's.
        for bad, run in ((1, "run2"), (0, "run2b")):
            proxy.clear()
            proxy.set_faults(error_rate=1.0, kinds=("flip_response",), only_methods=("GET",),
                             path_filter=r"\.weights\.h5")
            workers = start(run, [proxied if i == bad else s3_options for i in range(2)], "--epochs", "40",
                            "--steps", "6")
            _, message = restore_failed_on(bad, workers, "START_EPOCH")
            assert "BackupAndRestore" in message, message

        # The final backup's commit fails at the end of fit (on_train_end): worker 1's fit raises too.
        proxy.clear()
        restored = cloudckpt.latest_checkpoint(s3_url, s3_options).step
        epochs = restored // 6 + 1  # one epoch to run
        workers = start("run3", [proxied, s3_options], "--epochs", str(epochs), "--steps", "6", "--batch-sleep", "0.2")
        workers[0].wait_for_line("START_EPOCH", 300)  # restored and registered through the proxy
        proxy.start_outage()
        chief_step, chief_error, _ = failure_of(workers[0], 300)
        step, error, message = failure_of(workers[1])
        assert workers[1].finish(30) == 3 and workers[0].proc.poll() is None
    assert (chief_error, error) == ("UploadError", "WorkerFailedError") and step == chief_step == restored + 6, message
    assert not workers[1].lines("DONE") and "worker:0 (UploadError)" in message, message


# -- in-process: roles, TF_CONFIG, log records, misuse ------------------------------------------------------


def test_roles_follow_tf_chief_rule():
    from cloudckpt.distributed import role_from_cluster

    workers = {"worker": ["a:1", "b:1"], "ps": ["c:1"]}
    assert role_from_cluster(workers, "worker", 0).is_chief
    assert not role_from_cluster(workers, "worker", 1).is_chief
    one = role_from_cluster(workers, "worker", 1)
    assert (one.name, one.workers, one.parameter_servers, one.multi_worker) == ("worker:1", 2, 1, True)
    with_chief = {"chief": ["a:1"], "worker": ["b:1"]}
    assert role_from_cluster(with_chief, "chief", 0).is_chief
    assert not role_from_cluster(with_chief, "worker", 0).is_chief  # TF: worker 0 is not the chief then
    assert role_from_cluster(with_chief, "worker", 0).workers == 2
    assert not role_from_cluster({"worker": ["a:1"]}, "worker", 0).multi_worker
    assert role_from_cluster(workers, None, None) is None
    with pytest.raises(cloudckpt.ConfigError, match="worker:2 is not in the cluster"):
        role_from_cluster(workers, "worker", 2)
    sparse = {"worker": {"1": "b:1"}, "ps": ["c:1"]}  # TF's sparse cluster spec: only the tasks it knows
    assert role_from_cluster(sparse, "worker", 1).name == "worker:1"
    with pytest.raises(cloudckpt.ConfigError, match="worker:0 is not in the cluster"):
        role_from_cluster(sparse, "worker", 0)
    # TF's evaluator sits outside the training cluster (it may be absent from it) and is its own chief
    evaluator = role_from_cluster(workers, "evaluator", 0)
    assert evaluator.is_chief and not evaluator.multi_worker


def test_tf_config_is_parsed_or_refused():
    from cloudckpt.distributed import role_from_tf_config

    config = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    assert role_from_tf_config({"TF_CONFIG": json.dumps(config)}).name == "worker:1"
    assert role_from_tf_config({}) is None
    with pytest.raises(cloudckpt.ConfigError, match="TF_CONFIG is not TF's cluster description"):
        role_from_tf_config({"TF_CONFIG": "{not json"})
    config["task"]["index"] = 5  # valid JSON, a task outside the cluster: said as such
    with pytest.raises(cloudckpt.ConfigError, match="worker:5 is not in the cluster"):
        role_from_tf_config({"TF_CONFIG": json.dumps(config)})


def tf1_graph_with_variables_on_a_ps():
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        with tf.compat.v1.device(tf.compat.v1.train.replica_device_setter(
                ps_tasks=1, worker_device="/job:worker/task:0")):
            tf.compat.v1.train.get_or_create_global_step()
            tf.compat.v1.get_variable("w", [4], initializer=tf.compat.v1.zeros_initializer())
            saver = tf.compat.v1.train.Saver(sharded=False)  # the standard pattern: its ops on the chief
    return graph, saver


def test_tf1_hook_without_tf_config_accepts_a_saver_on_the_chief(memory_url, tmp_path, monkeypatch):
    """TF1 jobs often name their task by flags, not TF_CONFIG: a non-sharded Saver built in the chief's
    replica_device_setter writes on the chief and is accepted; a sharded one is still refused."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    graph, saver = tf1_graph_with_variables_on_a_ps()
    with graph.as_default():
        hook = cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, saver=saver, local_dir=str(tmp_path / "a"))
        hook.begin()
        hook.close()
        import tensorflow as tf
        with tf.compat.v1.device(tf.compat.v1.train.replica_device_setter(ps_tasks=1)):
            sharded = tf.compat.v1.train.Saver(sharded=True)
        refused = cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, saver=sharded, local_dir=str(tmp_path / "b"))
        with pytest.raises(cloudckpt.ConfigError, match="sharded"):
            refused.begin()
        refused.close()


def test_tf1_hook_on_a_non_chief_worker_names_chief_only_hooks(memory_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"],
                                                            "ps": ["127.0.0.1:3"]}, "task": {"type": "worker", "index": 1}}))
    graph, saver = tf1_graph_with_variables_on_a_ps()
    with graph.as_default():
        hook = cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, local_dir=str(tmp_path))
        with pytest.raises(cloudckpt.ConfigError, match="chief_only_hooks"):
            hook.begin()
        hook.close()
    assert cloudckpt.list_checkpoints(memory_url) == []


def test_a_worker_temp_dir_left_by_a_killed_run_is_removed(tmp_path):
    from cloudckpt.distributed import role_from_cluster, worker_temp_dir

    cluster = {"worker": ["a:1", "b:1", "c:1"]}
    stale = tmp_path / ".cloudckpt-worker-1-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "ckpt-5.index").write_bytes(b"x" * 10)
    other = tmp_path / ".cloudckpt-worker-2-def456"  # another task's (another process): kept
    other.mkdir()
    new = worker_temp_dir(role_from_cluster(cluster, "worker", 1), str(tmp_path))
    assert not stale.exists() and other.exists()
    assert Path(new).is_dir() and Path(new).name.startswith(".cloudckpt-worker-1-")


def test_log_records_name_the_task(caplog):
    from cloudckpt.distributed import name_task_in_logs

    name_task_in_logs("worker:1")
    name_task_in_logs("worker:7")  # a process is one task: the first name stays
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        logging.getLogger("cloudckpt").info("Committed checkpoint step %d", 5)
        logging.getLogger("cloudckpt.preemption").warning("notice")
    assert [r.getMessage() for r in caplog.records] == ["[worker:1] Committed checkpoint step 5", "[worker:1] notice"]
    assert {r.task for r in caplog.records} == {"worker:1"}


def test_manager_refuses_multi_worker_tf_config_without_the_strategy(monkeypatch, memory_url, tmp_path):
    """Every worker committing would fence the others: without MultiWorkerMirroredStrategy in scope (or
    strategy=), a TF_CONFIG of several workers is refused, naming the fix."""
    import tensorflow as tf

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    with pytest.raises(cloudckpt.ConfigError, match=r"strategy.scope\(\), or pass strategy="):
        cloudckpt.CheckpointManager(checkpoint, memory_url, max_to_keep=1, local_dir=str(tmp_path))
    # Parameter-server training: one coordinator runs the loop and saves; no refusal, the task is named.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"],
                                                            "ps": ["127.0.0.1:3"]}, "task": {"type": "chief", "index": 0}}))
    with cloudckpt.CheckpointManager(checkpoint, memory_url, max_to_keep=1, local_dir=str(tmp_path)) as manager:
        assert manager.is_chief and manager.task == "chief:0" and manager.stats().task == "chief:0"


def test_stop_agreement_runs_about_once_a_second_not_every_step(memory_url, tmp_path):
    """``stop_agreed`` on a real (one-worker) MWMS: most calls do not communicate, the k-th call is the
    all-reduce on every worker (the interval comes out of the all-reduce), and a notice is acted on at the
    next agreed call, within about a second of training."""
    import tensorflow as tf

    from cloudckpt.distributed import STOP_CHECK_SECONDS, TaskRole, WorkerAgreement

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    agreement = WorkerAgreement(strategy, TaskRole("worker", 0, True, 1))
    reduces = []
    sum_over_workers = agreement._sum
    agreement._sum = lambda value: reduces.append(1) or sum_over_workers(value)  # counts, then the real one
    engine = cloudckpt.CheckpointEngine(memory_url, str(tmp_path / "local"), preemption="sigterm")
    step_seconds = 0.01
    calls = int(2.5 * STOP_CHECK_SECONDS / step_seconds)
    try:
        for _ in range(calls):
            time.sleep(step_seconds)  # a training step
            assert agreement.stop_agreed(engine) == 0
        assert 2 <= len(reduces) <= calls // 5, (len(reduces), calls)
        engine.watcher.trigger("sigterm", "test notice", 30.0)
        for late in range(1, calls + 1):
            time.sleep(step_seconds)
            if agreement.stop_agreed(engine):
                break
        else:
            pytest.fail("the notice was never agreed")
        assert late <= 2 * STOP_CHECK_SECONDS / step_seconds, late
    finally:
        engine.close()


def test_failure_agreement_raises_the_own_error_here_and_names_the_failed_worker_elsewhere(memory_url):
    """On a real (one-worker) MWMS: no failure passes; a worker's own failure is re-raised as it is; a slot
    set by another worker becomes a WorkerFailedError naming that task and its error type."""
    import tensorflow as tf

    from cloudckpt.distributed import TaskRole, WorkerAgreement

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    agreement = WorkerAgreement(strategy, TaskRole("worker", 0, True, 1, peers=("worker:0",)))
    agreement.context = f"cloudckpt ({memory_url})"
    assert agreement.from_chief(7) == 7
    agreement.agree_on_failure(None)
    own = cloudckpt.UploadError("step 5 was not committed", url=memory_url, step=5)
    with pytest.raises(cloudckpt.UploadError) as raised:
        agreement.from_chief(7, own)
    assert raised.value is own
    # What a worker without a failure of its own sees (the slots as the all-reduce sums them, 2 workers):
    other = WorkerAgreement(strategy, TaskRole("worker", 1, False, 2, peers=("worker:0", "worker:1")))
    other.context = agreement.context
    with pytest.raises(cloudckpt.WorkerFailedError) as raised:
        other._raise_failures(None, [2.0, 0.0])
    assert raised.value.workers == ("worker:0",) and raised.value.errors == ("UploadError",)
    assert str(raised.value).startswith(f"cloudckpt ({memory_url}) failed on worker:0 (UploadError); every worker")
    assert "this one (worker:1)" in str(raised.value) and "[worker:0]" in str(raised.value)
    # a per-worker figure (stop_agreed's announced hard stops) comes back by rank, after the sums
    assert agreement._totals([3.0], None, 26.0) == [3.0, 26.0]
    assert other._totals([3.0], None, 21.0) == [3.0, 0.0, 21.0]
