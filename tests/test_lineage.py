"""Lineage decides "latest": rollbacks (the TF way and `cloudckpt rollback`), superseded checkpoints."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import tensorflow as tf

import cloudckpt
from cloudckpt import cli
from cloudckpt.catalog import scan_directory
from cloudckpt.commit import LocalCheckpoint, commit_checkpoint, register_continuing
from cloudckpt.remote import RemoteStore
from cloudckpt.retention import RetentionPolicy, apply_retention, plan_retention
from cloudckpt.writers import Writer
from support.checks import assert_all_committed_intact, state_file
from support.tf_model import train


def run(url, options, local_dir, last_step, *, learning_rate=0.01, **hook_kwargs):
    hook_kwargs.setdefault("remote_max_to_keep", 0)  # keep all: the tests look at superseded checkpoints
    return train(lambda scaffold: cloudckpt.CheckpointSaverHook(
        url, save_steps=5, local_dir=str(local_dir), storage_options=options, max_pending=100, **hook_kwargs),
        last_step=last_step, learning_rate=learning_rate)


def ls_json(url: str, endpoint: str) -> dict[int, list[str]]:
    """step -> statuses, from `cloudckpt ls --json` (in-process)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["ls", url, "--json", "-o", f"endpoint_url={endpoint}"]) == 0
    rows: dict[int, list[str]] = {}
    for row in json.loads(out.getvalue()):
        rows.setdefault(row["step"], []).append(row["status"] + ("*" if row.get("latest") else ""))
    return rows


def test_rollback_end_to_end_on_s3(moto_server, tmp_path):
    """Issue example 2, then `cloudckpt rollback`: the newest writer's lineage decides what resumes."""
    url = moto_server.create_bucket(f"lineage-{uuid.uuid4().hex[:10]}") + "/runs/exp1"
    options, endpoint = moto_server.storage_options, moto_server.endpoint
    vm1 = tmp_path / "vm1"
    run(url, options, vm1, 20)  # commits 0, 5, 10, 15, 20
    at_ten = tf.train.load_variable(str(vm1 / "model.ckpt-10"), "w")

    # A loss spike: roll back the TF way (point the local state file at step 10, newer files stay) and
    # retrain with a lower learning rate to step 18.
    tf.compat.v1.train.update_checkpoint_state(str(vm1), str(vm1 / "model.ckpt-10"))
    branch = run(url, options, vm1, 18, learning_rate=0.001)
    assert branch.first_step == 10
    np.testing.assert_array_equal(branch.first_weights, at_ten)
    assert ls_json(url, endpoint) == {0: ["committed"], 5: ["committed"], 10: ["committed"], 15: ["committed"],
                                      18: ["committed*"], 20: ["superseded"]}
    fifteen = cloudckpt.download_checkpoint(url, str(tmp_path / "dl15"), step=15, storage_options=options)
    np.testing.assert_array_equal(tf.train.load_variable(fifteen, "w"),  # the new branch's 15 replaced the old
                                  tf.train.load_variable(str(vm1 / "model.ckpt-15"), "w"))
    assert state_file(url, options)["model_checkpoint_path"] == ["model.ckpt-18"]
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="superseded"):
        cloudckpt.download_checkpoint(url, str(tmp_path / "dl20"), step=20, storage_options=options)

    # A preemption: a fresh VM resumes at the new branch's head.
    fresh = run(url, options, tmp_path / "vm2", 21)
    assert fresh.first_step == 18
    np.testing.assert_array_equal(fresh.first_weights, branch.last_weights)
    assert cloudckpt.latest_checkpoint(url, options).step == 21

    # Roll back on purpose with the CLI: step 10 is the latest again, nothing is deleted.
    before = {c.commit_id for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)}
    assert cli.main(["rollback", url, "--step", "10", "-o", f"endpoint_url={endpoint}"]) == 0
    assert {c.commit_id for c in cloudckpt.list_checkpoints(url, options, include_superseded=True)} == before
    assert ls_json(url, endpoint) == {0: ["committed"], 5: ["committed"], 10: ["committed*"],
                                      15: ["superseded"], 18: ["superseded"], 20: ["superseded"],
                                      21: ["superseded"]}
    assert state_file(url, options)["model_checkpoint_path"] == ["model.ckpt-10"]
    restarted = run(url, options, tmp_path / "vm3", 12)
    assert restarted.first_step == 10
    np.testing.assert_array_equal(restarted.first_weights, at_ten)
    assert cli.main(["verify", url, "--all", "-o", f"endpoint_url={endpoint}"]) == 0
    assert set(assert_all_committed_intact(url, options)) == {0, 5, 10, 12, 15, 18, 20, 21}


def fake(root, step: int, tag: str) -> LocalCheckpoint:
    directory = root / f"{tag}-{step}-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    files = {}
    for suffix, payload in ((".index", f"{tag}{step}".encode()), (".data-00000-of-00001", tag.encode() * 300)):
        (directory / f"model.ckpt-{step}{suffix}").write_bytes(payload)
        files[f"model.ckpt-{step}{suffix}"] = str(directory / f"model.ckpt-{step}{suffix}")
    return LocalCheckpoint(step, f"model.ckpt-{step}", files)


def test_superseded_are_listed_never_restored_and_deleted_first(tmp_path):
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    store = RemoteStore(url)
    first = Writer(store)
    for step in (10, 20, 30, 40, 50):
        commit_checkpoint(store, fake(tmp_path, step, "a"), writer=first)
    result = cloudckpt.rollback(url, 20)
    assert result.latest.step == 20 and [c.step for c in result.superseded] == [30, 40, 50]
    with pytest.raises(cloudckpt.FencedError, match="a rollback"):  # the running writer is fenced
        commit_checkpoint(store, fake(tmp_path, 60, "a"), writer=first)

    second = Writer(RemoteStore(url))
    register_continuing(second)
    assert commit_checkpoint(second.store, fake(tmp_path, 30, "b"), writer=second).outcome == "uploaded"
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [10, 20, 30]
    everything = cloudckpt.list_checkpoints(url, include_superseded=True)
    assert [(c.step, c.status) for c in everything] == [(10, "committed"), (20, "committed"), (30, "committed"),
                                                        (40, "superseded"), (50, "superseded")]
    assert cloudckpt.latest_checkpoint(url).writer_id == second.writer_id
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="superseded"):
        cloudckpt.verify(url, step=50)

    scan = scan_directory(store)
    plan = plan_retention(scan, RetentionPolicy(max_to_keep=3))
    assert [(c.step, c.status) for c in plan.delete] == [(40, "superseded"), (50, "superseded")]
    plan = plan_retention(scan, RetentionPolicy(max_to_keep=2))
    assert [(c.step, c.status) for c in plan.delete] == [(40, "superseded"), (50, "superseded"), (10, "committed")]
    apply_retention(second.store, plan, second)
    assert [(c.step, c.status) for c in cloudckpt.list_checkpoints(url, include_superseded=True)] == \
        [(20, "committed"), (30, "committed")]
    assert set(assert_all_committed_intact(url)) == {20, 30}


def test_rollback_refuses_unknown_or_corrupt_steps(tmp_path):
    import fsspec

    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    store = RemoteStore(url)
    writer = Writer(store)
    for step in (1, 2):
        commit_checkpoint(store, fake(tmp_path, step, "a"), writer=writer)
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match=r"step 7 .*\[1, 2\]"):
        cloudckpt.rollback(url, 7)
    assert cli.main(["rollback", url, "--step", "7"]) == 1  # a check failed: exit 1, one line
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/model.ckpt-1.data-00000-of-00001", b"flipped")
    with pytest.raises(cloudckpt.IntegrityError, match="does not verify"):
        cloudckpt.rollback(url, 1)
    writer.state()  # neither attempt registered a writer: the running one is not fenced
    assert cloudckpt.latest_checkpoint(url).step == 2


def test_rollback_to_a_step_committed_under_two_names_takes_the_newer_or_the_named(tmp_path):
    """A Keras template with a metric, fit again from scratch, commits step 6 under two names: `rollback
    --step 6` made the older one (the first run's) the latest, while pull / download_checkpoint take the
    newer; it takes the newer too, and name= (`--name`) picks either."""
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    store = RemoteStore(url)
    writer = Writer(store)
    for name in ("first-3", "first-6", "second-3", "second-6", "second-9"):
        step = int(name.rsplit("-", 1)[1])
        files = {}
        for suffix in (".index", ".data-00000-of-00001"):
            (tmp_path / f"{name}{suffix}").write_bytes(f"{name}{suffix}".encode() * 20)
            files[f"{name}{suffix}"] = str(tmp_path / f"{name}{suffix}")
        commit_checkpoint(store, LocalCheckpoint(step, name, files), writer=writer)
    assert cloudckpt.rollback(url, 6).latest.name == "second-6"
    result = cloudckpt.rollback(url, name="first-6")
    assert result.latest.name == "first-6" and cloudckpt.latest_checkpoint(url).name == "first-6"
    assert [c.name for c in result.superseded] == ["second-3", "second-6", "second-9"]
    assert cloudckpt.rollback(url, name="second-9").latest.name == "second-9"  # a superseded one, by name
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match=r"named 'first-9' .*\(committed: second-9, "):
        cloudckpt.rollback(url, name="first-9")
    with pytest.raises(cloudckpt.ConfigError, match="not both"):
        cloudckpt.rollback(url, 6, name="first-6")
    with pytest.raises(cloudckpt.ConfigError, match="step or name"):
        cloudckpt.rollback(url)


def test_restore_false_on_a_used_directory_starts_a_new_lineage(tmp_path, caplog):
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    run(url, None, tmp_path / "vm1", 10)
    fresh = run(url, None, tmp_path / "vm2", 5, restore=False)
    assert fresh.first_step == 0
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [0, 5]
    assert [(c.step, c.status) for c in cloudckpt.list_checkpoints(url, include_superseded=True)] == \
        [(0, "committed"), (5, "committed"), (10, "superseded")]
    assert any("starts a new lineage" in r.getMessage() for r in caplog.records)


def test_a_version1_directory_is_adopted_by_its_first_writer(tmp_path):
    """A directory committed by manifests alone (cloudckpt before the commit log) stays readable, and the
    first writer adopts its checkpoints as the start of the lineage."""
    import fsspec

    from cloudckpt.commit import build_manifest

    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    fs, root = fsspec.core.url_to_fs(url)
    for step in (10, 20):  # what a version 1 writer left: files, then the manifest
        ckpt = fake(tmp_path, step, "v1")
        for name, path in ckpt.files.items():
            fs.put_file(path, f"{root}/{name}")
        manifest = build_manifest(ckpt)
        assert manifest.version == 1
        fs.pipe_file(f"{root}/{manifest.name}", manifest.to_json())
    assert [(c.step, c.writer_id) for c in cloudckpt.list_checkpoints(url)] == [(10, None), (20, None)]

    writer = Writer(RemoteStore(url))
    register_continuing(writer)
    assert commit_checkpoint(writer.store, fake(tmp_path, 30, "v2"), writer=writer).outcome == "uploaded"
    lineage = cloudckpt.list_checkpoints(url)
    assert [(c.step, c.writer_id) for c in lineage] == [(10, None), (20, None), (30, writer.writer_id)]
    assert lineage[-1].commit_id and json.loads(fs.cat_file(f"{root}/model.ckpt-30.manifest.json"))["parent"] == \
        "legacy:model.ckpt-20"
    # A version 1 manifest written after the log exists (an old cloudckpt still running) is not trusted.
    late = build_manifest(fake(tmp_path, 40, "old"))
    for name, path in fake(tmp_path, 40, "old").files.items():
        fs.put_file(path, f"{root}/{name}")
    fs.pipe_file(f"{root}/{late.name}", late.to_json())
    assert [c.step for c in cloudckpt.list_checkpoints(url, include_superseded=True)] == [10, 20, 30]


def test_a_disk_that_is_only_behind_catches_up_instead_of_rolling_back(tmp_path, caplog):
    """VM1 stops at step 10, VM2 goes on to 20; VM1 comes back with its old disk (state file at 10): that is
    not a rollback, it resumes at 20. Leftovers of an abandoned branch on a disk do not count either."""
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    run(url, None, tmp_path / "vm1", 10)
    run(url, None, tmp_path / "vm2", 20)
    back = run(url, None, tmp_path / "vm1", 22)
    assert back.first_step == 20
    assert not any("Rolling back" in r.getMessage() for r in caplog.records)
    assert any(r.levelname == "WARNING" and "cloudckpt rollback" in r.getMessage() and "step 20" in r.getMessage()
               for r in caplog.records)  # the state file's step is overridden: said, with the way to go back
    assert [c.step for c in cloudckpt.list_checkpoints(url, include_superseded=True)] == [0, 5, 10, 15, 20, 22]

    cloudckpt.rollback(url, 10)  # vm1's disk now holds 15, 20, 22 of a superseded branch, state file at 22
    again = run(url, None, tmp_path / "vm1", 12)
    assert again.first_step == 10  # the rollback holds: the superseded local checkpoints are not resumed
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [0, 5, 10, 12]


def test_a_fresh_start_that_dies_before_its_first_commit_hides_nothing(tmp_path, caplog):
    """A writer that resumed from nothing (restore=False, an empty disk) takes over at its first commit: if it
    dies before that, the run before it stays the latest, a restart resumes there and retention keeps it."""
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    run(url, None, tmp_path / "vm1", 10)
    fresh = Writer(RemoteStore(url))
    fresh.register(None)  # registered (the older writer is fenced), then the VM dies
    assert [(c.step, c.status) for c in cloudckpt.list_checkpoints(url, include_superseded=True)] == \
        [(0, "committed"), (5, "committed"), (10, "committed")]
    assert cloudckpt.latest_checkpoint(url).step == 10
    again = run(url, None, tmp_path / "vm3", 15, remote_max_to_keep=2)
    assert again.first_step == 10
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [10, 15]


def test_tf_stock_hook_with_upload_listener_resumes_on_an_empty_disk(tmp_path):
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    run(url, None, tmp_path / "vm1", 10)

    def stock(scaffold, local=str(tmp_path / "vm2")):
        return tf.compat.v1.train.CheckpointSaverHook(
            local, save_steps=5, scaffold=scaffold, listeners=[cloudckpt.UploadListener(url, local)])
    resumed = train(stock, last_step=15)
    assert resumed.first_step == 10
    assert [(c.step, c.status) for c in cloudckpt.list_checkpoints(url, include_superseded=True)] == \
        [(0, "committed"), (5, "committed"), (10, "committed"), (15, "committed")]


def test_rollback_the_tf_way_in_place(tmp_path):
    """A plain local checkpoint_dir (committed in place): the Saver's new files of the new branch are never
    deleted as "superseded", and a restart resumes at the new branch's head."""
    ckpt_dir = str(tmp_path / "ckpt")

    def in_place(scaffold):
        # max_pending: no save is dropped however slowly the machine commits (all five are listed below)
        return cloudckpt.CheckpointSaverHook(ckpt_dir, save_steps=5, remote_max_to_keep=0, max_pending=100)
    train(in_place, last_step=20)
    state = tf.compat.v1.train.get_checkpoint_state(ckpt_dir)
    listed = [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]
    assert listed == [0, 5, 10, 15, 20] and state.model_checkpoint_path.endswith("-20"), state
    tf.compat.v1.train.update_checkpoint_state(ckpt_dir, state.all_model_checkpoint_paths[2])  # step 10
    rolled = train(in_place, last_step=18, learning_rate=0.001)
    assert rolled.first_step == 10
    assert [c.step for c in cloudckpt.list_checkpoints(ckpt_dir)] == [0, 5, 10, 15, 18]
    for step in (0, 5, 10, 15, 18):
        assert cloudckpt.verify(ckpt_dir, step).ok, step
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("model.ckpt-18")
    assert train(in_place, last_step=19).first_step == 18


def test_a_rollback_whose_target_a_running_writer_deletes_meanwhile_changes_nothing(tmp_path):
    """The race a review hit rolling back to the oldest kept checkpoint while training ran: between the
    rollback's decision and its ``writer`` entry, the running writer's retention retired the target (a
    ``delete`` entry). ``register`` decided again only after ``writer`` or ``commit`` entries, so it
    registered a writer continuing a deleted checkpoint: no latest checkpoint was left, the next run
    started from nothing, and its retention deleted the old lineage. Now a retired choice is decided again:
    the rollback's decision refuses (nothing changed), the running writer is not fenced."""
    url = f"memory://lineage-{uuid.uuid4().hex[:8]}/run"
    store = RemoteStore(url)
    running = Writer(store)
    for step in (1, 2, 3):
        commit_checkpoint(store, fake(tmp_path, step, "a"), writer=running)
    target = scan_directory(store).committed[0]
    assert target.step == 1
    decisions = []

    def resume(state):  # what cloudckpt.rollback decides (rollback.py), with the race put in its window
        decisions.append(state.last_index)
        if target.commit_id in state.retired:
            raise cloudckpt.CheckpointNotFoundError("deleted while rolling back; nothing was changed")
        if len(decisions) == 1:  # the running writer's retention retires the target meanwhile
            names = ["model.ckpt-1.manifest.json", *(f.name for f in target.files)]
            assert running.delete(names, retire=(target.commit_id,), reason="retention")
        return target.commit_id

    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="deleted while rolling back"):
        Writer(store).register(resume, reason="rollback")
    assert len(decisions) == 2
    running.state()  # not fenced: no writer entry was appended
    assert [c.step for c in cloudckpt.list_checkpoints(url)] == [2, 3]
    assert cloudckpt.latest_checkpoint(url).step == 3
