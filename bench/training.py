"""Graph-mode training through ``MonitoredTrainingSession`` for scenarios 1 and 2.

The model is a small MLP (a step of about a millisecond on 2 cores, so that any
per-step hook cost shows) plus, optionally, large embedding-like tables that
each step touches one row of, so that a save writes ``big_bytes`` of fresh
variables while the step itself stays cheap.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import tensorflow as tf

_TABLE_COLS = 1024                 # float32 columns per row of a big table (4 KiB rows)
_TABLE_BYTES = 32 << 20            # at most this much per table variable


def build_model(*, width: int, layers: int, batch: int, big_bytes: int = 0) -> tuple[Any, Any]:
    """Build the graph in the default graph; returns (train_op, global_step)."""
    global_step = tf.compat.v1.train.get_or_create_global_step()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, width)).astype(np.float32))
    y = tf.constant(rng.standard_normal((batch, width)).astype(np.float32))
    h = x
    for i in range(layers):
        w = tf.compat.v1.get_variable(f"dense_{i}", shape=[width, width],
                                      initializer=tf.compat.v1.glorot_uniform_initializer(seed=i))
        h = tf.tanh(tf.matmul(h, w))
    loss = tf.reduce_mean(tf.square(h - y))
    ops = [tf.compat.v1.train.GradientDescentOptimizer(0.01).minimize(loss, global_step=global_step)]
    left, t = big_bytes, 0
    while left > 0:
        nbytes = min(left, _TABLE_BYTES)
        rows = max(1, nbytes // (4 * _TABLE_COLS))
        table = tf.compat.v1.get_variable(f"table_{t}", shape=[rows, _TABLE_COLS], trainable=False,
                                          initializer=tf.compat.v1.zeros_initializer())
        row = tf.math.floormod(tf.cast(global_step, tf.int32) * 7919 + t, rows)
        ops.append(tf.compat.v1.scatter_add(table, tf.reshape(row, [1]), tf.ones([1, _TABLE_COLS])))
        left -= rows * 4 * _TABLE_COLS
        t += 1
    return tf.group(*ops), global_step


class SaveMarker(tf.compat.v1.train.CheckpointSaverListener):
    """Flags the step during which a save happened."""

    def __init__(self) -> None:
        self.saved = False
        self.saved_at = 0.0
        self.count = 0

    def after_save(self, session: Any, global_step_value: int) -> None:
        self.saved_at = time.perf_counter()
        self.saved = True
        self.count += 1


class SyncUploadListener(tf.compat.v1.train.CheckpointSaverListener):
    """What people do today: after each save, upload its files before training goes on.

    Uses boto3's TransferManager (``TransferConfig(max_concurrency=10)``, all
    files of the checkpoint submitted at once), the fastest synchronous uploader
    we have, so the baseline is a strong one.
    """

    def __init__(self, local_dir: str, client: Any, bucket: str, key_prefix: str) -> None:
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        self._local_dir = local_dir
        self._bucket = bucket
        self._key_prefix = key_prefix.strip("/")
        self._tm = create_transfer_manager(client, TransferConfig(max_concurrency=10))
        self.uploaded_bytes = 0

    def after_save(self, session: Any, global_step_value: int) -> None:
        state = tf.compat.v1.train.get_checkpoint_state(self._local_dir)
        prefix = state.model_checkpoint_path
        if not os.path.isabs(prefix):
            prefix = os.path.join(self._local_dir, prefix)
        paths = [p for p in glob.glob(glob.escape(prefix) + ".*") if os.path.isfile(p)]
        paths.append(os.path.join(self._local_dir, "checkpoint"))
        futures = [self._tm.upload(p, self._bucket, f"{self._key_prefix}/{os.path.basename(p)}") for p in paths]
        for f in futures:
            f.result()
        self.uploaded_bytes += sum(os.path.getsize(p) for p in paths)

    def end(self, session: Any, global_step_value: int) -> None:
        self._tm.shutdown()


@dataclass
class RunTimes:
    """Wall time of every ``sess.run`` of one training run, and which ones saved a checkpoint.

    ``tails`` holds, for each save step, the time from the end of the Saver's
    write (our listener's ``after_save``, which runs before any cloudckpt
    listener) to the end of ``sess.run``: the part of the stall that is not
    TensorFlow writing the checkpoint.
    """

    durations: list[float] = field(default_factory=list)
    saved: list[bool] = field(default_factory=list)
    tails: list[float] = field(default_factory=list)
    saves: int = 0
    hook: Any = None

    def step_times(self, skip: int = 0) -> list[float]:
        """Durations of the steps that did not save, after the first ``skip`` steps."""
        return [d for i, (d, s) in enumerate(zip(self.durations, self.saved)) if i >= skip and not s]

    def save_times(self) -> list[float]:
        return [d for d, s in zip(self.durations, self.saved) if s]


class _InGraph:
    """Enter and exit a context manager (a session) with ``graph`` as the default graph."""

    def __init__(self, graph: Any, cm: Any) -> None:
        self._graph, self._cm = graph, cm

    def __enter__(self) -> Any:
        with self._graph.as_default():
            return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        with self._graph.as_default():
            return self._cm.__exit__(*exc)


class _Run:
    """One variant's graph, hook and session, stepped by ``train_lockstep``."""

    def __init__(self, make_hook: Callable[[SaveMarker], Any], checkpoint_dir: str, last_step: int,
                 model: dict[str, int], stack: contextlib.ExitStack) -> None:
        self.graph = tf.Graph()
        self.times = RunTimes()
        with self.graph.as_default():
            self.train_op, _ = build_model(**model)
            self.marker = SaveMarker()
            self.hook = make_hook(self.marker)
            self.sess = stack.enter_context(_InGraph(self.graph, tf.compat.v1.train.MonitoredTrainingSession(
                checkpoint_dir=checkpoint_dir, save_checkpoint_secs=None, save_checkpoint_steps=None,
                save_summaries_steps=None, save_summaries_secs=None, log_step_count_steps=None,
                hooks=[self.hook, tf.compat.v1.train.StopAtStepHook(last_step=last_step)])))
        self.marker.saved = False  # the save at session creation is not a training step
        self.index = 0

    def step(self) -> bool:
        """Run one step; False once the session wants to stop."""
        with self.graph.as_default():  # graph mode (the Saver and hooks need it), as inside a user's `with`
            if self.sess.should_stop():
                return False
            started = time.perf_counter()
            self.sess.run(self.train_op)
            ended = time.perf_counter()
        self.times.durations.append(ended - started)
        saved, self.marker.saved = self.marker.saved, False
        self.times.saved.append(saved)
        if saved:
            self.times.tails.append(ended - self.marker.saved_at)
        return True


def train_lockstep(variants: dict[str, tuple[Callable[[SaveMarker], Any], str]], *, last_step: int, width: int,
                   layers: int, batch: int, big_bytes: int = 0,
                   after_step: Callable[[str, Any, int, bool], None] | None = None) -> dict[str, RunTimes]:
    """Train the same model once per variant, alternating single steps between the variants.

    ``variants``: name -> (``make_hook(marker)``, checkpoint_dir); the hook must
    include ``marker`` among its listeners. Alternating step by step (in a
    rotating order) exposes every variant to the same machine load, which on a
    shared machine matters more than anything else. ``after_step(name, hook,
    index, saved)`` runs after every step, outside the timing.
    """
    model = {"width": width, "layers": layers, "batch": batch, "big_bytes": big_bytes}
    with contextlib.ExitStack() as stack:
        runs = {name: _Run(make, ckdir, last_step, model, stack) for name, (make, ckdir) in variants.items()}
        for run in runs.values():
            if hasattr(run.hook, "wait"):
                run.hook.wait()  # the upload of the save at session creation is over before the first step
        names = list(runs)
        active = set(names)
        i = 0
        while active:
            for name in names[i % len(names):] + names[: i % len(names)]:
                if name not in active:
                    continue
                run = runs[name]
                if not run.step():
                    active.discard(name)
                    continue
                if after_step is not None:
                    after_step(name, run.hook, run.index, run.times.saved[-1])
                run.index += 1
            i += 1
    for run in runs.values():
        run.times.saves = run.marker.count
        run.times.hook = run.hook
    return {name: run.times for name, run in runs.items()}
