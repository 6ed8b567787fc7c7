"""A custom TF2 training loop (``tf.function``, Keras Adam) with ``cloudckpt.CheckpointManager``, for subprocess tests.

Usage:
  python tf2_trainer.py train URL OPTIONS_JSON LOCAL_DIR EXPECT_DIR [--save-every N] [--last-step N]
                              [--async] [--preemption none|sigterm] [--step-sleep SECONDS]
  python tf2_trainer.py restore URL OPTIONS_JSON LOCAL_DIR OUT_NPZ

``train`` restores (``restore_or_initialize``), prints ``WRITER <id>`` and ``FIRST_STEP <n>``, then
trains; before each save it writes every model variable and optimizer variable (Adam's slots and
iterations) to ``EXPECT_DIR/expected-<step>.npz`` (what the checkpoint of that step holds). It prints
``STEP <n>`` after each step and ``COMMITTED <n>`` when a newer commit has landed. It runs until killed,
``--last-step`` (then ``close()``, ``DONE <stats>``), or a preemption notice (``should_stop()``: a final
save, ``close()``, ``PREEMPTED <step> <committed>``). A fenced writer prints ``FENCED <message>`` and exits 3.

``restore`` starts from LOCAL_DIR (empty on a new VM), calls ``restore_or_initialize()``, writes the
restored values to OUT_NPZ and prints ``RESTORED <step> <path>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cloudckpt  # noqa: E402


def build() -> tuple[tf.keras.Model, tf.keras.optimizers.Optimizer, tf.Variable, tf.train.Checkpoint]:
    """The same model, optimizer and step counter in every process (weights from a fixed seed)."""
    tf.keras.utils.set_random_seed(7)
    model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, activation="relu"),
                                 tf.keras.layers.Dense(1)])
    optimizer = tf.keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)  # slots exist before a restore fills them
    step = tf.Variable(0, dtype=tf.int64, name="step")
    return model, optimizer, step, tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)


def values(model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer, step: tf.Variable) -> dict:
    out = {f"model_{i}": np.asarray(v.numpy()) for i, v in enumerate(model.weights)}
    out.update({f"optimizer_{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)})
    out["step"] = np.asarray(step.numpy())
    return out


def save_npz(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def train(args: argparse.Namespace, options: dict) -> int:
    model, optimizer, step, checkpoint = build()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(64, 8)), tf.float32)
    y = tf.constant(rng.normal(size=(64, 1)), tf.float32)

    @tf.function
    def train_step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        step.assign_add(1)
        return loss

    manager = cloudckpt.CheckpointManager(checkpoint, args.url, max_to_keep=3, local_dir=args.local_dir,
                                          storage_options=options, checkpoint_name="ckpt",
                                          preemption=None if args.preemption == "none" else args.preemption)
    save_options = tf.train.CheckpointOptions(enable_async=True) if args.use_async else None
    try:
        manager.restore_or_initialize()
        print(f"WRITER {manager.writer_id}", flush=True)
        print(f"FIRST_STEP {int(step.numpy())}", flush=True)
        committed = None
        while True:
            train_step()
            current = int(step.numpy())
            stop = manager.should_stop()  # once per step: a notice between two calls would skip the final save
            if current % args.save_every == 0 or stop:
                save_npz(os.path.join(args.expect_dir, f"expected-{current}.npz"), values(model, optimizer, step))
                manager.save(checkpoint_number=current, options=save_options)
            print(f"STEP {current}", flush=True)
            last = manager.stats().last_committed_step
            if last is not None and last != committed:
                committed = last
                print(f"COMMITTED {last}", flush=True)
            if stop:
                manager.close()
                print(f"PREEMPTED {current} {manager.stats().last_committed_step}", flush=True)
                return 0
            if args.last_step is not None and current >= args.last_step:
                manager.close()
                print(f"DONE {json.dumps(manager.stats().__dict__)}", flush=True)
                return 0
            if args.step_sleep:
                time.sleep(args.step_sleep)
    except cloudckpt.FencedError as exc:
        print(f"FENCED {exc}", flush=True)
        return 3


def restore(args: argparse.Namespace, options: dict) -> int:
    model, optimizer, step, checkpoint = build()
    with cloudckpt.CheckpointManager(checkpoint, args.url, max_to_keep=3, local_dir=args.local_dir,
                                     storage_options=options) as manager:
        path = manager.restore_or_initialize()
        save_npz(args.out, values(model, optimizer, step))
        print(f"RESTORED {int(step.numpy())} {path}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "restore"])
    parser.add_argument("url")
    parser.add_argument("options", help="storage_options as JSON")
    parser.add_argument("local_dir")
    parser.add_argument("target", help="train: directory for expected-<step>.npz; restore: output .npz")
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--last-step", type=int)
    parser.add_argument("--async", dest="use_async", action="store_true")
    parser.add_argument("--preemption", default="none")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    args = parser.parse_args()
    options = json.loads(args.options)
    if args.mode == "train":
        args.expect_dir = args.target
        return train(args, options)
    args.out = args.target
    return restore(args, options)


if __name__ == "__main__":
    sys.exit(main())
