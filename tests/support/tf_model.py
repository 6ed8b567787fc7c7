"""A tiny graph-mode TF model trained through MonitoredTrainingSession, as users do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf


@dataclass
class TrainResult:
    """What a training run saw."""

    first_step: int          # global step right after the session was created (after any restore)
    first_weights: np.ndarray  # value of ``w`` right after the session was created
    last_step: int           # global step when the session ended
    last_weights: np.ndarray


class _Probe(tf.compat.v1.train.SessionRunHook):
    """Reads the global step and ``w`` when the session starts and ends."""

    def __init__(self, global_step: tf.Tensor, w: tf.Variable) -> None:
        self._fetch = (global_step, w)
        self.first: tuple[int, np.ndarray] | None = None
        self.last: tuple[int, np.ndarray] | None = None

    def after_create_session(self, session: Any, coord: Any) -> None:
        if self.first is None:
            step, value = session.run(self._fetch)
            self.first = (int(step), value)

    def end(self, session: Any) -> None:
        step, value = session.run(self._fetch)
        self.last = (int(step), value)


def train(
    make_hook: Callable[[tf.compat.v1.train.Scaffold | None], tf.compat.v1.train.SessionRunHook],
    last_step: int,
    *,
    size: int = 64,
    extra_hooks: Sequence[tf.compat.v1.train.SessionRunHook] = (),
    max_to_keep: int | None = None,
    step_callback: Callable[[int], None] | None = None,
    learning_rate: float = 0.01,
    restore: bool = True,
    extra_variables: Callable[[], Any] | None = None,
) -> TrainResult:
    """Train ``w`` (``size`` floats) with SGD until global step ``last_step``.

    ``make_hook(scaffold)`` builds the checkpoint hook under test (``scaffold``
    is None unless ``max_to_keep`` asks for a custom Saver). The loss pulls
    ``w`` towards 1..size, so every step changes it deterministically.
    ``restore=False``: the session is created without ``checkpoint_dir`` (a user who forgot it), so it
    restores nothing. ``extra_variables()`` runs in the graph before the hook is made: more variables,
    which the Saver saves and restores (another model, a partitioned variable).
    """
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", shape=[size], initializer=tf.compat.v1.zeros_initializer())
        # computed in the graph, not a constant in it: the graph (graph.pbtxt, each .meta) stays small however
        # large the checkpoint's data is
        target = tf.cast(tf.range(1, size + 1), tf.float32)
        loss = tf.reduce_sum(tf.square(w - target))
        train_op = tf.compat.v1.train.GradientDescentOptimizer(learning_rate).minimize(loss, global_step=global_step)
        if extra_variables is not None:
            extra_variables()
        scaffold = None
        if max_to_keep is not None:
            scaffold = tf.compat.v1.train.Scaffold(saver=tf.compat.v1.train.Saver(max_to_keep=max_to_keep))
        hook = make_hook(scaffold)
        checkpoint_dir = getattr(hook, "local_dir", None) or getattr(hook, "_checkpoint_dir")
        probe = _Probe(global_step, w)
        with tf.compat.v1.train.MonitoredTrainingSession(
            checkpoint_dir=checkpoint_dir if restore else None, scaffold=scaffold, save_checkpoint_secs=None,
            save_checkpoint_steps=None, save_summaries_steps=None, save_summaries_secs=None, log_step_count_steps=None,
            hooks=[hook, tf.compat.v1.train.StopAtStepHook(last_step=last_step), probe, *extra_hooks],
        ) as sess:
            while not sess.should_stop():
                _, step = sess.run([train_op, global_step])
                if step_callback is not None:
                    step_callback(int(step))
        assert probe.first is not None and probe.last is not None
        return TrainResult(probe.first[0], probe.first[1], probe.last[0], probe.last[1])


class RaiseAt(tf.compat.v1.train.SessionRunHook):
    """Fails the training step that reaches global step ``at`` with RuntimeError (a crash in user code)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def begin(self) -> None:
        self._step = tf.compat.v1.train.get_global_step()

    def before_run(self, run_context: Any) -> Any:
        return tf.compat.v1.train.SessionRunArgs(self._step)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        if int(run_values.results) + 1 >= self.at:
            raise RuntimeError(f"training failed at step {self.at}")
