"""Remote retention and debris collection."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import cloudckpt
from cloudckpt.catalog import DirectoryScan, IncompleteCheckpoint, scan_directory, CheckpointInfo
from cloudckpt.manifest import FileEntry
from cloudckpt.remote import RemoteObject, RemoteStore
from cloudckpt.retention import RetentionPolicy, apply_retention, gc, plan_retention
from support.checks import assert_all_committed_intact
from support.tf_model import train


def checkpoint_objects(client, bucket):
    keys = [o["Key"].rsplit("/", 1)[-1] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return sorted(k for k in keys if k.startswith("model.ckpt-"))


def test_remote_max_to_keep_leaves_only_newest(moto_server, tmp_path):
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    url = moto_server.create_bucket(bucket) + "/runs/exp1"
    train(lambda s: cloudckpt.CheckpointSaverHook(url, save_steps=10, local_dir=str(tmp_path),
                                                  storage_options=moto_server.storage_options,
                                                  remote_max_to_keep=2), last_step=60)
    assert [c.step for c in cloudckpt.list_checkpoints(url, moto_server.storage_options)] == [50, 60]
    expected = sorted(f"model.ckpt-{s}{x}" for s in (50, 60)
                      for x in (".index", ".data-00000-of-00001", ".meta", ".manifest.json"))
    assert checkpoint_objects(moto_server.client(), bucket) == expected
    assert set(assert_all_committed_intact(url, moto_server.storage_options)) == {50, 60}


def test_default_follows_the_savers_max_to_keep(memory_url, tmp_path):
    # max_pending: the 5 saves come within milliseconds; under load the default 2 dropped step 30 (CI)
    train(lambda scaffold: cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, scaffold=scaffold,
                                                         local_dir=str(tmp_path), max_pending=10),
          last_step=50, max_to_keep=3)
    assert [c.step for c in cloudckpt.list_checkpoints(memory_url)] == [30, 40, 50]
    assert len(list(tmp_path.glob("model.ckpt-*.index"))) == 3  # the local directory keeps the same


class CrashOnDataDeleteFS(MemoryFileSystem):
    """In-memory store where the process 'dies' when deleting checkpoint data (after the manifest went)."""

    protocol = "crashondelete"
    armed = False

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("crashondelete://", "memory://", 1))

    def rm_file(self, path):
        if self.armed and not path.endswith((".manifest.json", "checkpoint")):
            raise KeyboardInterrupt("simulated crash during retention")
        return super().rm_file(path)


fsspec.register_implementation("crashondelete", CrashOnDataDeleteFS, clobber=True)


def test_crash_between_manifest_and_file_deletion_leaves_nothing_broken(tmp_path):
    root = f"ckpt-{uuid.uuid4().hex[:8]}/run"
    train(lambda s: cloudckpt.CheckpointSaverHook(f"memory://{root}", save_steps=10, local_dir=str(tmp_path)),
          last_step=30)
    store = RemoteStore(f"crashondelete://{root}")
    plan = plan_retention(scan_directory(store), RetentionPolicy(max_to_keep=2))
    assert [c.step for c in plan.delete] == [0, 10]
    CrashOnDataDeleteFS.armed = True
    try:
        with pytest.raises(KeyboardInterrupt):
            apply_retention(store, plan)
    finally:
        CrashOnDataDeleteFS.armed = False
    # Step 0 lost its manifest but kept its files: it is debris, not a broken committed checkpoint.
    committed = assert_all_committed_intact(f"memory://{root}")
    assert set(committed) == {10, 20, 30}
    scan = scan_directory(RemoteStore(f"memory://{root}"))
    assert [i.step for i in scan.incomplete] == [0]
    for c in scan.committed:
        assert cloudckpt.verify(f"memory://{root}", step=c.step).ok
    # A later gc finishes the job.
    plan = gc(f"memory://{root}", keep=2, grace_seconds=0).plan
    assert [c.step for c in plan.delete] == [10] and [d.step for d in plan.debris] == [0]
    scan = scan_directory(RemoteStore(f"memory://{root}"))
    assert [c.step for c in scan.committed] == [20, 30] and scan.incomplete == []


def info(step: int, hour: float) -> CheckpointInfo:
    created = f"2026-01-01T{int(hour):02d}:{int(hour % 1 * 60):02d}:00Z"
    return CheckpointInfo(step, f"s3://b/r/model.ckpt-{step}", (FileEntry(f"model.ckpt-{step}.index", 10, "0" * 8),),
                          created, f"s3://b/r/model.ckpt-{step}.manifest.json")


def debris(prefix: str, step: int, modified: float) -> IncompleteCheckpoint:
    return IncompleteCheckpoint(step, f"s3://b/r/{prefix}-{step}",
                                (RemoteObject(f"{prefix}-{step}.index", 10, modified),))


def test_plan_keeps_newest_and_one_per_period():
    scan = DirectoryScan(committed=[info(s, s / 10) for s in range(0, 100, 10)], incomplete=[], unreadable={},
                         objects=[])
    plan = plan_retention(scan, RetentionPolicy(max_to_keep=2, keep_checkpoint_every_n_hours=3))
    # as TF: one kept 3 hours after the first checkpoint (step 30), then every 3 hours; not the first itself
    assert [c.step for c in plan.keep] == [30, 60, 80, 90]
    assert [c.step for c in plan.delete] == [0, 10, 20, 40, 50, 70]
    everything = plan_retention(scan, RetentionPolicy(max_to_keep=None))
    assert everything.delete == []


def test_one_per_period_is_kept_when_retention_runs_after_every_commit():
    """Retention runs after each commit, when the oldest checkpoints are already gone: the periods are
    counted from the lineage's first checkpoint in the commit log (retired ones included), not from the
    oldest one still there, which moved on at every pass and kept none once max_to_keep saves spanned
    less than a period (spot-VM trial: keep_checkpoint_every_n_hours kept nothing remotely)."""
    from cloudckpt.lineage import CommitRecord, LogState
    epoch = 1_767_225_600.0  # 2026-01-01T00:00:00Z, as info()'s created_at
    commits: dict[str, CommitRecord] = {}
    present: list[CheckpointInfo] = []
    parent = None
    for index, step in enumerate(range(0, 100, 10), start=2):
        cid = f"c{step}"
        commits[cid] = CommitRecord(cid, index, step, f"model.ckpt-{step}", f"model.ckpt-{step}.manifest.json",
                                    parent, 1, "w", saved_at=epoch + step / 10 * 3600)
        parent = cid
        c = info(step, step / 10)
        present.append(CheckpointInfo(c.step, c.prefix, c.files, c.created_at, c.manifest_url, commit_id=cid,
                                      writer_id="w"))
        scan = DirectoryScan(committed=list(present), incomplete=[], unreadable={}, objects=[],
                             log=LogState(last_index=index, commits=dict(commits), head=cid))
        plan = plan_retention(scan, RetentionPolicy(max_to_keep=2, keep_checkpoint_every_n_hours=3))
        doomed = {c.step for c in plan.delete}
        present = [c for c in present if c.step not in doomed]
    # what TF's manager keeps locally, and what one pass over all of them keeps (the test above)
    assert [c.step for c in present] == [30, 60, 80, 90]


def test_debris_respects_grace_and_foreign_files():
    now = 1_000_000.0
    scan = DirectoryScan(committed=[info(10, 1)], objects=[], unreadable={}, incomplete=[
        debris("model.ckpt", 20, now - 7200),   # old crash debris: removed
        debris("model.ckpt", 30, now - 60),     # maybe an upload in flight: kept
        debris("other.ckpt", 5, now - 7200),    # another basename: not ours to touch
    ])
    plan = plan_retention(scan, RetentionPolicy(), now=now)
    assert [(d.prefix, d.step) for d in plan.debris] == [("s3://b/r/model.ckpt-20", 20)]
    assert plan.delete == [] and [c.step for c in plan.keep] == [10]


@pytest.mark.parametrize("kwargs", [{"max_to_keep": -1}, {"keep_checkpoint_every_n_hours": 0},
                                    {"debris_grace_seconds": -5}, {"max_to_keep": 2.0}, {"max_to_keep": True},
                                    {"max_to_keep": np.True_}, {"max_to_keep": "2"}, {"max_to_keep": np.int64(-1)},
                                    {"debris_grace_seconds": True}, {"debris_grace_seconds": "60"},
                                    {"keep_checkpoint_every_n_hours": float("nan")}])
def test_policy_validation(kwargs):
    with pytest.raises(cloudckpt.ConfigError):
        RetentionPolicy(**kwargs)


def test_policy_takes_a_numpy_integer_as_the_int():
    policy = RetentionPolicy(max_to_keep=np.int64(3))
    assert policy.max_to_keep == 3 and type(policy.max_to_keep) is int
    assert policy == RetentionPolicy(max_to_keep=3)
    hours = RetentionPolicy(keep_checkpoint_every_n_hours=np.float32(0.5), debris_grace_seconds=np.int64(60))
    assert (hours.keep_checkpoint_every_n_hours, hours.debris_grace_seconds) == (0.5, 60.0)


def test_plan_never_deletes_a_protected_step():
    scan = DirectoryScan(committed=[info(s, s / 10) for s in (10, 20, 30)], incomplete=[], unreadable={},
                         objects=[])
    plan = plan_retention(scan, RetentionPolicy(max_to_keep=1), protect={20})
    assert [c.step for c in plan.keep] == [20, 30] and [c.step for c in plan.delete] == [10]
