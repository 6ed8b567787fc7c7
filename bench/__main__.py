"""``python -m bench [--quick]``: run every benchmark scenario, print a table, write bench/results.json.

Run from the repository root. Starts cloudckpt's embedded S3 server (moto) in a
child process, runs the scenarios with their baselines in the same run and
reports each figure (median and spread over the repetitions) and each ratio
against its baseline. The transport scenarios (upload, restore, memory,
deadline, incremental, upload_contended, restore_contended) run again against
SeaweedFS (``weed mini``, disk-backed), reported as ``<scenario>@seaweedfs``. Each server runs pinned to CPU 1 (``taskset``) when
the machine has a second core, so client CPU figures are the client's. ``--quick`` takes under 3 minutes on 2 cores, the full
mode under 20.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

from . import (background_step, deadline, incremental, integrity, memory, stall, step_overhead, tf2_async,  # noqa: E402
               throughput)
from .common import CONFIGS, GB, Config, machine, versions  # noqa: E402
from .context import Context  # noqa: E402
from .report import render_table  # noqa: E402
from .server import S3Server, ServerProcess  # noqa: E402

SCENARIOS = {
    step_overhead.KEY: step_overhead.run,
    stall.KEY: stall.run,
    throughput.UPLOAD_KEY: throughput.run_upload,
    throughput.RESTORE_KEY: throughput.run_restore,
    memory.KEY: memory.run,
    integrity.KEY: integrity.run,
    tf2_async.KEY: tf2_async.run,
    background_step.KEY: background_step.run,
    deadline.KEY: deadline.run,
    incremental.KEY: incremental.run,
    throughput.UPLOAD_CONTENDED_KEY: throughput.run_upload_contended,
    throughput.RESTORE_CONTENDED_KEY: throughput.run_restore_contended,
}
# Scenarios about moving bytes: run on every server (the others measure the training side: moto only).
TRANSPORT_SCENARIOS = (throughput.UPLOAD_KEY, throughput.RESTORE_KEY, memory.KEY, deadline.KEY, incremental.KEY,
                       throughput.UPLOAD_CONTENDED_KEY, throughput.RESTORE_CONTENDED_KEY)
SERVERS = ("moto", "seaweedfs")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="128 MiB upload/restore/memory runs, 32 MiB stall model: < 3 min on 2 cores "
                           "(default: full mode, 1 GiB / 2 GiB, about 30 min on 2 cores)")
    mode.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="a few MiB, 2 repetitions: checks the benchmark code runs (numbers meaningless)")
    p.set_defaults(mode="full")
    p.add_argument("--reps", type=int, help="repetitions per figure (default: 5)")
    p.add_argument("--only", help=f"comma-separated scenarios to run, of: {', '.join(SCENARIOS)}")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated S3 servers for the transport scenarios (default: {','.join(SERVERS)})")
    p.add_argument("--out", default=DEFAULT_OUT, help="results JSON path (default: bench/results.json)")
    p.add_argument("--workdir", help="scratch directory for checkpoints (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import logging

    args = parse_args(argv)
    cfg = CONFIGS[args.mode]
    if args.reps:
        cfg = dataclasses.replace(cfg, reps=args.reps)
    selected = list(SCENARIOS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = args.workdir or tempfile.mkdtemp(prefix="cloudckpt-bench-")
    own_workdir = args.workdir is None
    os.makedirs(workdir, exist_ok=True)
    _warn_if_disk_is_short(cfg, args.servers, workdir)
    started = time.monotonic()
    doc = {
        "benchmark": {"command": "python -m bench" + ("" if cfg.mode == "full" else f" --{cfg.mode}"),
                      "mode": cfg.mode, "config": cfg.as_dict(),
                      "started_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()},
        "machine": machine(),
        "versions": versions(),
        "scenarios": {},
    }
    doc["machine"]["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    failed = False
    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    if set(servers) - set(SERVERS) or not servers:
        print(f"unknown server(s) in {args.servers!r}; choose from {list(SERVERS)}", file=sys.stderr)
        return 2
    pin = "1" if len(os.sched_getaffinity(0)) > 1 else None
    doc["machine"]["s3_servers"] = {}
    try:
        for name in servers:
            keys = [k for k in selected if name == servers[0] or k in TRANSPORT_SCENARIOS]
            if not keys:
                continue
            try:
                server = _server(name, pin).start()
            except Exception:  # noqa: BLE001 - recorded for each of its scenarios, the other server still runs
                failed = True
                for key in keys:
                    label = key if name == servers[0] else f"{key}@{name}"
                    doc["scenarios"][label] = {"key": key, "error": traceback.format_exc(), "seconds": 0.0}
                print(f"server {name} FAILED to start:\n{traceback.format_exc()}", file=sys.stderr)
                continue
            try:
                doc["machine"]["s3_servers"][name] = server.description + (f", pinned to CPU {pin}" if pin else "")
                ctx = Context(cfg=cfg, server=server, bucket="bench", workdir=workdir, verbose=not args.quiet,
                              server_name=name)
                for key in keys:
                    label = key if name == servers[0] else f"{key}@{name}"
                    server.reset()  # moto holds objects in RAM: start every scenario empty
                    server.create_bucket(ctx.bucket)
                    ctx.log(f"scenario {label} ({cfg.mode}, {cfg.reps} reps)")
                    t0 = time.monotonic()
                    try:
                        result = SCENARIOS[key](ctx)
                        result.seconds = time.monotonic() - t0
                        result.params.setdefault("server", name)
                        doc["scenarios"][label] = result.as_dict()
                    except Exception:  # noqa: BLE001 - recorded, the other scenarios still run
                        failed = True
                        doc["scenarios"][label] = {"key": key, "error": traceback.format_exc(),
                                                   "seconds": time.monotonic() - t0}
                        print(f"scenario {label} FAILED:\n{traceback.format_exc()}", file=sys.stderr)
            finally:
                server.stop()
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["benchmark"]["seconds"] = round(time.monotonic() - started, 1)
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(render_table(doc))
    print(f"\nwrote {args.out} ({doc['benchmark']['seconds']:.0f}s)")
    return 1 if failed else 0


def _warn_if_disk_is_short(cfg: Config, servers: str, workdir: str) -> None:
    """Warn when the disk may not hold what the run writes. SeaweedFS keeps the bytes of deleted objects
    in its volume files until the bucket is deleted (between scenarios): an upload scenario writes every
    method's checkpoint in each of its warm-up and timed rounds into one bucket. With ~27 GiB free, a
    full run ran out of disk ("No space left on device") in its SeaweedFS memory scenario."""
    rounds = cfg.warmup_reps + cfg.reps + 1  # + the 1 MiB warm-ups and checks, rounded up to one more round
    need = rounds * 4 * cfg.upload_bytes + 2 * cfg.memory_bytes + cfg.upload_bytes if "seaweedfs" in servers \
        else 2 * cfg.memory_bytes + cfg.upload_bytes
    free = shutil.disk_usage(workdir).free
    if free < need:
        print(f"warning: {free / GB:.0f} GiB free on the disk of {workdir}; this run may write ~{need / GB:.0f} GiB "
              "(SeaweedFS keeps deleted objects' bytes until a scenario ends): free some, or run fewer --reps.",
              file=sys.stderr)


def _server(name: str, cpus: str | None) -> ServerProcess:
    if name == "seaweedfs":
        from .seaweed import SeaweedS3

        return SeaweedS3(cpus=cpus)
    return S3Server(cpus=cpus)


if __name__ == "__main__":
    sys.exit(main())
