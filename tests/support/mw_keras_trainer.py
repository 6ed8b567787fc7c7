"""One worker of a tf-keras ``model.fit`` under MultiWorkerMirroredStrategy with cloudckpt.keras.BackupAndRestore.

Usage: python mw_keras_trainer.py URL OPTIONS_JSON LOCAL_DIR OUT_DIR [--epochs N] [--steps N]
                                  [--preemption none|sigterm] [--batch-sleep SECONDS]
                                  [--retry-attempts N] [--linger SECONDS]

Runs with ``TF_USE_LEGACY_KERAS=1`` (tf-keras: Keras 3's ``fit`` does not run under this strategy,
keras-team/keras#20585); ``TF_CONFIG`` names the cluster and this task. Every worker reads the same
batches. Prints ``RESTORED <step|None>`` and ``START_EPOCH <e>`` when training begins, ``BATCH <e> <b>``
after each batch, and ``DONE preempted=<bool> iterations=<n>``, then ``STATS <json>``. Writes
``OUT_DIR/first-<task>.npz`` (weights and optimizer variables after the restore) and
``OUT_DIR/last-<task>.npz``. An exception from cloudckpt ends ``fit`` with ``ERROR <iterations> <type>
<message>``; the process stays alive ``--linger`` seconds, then exits with 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import cloudckpt.keras  # noqa: E402
from task_script import (FitProgress, add_failure_arguments, report_failure, retry_policy,  # noqa: E402
                         task_arguments, this_task)


def state(model: keras.Model) -> dict:
    out = {f"w{i}": np.asarray(v) for i, v in enumerate(model.get_weights())}
    out.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables())})
    return out


class Report(FitProgress, keras.callbacks.Callback):
    epoch_line, every_epoch = "START_EPOCH", False

    def __init__(self, out: str, name: str, batch_sleep: float) -> None:
        super().__init__()
        self.out, self.name, self.batch_sleep = out, name, batch_sleep

    def on_train_begin(self, logs=None):
        np.savez(os.path.join(self.out, f"first-{self.name}.npz"), **state(self.model))


def main() -> int:
    parser = task_arguments("out_dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--preemption", default="none")
    parser.add_argument("--batch-sleep", type=float, default=0.0)
    add_failure_arguments(parser)
    args = parser.parse_args()
    name, _ = this_task()

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)])
        model.compile(keras.optimizers.Adam(0.01), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)

    backup = cloudckpt.keras.BackupAndRestore(
        args.url, delete_checkpoint=False, local_dir=args.local_dir, storage_options=json.loads(args.options),
        preemption=None if args.preemption == "none" else args.preemption, retry=retry_policy(args))
    report = Report(args.out_dir, name, args.batch_sleep)

    class Restored(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            print(f"RESTORED {backup.restored.step if backup.restored is not None else None}", flush=True)

    try:
        model.fit(dataset, epochs=args.epochs, steps_per_epoch=args.steps, verbose=0,
                  callbacks=[backup, Restored(), report])
    except cloudckpt.CloudCkptError as exc:
        return report_failure(exc, int(model.optimizer.iterations.numpy()), args.linger)
    np.savez(os.path.join(args.out_dir, f"last-{name}.npz"), **state(model))
    iterations = int(model.optimizer.iterations.numpy())
    print(f"DONE preempted={backup.preempted} iterations={iterations}", flush=True)
    print(f"STATS {json.dumps(dataclasses.asdict(backup.stats()))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
