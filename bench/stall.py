"""Scenario 2: how long the training thread is blocked by a save.

Three ways to checkpoint the same model (``stall_bytes`` of variables), each
saving every ``stall_save_steps`` steps:

* ``stock_local``: TF's stock hook, local directory (baseline a);
* ``stock_sync_upload``: TF's stock hook plus a listener that uploads the saved
  files with boto3's TransferManager before training resumes (baseline b: what
  people do today);
* ``cloudckpt``: cloudckpt's hook to ``s3://``.

The three sessions live in one process and are stepped alternately, so their
saves happen seconds apart under the same machine load. The stall of a save is
the wall time of the step that saved minus the median time of that session's
steps that did not. After a cloudckpt save its background upload is waited for
(outside the timing) before any session steps again, as if saves were minutes
apart: the upload never competes with the next save.

``*_tail`` figures: time from the end of TensorFlow's write (our listener's
``after_save``, which runs before cloudckpt's listener) to the end of the
step: what the hook adds on top of the Saver, independent of disk noise.
"""

from __future__ import annotations

import shutil
import statistics

from .common import Scenario, ratio, summarize
from .context import Context

KEY = "stall"
TITLE = "2. Stall per save"
VARIANTS = ("stock_local", "stock_sync_upload", "cloudckpt")


def run(ctx: Context) -> Scenario:
    import tensorflow as tf

    import cloudckpt

    from .training import SyncUploadListener, train_lockstep

    cfg = ctx.cfg
    sc = Scenario(KEY, TITLE, params={
        "checkpoint_mib": round(cfg.stall_bytes / (1 << 20), 1), "save_steps": cfg.stall_save_steps,
        "timed_saves_per_rep": cfg.stall_saves,
        "figure": "save-step wall time minus the session's median non-save step time, every save of every rep"})
    stalls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tails: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_rep: dict[str, list[float]] = {v: [] for v in VARIANTS}
    client = ctx.server.client()
    sync_listeners: dict[int, SyncUploadListener] = {}
    work: dict[str, list] = {"cloudckpt_committed": [], "cloudckpt_failed": [], "stock_sync_upload_mib": []}
    sc.params["work"] = work
    # No warm-up repetition: each session's first save (at session creation) is untimed and warms the Saver.
    for rep in range(cfg.reps):
        dirs = {v: ctx.scratch(f"stall-{v}") for v in VARIANTS}
        every = cfg.stall_save_steps

        def stock(marker):
            return tf.compat.v1.train.CheckpointSaverHook(dirs["stock_local"], save_steps=every, listeners=[marker])

        def sync(marker, rep=rep):
            upload = sync_listeners[rep] = SyncUploadListener(dirs["stock_sync_upload"], client, ctx.bucket,
                                                              f"stall-sync/rep{rep}")
            return tf.compat.v1.train.CheckpointSaverHook(dirs["stock_sync_upload"], save_steps=every,
                                                          listeners=[marker, upload])

        def cloud(marker, rep=rep):
            return cloudckpt.CheckpointSaverHook(
                ctx.url(f"stall-cloudckpt/rep{rep}"), save_steps=every, listeners=[marker],
                local_dir=dirs["cloudckpt"], storage_options=ctx.storage_options, restore=False)

        makers = {"stock_local": stock, "stock_sync_upload": sync, "cloudckpt": cloud}
        order = list(VARIANTS)[rep % 3:] + list(VARIANTS)[: rep % 3]
        variants = {v: (makers[v], dirs[v]) for v in order}

        def after_step(name, hook, index, saved):
            if saved and hasattr(hook, "wait"):
                hook.wait()  # saves are minutes apart in real training: the upload ends before the next one

        times = train_lockstep(variants, last_step=every * cfg.stall_saves, width=cfg.mlp_width,
                               layers=cfg.mlp_layers, batch=cfg.mlp_batch, big_bytes=cfg.stall_bytes,
                               after_step=after_step)
        for variant, t in times.items():
            saves = t.save_times()
            if len(saves) != cfg.stall_saves:
                raise AssertionError(f"{variant}: expected {cfg.stall_saves} timed saves, got {len(saves)}")
            base = statistics.median(t.step_times(skip=2))
            run_stalls = [(s - base) * 1e3 for s in saves]
            if rep >= 0:
                stalls[variant].extend(run_stalls)
                tails[variant].extend(x * 1e3 for x in t.tails)
                per_rep[variant].append(statistics.median(run_stalls))
        if rep >= 0:
            stats = times["cloudckpt"].hook.stats()
            work["cloudckpt_committed"].append(stats.committed)
            work["cloudckpt_failed"].append(stats.failed)
            work["stock_sync_upload_mib"].append(round(sync_listeners[rep].uploaded_bytes / (1 << 20), 2))
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        if rep < 0:
            ctx.log(f"{KEY} warm-up repetition done")
            continue
        ctx.log(f"{KEY} rep {rep + 1}/{cfg.reps}: " + ", ".join(f"{v} {per_rep[v][-1]:.0f} ms" for v in VARIANTS))
    labels = {"stock_local": "(a) TF hook, local dir", "stock_sync_upload": "(b) TF hook + synchronous upload",
              "cloudckpt": "cloudckpt hook, s3://"}
    for v in VARIANTS:
        sc.figures[v] = summarize(stalls[v], "ms/save", label=labels[v])
    for v in ("stock_local", "cloudckpt"):
        sc.figures[f"{v}_tail"] = summarize(tails[v], "ms/save", label=f"{labels[v]}: after the Saver's write")
    sc.ratios["cloudckpt/stock_local"] = ratio(
        sc.figures["cloudckpt"], sc.figures["stock_local"], target="<= 1.10",
        paired=[c / s for c, s in zip(per_rep["cloudckpt"], per_rep["stock_local"])])
    sc.ratios["cloudckpt/stock_sync_upload"] = ratio(
        sc.figures["cloudckpt"], sc.figures["stock_sync_upload"], target="<= 0.5",
        paired=[c / s for c, s in zip(per_rep["cloudckpt"], per_rep["stock_sync_upload"])],
        note="target 'far below (b)'; <= 0.5 is counted as met")
    ctx.clean_bucket()
    return sc
