"""One worker of a MultiWorkerMirroredStrategy job: a custom loop with ``cloudckpt.CheckpointManager``.

Usage: python mw_tf2_trainer.py URL OPTIONS_JSON LOCAL_DIR OUT_DIR [--save-every N] [--last-step N]
                                [--preemption none|sigterm|auto] [--step-sleep SECONDS]
                                [--retry-attempts N] [--linger SECONDS] [--preemption-deadline SECONDS]

``TF_CONFIG`` names the cluster and this task. The model is plain ``tf.Variable`` state created in
the strategy's scope (weights, a momentum slot, the step counter), updated with MEAN aggregation, so
all workers hold the same values after each step while each trains on its own data.

Saves every ``--save-every`` steps, at ``--last-step`` and when ``should_stop()`` turns True.
Prints ``FIRST_STEP <n>`` after ``restore_or_initialize()``, ``STEP <n>`` after each step, and at the
end ``PREEMPTED <step>`` (``should_stop()`` turned True) or ``DONE <step>``, then
``STATS <json>`` (``manager.stats()``, with ``preempted`` and ``is_chief``), and after a notice ``NOTICE <json>``
(the first notice's ``source``, ``detail``, ``deadline``, ``announced``, and ``deadline_in_use``: the seconds
from it to the engine's ``preemption_deadline_at()``). An exception from cloudckpt
ends training with ``ERROR <step> <type> <message>``; the process stays alive ``--linger`` seconds, then
exits with 3. Writes
``OUT_DIR/first-<task>.npz`` (the variables right after the restore) and ``OUT_DIR/last-<task>.npz``
(at the end).
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
from task_script import add_failure_arguments, report_failure, retry_policy, task_arguments, this_task  # noqa: E402


def main() -> int:
    parser = task_arguments("out_dir")
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--last-step", type=int, default=None)
    parser.add_argument("--preemption", default="none")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--preemption-deadline", type=float, default=None)
    parser.add_argument("--summary-dir", default=None)
    parser.add_argument("--no-should-stop", action="store_true", help="a loop that never calls should_stop()")
    parser.add_argument("--no-restore", action="store_true", help="a loop that forgets restore_or_initialize()")
    add_failure_arguments(parser)
    args = parser.parse_args()
    name, index = this_task()

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    mean = tf.VariableAggregation.MEAN
    with strategy.scope():
        w = tf.Variable(tf.ones([8, 1]), aggregation=mean, name="w")
        b = tf.Variable(tf.zeros([1]), aggregation=mean, name="b")
        momentum = tf.Variable(tf.zeros([8, 1]), aggregation=mean, name="momentum")
        step = tf.Variable(0, dtype=tf.int64, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, name="step")
        checkpoint = tf.train.Checkpoint(w=w, b=b, momentum=momentum, step=step)
        manager = cloudckpt.CheckpointManager(
            checkpoint, args.url, max_to_keep=3, local_dir=args.local_dir, storage_options=json.loads(args.options),
            preemption=None if args.preemption == "none" else args.preemption,
            preemption_deadline=args.preemption_deadline, summary_dir=args.summary_dir,
            retry=retry_policy(args))
    rng = np.random.default_rng(index)  # every worker its own data
    x = tf.constant(rng.normal(size=(32, 8)), tf.float32)
    y = tf.constant(rng.normal(size=(32, 1)), tf.float32)

    def replica_step() -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + b - y))
        grad_w, grad_b = tape.gradient(loss, [w, b])
        momentum.assign(0.9 * momentum + grad_w)
        w.assign_sub(0.01 * momentum)
        b.assign_sub(0.01 * grad_b)
        step.assign_add(1)

    @tf.function
    def train_step() -> None:
        strategy.run(replica_step)

    def dump(path: str) -> None:
        np.savez(path, w=w.numpy(), b=b.numpy(), momentum=momentum.numpy(), step=step.numpy())

    current = -1
    try:
        if not args.no_restore:
            manager.restore_or_initialize()
        current = int(step.numpy())
        print(f"FIRST_STEP {current}", flush=True)
        dump(os.path.join(args.out_dir, f"first-{name}.npz"))
        outcome = "DONE"
        while True:
            train_step()
            current = int(step.numpy())
            stop = False if args.no_should_stop else manager.should_stop()  # every worker, once per step
            last = args.last_step is not None and current >= args.last_step
            if current % args.save_every == 0 or stop or last:
                manager.save(checkpoint_number=current)
            print(f"STEP {current}", flush=True)
            if stop:
                outcome = "PREEMPTED"
                break
            if last:
                break
            if args.step_sleep:
                time.sleep(args.step_sleep)
        if os.environ.get("CLOUDCKPT_TEST_SKIP_CLOSE"):  # a worker that leaves without close() (a mistake)
            print(f"SKIPPED_CLOSE {current}", flush=True)
            return 0
        manager.close()  # every worker (a collective): the chief's final commit
    except cloudckpt.CloudCkptError as exc:
        return report_failure(exc, current, args.linger)
    dump(os.path.join(args.out_dir, f"last-{name}.npz"))
    print(f"{outcome} {current}", flush=True)
    stats = dataclasses.asdict(manager.stats())
    stats.update(preempted=manager.preempted, is_chief=manager.is_chief, task=manager.task)
    print(f"STATS {json.dumps(stats)}", flush=True)
    notice = manager.notice
    if notice is not None:
        deadline_at = manager._engine.preemption_deadline_at()  # what the final commit was bound by
        print("NOTICE " + json.dumps({"source": notice.source, "detail": notice.detail, "deadline": notice.deadline,
                                      "announced": getattr(notice, "announced", None),
                                      "deadline_in_use": deadline_at - notice.received_at}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
