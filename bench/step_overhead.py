"""Scenario 1: per-step overhead when no save is due.

The same graph is trained with TF's stock ``CheckpointSaverHook`` (local
directory) and with cloudckpt's (``s3://`` on the benchmark server), with a
schedule that never comes due during the timed steps. Both sessions live in
one process and are stepped alternately, one step each, so that both see the
same machine load. A repetition's figure is its median step time. The upload
of the checkpoint saved at session creation is waited for before the first
step, so the figure is the steady-state cost of the hook itself.
"""

from __future__ import annotations

import shutil
import statistics

from .common import Scenario, ratio, summarize
from .context import Context

KEY = "step_overhead"
TITLE = "1. Step overhead, no save due"
NEVER = 10**9


def run(ctx: Context) -> Scenario:
    import tensorflow as tf

    import cloudckpt

    from .training import train_lockstep

    cfg = ctx.cfg
    sc = Scenario(KEY, TITLE, params={
        "timed_steps_per_rep": cfg.overhead_steps, "warmup_steps": cfg.overhead_warmup,
        "model": f"MLP {cfg.mlp_layers}x{cfg.mlp_width}, batch {cfg.mlp_batch}",
        "figure": "median sess.run() wall time of a repetition; the two hooks' sessions alternate step by step",
        "hook_us": "time inside the hook's before_run + after_run, the hook's own share of the step"})
    per_rep: dict[str, list[float]] = {"stock": [], "cloudckpt": []}
    hook_us: dict[str, list[float]] = {"stock": [], "cloudckpt": []}
    work: dict[str, list] = {"cloudckpt_committed": []}
    sc.params["work"] = work
    for rep in range(-cfg.warmup_reps, cfg.reps):  # negative reps: warm-up, discarded
        dirs = {v: ctx.scratch(f"overhead-{v}") for v in per_rep}
        calls: dict[str, list[float]] = {"stock": [], "cloudckpt": []}
        variants = {
            "stock": (lambda m: _timed_hook(tf.compat.v1.train.CheckpointSaverHook(
                dirs["stock"], save_steps=NEVER, listeners=[m]), calls["stock"]), dirs["stock"]),
            "cloudckpt": (lambda m, rep=rep: _timed_hook(cloudckpt.CheckpointSaverHook(
                ctx.url(f"overhead/rep{rep}"), save_steps=NEVER, listeners=[m], local_dir=dirs["cloudckpt"],
                storage_options=ctx.storage_options, restore=False), calls["cloudckpt"]), dirs["cloudckpt"]),
        }
        if rep % 2:
            variants = dict(reversed(list(variants.items())))
        times = train_lockstep(variants, last_step=cfg.overhead_warmup + cfg.overhead_steps, width=cfg.mlp_width,
                               layers=cfg.mlp_layers, batch=cfg.mlp_batch)
        for variant, t in times.items():
            steps = t.step_times(skip=cfg.overhead_warmup)
            if len(steps) != cfg.overhead_steps or any(t.saved):
                raise AssertionError(f"{variant}: expected {cfg.overhead_steps} timed steps without a save, got "
                                     f"{len(steps)} and {sum(t.saved)} save(s)")
            if rep >= 0:
                per_rep[variant].append(statistics.median(steps) * 1e3)
                hook_us[variant].append(statistics.median(calls[variant][-len(steps):]) * 1e6)
        if rep >= 0:
            work["cloudckpt_committed"].append(times["cloudckpt"].hook.stats().committed)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        if rep < 0:
            ctx.log(f"{KEY} warm-up repetition done")
            continue
        ctx.log(f"{KEY} rep {rep + 1}/{cfg.reps}: stock {per_rep['stock'][-1]:.3f} ms, "
                f"cloudckpt {per_rep['cloudckpt'][-1]:.3f} ms")
    sc.figures["stock"] = summarize(per_rep["stock"], "ms/step", label="TF CheckpointSaverHook, local dir")
    sc.figures["cloudckpt"] = summarize(per_rep["cloudckpt"], "ms/step", label="cloudckpt hook, s3://")
    for v in ("stock", "cloudckpt"):
        sc.figures[f"{v}_hook_us"] = summarize(hook_us[v], "us/step", label=f"time inside the {v} hook's "
                                               "before_run + after_run (median step of a repetition)")
    paired = [c / s for c, s in zip(per_rep["cloudckpt"], per_rep["stock"])]
    sc.ratios["cloudckpt/stock"] = ratio(sc.figures["cloudckpt"], sc.figures["stock"], target="<= 1.02",
                                         paired=paired)
    ctx.clean_bucket()
    return sc


def _timed_hook(hook, out: list[float]):
    """Record the time each step spends inside ``hook.before_run`` + ``hook.after_run`` (appended to ``out``)."""
    import time

    before, after = hook.before_run, hook.after_run
    pending = [0.0]

    def before_run(run_context):
        started = time.perf_counter()
        try:
            return before(run_context)
        finally:
            pending[0] = time.perf_counter() - started

    def after_run(run_context, run_values):
        started = time.perf_counter()
        try:
            return after(run_context, run_values)
        finally:
            out.append(pending[0] + time.perf_counter() - started)

    hook.before_run, hook.after_run = before_run, after_run
    return hook
