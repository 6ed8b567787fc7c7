"""Scenario 5: peak RSS growth of the process that uploads, then restores, a large checkpoint.

Each repetition runs in a fresh child process (``python -m bench.memory``),
the S3 server being another process, so only the uploader's memory counts.
The child first does what the hook's ``begin()`` does (checks the bucket) and
commits a tiny checkpoint, so one-time initialisation (botocore's service
models, the s3fs session, the thread pool) is not counted; then it resets its
peak RSS (``/proc/self/clear_refs``), uploads the checkpoint and reports
``VmHWM - VmRSS before``. The baseline is boto3's TransferManager in the same
kind of child. Restore the same way: ``download_checkpoint`` (after restoring a
tiny checkpoint, untimed) against TransferManager downloads.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from typing import TYPE_CHECKING

from .common import MB, Scenario, proc_status_kb, ratio, reset_peak_rss, summarize, total_size

if TYPE_CHECKING:  # the child process imports this module: keep it light
    from .context import Context

KEY, TITLE = "memory", "5. Memory while uploading / restoring"
METHODS = ("cloudckpt", "transfer_manager")
RESTORE_METHODS = ("cloudckpt_restore", "transfer_manager_restore")
TARGET_MB = 256


def run(ctx: Context) -> Scenario:
    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.memory_bytes, cfg.memory_shards)
    nbytes = total_size(files)
    sc = Scenario(KEY, TITLE, params={
        "checkpoint_mib": round(nbytes / MB, 1), "files": len(files),
        "figure": "peak RSS (VmHWM) minus RSS before the upload, fresh child process per repetition",
        "note": "the cloudckpt and TransferManager children of a repetition run at the same time"})
    growth: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(cfg.reps):
        # The two children run at the same time: RSS is a property of each process, not of how fast the
        # server answers (every buffer is allocated by construction, whatever the speed), and it halves the time.
        results = _children(ctx, {m: (files, f"memory/{m}/rep{rep}") for m in METHODS})
        ctx.clean_bucket()
        for method, result in results.items():
            growth[method].append(result["growth_kb"] / 1024)
            sc.params["peak_reset"] = result["peak_reset"]
        ctx.log(f"{KEY} rep {rep + 1}/{cfg.reps}: " + ", ".join(f"{m} +{growth[m][-1]:.0f} MiB" for m in METHODS))
    growth.update(_restores(ctx, files, sc))
    labels = {"cloudckpt": "cloudckpt Uploader", "transfer_manager": "boto3 TransferManager, max_concurrency=10",
              "cloudckpt_restore": "download_checkpoint",
              "transfer_manager_restore": "boto3 TransferManager download, max_concurrency=10"}
    for m in METHODS + RESTORE_METHODS:
        sc.figures[m] = summarize(growth[m], "MiB", label=labels[m])
    sc.figures["cloudckpt_fraction_of_checkpoint"] = summarize(
        [g * MB / nbytes for g in growth["cloudckpt"]], "x checkpoint size", label="cloudckpt growth / checkpoint size")
    sc.ratios["cloudckpt/transfer_manager"] = ratio(
        sc.figures["cloudckpt"], sc.figures["transfer_manager"],
        paired=[c / t for c, t in zip(growth["cloudckpt"], growth["transfer_manager"]) if t > 0] or None)
    sc.ratios["cloudckpt/target_256MiB"] = ratio(sc.figures["cloudckpt"], {"median": float(TARGET_MB)},
                                                 target="<= 1.0", note=f"absolute target: growth <= {TARGET_MB} MiB")
    sc.ratios["cloudckpt_restore/transfer_manager_restore"] = ratio(
        sc.figures["cloudckpt_restore"], sc.figures["transfer_manager_restore"],
        paired=[c / t for c, t in zip(growth["cloudckpt_restore"], growth["transfer_manager_restore"]) if t > 0]
        or None)
    sc.ratios["cloudckpt_restore/target_256MiB"] = ratio(
        sc.figures["cloudckpt_restore"], {"median": float(TARGET_MB)}, target="<= 1.0",
        note=f"absolute target: growth <= {TARGET_MB} MiB")
    return sc


def _restores(ctx: Context, files: dict[str, str], sc: Scenario) -> dict[str, list[float]]:
    """Peak RSS growth of restoring the checkpoint, per method and repetition (children at the same time)."""
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore

    commit_checkpoint(RemoteStore(ctx.url("memory/restore"), ctx.storage_options),
                      LocalCheckpoint(1, "model.ckpt-1", dict(files)))
    tiny = ctx.checkpoint_files(1 << 20, 1)
    commit_checkpoint(RemoteStore(ctx.url("memory/restore-warm"), ctx.storage_options),
                      LocalCheckpoint(1, "model.ckpt-1", tiny))
    growth: dict[str, list[float]] = {m: [] for m in RESTORE_METHODS}
    for rep in range(ctx.cfg.reps):
        results = _children(ctx, {m: (files, "memory/restore") for m in RESTORE_METHODS})
        for method, result in results.items():
            growth[method].append(result["growth_kb"] / 1024)
        ctx.log(f"{KEY} restore rep {rep + 1}/{ctx.cfg.reps}: " + ", ".join(
            f"{m} +{growth[m][-1]:.0f} MiB" for m in RESTORE_METHODS))
    ctx.clean_bucket()
    return growth


def _children(ctx: Context, jobs: dict[str, tuple[dict[str, str], str]]) -> dict[str, dict[str, Any]]:
    """Run one child per method at once; check what each uploaded; their reports by method."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = {}
    for method, (files, prefix) in jobs.items():
        args = {"method": method, "url": ctx.url(prefix), "bucket": ctx.bucket, "prefix": prefix, "files": files,
                "storage_options": ctx.storage_options, "workdir": ctx.workdir}
        procs[method] = subprocess.Popen([sys.executable, "-m", "bench.memory", json.dumps(args)], cwd=root,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for method, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child ({method}) failed with code {proc.returncode}:\n{err[-4000:]}")
        results[method] = json.loads(out.strip().splitlines()[-1])
        files, prefix = jobs[method]
        names = {k.rsplit("/", 1)[-1]: v for k, v in ctx.server.object_sizes(ctx.bucket, prefix + "/").items()}
        for name, path in files.items():
            if names.get(name) != os.path.getsize(path):
                raise AssertionError(f"memory child ({method}) did not upload {name} completely")
    return results


# -- the child ----------------------------------------------------------------------------------------
def _child_main(args: dict[str, Any]) -> dict[str, Any]:
    method, files = args["method"], args["files"]
    if method.endswith("_restore"):
        return _child_restore(args)
    fd, tiny = tempfile.mkstemp(dir=args["workdir"], prefix="warm.ckpt-0.", suffix=".index")
    os.write(fd, b"x" * 1024)
    os.close(fd)
    if method == "cloudckpt":
        from cloudckpt.commit import LocalCheckpoint
        from cloudckpt.remote import RemoteStore
        from cloudckpt.uploader import Uploader, UploadJob

        store = RemoteStore(args["url"], args["storage_options"])
        store.check_usable()
        uploader = Uploader(store)
        uploader.start()
        uploader.submit(UploadJob(LocalCheckpoint(0, "warm.ckpt-0", {"warm.ckpt-0.index": tiny})))
        uploader.wait()

        def upload() -> None:
            uploader.submit(UploadJob(LocalCheckpoint(1, "model.ckpt-1", files)))
            uploader.wait()
            stats = uploader.stats()
            if stats.committed != 2 or stats.failed:
                raise SystemExit(f"upload failed: {stats}")
    else:
        tm = _transfer_manager(args["storage_options"])
        tm.upload(tiny, args["bucket"], f"{args['prefix']}/warm").result()

        def upload() -> None:
            futures = [tm.upload(p, args["bucket"], f"{args['prefix']}/{n}") for n, p in files.items()]
            for f in futures:
                f.result()
    report = _measured(method, upload)
    os.unlink(tiny)
    return report


def _child_restore(args: dict[str, Any]) -> dict[str, Any]:
    method, files = args["method"], args["files"]
    dest = tempfile.mkdtemp(dir=args["workdir"], prefix=f"{method}-")
    opts = args["storage_options"]
    if method == "cloudckpt_restore":
        from cloudckpt import download_checkpoint

        download_checkpoint(args["url"] + "-warm", os.path.join(dest, "warm"), storage_options=opts)

        def restore() -> None:
            download_checkpoint(args["url"], dest, storage_options=opts)
    else:
        tm = _transfer_manager(opts)
        tm.download(args["bucket"], f"{args['prefix']}-warm/model.ckpt-1.index", os.path.join(dest, "warm")).result()

        def restore() -> None:
            futures = [tm.download(args["bucket"], f"{args['prefix']}/{n}", os.path.join(dest, n)) for n in files]
            for f in futures:
                f.result()
    report = _measured(method, restore)
    for name, path in files.items():
        if os.path.getsize(os.path.join(dest, name)) != os.path.getsize(path):
            raise SystemExit(f"{method}: {name} restored with the wrong size")
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    return report


def _transfer_manager(opts: dict[str, Any]) -> Any:
    """boto3's TransferManager (max_concurrency=10) on the bench server: the baseline of both directions."""
    import boto3
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = boto3.client("s3", endpoint_url=opts["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"])
    return create_transfer_manager(client, TransferConfig(max_concurrency=10))


def _measured(method: str, transfer: Callable[[], None]) -> dict[str, Any]:
    """Run ``transfer`` once with the peak RSS reset before it: the child's report (RSS in KiB, seconds)."""
    gc.collect()
    peak_reset = reset_peak_rss()
    before = proc_status_kb("VmRSS")
    started = time.perf_counter()
    transfer()
    seconds = time.perf_counter() - started
    peak = proc_status_kb("VmHWM")
    return {"method": method, "rss_before_kb": before, "peak_kb": peak, "growth_kb": max(0, peak - before),
            "seconds": seconds, "peak_reset": peak_reset}


if __name__ == "__main__":
    print(json.dumps(_child_main(json.loads(sys.argv[1]))), flush=True)
