"""Many writers on one directory: the newest writer wins, an older one is fenced, committed checkpoints verify.

* Writers driven step by step (deterministic): a newer writer is run to completion at every
  storage operation of an older writer's commit (``GatedStore``), and the invariants are checked
  after each interleaving.
* Real training processes (crash_trainer.py) on one s3:// prefix against moto, a newer one
  started while the older one trains, seeded trials.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Callable

import fsspec
import pytest

import cloudckpt
from cloudckpt import cli
from cloudckpt.catalog import scan_directory
from cloudckpt.commit import ALREADY_COMMITTED, REFUSED, UPLOADED, LocalCheckpoint, commit_checkpoint
from cloudckpt.remote import RemoteStore
from cloudckpt.restore import verify_checkpoint
from cloudckpt.retry import is_transient
from cloudckpt.writers import Writer
from support.checks import assert_all_committed_intact, committed_manifest_names, log_entries, remote_fs
from support.trainer_process import TrainerProcess


class Serial:
    """A sequential ``map`` (the commit's Mapper): one storage operation at a time, in order."""

    def map(self, func, iterable):
        return [func(x) for x in iterable]


GATED_OPS = ("list_objects", "list_under", "put_file_if_absent", "write_if_absent", "read_bytes", "write_atomic",
             "delete", "size", "get_file", "open_read", "stored_crc32c", "heads", "read_crc32c")


class GatedStore(RemoteStore):
    """A RemoteStore that calls ``gate(op)`` before each storage operation (deletes one object at a time):
    the points where another writer may run."""

    gate: Callable[[str], None] = staticmethod(lambda op: None)

    def delete_before(self, names, deadline):
        retried = False
        for name in names:
            self.gate("delete_before")
            done, again = RemoteStore.delete_before(self, [name], deadline)
            retried = retried or again
            if not done:
                return False, retried
        return True, retried


def _gated(op):
    def method(self, *args, **kwargs):
        self.gate(op)
        return getattr(RemoteStore, op)(self, *args, **kwargs)
    return method


for _op in GATED_OPS:
    setattr(GatedStore, _op, _gated(_op))


class Injector:
    """Counts gated operations; at operation number ``at`` runs ``action`` (once) before it."""

    def __init__(self, at: int | None, action: Callable[[], None] = lambda: None) -> None:
        self.at, self.action, self.count, self.ops = at, action, 0, []

    def __call__(self, op: str) -> None:
        if self.count == self.at:
            self.action()
        self.count += 1
        self.ops.append(op)


def fake_checkpoint(root, step: int, who: str) -> LocalCheckpoint:
    directory = root / f"{who}-{step}-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    files = {}
    for suffix, payload in ((".index", f"index {who} {step}".encode()),
                            (".data-00000-of-00001", f"tensors of {who} at {step};".encode() * 50)):
        name = f"model.ckpt-{step}{suffix}"
        (directory / name).write_bytes(payload)
        files[name] = str(directory / name)
    return LocalCheckpoint(step, f"model.ckpt-{step}", files)


def check_invariants(url: str) -> list[cloudckpt.CheckpointInfo]:
    """Every committed checkpoint (current and superseded) verifies; returns the current lineage."""
    assert_all_committed_intact(url)  # independent: plain fsspec + crc32c over the log's commits
    store = RemoteStore(url)
    for info in cloudckpt.list_checkpoints(url, include_superseded=True):
        assert verify_checkpoint(store, info).ok, info
    return cloudckpt.list_checkpoints(url)


def commits_after_newer_writer(url: str, older_epoch: int) -> list[dict]:
    """Commit entries of the older writer that landed after a newer writer registered (must be none)."""
    entries = log_entries(url)
    newer = [i for i, e in enumerate(entries, start=1) if e["type"] == "writer" and i > older_epoch]
    if not newer:
        return []
    return [e for i, e in enumerate(entries, start=1) if e["type"] == "commit" and e["epoch"] == older_epoch
            and i > newer[0]]


def interleave(tmp_path, at: int | None, *, debris: bool, window: float = 0.2, lease: float = 0.5):
    """Writer A commits step 2 of its run while writer B (started at A's operation ``at``) registers and
    commits steps 2 and 3 with other tensors. Returns (url, ops of A, A fenced at step 2?, B's outcomes, A, B)."""
    url = f"memory://fence-{uuid.uuid4().hex[:8]}/run"
    a_store = GatedStore(url)
    writer_a = Writer(a_store, delete_window=window, delete_lease=lease)
    assert commit_checkpoint(a_store, fake_checkpoint(tmp_path, 1, "a"), writer=writer_a,
                             executor=Serial()).outcome == UPLOADED
    if debris:  # a crashed third writer left files of step 2 behind
        fs, root = fsspec.core.url_to_fs(url)
        fs.pipe_file(f"{root}/model.ckpt-2.data-00000-of-00001", b"half an upload")
        fs.pipe_file(f"{root}/model.ckpt-2.index", b"junk")
    b_outcomes: list[str] = []
    holder: dict = {}

    def run_b() -> None:
        b_store = RemoteStore(url)
        writer_b = holder["b"] = Writer(b_store, delete_window=window, delete_lease=lease)
        for step in (2, 3):
            b_outcomes.append(commit_checkpoint(b_store, fake_checkpoint(tmp_path, step, "b"), writer=writer_b,
                                                executor=Serial()).outcome)

    gate = Injector(at, run_b)
    a_store.gate = gate
    fenced_at_2 = False
    try:
        commit_checkpoint(a_store, fake_checkpoint(tmp_path, 2, "a"), writer=writer_a, executor=Serial())
    except cloudckpt.FencedError:
        fenced_at_2 = True
    a_store.gate = lambda op: None
    if at is not None and gate.count <= at:  # B goes after A's last operation
        run_b()
    return url, gate.ops, fenced_at_2, b_outcomes, writer_a, holder.get("b")


@pytest.mark.parametrize("debris", [False, True], ids=["clean", "debris-of-a-crashed-writer"])
def test_fence_holds_at_every_interleaving_point(tmp_path, debris):
    _, ops, _, _, _, _ = interleave(tmp_path, None, debris=debris)  # count A's storage operations
    assert len(ops) >= 8 and "write_if_absent" in ops
    seen = set()
    for at in range(len(ops) + 1):
        url, _, fenced_at_2, b_outcomes, writer_a, writer_b = interleave(tmp_path, at, debris=debris)
        where = f"B started before A's operation {at} ({ops[at] if at < len(ops) else 'end'})"
        lineage = check_invariants(url)
        assert [c.step for c in lineage] == [1, 2, 3], where
        assert lineage[-1].writer_id == writer_b.writer_id, where  # the newest writer's head is the latest
        assert lineage[0].writer_id == writer_a.writer_id
        if fenced_at_2:
            assert b_outcomes == [UPLOADED, UPLOADED], where
            assert lineage[1].writer_id == writer_b.writer_id, where
        else:  # A committed step 2 before B registered: B resumed from it and keeps it
            assert b_outcomes in ([REFUSED, UPLOADED], [ALREADY_COMMITTED, UPLOADED]), where
            assert lineage[1].writer_id == writer_a.writer_id, where
        with pytest.raises(cloudckpt.FencedError) as info:  # the older writer commits nothing more
            commit_checkpoint(writer_a.store, fake_checkpoint(tmp_path, 4, "a"), writer=writer_a, executor=Serial())
        assert url in str(info.value) and writer_b.writer_id in str(info.value)
        assert info.value.newer_writer and isinstance(info.value, cloudckpt.UploadError)
        assert commits_after_newer_writer(url, writer_a.epoch) == [], where
        assert [c.step for c in cloudckpt.list_checkpoints(url)] == [1, 2, 3]
        seen.add(fenced_at_2)
    assert seen == {True, False}  # both sides of the race were exercised


def test_concurrent_registrations_have_one_newest_writer():
    url = f"memory://reg-{uuid.uuid4().hex[:8]}/run"
    writers = [Writer(RemoteStore(url)) for _ in range(5)]
    for w in writers:
        w.register(None)
    assert sorted(w.epoch for w in writers) == [1, 2, 3, 4, 5]
    for w in writers[:-1]:
        with pytest.raises(cloudckpt.FencedError):
            w.state()
    writers[-1].state()  # the newest is not fenced


def test_precondition_failed_is_not_transient():
    """A create-only write that loses (412 / FileExistsError) is an answer, never retried."""
    from botocore.exceptions import ClientError

    assert not is_transient(FileExistsError("exists"))
    error = ClientError({"Error": {"Code": "PreconditionFailed", "Condition": "If-None-Match"},
                         "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject")
    assert not is_transient(error)


# -- real training processes ---------------------------------------------------------------------------

def wait_until(predicate, timeout: float, what: str, proc: TrainerProcess | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.proc.poll() is not None and not predicate():
            raise AssertionError(f"{what}: the trainer exited (rc={proc.proc.returncode}):\n{proc.stderr}")
        assert time.monotonic() < end, f"timed out: {what}\n{proc.stderr if proc else ''}"
        time.sleep(0.05)


def writer_trials(moto_server, tmp_path, trials: int, seed: int) -> list[tuple[int, int]]:
    """A chain of writers on one prefix: in each trial a newer writer starts while the current one trains.

    The next writer process is started a trial ahead and waits (``--start-when``) with TensorFlow
    imported, so a trial costs the overlap, not an interpreter start. Returns (step the newer writer
    resumed from, last step of the writer it fenced) per trial.
    """
    rng = random.Random(seed)
    url = moto_server.create_bucket(f"writers-{uuid.uuid4().hex[:10]}") + "/shared"
    options = moto_server.storage_options
    store = RemoteStore(url, options)  # one store: its commit log cache makes polling cheap
    dirs: list[str] = []  # dirs[n]: the local directory of writer n

    def spawn(n: int) -> tuple[TrainerProcess, str]:
        # a fresh VM, or a VM that comes back with the disk of a writer that has stopped by the time
        # this one starts (writers 0 .. n-2)
        local = rng.choice(dirs[:n - 1]) if n >= 2 and rng.random() < 0.3 else str(tmp_path / f"vm{n}")
        dirs.append(local)
        trigger = str(tmp_path / f"go{n}")
        return TrainerProcess(url, moto_server.endpoint, local, "--save-steps", str(rng.choice([3, 4, 5])),
                              "--size", "4096", "--learning-rate", f"{rng.choice([0.05, 0.1, 0.2]):.2f}",
                              "--step-sleep", f"{rng.uniform(0.15, 0.3):.3f}", "--start-when", trigger), trigger

    current, trigger = spawn(0)
    open(trigger, "w").close()
    waiting, trigger = spawn(1)
    results = []
    trial = 0
    try:
        wait_until(lambda: current.step >= 3, 120, "first writer trains", current)
        for trial in range(1, trials + 1):
            time.sleep(rng.uniform(0.0, 0.5))  # overlapping timings
            older, newer = current, waiting
            open(trigger, "w").close()
            if trial < trials:
                waiting, trigger = spawn(trial + 1)
            wait_until(lambda: newer.writer_id is not None and newer.first_step is not None, 120,
                       f"trial {trial}: the newer writer starts", newer)
            assert older.wait(120) == 3, f"trial {trial}: the older writer was not fenced:\n{older.stderr}"
            assert older.fenced and newer.writer_id in older.fenced and url in older.fenced, older.fenced
            wait_until(lambda: (lineage := scan_directory(store).committed) != []
                       and lineage[-1].writer_id == newer.writer_id, 120,
                       f"trial {trial}: the newer writer's checkpoint becomes the latest", newer)
            scan = scan_directory(store)  # every committed checkpoint verifies (the writer keeps running:
            for info in scan.committed + scan.superseded:  # one retired meanwhile is not committed any more)
                report = verify_checkpoint(store, info)
                assert report.ok or info.commit_id not in {c.commit_id for c in scan_directory(store).committed
                                                           + scan_directory(store).superseded}, \
                    f"trial {trial}: committed step {info.step} does not verify: {report.problems}"
            # every committed manifest's files are intact; a live directory: the writer may commit and retire
            # all it had committed while the check reads (at least 5 commits: slow only on a loaded machine)
            for attempt in range(3):
                found = assert_all_committed_intact(url, options)
                if found:
                    break
                time.sleep(0.5 * (attempt + 1))  # the writer's next commit
            assert found, (
                f"trial {trial}: no committed manifest found; cloudckpt's scan: "
                f"{[(c.step, c.commit_id, c.writer_id) for c in scan_directory(store).committed]}; "
                f"log: {[(e['type'], e.get('epoch'), e.get('commit_id'), e.get('manifest'), e.get('retire')) for e in log_entries(url, options)]}; "
                f"committed names: {committed_manifest_names(url, options)}; "
                f"listing: {sorted(p.rsplit('/', 1)[-1] for p in remote_fs(url, options)[0].ls(url, detail=False))}")
            results.append((newer.first_step, older.step))
            current = newer
    finally:
        current.kill()
        if trial < trials:
            waiting.kill()
    assert cli.main(["verify", url, "--all", "-o", f"endpoint_url={moto_server.endpoint}"]) == 0  # at rest
    entries = log_entries(url, options)
    writers = [i for i, e in enumerate(entries, start=1) if e["type"] == "writer"]
    assert len(writers) == trials + 1
    for epoch, following in zip(writers, writers[1:]):  # no writer committed after a newer one registered
        assert not [i for i, e in enumerate(entries, start=1)
                    if e["type"] == "commit" and e["epoch"] == epoch and i > following]
    return results


@pytest.mark.timeout(600)  # ~2-3 min on an idle CI machine
def test_two_writer_processes_newest_wins(moto_server, tmp_path):
    results = writer_trials(moto_server, tmp_path, trials=10, seed=2026)
    assert len(results) == 10
    assert any(fenced_at >= resumed for resumed, fenced_at in results)  # the two trained the same steps


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_writer_processes_soak(moto_server, tmp_path):
    assert len(writer_trials(moto_server, tmp_path, trials=60, seed=7)) == 60
