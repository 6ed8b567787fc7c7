"""Scenarios 3 and 4: upload and restore throughput of a multi-file checkpoint.

Upload (3), same files, same server, each repetition runs every method in a
rotating order, after one discarded warm-up repetition:

* ``cloudckpt``: the hook's ``Uploader`` (checksums, uploads, size check,
  manifest, state file): the whole commit, timed from submit to committed
  (the store is created and checked first, as the hook's ``begin()`` does);
* ``transfer_manager``: boto3's TransferManager, ``TransferConfig(max_concurrency=10)``,
  every file submitted at once;
* ``fs_put``: a plain ``fs.put(files, dir)`` with s3fs.

Restore (4): ``download_checkpoint`` (creates its S3 client, lists, reads the
manifest, downloads, verifies size and crc32c of every file, moves them into
place: the whole public call) against
TransferManager downloads and ``fs.get`` of the same objects.

Every method's result is checked (object sizes on the server / local sizes),
so a baseline that silently did less work cannot win.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from .common import MB, Scenario, ratio, rotate, summarize, timed, total_size
from .context import Context

UPLOAD_KEY, UPLOAD_TITLE = "upload", "3. Upload throughput"
RESTORE_KEY, RESTORE_TITLE = "restore", "4. Restore throughput"
PREFIX = "model.ckpt-1"


# -- upload methods ------------------------------------------------------------------------------------
def upload_cloudckpt(ctx: Context, files: dict[str, str], prefix: str) -> float:
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
        seconds, done = timed(lambda: (uploader.submit(job), uploader.wait())[1])
    finally:
        uploader.close()
    stats = uploader.stats()
    if not done or stats.committed != 1 or stats.failed:
        raise AssertionError(f"cloudckpt upload did not commit: {stats}")
    _check_remote(ctx, prefix, files, extra=(f"{PREFIX}.manifest.json", "checkpoint"))
    return seconds


def upload_transfer_manager(ctx: Context, files: dict[str, str], prefix: str) -> float:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = _boto3_client(ctx)

    def go() -> None:
        tm = create_transfer_manager(client, TransferConfig(max_concurrency=10))
        try:
            futures = [tm.upload(path, ctx.bucket, f"{prefix}/{name}") for name, path in files.items()]
            for f in futures:
                f.result()
        finally:
            tm.shutdown()
    seconds, _ = timed(go)
    _check_remote(ctx, prefix, files)
    return seconds


def upload_fs_put(ctx: Context, files: dict[str, str], prefix: str) -> float:
    import fsspec

    fs = fsspec.filesystem("s3", **ctx.storage_options)
    seconds, _ = timed(lambda: fs.put(list(files.values()), f"{ctx.bucket}/{prefix}/"))
    _check_remote(ctx, prefix, files)
    return seconds


def _boto3_client(ctx: Context) -> Any:
    """One boto3 client (botocore's default config) per run, created outside any timing."""
    if "boto3_client" not in ctx.shared:
        ctx.shared["boto3_client"] = ctx.server.client()
    return ctx.shared["boto3_client"]


def _check_remote(ctx: Context, prefix: str, files: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    found = {k.rsplit("/", 1)[-1]: v for k, v in ctx.server.object_sizes(ctx.bucket, prefix + "/").items()}
    for name, path in files.items():
        if found.get(name) != os.path.getsize(path):
            raise AssertionError(f"{prefix}/{name}: size {found.get(name)} on the server, "
                                 f"{os.path.getsize(path)} locally")
    missing = [n for n in extra if n not in found]
    if missing:
        raise AssertionError(f"{prefix}: missing {missing}")


UPLOADS: dict[str, Callable[[Context, dict[str, str], str], float]] = {
    "cloudckpt": upload_cloudckpt, "transfer_manager": upload_transfer_manager, "fs_put": upload_fs_put}


# -- restore methods ------------------------------------------------------------------------------------
def restore_cloudckpt(ctx: Context, prefix: str, names: list[str], dest: str) -> float:
    from cloudckpt import download_checkpoint

    seconds, local_prefix = timed(lambda: download_checkpoint(ctx.url(prefix), dest,
                                                              storage_options=ctx.storage_options))
    if os.path.basename(local_prefix) != PREFIX:
        raise AssertionError(f"download_checkpoint returned {local_prefix}")
    return seconds


def restore_transfer_manager(ctx: Context, prefix: str, names: list[str], dest: str) -> float:
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    client = _boto3_client(ctx)

    def go() -> None:
        tm = create_transfer_manager(client, TransferConfig(max_concurrency=10))
        try:
            futures = [tm.download(ctx.bucket, f"{prefix}/{n}", os.path.join(dest, n)) for n in names]
            for f in futures:
                f.result()
        finally:
            tm.shutdown()
    return timed(go)[0]


def restore_fs_get(ctx: Context, prefix: str, names: list[str], dest: str) -> float:
    import fsspec

    fs = fsspec.filesystem("s3", **ctx.storage_options)
    return timed(lambda: fs.get([f"{ctx.bucket}/{prefix}/{n}" for n in names], dest + "/"))[0]


RESTORES: dict[str, Callable[[Context, str, list[str], str], float]] = {
    "cloudckpt": restore_cloudckpt, "transfer_manager": restore_transfer_manager, "fs_get": restore_fs_get}


# -- scenarios -------------------------------------------------------------------------------------------
def run_upload(ctx: Context) -> Scenario:
    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.upload_bytes, cfg.shards)
    nbytes = total_size(files)
    sc = Scenario(UPLOAD_KEY, UPLOAD_TITLE, params=_params(files, nbytes))
    small = _small(files)
    for method, upload in UPLOADS.items():  # warm-up: clients, connections, the server's first objects
        upload(ctx, small, f"upload/warmup/{method}")
    ctx.clean_bucket()
    seconds: dict[str, list[float]] = {m: [] for m in UPLOADS}
    for rep in range(cfg.reps):
        for method in rotate(list(UPLOADS), rep):
            seconds[method].append(UPLOADS[method](ctx, files, f"upload/{method}/rep{rep}"))
            ctx.clean_bucket()  # the server holds objects in RAM
        ctx.log(f"{UPLOAD_KEY} rep {rep + 1}/{cfg.reps}: " + ", ".join(
                f"{m} {nbytes / MB / seconds[m][-1]:.0f} MiB/s" for m in UPLOADS))
    _throughput_figures(sc, seconds, nbytes, {
        "cloudckpt": "cloudckpt Uploader (checksum + upload + commit)",
        "transfer_manager": "boto3 TransferManager, max_concurrency=10", "fs_put": "s3fs fs.put"})
    sc.ratios["cloudckpt/transfer_manager"] = _tp_ratio(sc, seconds, "cloudckpt", "transfer_manager", ">= 1.0")
    sc.ratios["cloudckpt/fs_put"] = _tp_ratio(sc, seconds, "cloudckpt", "fs_put", None)
    return sc


def run_restore(ctx: Context) -> Scenario:
    from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
    from cloudckpt.remote import RemoteStore

    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.upload_bytes, cfg.shards)
    nbytes = total_size(files)
    sc = Scenario(RESTORE_KEY, RESTORE_TITLE, params=_params(files, nbytes))
    prefix = "restore"
    commit_checkpoint(RemoteStore(ctx.url(prefix), ctx.storage_options), LocalCheckpoint(1, PREFIX, dict(files)))
    small = _small(files)
    commit_checkpoint(RemoteStore(ctx.url("restore-warmup"), ctx.storage_options),
                      LocalCheckpoint(1, PREFIX, small))
    for method, restore in RESTORES.items():  # warm-up: clients and connections
        _restore_checked(ctx, method, restore, "restore-warmup", small)
    seconds: dict[str, list[float]] = {m: [] for m in RESTORES}
    for rep in range(cfg.reps):
        for method in rotate(list(RESTORES), rep):
            seconds[method].append(_restore_checked(ctx, method, RESTORES[method], prefix, files))
        ctx.log(f"{RESTORE_KEY} rep {rep + 1}/{cfg.reps}: " + ", ".join(
                f"{m} {nbytes / MB / seconds[m][-1]:.0f} MiB/s" for m in RESTORES))
    _throughput_figures(sc, seconds, nbytes, {
        "cloudckpt": "download_checkpoint (download + crc32c verify + move into place)",
        "transfer_manager": "boto3 TransferManager download, max_concurrency=10", "fs_get": "s3fs fs.get"})
    sc.ratios["cloudckpt/transfer_manager"] = _tp_ratio(sc, seconds, "cloudckpt", "transfer_manager", ">= 1.0")
    sc.ratios["cloudckpt/fs_get"] = _tp_ratio(sc, seconds, "cloudckpt", "fs_get", None)
    ctx.clean_bucket()
    return sc


def _restore_checked(ctx: Context, method: str, restore: Callable[[Context, str, list[str], str], float],
                     prefix: str, files: dict[str, str]) -> float:
    dest = ctx.scratch(f"restore-{method}")
    try:
        seconds = restore(ctx, prefix, sorted(files), dest)
        for name, path in files.items():
            got = os.path.join(dest, name)
            if not os.path.isfile(got) or os.path.getsize(got) != os.path.getsize(path):
                raise AssertionError(f"{method}: {name} missing or wrong size after download")
        return seconds
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _small(files: dict[str, str]) -> dict[str, str]:
    """The checkpoint without its data shards (index + meta): for warming up clients and connections."""
    return {n: p for n, p in files.items() if ".data-" not in n}


def _params(files: dict[str, str], nbytes: int) -> dict[str, Any]:
    return {"checkpoint_mib": round(nbytes / MB, 1), "files": len(files),
            "file_mib": sorted((round(os.path.getsize(p) / MB, 2) for p in files.values()), reverse=True),
            "warmup": "each method first moves the checkpoint's small files (index, meta), untimed",
            "figure": "MiB/s = checkpoint bytes / wall time"}


def _throughput_figures(sc: Scenario, seconds: dict[str, list[float]], nbytes: int, labels: dict[str, str]) -> None:
    for method, secs in seconds.items():
        sc.figures[method] = summarize([nbytes / MB / s for s in secs], "MiB/s", label=labels[method],
                                       seconds=summarize(secs, "s"))


def _tp_ratio(sc: Scenario, seconds: dict[str, list[float]], a: str, b: str, target: str | None) -> dict[str, Any]:
    paired = [tb / ta for ta, tb in zip(seconds[a], seconds[b])]  # throughput ratio = inverse time ratio
    return ratio(sc.figures[a], sc.figures[b], target=target, paired=paired)
