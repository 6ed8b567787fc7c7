"""Training process for the Keras preemption and crash tests: ``model.fit`` with cloudckpt.keras.BackupAndRestore.

Usage: python keras_trainer.py URL ENDPOINT LOCAL_DIR DUMP_DIR [--epochs N] [--save-freq epoch|N|false]
                               [--preemption none|sigterm] [--deadline SECONDS] [--batch-sleep SECONDS]

Prints ``EPOCH <e>`` when epoch e
(0-based) begins, ``BATCH <e> <b>`` after each batch, and ``DONE preempted=<bool> iterations=<n>``
when ``fit`` returns. After every batch it writes the model's state (weights, optimizer variables,
iterations) to ``DUMP_DIR/iter-<iterations>.npz``, so a test can compare any state that was backed
up with what a later run restores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import cloudckpt.keras  # noqa: E402
from keras_model import BATCH_SIZE, State, data, make_model  # noqa: E402  (this file's directory is on sys.path)
from task_script import FitProgress  # noqa: E402


class Report(FitProgress, keras.callbacks.Callback):
    def __init__(self, dump_dir: str, batch_sleep: float) -> None:
        super().__init__()
        self.dump_dir, self.batch_sleep = dump_dir, batch_sleep

    def batch_ended(self) -> None:
        state = State.of(self.model)
        state.save(os.path.join(self.dump_dir, f"iter-{state.iterations}.npz"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("endpoint")
    parser.add_argument("local_dir")
    parser.add_argument("dump_dir")
    parser.add_argument("--epochs", type=int, default=10**6)
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--preemption", default="none")
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--batch-sleep", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    save_freq = {"epoch": "epoch", "false": False}.get(args.save_freq)
    if save_freq is None:
        save_freq = int(args.save_freq)
    backup = cloudckpt.keras.BackupAndRestore(
        args.url, save_freq=save_freq, local_dir=args.local_dir, storage_options={"endpoint_url": args.endpoint},
        preemption=None if args.preemption == "none" else args.preemption, preemption_deadline=args.deadline)
    model = make_model(seed=1)
    x, y = data()
    # Report comes first: a state is dumped (completely) before the backup can save it.
    model.fit(x, y, epochs=args.epochs, batch_size=BATCH_SIZE, verbose=0,
              callbacks=[Report(args.dump_dir, args.batch_sleep), backup])
    print(f"DONE preempted={backup.preempted} iterations={int(model.optimizer.iterations)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
