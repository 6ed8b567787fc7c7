"""Keras 3 callbacks (issue 14): ``cloudckpt.keras.BackupAndRestore`` and ``cloudckpt.keras.ModelCheckpoint``.

Real ``model.fit`` runs (a tiny MLP, Adam) against the moto S3 server on 127.0.0.1. What was saved is
checked independently of cloudckpt: the tests record the model's weights, optimizer variables and
``optimizer.iterations`` themselves (tests/support/keras_model.py) and compare them with what a fresh
model, on an empty local disk, holds after the callback restored it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import cloudckpt
import cloudckpt.keras
from support.checks import log_entries, newest_writer_id, remote_fs
from support.keras_model import BATCH_SIZE, Probe, RaiseAtEpoch, State, data, make_model
from support.trainer_process import TrainerProcess

KERAS_TRAINER = Path(__file__).parent / "support" / "keras_trainer.py"
STEPS_PER_EPOCH = 4


def fit(model, callbacks, epochs, **kwargs):
    x, y = data()
    return model.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, verbose=0, callbacks=callbacks, **kwargs)


def backup(url, options, local_dir, **kwargs) -> cloudckpt.keras.BackupAndRestore:
    return cloudckpt.keras.BackupAndRestore(url, storage_options=options, local_dir=str(local_dir), **kwargs)


def flip_byte(url, options, name):
    """Corrupt one committed object in place (same size), as bit rot or a buggy tool would."""
    fs, root = remote_fs(url, options)
    body = bytearray(fs.cat_file(f"{root}/{name}"))
    body[len(body) // 2] ^= 0xFF
    fs.pipe_file(f"{root}/{name}", bytes(body))


def objects_outside_log(url, options) -> list[str]:
    fs, root = remote_fs(url, options)
    return sorted(p[len(root) + 1:] for p in fs.find(root) if not p[len(root) + 1:].startswith(".cloudckpt/"))


# -- BackupAndRestore ------------------------------------------------------------------------------------


def test_interrupted_fit_resumes_at_epoch_3_with_saved_optimizer_state(s3_url, s3_options, tmp_path):
    first_probe = Probe()
    first = backup(s3_url, s3_options, tmp_path / "vm1")
    model = make_model(seed=1)
    with pytest.raises(RuntimeError, match="interrupted at epoch 3"):
        fit(model, [first, first_probe, RaiseAtEpoch(3)], epochs=6)
    first.close()  # what the process does on its way out: the last epoch's backup is committed
    saved = first_probe.at_epoch_end[2]
    assert saved.iterations == 3 * STEPS_PER_EPOCH

    # A new VM: a fresh model with other initial weights, an empty local directory.
    probe = Probe()
    second = backup(s3_url, s3_options, tmp_path / "vm2")
    model = make_model(seed=2)
    history = fit(model, [second, probe], epochs=6)
    assert probe.epochs == [3, 4, 5]
    assert len(history.history["loss"]) == 3
    probe.begin.assert_equal(saved)  # weights, every optimizer variable, and optimizer.iterations
    assert second.restored is not None and second.restored.step == saved.iterations
    assert int(model.optimizer.iterations) == 6 * STEPS_PER_EPOCH


def test_integer_save_freq_resumes_in_the_epoch_it_saved(s3_url, s3_options, tmp_path):
    class RaiseAtBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if int(self.model.optimizer.iterations) == 11:  # epoch 2, batch 3
                raise RuntimeError("interrupted")

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.states: dict[int, State] = {}

        def on_train_batch_end(self, batch, logs=None):
            self.states[int(self.model.optimizer.iterations)] = State.of(self.model)

    record = Record()
    cb = backup(s3_url, s3_options, tmp_path / "vm1", save_freq=3, delete_checkpoint=False, max_to_keep=None)
    with pytest.raises(RuntimeError):
        fit(make_model(seed=1), [cb, record, RaiseAtBatch()], epochs=5)

    # Keras' documented pattern: fit again with the same callback (not closed: it waits for the backups
    # still uploading, then restores the newest).
    probe = Probe()
    model = make_model(seed=2)
    fit(model, [cb, probe], epochs=5)
    assert cb.restored is not None and cb.restored.step == 9  # iterations 9: epoch 2, batch 0
    assert probe.epochs[0] == 2  # Keras semantics: the epoch in progress is run again
    probe.begin.assert_equal(record.states[9])
    # Every 3 batches, across both runs (the second re-ran epoch 2 from iterations 9 on).
    assert [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)] == [3, 6, 9, 12, 15, 18, 21]


def preempt_keras_trainer(url, moto_server, tmp_path, *args) -> tuple[TrainerProcess, int]:
    """Run ``KERAS_TRAINER`` (50 epochs, SIGTERM as the notice, a 60 s deadline, ``args`` added), SIGTERM it in
    epoch 3 (0-based) after batch 1 and check it exits 0, preempted; returns it and the iterations it ran."""
    dump = tmp_path / "dump"
    dump.mkdir()
    trainer = TrainerProcess(url, moto_server.endpoint, str(tmp_path / "vm1"), str(dump), "--epochs", "50", *args,
                             "--preemption", "sigterm", "--deadline", "60", "--batch-sleep", "0.05",
                             script=KERAS_TRAINER)
    try:
        trainer.wait_for_line("BATCH 3 1")  # three epochs ended
        trainer.terminate()
        assert trainer.wait(120) == 0, trainer.stderr
    finally:
        if trainer.proc.poll() is None:
            trainer.kill()
    done = trainer.wait_for_line("DONE")
    assert "preempted=True" in done, done
    return trainer, int(done.rsplit("=", 1)[1])


def test_sigterm_preemption_saves_the_current_batch_and_resumes(moto_server, cloudckpt_s3, tmp_path, caplog):
    """Also the messages: they number epochs and batches as Keras shows them (1-based: the 0-based epoch 3
    is Keras' "Epoch 4/50"); they said "saving a backup at epoch 3, batch 1"."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    trainer, iterations = preempt_keras_trainer(url, moto_server, tmp_path)
    assert 3 * STEPS_PER_EPOCH + 2 <= iterations <= 4 * STEPS_PER_EPOCH  # a batch of epoch 3 (after batch 1)
    assert "EPOCH 4" not in "".join(trainer.output)
    latest = cloudckpt.latest_checkpoint(url, options)
    assert latest is not None and latest.step == iterations  # the batch it stopped at is committed
    batch = iterations - 3 * STEPS_PER_EPOCH  # 1-based, in Keras' 4th epoch (0-based epoch 3)
    assert f"saving a backup in epoch 4/50, after batch {batch} (step {iterations}) and stopping training" \
        in trainer.stderr, trainer.stderr

    probe = Probe()
    model = make_model(seed=3)
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        fit(model, [backup(url, options, tmp_path / "vm2"), probe], epochs=5)
    assert probe.epochs == [3, 4]  # resumes at epoch 3, the one it was preempted in
    (restored,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Restored backup step")]
    assert f"(saved in epoch 4/5, after batch {batch})" in restored, restored
    assert "training resumes at epoch 4." in restored, restored
    probe.begin.assert_equal(State.load(str(tmp_path / "dump" / f"iter-{iterations}.npz")))


def test_save_freq_false_backs_up_only_at_the_preemption_notice(moto_server, cloudckpt_s3, tmp_path):
    """Keras 3's ``save_freq=False`` ("only if using preemption checkpointing"): no backup at any epoch's end,
    one at the SIGTERM; it restores. It used to raise ConfigError ("save_freq must be 'epoch' or ...")."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    trainer, iterations = preempt_keras_trainer(url, moto_server, tmp_path, "--save-freq", "false")
    assert 3 * STEPS_PER_EPOCH + 2 <= iterations <= 4 * STEPS_PER_EPOCH
    # Exactly the preemption's backup (with save_freq="epoch" the backups of steps 8 and 12 were there too).
    assert [c.step for c in cloudckpt.list_checkpoints(url, options)] == [iterations]

    probe = Probe()
    model = make_model(seed=3)
    fit(model, [backup(url, options, tmp_path / "vm2"), probe], epochs=5)
    assert probe.epochs == [3, 4]
    probe.begin.assert_equal(State.load(str(tmp_path / "dump" / f"iter-{iterations}.npz")))


def test_save_freq_false_without_preemption_is_a_config_error(s3_url, s3_options, tmp_path):
    with pytest.raises(cloudckpt.ConfigError, match=r"save_freq=False .* preemption is None"):
        cloudckpt.keras.BackupAndRestore(s3_url, save_freq=False)
    with pytest.raises(cloudckpt.ConfigError, match="save_freq must be"):
        cloudckpt.keras.BackupAndRestore(s3_url, save_freq=True, preemption="sigterm")


def test_corrupt_newest_backup_falls_back_to_the_previous_one(s3_url, s3_options, tmp_path):
    probe = Probe()
    first = backup(s3_url, s3_options, tmp_path / "vm1", delete_checkpoint=False)
    fit(make_model(seed=1), [first, probe], epochs=3)
    # max_to_keep=2 (the default): while fit runs, older backups are deleted; the newest two stay
    assert [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)] == [2 * STEPS_PER_EPOCH,
                                                                               3 * STEPS_PER_EPOCH]
    newest = cloudckpt.latest_checkpoint(s3_url, s3_options)
    assert newest.step == 3 * STEPS_PER_EPOCH
    weights = [f.name for f in newest.files if f.name.endswith(".weights.h5")]
    assert len(weights) == 1
    flip_byte(s3_url, s3_options, weights[0])

    restored = Probe()
    second = backup(s3_url, s3_options, tmp_path / "vm2")
    fit(make_model(seed=2), [second, restored], epochs=4)
    assert restored.epochs == [2, 3]  # the epoch-2 backup: the newest one that verifies
    restored.begin.assert_equal(probe.at_epoch_end[1])


def test_sigkill_during_saves_never_restores_a_state_that_was_not_saved(moto_server, tmp_path):
    kill_trials(moto_server, tmp_path, trials=1, seed=7)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_soak(moto_server, tmp_path):
    kill_trials(moto_server, tmp_path, trials=12, seed=11)


def kill_trials(moto_server, tmp_path, trials: int, seed: int) -> None:
    """SIGKILL a trainer that saves after every batch at a random moment (uploads always in flight); a fresh
    model on an empty disk then restores exactly a state the trainer saved (dumped before each save)."""
    rng = random.Random(seed)
    url = moto_server.create_bucket(f"kcrash-{rng.getrandbits(40):010x}") + "/run"
    options = moto_server.storage_options
    dump = tmp_path / "dump"
    dump.mkdir()
    before = -1
    for trial in range(trials):
        trainer = TrainerProcess(url, moto_server.endpoint, str(tmp_path / f"vm{trial}"), str(dump),
                                 "--save-freq", "1", "--batch-sleep", "0.01", script=KERAS_TRAINER)
        try:
            trainer.wait_for_line("BATCH ")
            deadline = time.monotonic() + 120
            while (latest := cloudckpt.latest_checkpoint(url, options)) is None or latest.step <= before:
                assert trainer.proc.poll() is None and time.monotonic() < deadline, trainer.stderr
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 1.0))  # this run has committed; more saves are uploading
        finally:
            trainer.kill()
        latest = cloudckpt.latest_checkpoint(url, options)
        assert latest is not None and latest.step > before, f"trial {trial}: no progress:\n{trainer.stderr}"
        before = latest.step
        assert cloudckpt.verify(url, latest.step, storage_options=options).ok
        probe = Probe()
        cb = backup(url, options, tmp_path / f"restore{trial}", delete_checkpoint=False)
        fit(make_model(seed=5), [cb, probe], epochs=0)
        assert probe.begin.iterations == latest.step
        probe.begin.assert_equal(State.load(str(dump / f"iter-{latest.step}.npz")))


def test_delete_checkpoint_after_success_uncommits_everything(s3_url, s3_options, tmp_path, caplog):
    cb = backup(s3_url, s3_options, tmp_path / "vm1", delete_checkpoint=False)
    fit(make_model(seed=1), [cb], epochs=2)
    assert [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)] == [4, 8]

    # A second run resumes at epoch 2, trains 2 more epochs and, having finished, deletes the backup.
    probe = Probe()
    cb = backup(s3_url, s3_options, tmp_path / "vm1")
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        fit(make_model(seed=2), [cb, probe], epochs=4)
    assert probe.epochs == [2, 3]
    # each deletion's log line says what it is: max_to_keep's during fit, delete_checkpoint's at its end (all
    # were "Retention:", fresh-user trial)
    deletions = [r.getMessage().split(": deleted checkpoint step ") for r in caplog.records
                 if ": deleted checkpoint step " in r.getMessage()]
    by_reason: dict[str, set[int]] = {}
    for why, rest in deletions:
        by_reason.setdefault(why, set()).add(int(rest.split()[0]))
    assert set(by_reason) == {"Retention", "Training finished (delete_checkpoint=True)"}, deletions
    assert {12, 16} <= by_reason["Training finished (delete_checkpoint=True)"] and by_reason["Retention"] <= {4, 8}
    assert cloudckpt.list_checkpoints(s3_url, s3_options, include_superseded=True) == []
    assert objects_outside_log(s3_url, s3_options) == []  # no manifest vouching for missing files, no debris
    retired = {cid for e in log_entries(s3_url, s3_options) if e["type"] == "delete" for cid in e.get("retire", ())}
    committed = {e["commit_id"] for e in log_entries(s3_url, s3_options) if e["type"] == "commit"}
    assert committed and committed <= retired  # every commit was retired in the log before its files went

    # Nothing to restore any more: the next fit starts from scratch.
    probe = Probe()
    fit(make_model(seed=3), [backup(s3_url, s3_options, tmp_path / "vm2"), probe], epochs=1)
    assert probe.epochs == [0] and probe.begin.iterations == 0


def test_a_new_callback_always_restores_so_its_saves_never_go_below_the_head(s3_url, s3_options, tmp_path):
    """Unlike the TF adapters, BackupAndRestore has no way to train without restoring: a new callback restores
    the newest committed backup when training begins (same VM or fresh), so its first save is above it and
    nothing is superseded, even with max_to_keep=1 (retention would delete a superseded head first)."""
    def callback(vm):
        return backup(s3_url, s3_options, tmp_path / vm, delete_checkpoint=False, max_to_keep=1)

    fit(make_model(seed=1), [callback("vm1")], epochs=3)
    rows = lambda: [(c.step, c.status) for c in cloudckpt.list_checkpoints(s3_url, s3_options,  # noqa: E731
                                                                         include_superseded=True)]
    assert rows() == [(12, "committed")]
    for vm, epochs, head in (("vm1", 4, 12), ("vm2", 5, 16)):  # the VM that wrote it, then a fresh one
        probe, cb = Probe(), callback(vm)
        fit(make_model(seed=2), [cb, probe], epochs=epochs)  # a fresh model: iterations 0 before the restore
        assert cb.restored is not None and cb.restored.step == head
        assert probe.begin.iterations == head and probe.epochs == [epochs - 1]
        assert rows() == [(head + STEPS_PER_EPOCH, "committed")]


def test_a_newer_writer_fences_the_callback(s3_url, s3_options, tmp_path):
    cb = backup(s3_url, s3_options, tmp_path / "vm1")

    class RollBack(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                cb.wait()
                cloudckpt.rollback(s3_url, 4, storage_options=s3_options)  # registers a newer writer

    with pytest.raises(cloudckpt.FencedError) as info:
        fit(make_model(seed=1), [cb, RollBack()], epochs=5)
    assert "newer writer" in str(info.value).lower() or info.value.newer_writer
    cb.close()  # Keras tells callbacks nothing when fit() raises: the process's way out does this
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == 4


def test_two_callbacks_of_one_process_on_one_directory_are_told_so_when_fenced(s3_url, s3_options, tmp_path):
    """BackupAndRestore(url) and ModelCheckpoint(url + '/m-...') in one fit(): the second registered on the
    directory fenced the first, whose FencedError said 'make sure one job trains into one checkpoint directory',
    although one job was training. Now it names this process as the newer writer and two objects of it."""
    cb = backup(s3_url, s3_options, tmp_path / "vm1", delete_checkpoint=False)
    models = cloudckpt.keras.ModelCheckpoint(s3_url + "/m-{epoch:02d}.keras", storage_options=s3_options)
    with pytest.raises(cloudckpt.FencedError) as info:
        fit(make_model(seed=1), [cb, models], epochs=3)
    cb.close()
    models.close()
    message = str(info.value)
    assert f"(pid {os.getpid()}," in message and "this same process" in message
    assert "Two cloudckpt objects of this process write into one checkpoint directory" in message
    assert "its own checkpoint directory" in message and "one job trains" not in message


def test_numpy_integers_are_taken_as_ints(s3_url, s3_options, tmp_path):
    backup = cloudckpt.keras.BackupAndRestore(s3_url, save_freq=np.int64(3), max_to_keep=np.int64(2),
                                              storage_options=s3_options, local_dir=str(tmp_path / "b"))
    assert backup.save_freq == 3 and type(backup.save_freq) is int
    backup.close()


def test_bad_arguments_fail_before_training(s3_url, s3_options, tmp_path):
    with pytest.raises(cloudckpt.ConfigError, match="save_freq"):
        cloudckpt.keras.BackupAndRestore(s3_url, save_freq=0)
    with pytest.raises(cloudckpt.ConfigError, match="save_freq"):
        cloudckpt.keras.BackupAndRestore(s3_url, save_freq="batch")
    with pytest.raises(cloudckpt.ConfigError, match="backup_dir"):
        cloudckpt.keras.BackupAndRestore("")
    with pytest.raises(cloudckpt.ConfigError, match="max_to_keep"):
        cloudckpt.keras.BackupAndRestore(s3_url, max_to_keep=0)
    with pytest.raises(cloudckpt.ConfigError, match=r"\.keras"):
        cloudckpt.keras.ModelCheckpoint(s3_url + "/model-{epoch}.txt")
    with pytest.raises(cloudckpt.ConfigError, match=r"\.weights\.h5"):
        cloudckpt.keras.ModelCheckpoint(s3_url + "/model.keras", save_weights_only=True)
    missing = s3_url.split("/")[2] + "-missing"
    with pytest.raises(cloudckpt.CloudCkptError, match=missing):
        fit(make_model(), [backup(f"s3://{missing}/run", s3_options, tmp_path / "vm")], epochs=1)


def test_a_backup_of_another_model_is_refused(s3_url, s3_options, tmp_path):
    fit(make_model(seed=1), [backup(s3_url, s3_options, tmp_path / "vm1", delete_checkpoint=False)], epochs=1)
    writer = newest_writer_id(s3_url, s3_options)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    other.compile(keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
    with pytest.raises(cloudckpt.ConfigError, match="does not fit this model") as info:
        fit(other, [backup(s3_url, s3_options, tmp_path / "vm2")], epochs=2)
    assert s3_url in str(info.value) and "step 4" in str(info.value)
    assert cloudckpt.latest_checkpoint(s3_url, s3_options).step == 4  # nothing was deleted or overwritten
    assert newest_writer_id(s3_url, s3_options) == writer  # refused before registering: a job there is not fenced
    # What failed, short: not Keras' whole text (~4 KB, dumping every value of the variable); that is chained
    # (__cause__; Keras' traceback filtering in fit() re-raises it "from None", which leaves it as __context__).
    message = str(info.value)
    keras_error = info.value.__cause__ or info.value.__context__
    assert len(message) < 1000 and "value=[" not in message and "value=[" in str(keras_error), message
    assert "shape (4, 3) in the model, (4, 8) in the backup" in message
    assert "could not be loaded" in message and "not loaded: dense" in message


def test_import_cloudckpt_imports_neither_keras_nor_tensorflow():
    code = "import sys, cloudckpt; print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]"


# -- ModelCheckpoint -------------------------------------------------------------------------------------


class Score(keras.callbacks.Callback):
    """Puts a scripted ``score`` into the epoch logs (before ModelCheckpoint reads them)."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.values[epoch]


def test_model_checkpoint_save_best_only_commits_exactly_the_improving_epochs(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("best"), cloudckpt_s3.storage_options
    probe = Probe()
    cb = cloudckpt.keras.ModelCheckpoint(url + "/model-{epoch:02d}-{score:.2f}.keras", monitor="score", mode="min",
                                         save_best_only=True, storage_options=options)
    model = make_model(seed=1)
    fit(model, [Score([3.0, 2.0, 4.0, 1.0, 5.0]), cb, probe], epochs=5)
    committed = cloudckpt.list_checkpoints(url, options)
    # Stored names carry the step (optimizer.iterations at the save) before the extension.
    names = [f.name for c in committed for f in c.files]
    assert names == ["model-01-3.00-4.keras", "model-02-2.00-8.keras", "model-04-1.00-16.keras"]
    assert [c.step for c in committed] == [4, 8, 16]

    listing = subprocess.run([sys.executable, "-m", "cloudckpt.cli", "ls", url, "--json",
                              "-o", f"endpoint_url={options['endpoint_url']}"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["step"], r["status"]) for r in rows] == [(4, "committed"), (8, "committed"), (16, "committed")]

    pulled = tmp_path / "pulled"
    cloudckpt.download_checkpoint(url, str(pulled), step=8, storage_options=options)
    loaded = keras.models.load_model(str(pulled / "model-02-2.00-8.keras"))
    x, _ = data()
    expected = make_model(seed=9)
    expected.set_weights(probe.at_epoch_end[1].weights)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected.predict(x, verbose=0), rtol=0, atol=0)
    assert int(loaded.optimizer.iterations) == 8


def test_model_checkpoint_weights_every_n_batches(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("weights"), cloudckpt_s3.storage_options
    probe = Probe()
    cb = cloudckpt.keras.ModelCheckpoint(url + "/w-{epoch}-{batch}.weights.h5", save_weights_only=True, save_freq=6,
                                         storage_options=options)
    fit(make_model(seed=1), [cb, probe], epochs=3)
    committed = cloudckpt.list_checkpoints(url, options)
    assert [(c.step, [f.name for f in c.files]) for c in committed] == [
        (6, ["w-2-2-6.weights.h5"]), (12, ["w-3-4-12.weights.h5"])]
    cloudckpt.download_checkpoint(url, str(tmp_path / "pulled"), storage_options=options)
    model = make_model(seed=2)
    model.optimizer.build(model.trainable_variables)  # so load_weights restores the optimizer state too
    model.load_weights(str(tmp_path / "pulled" / "w-3-4-12.weights.h5"))
    State.of(model).assert_equal(probe.at_epoch_end[2])


def test_model_checkpoint_verbose_names_the_stored_object(cloudckpt_s3, capsys):
    """Keras' verbose "saving model to ..." used to name the template's file (m-1.keras), not what is stored."""
    url, options = cloudckpt_s3.url("verbose"), cloudckpt_s3.storage_options
    cb = cloudckpt.keras.ModelCheckpoint(url + "/m-{epoch}.keras", verbose=1, storage_options=options)
    best = cloudckpt.keras.ModelCheckpoint(cloudckpt_s3.url("best") + "/best.keras", monitor="score", mode="min",
                                           save_best_only=True, verbose=1, storage_options=options)
    fit(make_model(seed=1), [Score([3.0, 2.0]), cb, best], epochs=2)
    cb.close()
    best.close()
    out = capsys.readouterr().out
    assert [c.name for c in cloudckpt.list_checkpoints(url, options)] == ["m-1-4", "m-2-8"]
    assert f"Epoch 1: saving model to {url}/m-1-4.keras" in out, out
    assert f"Epoch 2: saving model to {url}/m-2-8.keras" in out, out
    assert f"improved from 3.00000 to 2.00000, saving model to {cloudckpt_s3.url('best')}/best-8.keras" in out, out
    assert "m-1.keras" not in out and "best.keras" not in out, out


def test_model_checkpoint_a_name_saved_again_replaces_the_older_file(cloudckpt_s3):
    url, options = cloudckpt_s3.url("one"), cloudckpt_s3.storage_options
    cb = cloudckpt.keras.ModelCheckpoint(url + "/best.keras", monitor="score", mode="min", save_best_only=True,
                                         storage_options=options)
    fit(make_model(seed=1), [Score([3.0, 2.0, 4.0]), cb], epochs=3)
    # Keras overwrites best.keras; here the newer one is committed, then the older one un-committed and deleted.
    assert [(c.step, [f.name for f in c.files]) for c in cloudckpt.list_checkpoints(url, options)] == [
        (8, ["best-8.keras"])]
    assert objects_outside_log(url, options) == ["best-8.keras", "best-8.manifest.json"]  # no TF state file


def test_model_checkpoint_fit_again_from_scratch_replaces_every_name_it_saves_again(cloudckpt_s3, tmp_path, caplog):
    """A notebook cell run again (a job restarted without BackupAndRestore): ``fit`` from scratch with a fresh
    model and callbacks saves the same stored names at the same steps (``model-01-4.keras``) with other bytes.
    Keras overwrites those files; so does ModelCheckpoint: afterwards every name the second run saved resolves
    to its file (nothing refused, no WARNING), and the first run's file of a name it did not save stays."""
    models, best = cloudckpt_s3.url("rerun/models"), cloudckpt_s3.url("rerun/best")
    options = cloudckpt_s3.storage_options

    def run(seed, scores, epochs):
        probe = Probe()
        callbacks = [cloudckpt.keras.ModelCheckpoint(models + "/model-{epoch:02d}.keras", storage_options=options),
                     cloudckpt.keras.ModelCheckpoint(best + "/best.keras", monitor="score", mode="min",
                                                     save_best_only=True, storage_options=options)]
        fit(make_model(seed=seed), [Score(scores), *callbacks, probe], epochs=epochs)
        return probe, callbacks

    first, _ = run(1, [3.0, 4.0, 5.0], epochs=3)  # best.keras: epoch 1, step 4
    before = {c.name: c.commit_id for c in cloudckpt.list_checkpoints(models, options)}
    assert sorted(before) == ["model-01-4", "model-02-8", "model-03-12"]
    with caplog.at_level(logging.INFO, logger="cloudckpt"):
        second, (every_epoch, best_only) = run(2, [9.0, 10.0], epochs=2)  # best.keras: epoch 1 again, step 4
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], "a WARNING was logged"
    for cb, replaced in ((every_epoch, 2), (best_only, 1)):
        stats = cb.stats()
        assert (stats.committed, stats.replaced, stats.refused, stats.failed, stats.dropped) == (replaced, replaced,
                                                                                                0, 0, 0)

    # Nothing superseded or hidden: the second run's files and the first run's model-03, by step.
    def rows(url):
        return sorted((c.step, [f.name for f in c.files], c.status)
                      for c in cloudckpt.list_checkpoints(url, options, include_superseded=True))
    assert rows(models) == [(4, ["model-01-4.keras"], "committed"), (8, ["model-02-8.keras"], "committed"),
                            (12, ["model-03-12.keras"], "committed")]
    assert rows(best) == [(4, ["best-4.keras"], "committed")]
    after = {c.name: c.commit_id for c in cloudckpt.list_checkpoints(models, options)}
    assert after["model-03-12"] == before["model-03-12"]
    assert after["model-01-4"] != before["model-01-4"] and after["model-02-8"] != before["model-02-8"]
    retired = {cid for e in log_entries(models, options) if e["type"] == "delete" for cid in e.get("retire", ())}
    assert {before["model-01-4"], before["model-02-8"]} <= retired  # un-committed before their files went
    assert objects_outside_log(models, options) == sorted(  # no debris, no manifest of a replaced file
        f"model-{n}{ext}" for n in ("01-4", "02-8", "03-12") for ext in (".keras", ".manifest.json"))

    listing = subprocess.run([sys.executable, "-m", "cloudckpt.cli", "ls", models, "--json",
                              "-o", f"endpoint_url={options['endpoint_url']}"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert [(r["step"], r["status"], r["latest"]) for r in json.loads(listing.stdout)] == [
        (4, "committed", False), (8, "committed", True), (12, "committed", False)]  # latest: the last save

    def pulled(url, step, name):
        directory = tmp_path / f"pull-{name}"
        cloudckpt.download_checkpoint(url, str(directory), step=step, storage_options=options)
        return keras.models.load_model(str(directory / name))

    def assert_weights(model, state):
        assert int(model.optimizer.iterations) == state.iterations
        for a, b in zip(model.get_weights(), state.weights, strict=True):
            np.testing.assert_array_equal(a, b)

    assert_weights(pulled(models, 4, "model-01-4.keras"), second.at_epoch_end[0])
    assert_weights(pulled(models, 8, "model-02-8.keras"), second.at_epoch_end[1])
    assert_weights(pulled(models, 12, "model-03-12.keras"), first.at_epoch_end[2])  # Keras leaves model-03 too
    cli_pull = subprocess.run([sys.executable, "-m", "cloudckpt.cli", "pull", best, str(tmp_path / "best"),
                               "-o", f"endpoint_url={options['endpoint_url']}"], capture_output=True, text=True)
    assert cli_pull.returncode == 0, cli_pull.stderr
    assert_weights(keras.models.load_model(str(tmp_path / "best" / "best-4.keras")), second.at_epoch_end[0])


def test_model_checkpoint_an_unknown_format_field_is_a_config_error_without_the_credentials(cloudckpt_s3, tmp_path):
    """A typo in a metric of the file name template is found at the first save. Keras' own KeyError quotes the
    raw filepath, and a URL's userinfo with it: the error says the display form, the field and the metrics."""
    import traceback

    secret = "Sk-keras-DO-NOT-LEAK"
    url = cloudckpt_s3.url("typo").replace("s3://", f"s3://AKIDKERAS:{secret}@")
    cb = cloudckpt.keras.ModelCheckpoint(url + "/model-{val_acc:.2f}.keras", monitor="loss",
                                         storage_options={"endpoint_url": cloudckpt_s3.storage_options["endpoint_url"]})
    with pytest.raises(cloudckpt.ConfigError) as info:
        fit(make_model(seed=1), [cb], epochs=1)
    text = "".join(traceback.format_exception(info.value))
    chain = [info.value.__cause__, info.value.__context__]
    assert secret not in text and all(c is None or secret not in str(c) for c in chain)
    message = str(info.value)
    assert "'val_acc'" in message and "loss" in message and url.replace(f"AKIDKERAS:{secret}", "***") in message
    assert cloudckpt.list_checkpoints(url, {"endpoint_url": cloudckpt_s3.storage_options["endpoint_url"]}) == []


def test_model_checkpoint_batch_field_with_save_freq_epoch_says_it_needs_an_integer_save_freq(cloudckpt_s3):
    """Keras formats ``{batch}`` only for saves within an epoch: with ``save_freq="epoch"`` the error must not list
    ``batch`` among the fields available (it did: "not a logged metric ('batch'); fields available: epoch, batch")
    and must say what to change."""
    url, options = cloudckpt_s3.url("batchfield"), cloudckpt_s3.storage_options
    cb = cloudckpt.keras.ModelCheckpoint(url + "/m-{epoch}-{batch}.keras", storage_options=options)
    with pytest.raises(cloudckpt.ConfigError) as info:
        fit(make_model(seed=1), [cb], epochs=1)
    message = str(info.value)
    assert "('batch')" in message and "integer save_freq" in message, message
    assert "fields available at this save: epoch, loss." in message, message


def test_backup_accepts_keras_3s_double_checkpoint(s3_url, s3_options, tmp_path):
    """Keras 3's BackupAndRestore(backup_dir, save_freq, double_checkpoint, delete_checkpoint): a drop-in given
    ``double_checkpoint=True`` got TypeError. Backups here always keep a fallback (max_to_keep=2); with
    max_to_keep=1 there is none, which is refused."""
    cb = backup(s3_url, s3_options, tmp_path / "a", double_checkpoint=True, delete_checkpoint=False)
    fit(make_model(seed=1), [cb], epochs=3)
    assert [c.step for c in cloudckpt.list_checkpoints(s3_url, s3_options)] == [8, 12]  # the fallback is kept
    with pytest.raises(cloudckpt.ConfigError, match="max_to_keep"):
        backup(s3_url, s3_options, tmp_path / "b", double_checkpoint=True, max_to_keep=1)


@pytest.mark.parametrize("epoch, batch, epochs, text", [
    (3, 1, 8, "in epoch 4/8, after batch 2"),  # the state file's 0-based epoch 3, batch 1: Keras' "Epoch 4/8"
    (0, 0, None, "in epoch 1, after batch 1"),
    (4, None, 8, "at the end of epoch 4/8"),  # saved at an epoch's end: 4 epochs completed
])
def test_backup_messages_number_epochs_as_keras_shows_them(epoch, batch, epochs, text):
    """Messages said "epoch 3, batch 1" (0-based) for what Keras shows as "Epoch 4/8" and ModelCheckpoint
    names model-04; the state file keeps its 0-based values."""
    from cloudckpt.keras.backup import _position

    assert _position(epoch, batch, epochs) == text


@pytest.mark.parametrize("name", ["BackupAndRestore", "ModelCheckpoint"])
def test_readme_keras_signatures_list_every_parameter(name):
    """README's Keras section left out ``transfer=`` and ``summary_dir=`` (the API table listed them and they
    work): both of its signatures of each callback name every parameter, in order, as the code has them."""
    import inspect
    import re

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    params = [p for p in inspect.signature(getattr(cloudckpt.keras, name).__init__).parameters if p != "self"]
    section = re.search(rf"\*\*{name}\*\*`\(([^`]*)\)`", readme)
    table = re.search(rf"`keras\.{name}\(([^`]*)\)`", readme)
    for found in (section, table):
        assert found is not None, name
        listed = [part.split("=")[0].strip() for part in found.group(1).split(",") if part.strip() != "*"]
        assert listed == params, (name, listed)
