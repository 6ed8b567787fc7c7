"""Scenario 7: a TF2 custom loop with ``cloudckpt.CheckpointManager``: step time around saves vs no saves.

One training loop (a ``tf.function`` MLP step, plus ``stall_bytes`` of
variables that only the checkpoint carries), checkpointed four ways, each in
turn in every repetition (the order rotates):

* ``no_save``: no checkpoint at all (the baseline);
* ``tf_local``: ``tf.train.CheckpointManager`` on a local directory, synchronous saves;
* ``cloudckpt_sync``: ``cloudckpt.CheckpointManager`` to ``s3://``, synchronous TF write;
* ``cloudckpt_async``: the same with ``tf.train.CheckpointOptions(enable_async=True)``: ``save()``
  returns once TF has copied the variables; TF writes in its thread, then the commit starts.

A save is due every ``stall_save_steps`` steps. The figure per save is the
mean step time over a *window*: the step that saves and the following ones
(up to 5), which is where an async write and the upload compete with
training; for ``no_save`` the same steps without the save. After each window
the manager's ``wait()`` runs untimed (as if saves were minutes apart).
Ratios: each variant's median window step time over ``no_save``'s, and
async over sync; ``*_save_step`` figures: the saving step alone (TF's write,
plus cloudckpt's snapshot and enqueue), compared with TF's local save. Plain ``tf.Variable`` state: TF 2.21's async checkpoint
fails on Keras 3 variables (see README, TF2 section).
"""

from __future__ import annotations

import shutil
import statistics
import time

from .common import Scenario, ratio, rotate, summarize
from .context import Context

KEY = "tf2_async"
TITLE = "7. TF2 step time around saves"
VARIANTS = ("no_save", "tf_local", "cloudckpt_sync", "cloudckpt_async")
WINDOW = 5


def run(ctx: Context) -> Scenario:
    import tensorflow as tf

    import cloudckpt

    cfg = ctx.cfg
    gap = cfg.stall_save_steps
    window = min(WINDOW, gap)
    warmup = 2 * gap  # tracing, the first save's setup (async: its thread and CPU copies)
    sc = Scenario(KEY, TITLE, params={
        "checkpoint_mib": round(cfg.stall_bytes / (1 << 20), 1), "save_steps": gap, "window_steps": window,
        "timed_saves_per_rep": cfg.stall_saves, "warmup_steps": warmup,
        "figure": "mean step time over the save step and the next window-1 steps, one sample per save"})
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    save_steps: dict[str, list[float]] = {v: [] for v in VARIANTS}  # the step that saves, alone
    per_rep: dict[str, list[float]] = {v: [] for v in VARIANTS}
    committed: list[int] = []

    x = tf.random.stateless_normal([cfg.mlp_batch, cfg.mlp_width], seed=[1, 2])
    weights = [tf.Variable(tf.random.stateless_normal([cfg.mlp_width, cfg.mlp_width], seed=[3, i]) * 0.05)
               for i in range(cfg.mlp_layers)]
    big = tf.Variable(tf.random.stateless_uniform([cfg.stall_bytes // 4], seed=[5, 6]))
    checkpoint = tf.train.Checkpoint(weights=weights, big=big)

    @tf.function
    def train_step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            h = x
            for w in weights:
                h = tf.nn.relu(h @ w)
            loss = tf.reduce_mean(h * h)
        for w, g in zip(weights, tape.gradient(loss, weights)):
            w.assign_sub(0.01 * g)
        return loss

    for rep in range(cfg.reps):
        for variant in rotate(VARIANTS, rep):
            directory = ctx.scratch(f"tf2-{variant}")
            manager = _manager(variant, checkpoint, directory, ctx, rep, cloudckpt, tf)
            options = tf.train.CheckpointOptions(enable_async=True) if variant == "cloudckpt_async" else None
            windows: list[float] = []
            current: list[float] = []
            try:
                for i in range(1, warmup + cfg.stall_saves * gap + window):  # the last window ends there
                    save_due = i % gap == 0
                    started = time.perf_counter()
                    train_step().numpy()
                    if save_due and manager is not None:
                        manager.save(checkpoint_number=i, options=options)
                    elapsed = time.perf_counter() - started
                    timed = i > warmup
                    if timed and (save_due or current):
                        current.append(elapsed)
                    if len(current) == window:
                        windows.append(statistics.mean(current) * 1e3)
                        save_steps[variant].append(current[0] * 1e3)
                        current = []
                    if i % gap == (window - 1) % gap and manager is not None:
                        manager.wait()  # untimed: the next save starts with the upload done
            finally:
                if manager is not None:
                    manager.wait()
                    stats = manager.stats() if hasattr(manager, "stats") else None
                    if stats is not None:
                        committed.append(stats.committed)
                    if hasattr(manager, "close"):
                        manager.close()
                shutil.rmtree(directory, ignore_errors=True)
            if len(windows) != cfg.stall_saves:
                raise AssertionError(f"{variant}: {len(windows)} timed windows, expected {cfg.stall_saves}")
            samples[variant].extend(windows)
            per_rep[variant].append(statistics.median(windows))
        ctx.log(f"{KEY} rep {rep + 1}/{cfg.reps}: " + ", ".join(f"{v} {per_rep[v][-1]:.1f} ms" for v in VARIANTS))
    labels = {"no_save": "no checkpoint", "tf_local": "tf.train.CheckpointManager, local dir",
              "cloudckpt_sync": "cloudckpt.CheckpointManager, s3://, sync write",
              "cloudckpt_async": "cloudckpt.CheckpointManager, s3://, enable_async"}
    for v in VARIANTS:
        sc.figures[v] = summarize(samples[v], "ms/step", label=labels[v])
    for v in VARIANTS[1:]:
        sc.figures[f"{v}_save_step"] = summarize(save_steps[v], "ms", label=f"{labels[v]}: the saving step alone")
    for v in VARIANTS[1:]:
        sc.ratios[f"{v}/no_save"] = ratio(sc.figures[v], sc.figures["no_save"],
                                          paired=[a / b for a, b in zip(per_rep[v], per_rep["no_save"])])
    sc.ratios["cloudckpt_async/cloudckpt_sync"] = ratio(
        sc.figures["cloudckpt_async"], sc.figures["cloudckpt_sync"],
        paired=[a / b for a, b in zip(per_rep["cloudckpt_async"], per_rep["cloudckpt_sync"])])
    sc.ratios["cloudckpt_sync/tf_local"] = ratio(
        sc.figures["cloudckpt_sync"], sc.figures["tf_local"],
        paired=[a / b for a, b in zip(per_rep["cloudckpt_sync"], per_rep["tf_local"])],
        note="window: includes the background upload competing for the CPU (and with the S3 server here)")
    sc.ratios["cloudckpt_sync_save_step/tf_local_save_step"] = ratio(
        sc.figures["cloudckpt_sync_save_step"], sc.figures["tf_local_save_step"], target="<= 1.10",
        note="the saving step: TF's write plus cloudckpt's snapshot and enqueue")
    sc.params["work"] = {"cloudckpt_committed_per_run": committed}
    ctx.clean_bucket()
    return sc


def _manager(variant, checkpoint, directory, ctx, rep, cloudckpt, tf):
    if variant == "no_save":
        return None
    if variant == "tf_local":
        return _LocalManager(tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2))
    return cloudckpt.CheckpointManager(checkpoint, ctx.url(f"tf2-{variant}/rep{rep}"), max_to_keep=2,
                                       local_dir=directory, storage_options=ctx.storage_options)


class _LocalManager:
    """``tf.train.CheckpointManager`` with the ``wait()`` the loop calls (TF's ``sync()``)."""

    def __init__(self, manager) -> None:
        self._manager = manager

    def save(self, **kwargs):
        return self._manager.save(**kwargs)

    def wait(self) -> None:
        self._manager.sync()
