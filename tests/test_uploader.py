"""The background uploader: bounded queue, drop-oldest-waiting, failures reported, stats."""

from __future__ import annotations

import threading
import time
import logging
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cloudckpt.commit import LocalCheckpoint
from cloudckpt.errors import ConfigError, UploadError
from cloudckpt.remote import RemoteStore
from cloudckpt.retry import RetryPolicy
from cloudckpt.uploader import Uploader, UploadJob
from support.checks import assert_all_committed_intact


class GatedMemoryFileSystem(MemoryFileSystem):
    """In-memory store whose uploads wait until the test opens the gate."""

    protocol = "gatedmemory"
    gate = threading.Event()
    started = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("gatedmemory://", "memory://", 1))

    def put_file(self, lpath, rpath, *args, **kwargs):
        self.started.set()
        assert self.gate.wait(30)
        return super().put_file(lpath, rpath, *args, **kwargs)


fsspec.register_implementation("gatedmemory", GatedMemoryFileSystem, clobber=True)


def fake_checkpoint(tmp_path, step: int, payload: bytes = b"x" * 1000) -> LocalCheckpoint:
    files = {}
    for suffix, data in ((".index", b"index" + payload[:10]), (".data-00000-of-00001", payload)):
        path = tmp_path / f"model.ckpt-{step}{suffix}"
        path.write_bytes(data)
        files[path.name] = str(path)
    return LocalCheckpoint(step=step, prefix=f"model.ckpt-{step}", files=files)


def test_drops_oldest_waiting_never_newest(tmp_path):
    GatedMemoryFileSystem.gate.clear()
    GatedMemoryFileSystem.started.clear()
    url = f"gatedmemory://q-{uuid.uuid4().hex[:8]}/run"
    uploader = Uploader(RemoteStore(url), max_pending=2)
    uploader.start()
    released = []
    for step in (10, 20, 30, 40):
        uploader.submit(UploadJob(fake_checkpoint(tmp_path, step), release=lambda s=step: released.append(s)))
        if step == 10:
            assert GatedMemoryFileSystem.started.wait(10)  # step 10 is in flight, the rest wait
    assert uploader.pending_steps() == [10, 30, 40]
    assert released == [20]  # the dropped snapshot is freed at once
    GatedMemoryFileSystem.gate.set()
    assert uploader.wait(30)
    uploader.close()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed) == (3, 1, 0)
    assert stats.last_committed_step == 40
    assert sorted(released) == [10, 20, 30, 40]
    assert set(assert_all_committed_intact(url.replace("gatedmemory://", "memory://"))) == {10, 30, 40}


def test_failure_is_kept_for_the_training_thread(tmp_path):
    store = RemoteStore(f"memory://f-{uuid.uuid4().hex[:8]}/run", retry=RetryPolicy(max_attempts=1))
    uploader = Uploader(store, max_pending=2)
    uploader.start()
    ckpt = fake_checkpoint(tmp_path, 5)
    (tmp_path / "model.ckpt-5.index").unlink()  # the snapshot vanished: the upload cannot succeed
    uploader.submit(UploadJob(ckpt))
    assert uploader.wait(10)
    failure = uploader.take_failure()
    assert isinstance(failure, UploadError)
    assert failure.step == 5 and store.url in str(failure) and "model.ckpt-5.index" in str(failure)
    assert uploader.take_failure() is None
    assert uploader.stats().failed == 1
    assert store.list_objects() == [] or not any(o.name.endswith(".manifest.json") for o in store.list_objects())
    uploader.close()


def test_warn_mode_logs_and_counts(tmp_path, caplog):
    store = RemoteStore(f"memory://w-{uuid.uuid4().hex[:8]}/run", retry=RetryPolicy(max_attempts=1))
    uploader = Uploader(store, max_pending=2, on_error="warn")
    uploader.start()
    ckpt = fake_checkpoint(tmp_path, 7)
    (tmp_path / "model.ckpt-7.index").unlink()
    uploader.submit(UploadJob(ckpt))
    assert uploader.wait(10)
    assert uploader.take_failure() is None
    assert uploader.stats().failed == 1
    assert any("step 7" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    uploader.close()


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_pending_must_be_positive_int(value):
    with pytest.raises(ConfigError, match="max_pending"):
        Uploader(RemoteStore("memory://x/y"), max_pending=value)


def test_recommit_heals_missing_objects_and_never_overwrites(tmp_path, caplog):
    from cloudckpt.commit import commit_checkpoint

    store = RemoteStore(f"memory://h-{uuid.uuid4().hex[:8]}/run")
    first = commit_checkpoint(store, fake_checkpoint(tmp_path, 3))
    store.delete(["model.ckpt-3.data-00000-of-00001"])  # lost from the bucket
    healed = commit_checkpoint(store, fake_checkpoint(tmp_path, 3))
    assert healed.already_committed and healed.bytes_uploaded == 1000
    assert set(assert_all_committed_intact(store.url)) == {3}

    other = tmp_path / "other"
    other.mkdir()
    different = commit_checkpoint(store, fake_checkpoint(other, 3, payload=b"y" * 1000))
    assert different.already_committed and different.manifest == first.manifest  # the committed one stays
    assert any("different tensor data" in r.getMessage() for r in caplog.records)
    assert set(assert_all_committed_intact(store.url)) == {3}


def test_failures_are_reported_once_per_step(tmp_path):
    """A step that failed twice (a final checkpoint submitted once more) counts once in the combined error."""
    store = RemoteStore(f"memory://c-{uuid.uuid4().hex[:8]}/run", retry=RetryPolicy(max_attempts=1))
    uploader = Uploader(store, max_pending=5)
    uploader.start()
    for i, step in enumerate((5, 9, 9)):
        directory = tmp_path / f"save{i}"
        directory.mkdir()
        ckpt = fake_checkpoint(directory, step)
        (directory / f"model.ckpt-{step}.index").unlink()  # the snapshot vanished: the upload cannot succeed
        uploader.submit(UploadJob(ckpt))
        assert uploader.wait(10)
    failure = uploader.take_failure()
    assert isinstance(failure, UploadError) and failure.step == 9
    assert str(failure).startswith("2 checkpoints (steps [5, 9]) were not committed"), str(failure)
    assert uploader.stats().failed == 3  # each attempt is counted in stats; the error names each step once
    uploader.close()


def test_an_abandoned_upload_on_a_backend_that_stops_between_files(tmp_path, monkeypatch):
    """An fsspec backend cannot cut a file in flight: ``close`` gives up on it after ``ABANDON_GRACE``. A second
    ``close`` does not wait again (before: it joined the worker without limit); the abandoned checkpoint is not
    committed when its file finishes later; ``start`` waits for that worker before the store's transfers resume,
    and the next checkpoint commits as usual."""
    from cloudckpt import uploader as uploader_module

    monkeypatch.setattr(uploader_module, "ABANDON_GRACE", 0.2)
    GatedMemoryFileSystem.gate.clear()
    GatedMemoryFileSystem.started.clear()
    url = f"gatedmemory://a-{uuid.uuid4().hex[:8]}/run"
    uploader = Uploader(RemoteStore(url), max_pending=2, concurrency=1)
    uploader.submit(UploadJob(fake_checkpoint(tmp_path, 10)))
    uploader.start()
    assert GatedMemoryFileSystem.started.wait(10)
    uploader.close(timeout=0)  # abandoned: the file in flight is held by the store
    assert uploader.pending_steps() == [10]

    second = threading.Thread(target=uploader.close)  # timeout=None: "until done" had meant until the gate opens
    second.start()
    second.join(10)
    assert not second.is_alive(), "a second close() waited for the abandoned upload"

    restarted = threading.Thread(target=uploader.start)
    restarted.start()
    restarted.join(0.5)
    assert restarted.is_alive(), "start() did not wait for the abandoned worker"
    GatedMemoryFileSystem.gate.set()  # the held file finishes: nothing of step 10 may be committed
    restarted.join(30)
    assert not restarted.is_alive()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped) == (0, 1)
    uploader.submit(UploadJob(fake_checkpoint(tmp_path, 20)))
    assert uploader.wait(30)
    uploader.close()
    assert uploader.stats().committed == 1
    assert set(assert_all_committed_intact(url.replace("gatedmemory://", "memory://"))) == {20}


def test_a_store_slower_than_every_save_warns_of_drops_once_per_interval(tmp_path, caplog, monkeypatch):
    """A store slower than the save interval drops a checkpoint at every save: each drop was its own WARNING
    (spot-VM trial: noisy). One WARNING per DROP_WARNING_INTERVAL, the rest at INFO, and the next WARNING
    says how many were dropped since; stats().dropped counts them all."""
    import cloudckpt.uploader as uploader_module

    GatedMemoryFileSystem.gate.clear()
    GatedMemoryFileSystem.started.clear()
    uploader = Uploader(RemoteStore(f"gatedmemory://q-{uuid.uuid4().hex[:8]}/run"), max_pending=1)
    uploader.start()
    try:
        with caplog.at_level(logging.INFO, logger="cloudckpt"):
            for step in range(10, 70, 10):  # 10 in flight; 20..40 each dropped by the next save
                uploader.submit(UploadJob(fake_checkpoint(tmp_path, step)))
                if step == 10:
                    assert GatedMemoryFileSystem.started.wait(10)
            monkeypatch.setattr(uploader_module, "DROP_WARNING_INTERVAL", 0.0)  # the interval has passed
            uploader.submit(UploadJob(fake_checkpoint(tmp_path, 70)))
        drops = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("Dropping")]
        assert [level for level, _ in drops] == [logging.WARNING] + [logging.INFO] * 3 + [logging.WARNING], drops
        assert "(3 more dropped since the last such warning, logged at INFO.)" in drops[-1][1], drops[-1]
        assert uploader.stats().dropped == 5
    finally:
        GatedMemoryFileSystem.gate.set()
        uploader.wait(30)
        uploader.close()



def test_readme_states_the_drop_warning_rate_limit():
    """README once said "drops at WARNING" while most drops are logged at INFO (_log_drop's rate limit): it
    states the limit, with DROP_WARNING_INTERVAL's figure, where it describes the drop log levels."""
    from pathlib import Path

    import cloudckpt.uploader as uploader_module

    readme = " ".join((Path(uploader_module.__file__).parent.parent / "README.md").read_text().split())
    seconds = f"{uploader_module.DROP_WARNING_INTERVAL:g} s"
    logging_paragraph = readme[readme.index('Logging goes to `logging.getLogger("cloudckpt")`'):][:500]
    assert "drops at WARNING rate-limited to one WARNING per " + seconds in logging_paragraph, logging_paragraph
    assert "logged at INFO only" in logging_paragraph
    assert f"further drops within {seconds} of the last WARNING go to INFO only" in readme


MiB = 1 << 20


@pytest.mark.parametrize("older_left, final_size, rate, left, action, case", [
    (8 * MiB, 8 * MiB, 4 * MiB, 10.0, "keep", "both fit"),  # 2.5 + 1 + 2.5 + 1 = 7 s <= 10 s
    (28 * MiB, 8 * MiB, 4 * MiB, 6.0, "abandon", "final alone fits"),  # 9.75 + 3.5 s > 6 s; 3.5 s alone fits
    (12 * MiB, 40 * MiB, 4 * MiB, 6.0, "keep", "final cannot fit"),  # the final alone: 13.5 s
    (0, 8 * MiB, 4 * MiB, 3.0, "keep", "older is committing"),  # sent its files: a few small requests left
    (8 * MiB, 8 * MiB, None, 6.0, "abandon", "no figure"),  # as many bytes left as the final has: the final
    (2 * MiB, 8 * MiB, None, 6.0, "keep", "no figure"),  # nearer done than the final could be: keep
    (8 * MiB, 8 * MiB, 0.0, 6.0, "abandon", "no figure"),  # nothing delivered for a while: no figure either
    (28 * MiB, 1, 4 * MiB, 0.0, "keep", "deadline passed"),
])
def test_plan_final_upload(older_left, final_size, rate, left, action, case):
    """The preemption policy for an older upload in flight, from its figures (see plan_final_upload)."""
    from cloudckpt.uploader import plan_final_upload

    plan = plan_final_upload(older_left=older_left, final_size=final_size, bytes_per_second=rate,
                             seconds_left=left)
    assert (plan.action, plan.case) == (action, case), plan
    if case in ("both fit", "final alone fits", "final cannot fit"):
        assert f"at {rate / MiB:.1f} MiB/s" in plan.reason and f"{left:.1f} s are left" in plan.reason


def test_favour_final_without_a_throughput_figure_abandons_an_older_upload_that_has_as_much_left(tmp_path, caplog):
    """No throughput measured (an fsspec store counts a file once it is stored, and none is yet): the older
    upload in flight has as many bytes left as the final checkpoint has, so it is abandoned for the final
    one. The backend cannot cut the file in flight: the older commit stops at its next request, nothing of
    it committed, counted as dropped; the final one is committed."""
    GatedMemoryFileSystem.gate.clear()
    GatedMemoryFileSystem.started.clear()
    url = f"gatedmemory://p-{uuid.uuid4().hex[:8]}/run"
    uploader = Uploader(RemoteStore(url), max_pending=2)
    uploader.start()
    try:
        older, final = tmp_path / "older", tmp_path / "final"
        older.mkdir()
        final.mkdir()
        uploader.submit(UploadJob(fake_checkpoint(older, 10, payload=b"o" * 2000)))
        assert GatedMemoryFileSystem.started.wait(10)  # step 10 is in flight, held by the store
        uploader.submit(UploadJob(fake_checkpoint(final, 20, payload=b"f" * 2000), required=True))
        assert uploader.favour_final(30, time.monotonic() + 30) is None  # no checkpoint of step 30 is waiting
        with caplog.at_level(logging.INFO, logger="cloudckpt"):
            plan = uploader.favour_final(20, time.monotonic() + 30)
        assert (plan.action, plan.case) == ("abandon", "no figure"), plan
        assert uploader.favour_final(20, time.monotonic() + 30) is None  # abandoned already: nothing to decide
        GatedMemoryFileSystem.gate.set()
        assert uploader.wait(30)
    finally:
        GatedMemoryFileSystem.gate.set()
        uploader.close()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (1, 1, 0, 20)
    assert set(assert_all_committed_intact(url.replace("gatedmemory://", "memory://"))) == {20}
    (line,) = [r.getMessage() for r in caplog.records
               if "abandoning the upload of checkpoint step 10" in r.getMessage()]
    assert "no upload throughput measured yet" in line and "final checkpoint (step 20)" in line, line
