"""What the training scripts of tests/support share (imports no TensorFlow or Keras): the arguments of a
cluster task, the task ``TF_CONFIG`` names, and the progress lines a Keras ``fit`` prints for its test."""

from __future__ import annotations

import argparse
import json
import os
import time


def task_arguments(*positionals: str) -> argparse.ArgumentParser:
    """A parser of ``URL OPTIONS_JSON LOCAL_DIR`` (the task's checkpoint URL, storage_options as JSON, its local
    directory), then ``positionals``; a script adds its own options."""
    parser = argparse.ArgumentParser()
    for name in ("url", "options", "local_dir", *positionals):
        parser.add_argument(name)
    return parser


def add_failure_arguments(parser: argparse.ArgumentParser) -> None:
    """``--retry-attempts N`` (``RetryPolicy(max_attempts=N)``: a failing store fails fast) and
    ``--linger SECONDS`` (see ``report_failure``)."""
    parser.add_argument("--retry-attempts", type=int, default=None)
    parser.add_argument("--linger", type=float, default=0.0)


def retry_policy(args: argparse.Namespace):
    """The ``RetryPolicy`` of ``--retry-attempts`` (None: cloudckpt's default)."""
    import cloudckpt  # noqa: PLC0415

    return None if args.retry_attempts is None else cloudckpt.RetryPolicy(max_attempts=args.retry_attempts)


def report_failure(exc: BaseException, step: int, linger: float) -> int:
    """Print ``ERROR <step> <type> <message>`` for an exception that ended training; if it is this worker's own
    failure (not ``WorkerFailedError``: another's), stay alive ``linger`` seconds (a process cleaning up
    slowly, or waiting on uploads). Returns 3, the exit status."""
    message = " ".join(str(exc).split())
    print(f"ERROR {step} {type(exc).__name__} {message}", flush=True)
    if type(exc).__name__ != "WorkerFailedError":  # this worker's own failure
        time.sleep(linger)
    return 3


def this_task() -> tuple[str, int]:
    """This task's name ``<type>-<index>`` (``worker-1``) and index, from ``TF_CONFIG``."""
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    return f"{task['type']}-{task['index']}", int(task["index"])


class FitProgress:
    """Mixin for a ``Callback`` of either Keras (Keras 3 or tf-keras): prints ``<epoch_line> <e>`` when epoch e
    (0-based) begins (only the first epoch of the run unless ``every_epoch``), and after each batch calls
    ``batch_ended()``, prints ``BATCH <e> <b>`` and sleeps ``batch_sleep`` seconds."""

    epoch_line = "EPOCH"
    every_epoch = True
    batch_sleep = 0.0
    epoch = -1

    def batch_ended(self) -> None:
        """Runs before the ``BATCH`` line (e.g. to dump the model's state)."""

    def on_epoch_begin(self, epoch, logs=None):
        if self.every_epoch or self.epoch < 0:
            print(f"{self.epoch_line} {epoch}", flush=True)
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ended()
        print(f"BATCH {self.epoch} {batch}", flush=True)
        if self.batch_sleep:
            time.sleep(self.batch_sleep)
