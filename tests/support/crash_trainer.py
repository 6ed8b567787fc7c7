"""Training process for crash and preemption tests: trains with cloudckpt's hook until stopped or killed.

Usage: python crash_trainer.py URL ENDPOINT|- LOCAL_DIR [--save-steps N] [--last-step N]
                               [--preemption none|auto|SOURCE[,SOURCE...]] [--deadline SECONDS]
                               [--raise-at N] [--learning-rate LR] [--step-sleep SECONDS] [--start-when PATH]
SOURCE is sigterm, gce, aws or azure (metadata URLs from CLOUDCKPT_*_METADATA_URL, polled every 0.1 s);
``auto`` is the hook's ``preemption="auto"`` (SIGTERM and every metadata source, polled every 5 s).
Prints ``WRITER <id>`` and ``FIRST_STEP <n>`` once the session is created (after any restore) and
``STEP <n>`` now and then, so the parent knows training (and uploading) is under way.
With ``--raise-at N`` a hook raises RuntimeError at step N; the trainer catches it, prints
``RAISED <threads>`` (cloudckpt-started threads still alive) and waits for a signal. A writer
fenced by a newer one prints ``FENCED <message>`` and exits with code 3. With ``--start-when``, the
process imports TensorFlow and builds the graph, then waits for PATH to exist before the session starts
(so a test can start a writer at a chosen moment without paying the import then).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import cloudckpt  # noqa: E402
from tf_model import RaiseAt  # noqa: E402  (this file's directory is on sys.path)
from trainer_process import foreign_thread  # noqa: E402


class Report(tf.compat.v1.train.SessionRunHook):
    def __init__(self, checkpoint_hook, step_sleep=0.0):
        self._hook = checkpoint_hook
        self._sleep = step_sleep

    def begin(self):
        self._step = tf.compat.v1.train.get_global_step()

    def after_create_session(self, session, coord):
        print(f"WRITER {self._hook.writer_id}", flush=True)
        print(f"FIRST_STEP {int(session.run(self._step))}", flush=True)

    def after_run(self, run_context, run_values):
        # Read after the step: a fetch of the global step in the train op's own run sees it before or after
        # the increment (no ordering between them), which made STEP off by one now and then.
        print(f"STEP {int(run_context.session.run(self._step))}", flush=True)
        if self._sleep:
            time.sleep(self._sleep)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("endpoint")
    parser.add_argument("local_dir")
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--last-step", type=int, default=10**9)
    parser.add_argument("--preemption", default="none")
    parser.add_argument("--raise-at", type=int, default=None)
    parser.add_argument("--user-sigterm-exit", type=int, default=None,
                        help="install the script's own SIGTERM handler, which exits with this code")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--size", type=int, default=1 << 18, help="floats in the model's variable")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--start-when", default=None, help="wait for this file before the session starts")
    args = parser.parse_args()
    url, endpoint, local_dir, save_steps, last_step = (args.url, args.endpoint, args.local_dir, args.save_steps,
                                                       args.last_step)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    options = {"endpoint_url": endpoint} if endpoint != "-" else None
    extra: dict = {"preemption_deadline": args.deadline}
    if args.preemption in ("sigterm", "auto"):
        extra["preemption"] = args.preemption
    elif args.preemption != "none":  # metadata URLs come from CLOUDCKPT_*_METADATA_URL
        extra["preemption"] = cloudckpt.PreemptionWatcher(tuple(args.preemption.split(",")), poll_interval=0.1)
    threads_before = set(threading.enumerate())
    if args.user_sigterm_exit is not None:
        def user_handler(signum, frame):
            print("USER_HANDLER", flush=True)
            sys.exit(args.user_sigterm_exit)
        signal.signal(signal.SIGTERM, user_handler)
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", shape=[args.size], initializer=tf.compat.v1.zeros_initializer())
        target = tf.linspace(0.0, 1.0, args.size)  # an op, not a constant: the .meta files stay small
        train_op = tf.compat.v1.train.GradientDescentOptimizer(args.learning_rate).minimize(
            tf.reduce_sum(tf.square(w - target)), global_step=global_step)
        hook = cloudckpt.CheckpointSaverHook(url, save_steps=save_steps, local_dir=local_dir,
                                             storage_options=options, max_pending=2, **extra)
        while args.start_when and not os.path.exists(args.start_when):
            time.sleep(0.02)
        hooks = [hook, Report(hook, args.step_sleep), tf.compat.v1.train.StopAtStepHook(last_step=last_step)]
        if args.raise_at is not None:
            hooks.append(RaiseAt(args.raise_at))
        try:
            with tf.compat.v1.train.MonitoredTrainingSession(
                    checkpoint_dir=hook.local_dir, save_checkpoint_secs=None, save_summaries_steps=None,
                    log_step_count_steps=None, hooks=hooks) as sess:
                while not sess.should_stop():
                    sess.run(train_op)
        except cloudckpt.FencedError as exc:
            print(f"FENCED {' '.join(str(exc).split())}", flush=True)
            return 3
        except RuntimeError as exc:
            if args.raise_at is None:
                raise
            left = sorted(t.name for t in set(threading.enumerate()) - threads_before if not foreign_thread(t.name))
            print(f"RAISED {exc}; threads left: {left}", flush=True)
            while True:  # a SIGTERM now must behave as it would without cloudckpt
                time.sleep(0.1)
        print(f"DONE {hook.stats().last_committed_step} preempted={cloudckpt.was_preempted()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
