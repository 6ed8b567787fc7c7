"""Scenario 8: training step time while a big commit runs in the background, against no upload.

The issue's acceptance 2: a checkpoint of ``upload_bytes`` (1 GiB in full
mode, ``shards`` data files) is committed by a ``CheckpointEngine`` to
``s3://`` while the training thread keeps stepping an MLP graph in a plain
``tf.compat.v1.Session``; the figure is the median step time while the commit
is in flight, against the median of as many steps with nothing uploading,
measured right after it in the same session. The S3 server runs in its own
process pinned to CPU 1 (``taskset -c 1``), standing in for a store on
another machine; the training process, the engine's uploader threads
(checksums, HTTP) included, runs on CPU 0 with one TensorFlow intra-op and one
inter-op thread in both phases, so the figure is what the uploader takes from
the core it shares with training. (Unpinned, TensorFlow's intra-op threads
ran on both cores and the step time mostly measured the server receiving the
commit on CPU 1.) Loopback TCP still charges the sender's core with much of
the receiving side's kernel work, which a NIC would not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time

from .common import Scenario, ratio, summarize, threads_pinned
from .context import Context
from .server import S3Server

KEY = "background_step"
TITLE = "8. Step time, commit in background"
PINNED_CPU = "1"
CLIENT_CPU = 0  # the training process, uploader included, when the server could be pinned
MIN_STEPS = 50  # at least this many steps per phase, however fast the commit
READ_TIMEOUT = 600  # seconds


def run(ctx: Context) -> Scenario:
    import tensorflow as tf

    import cloudckpt

    from .training import build_model

    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.upload_bytes, cfg.shards)
    checkpoint_bytes = sum(os.path.getsize(p) for p in files.values())
    sc = Scenario(KEY, TITLE, params={
        "checkpoint_mib": round(checkpoint_bytes / (1 << 20), 1), "files": len(files),
        "model": f"MLP {cfg.mlp_layers}x{cfg.mlp_width}, batch {cfg.mlp_batch}",
        "server": f"moto in a child process pinned with taskset -c {PINNED_CPU}",
        "figure": "median sess.run() wall time while the commit is in flight, vs the same number of steps "
                  "with no upload right after it"})
    per_rep: dict[str, list[float]] = {"no_upload": [], "background_commit": []}
    upload_mibps: list[float] = []
    steps_per_rep: list[int] = []
    server = _pinned_server()
    pinned = server.cpus is not None and CLIENT_CPU in os.sched_getaffinity(0)
    sc.params["training"] = (f"pinned to CPU {CLIENT_CPU} with the uploader, 1 intra-op and 1 inter-op thread"
                             if pinned else "unpinned, TensorFlow's default thread pools")
    # moto on one loaded core can take minutes to complete a 128 MiB multipart upload: past botocore's
    # 60 s read timeout the retried CompleteMultipartUpload finds the upload gone.
    options = {**server.storage_options, "config_kwargs": {"read_timeout": READ_TIMEOUT}}
    try:
        server.create_bucket(ctx.bucket)
        with threads_pinned({CLIENT_CPU}) if pinned else contextlib.nullcontext(), tf.Graph().as_default():
            train_op, _ = build_model(width=cfg.mlp_width, layers=cfg.mlp_layers, batch=cfg.mlp_batch)
            config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1) \
                if pinned else None
            with tf.compat.v1.Session(config=config) as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                for _ in range(MIN_STEPS):  # warm up the session
                    sess.run(train_op)
                for rep in range(-cfg.warmup_reps, cfg.reps):
                    local = ctx.scratch("background")
                    step = rep + cfg.warmup_reps + 1
                    named = {name.replace("model.ckpt-1", f"model.ckpt-{step}"): path for name, path in files.items()}
                    engine = cloudckpt.CheckpointEngine(f"s3://{ctx.bucket}/background/rep{step}", local,
                                                        storage_options=options)
                    engine.open()
                    engine.register()
                    try:
                        started = time.perf_counter()
                        engine.submit(step, named)
                        busy = []
                        while engine.pending_steps() or len(busy) < MIN_STEPS:
                            t0 = time.perf_counter()
                            sess.run(train_op)
                            if engine.pending_steps():
                                busy.append(time.perf_counter() - t0)
                        engine.wait()
                        seconds = time.perf_counter() - started
                        stats = engine.stats()
                        if stats.committed != 1:
                            raise AssertionError(f"the background commit did not commit: {stats}")
                    finally:
                        engine.close()
                    quiet = []
                    for _ in range(max(len(busy), MIN_STEPS)):  # nothing uploading now
                        t0 = time.perf_counter()
                        sess.run(train_op)
                        quiet.append(time.perf_counter() - t0)
                    shutil.rmtree(local, ignore_errors=True)
                    server.empty_bucket(ctx.bucket)
                    if rep < 0 or not busy:
                        continue
                    per_rep["no_upload"].append(statistics.median(quiet) * 1e3)
                    per_rep["background_commit"].append(statistics.median(busy) * 1e3)
                    upload_mibps.append(checkpoint_bytes / (1 << 20) / seconds)
                    steps_per_rep.append(len(busy))
                    ctx.log(f"{KEY} rep {rep + 1}/{cfg.reps}: no upload {per_rep['no_upload'][-1]:.3f} ms, "
                            f"during commit {per_rep['background_commit'][-1]:.3f} ms ({len(busy)} steps, "
                            f"{upload_mibps[-1]:.0f} MiB/s)")
    finally:
        server.stop()
    if not per_rep["no_upload"]:
        raise AssertionError("no repetition had a step while the commit was in flight")
    sc.params["steps_during_commit"] = steps_per_rep
    sc.figures["no_upload"] = summarize(per_rep["no_upload"], "ms/step", label="no upload")
    sc.figures["background_commit"] = summarize(per_rep["background_commit"], "ms/step",
                                                label=f"{checkpoint_bytes / (1 << 20):.0f} MiB commit in flight")
    sc.figures["commit_mibps"] = summarize(upload_mibps, "MiB/s", label="the background commit's throughput")
    sc.ratios["background_commit/no_upload"] = ratio(
        sc.figures["background_commit"], sc.figures["no_upload"], target="<= 1.05",
        paired=[b / q for b, q in zip(per_rep["background_commit"], per_rep["no_upload"])])
    return sc


def _pinned_server(timeout: float = 60.0) -> S3Server:
    """A moto server child process pinned to CPU ``PINNED_CPU`` (unpinned where taskset or the CPU is missing)."""
    pinnable = shutil.which("taskset") and int(PINNED_CPU) in os.sched_getaffinity(0)
    return S3Server(cpus=PINNED_CPU if pinnable else None).start(timeout)
