"""Scenario 6: what the crc32c integrity check costs.

* ``crc_pass``: ``build_manifest`` exactly as ``commit_checkpoint`` runs it
  (the Uploader's 8-thread pool) over the upload checkpoint; seconds per GiB.
* ``upload_without_crc``: the same commit with the manifest precomputed, i.e.
  the upload as it would be if the checksums cost nothing on its critical path.
* ``upload_with_crc``: the same commit as shipped (checksums first, then uploads),
  alternating with ``upload_without_crc`` within each repetition;
* the fractions: crc pass time / commit time, and commit time with / without the crc pass.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .common import GB, MB, Scenario, ratio, summarize, timed, total_size
from .context import Context
from .throughput import PREFIX, _check_remote

KEY, TITLE = "integrity", "6. Cost of integrity (crc32c)"


def run(ctx: Context) -> Scenario:
    from cloudckpt.commit import LocalCheckpoint, build_manifest, commit_checkpoint
    from cloudckpt.manifest import crc32c_of_file
    from cloudckpt.remote import RemoteStore

    cfg = ctx.cfg
    files = ctx.checkpoint_files(cfg.upload_bytes, cfg.shards)
    nbytes = total_size(files)
    ckpt = LocalCheckpoint(1, PREFIX, dict(files))
    sc = Scenario(KEY, TITLE, params={"checkpoint_mib": round(nbytes / MB, 1), "files": len(files)})
    crc_s, single_s, with_crc_s, no_crc_s = [], [], [], []
    with ThreadPoolExecutor(max_workers=8) as pool:  # the Uploader's pool size
        manifest = build_manifest(ckpt, pool)  # also warms the page cache, as after a save
        for rep in range(cfg.reps):
            crc_s.append(timed(lambda: build_manifest(ckpt, pool))[0])
            single_s.append(timed(lambda: [crc32c_of_file(p) for p in files.values()])[0])
            for variant in (("with", "without") if rep % 2 == 0 else ("without", "with")):
                prefix = f"integrity/{variant}-rep{rep}"
                store = RemoteStore(ctx.url(prefix), ctx.storage_options)
                store.check_usable()  # as the hook's begin() does: the client exists before the first commit
                given = manifest if variant == "without" else None
                seconds = timed(lambda: commit_checkpoint(store, ckpt, executor=pool, manifest=given))[0]
                (no_crc_s if variant == "without" else with_crc_s).append(seconds)
                _check_remote(ctx, prefix, files, extra=(f"{PREFIX}.manifest.json",))
                ctx.clean_bucket()
            ctx.log(f"{KEY} rep {rep + 1}/{cfg.reps}: crc pass {crc_s[-1] * GB / nbytes:.2f} s/GiB, commit "
                    f"{nbytes / MB / with_crc_s[-1]:.0f} MiB/s, without the crc pass {nbytes / MB / no_crc_s[-1]:.0f} MiB/s")
    gib = nbytes / GB
    sc.figures["crc_pass"] = summarize([s / gib for s in crc_s], "s/GiB",
                                       label="build_manifest (8 threads, page cache warm)")
    sc.figures["crc_single_thread"] = summarize([gib / s for s in single_s], "GiB/s",
                                                label="crc32c_of_file, one thread")
    sc.figures["upload_with_crc"] = summarize([s / gib for s in with_crc_s], "s/GiB",
                                              label="commit_checkpoint as shipped (checksums, then uploads)")
    sc.figures["upload_without_crc"] = summarize([s / gib for s in no_crc_s], "s/GiB",
                                                 label="same commit, manifest precomputed")
    sc.ratios["crc_pass/upload"] = ratio(sc.figures["crc_pass"], sc.figures["upload_with_crc"], target="<= 0.05",
                                         note="share of the commit's wall time spent in the separate checksum pass")
    sc.ratios["upload_with_crc/upload_without_crc"] = ratio(
        sc.figures["upload_with_crc"], sc.figures["upload_without_crc"],
        paired=[w / n for w, n in zip(with_crc_s, no_crc_s)],
        note="what the checksum pass costs end to end (1.0 = free); the two alternate within a repetition")
    return sc
