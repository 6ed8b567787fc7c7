"""Scenario 8: the largest checkpoint committed within a 25 s preemption deadline.

GCE gives a spot VM 30 s between the preemption notice and the stop; 25 s
leave room for the final save. For each size of a ladder (growing), the
hook's ``Uploader`` commits a fresh checkpoint (checksums, upload, size check,
manifest, log entry, state file), timed from submit to committed; the ladder
stops at the first size that misses the deadline. Figures: each size's commit
time, the largest size committed in time and the size that would take 25 s (a
projection, labelled as such): interpolated between the largest size committed
in time and the first that missed (commit time is about linear in size there),
or that size's throughput x 25 s when none missed.
"""

from __future__ import annotations

from typing import Any

from .common import GB, MB, Scenario, summarize, timed_cpu, total_size
from .context import Context

KEY, TITLE = "deadline", "8. Largest checkpoint committed in a 25 s deadline"
DEADLINE_S = 25.0
SHARD_BYTES = 256 * MB  # TF's sharding of a large checkpoint is per variable; 256 MiB shards are typical


def ladder(cfg: Any) -> list[int]:
    """Checkpoint sizes tried, smallest first (by mode)."""
    return {"tiny": [4 * MB, 8 * MB], "quick": [512 * MB, 1 * GB, 2 * GB]}.get(
        cfg.mode, [512 * MB, 1 * GB, 2 * GB, 3 * GB, 4 * GB])  # from 512 MiB: a loaded moto misses 25 s with 1 GiB


def run(ctx: Context) -> Scenario:
    from cloudckpt.commit import LocalCheckpoint
    from cloudckpt.remote import RemoteStore
    from cloudckpt.uploader import Uploader, UploadJob

    sc = Scenario(KEY, TITLE, params={"deadline_s": DEADLINE_S, "server": ctx.server_name,
                                      "figure": "seconds from submit to committed (Uploader), one commit per size"})
    largest, largest_s = 0, 0.0
    missed: tuple[int, float] | None = None  # (bytes, seconds) of the first size over the deadline
    for step, size in enumerate(ladder(ctx.cfg), 1):
        files = ctx.checkpoint_files(size, max(1, size // SHARD_BYTES))
        nbytes = total_size(files)
        store = RemoteStore(ctx.url(f"deadline/{size // MB}"), ctx.storage_options)
        store.check_usable()
        uploader = Uploader(store)
        uploader.start()
        try:
            seconds, cpu, done = timed_cpu(lambda: (uploader.submit(UploadJob(LocalCheckpoint(
                step, "model.ckpt-1", dict(files)))), uploader.wait(timeout=DEADLINE_S * 4))[1])
        finally:
            uploader.close()
        stats = uploader.stats()
        committed = bool(done) and stats.committed == 1 and not stats.failed
        ctx.clean_bucket()
        sc.figures[f"commit_{size // MB}MiB"] = summarize([seconds], "s", label=f"commit of {nbytes / MB:.0f} MiB "
                                                          f"({len(files)} files), {cpu * GB / nbytes:.2f} CPU-s/GiB")
        ctx.log(f"{KEY}: {nbytes / MB:.0f} MiB committed={committed} in {seconds:.1f}s")
        if not committed or seconds > DEADLINE_S:
            missed = (nbytes, seconds) if committed else None
            break
        largest, largest_s = nbytes, seconds
    sc.figures["largest_committed"] = summarize([largest / GB], "GiB",
                                                label=f"largest ladder size committed within {DEADLINE_S:.0f} s")
    if missed is not None and largest:  # between the two sizes measured on either side of the deadline
        projected = largest + (DEADLINE_S - largest_s) * (missed[0] - largest) / (missed[1] - largest_s)
        how = f"interpolated between {largest / GB:.2g} GiB ({largest_s:.1f} s) and {missed[0] / GB:.2g} GiB " \
              f"({missed[1]:.1f} s)"
    else:
        projected = largest / largest_s * DEADLINE_S if largest else 0.0
        how = "the largest size's commit throughput x 25 s"
    sc.figures["projected_in_deadline"] = summarize([projected / GB], "GiB", label=f"projection: {how}")
    return sc
