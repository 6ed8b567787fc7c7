"""One task of a TF1 between-graph replication job with a parameter server (``MonitoredTrainingSession``).

Usage: python mw_tf1_trainer.py URL OPTIONS_JSON LOCAL_DIR [--last-step N] [--save-steps N] [--sharded-saver]

``TF_CONFIG`` names the cluster and this task. A ``ps`` task serves its variables until killed. A
``worker`` builds the graph with ``replica_device_setter`` (the global step, weights, biases and the
momentum slots live on the PS), and trains with ``MonitoredTrainingSession(master=server.target,
is_chief=..., chief_only_hooks=[cloudckpt.CheckpointSaverHook(...)])`` until the global step reaches
``--last-step``. ``--sharded-saver`` hands the hook ``Saver(sharded=True)`` (TF's default), which the
hook must refuse.

Prints ``FIRST_STEP <n>`` (the global step the session starts at), ``STEP <n>`` after each step,
``RESTORED <step|None>`` (the chief: what the hook downloaded), ``DONE <n>``, and ``STATS <json>`` (the chief's hook stats) or ``ERROR <type>: <message>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cloudckpt  # noqa: E402
from task_script import task_arguments  # noqa: E402


def main() -> int:
    parser = task_arguments()
    parser.add_argument("--last-step", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.02)
    parser.add_argument("--sharded-saver", action="store_true")
    args = parser.parse_args()
    config = json.loads(os.environ["TF_CONFIG"])
    job, index = config["task"]["type"], config["task"]["index"]
    cluster = tf.train.ClusterSpec(config["cluster"])
    tf.compat.v1.disable_eager_execution()
    server = tf.distribute.Server(cluster, job_name=job, task_index=index)
    if job == "ps":
        print("SERVING", flush=True)
        server.join()
        return 0

    is_chief = index == 0
    if not is_chief:
        # A non-chief's session waits for the chief to initialize the variables, polling every 30 s
        # (SessionManager's recovery_wait_secs, not an argument of MonitoredTrainingSession): 1 s here.
        from tensorflow.python.training import session_manager
        defaults = list(session_manager.SessionManager.__init__.__defaults__)
        defaults[4] = 1
        session_manager.SessionManager.__init__.__defaults__ = tuple(defaults)
    rng = np.random.default_rng(index)
    with tf.compat.v1.Graph().as_default():
        with tf.compat.v1.device(tf.compat.v1.train.replica_device_setter(
                worker_device=f"/job:worker/task:{index}", cluster=cluster)):
            global_step = tf.compat.v1.train.get_or_create_global_step()
            w = tf.compat.v1.get_variable("w", [8, 1], initializer=tf.compat.v1.ones_initializer())
            b = tf.compat.v1.get_variable("b", [1], initializer=tf.compat.v1.zeros_initializer())
            x = tf.constant(rng.normal(size=(32, 8)), tf.float32)
            y = tf.constant(rng.normal(size=(32, 1)), tf.float32)
            loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + b - y))
            train_op = tf.compat.v1.train.MomentumOptimizer(0.01, 0.9).minimize(loss, global_step=global_step)
            saver = tf.compat.v1.train.Saver(sharded=True) if args.sharded_saver else None
        hook = cloudckpt.CheckpointSaverHook(args.url, save_steps=args.save_steps, saver=saver,
                                             local_dir=args.local_dir, storage_options=json.loads(args.options))
        try:
            with tf.compat.v1.train.MonitoredTrainingSession(
                    master=server.target, is_chief=is_chief, checkpoint_dir=hook.local_dir if is_chief else None,
                    save_checkpoint_secs=None, save_summaries_steps=None, save_summaries_secs=None, log_step_count_steps=None,
                    chief_only_hooks=[hook], hooks=[tf.compat.v1.train.StopAtStepHook(last_step=args.last_step)],
                    config=tf.compat.v1.ConfigProto(device_filters=["/job:ps", f"/job:worker/task:{index}"])) as sess:
                if is_chief:
                    print(f"RESTORED {hook.restored.step if hook.restored is not None else None}", flush=True)
                print(f"FIRST_STEP {sess.run(global_step)}", flush=True)
                step = None
                while not sess.should_stop():
                    _, step = sess.run([train_op, global_step])
                    print(f"STEP {step}", flush=True)
                    time.sleep(args.step_sleep)
        except cloudckpt.ConfigError as exc:
            print(f"ERROR ConfigError: {exc}", flush=True)
            return 2
    print(f"DONE {step}", flush=True)
    if is_chief:
        stats = dataclasses.asdict(hook.stats())
        stats["hook_task"] = hook.task
        print(f"STATS {json.dumps(stats)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
