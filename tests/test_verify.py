"""Verify that re-reads the bytes: retried like a download, bounded memory, and HEADs only what it checks.

Against real servers on 127.0.0.1 (SeaweedFS: disk-backed, keeps the full-object CRC32C cloudckpt's uploads
send; moto's server mode), with the fault proxy of ``tests/support`` in front for the faults and the counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

import cloudckpt
from cloudckpt import cli
from cloudckpt.commit import LocalCheckpoint, commit_checkpoint
from cloudckpt.errors import RemoteError
from cloudckpt.manifest import crc32c_parts_of_stream
from cloudckpt.remote import RemoteStore
from cloudckpt.restore import verify_checkpoint
from cloudckpt.retry import RetryPolicy
from cloudckpt.s3_transport import transport_for
from support.fault_proxy import FaultProxy

MiB = 1 << 20
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, seed=0)
DATA = "data-00000-of-00001"
# The data path: cloudckpt's S3 transport, or s3fs (an option the transport cannot honour keeps it there).
PATHS = {"transport": {}, "s3fs": {"s3_additional_kwargs": {"StorageClass": "STANDARD"}}}


def write(path, size: int, seed: int = 0) -> str:
    with open(path, "wb") as f:
        rng = np.random.default_rng(seed)
        for start in range(0, size, 16 * MiB):
            f.write(rng.bytes(min(16 * MiB, size - start)))
    return str(path)


def commit(server, url: str, tmp_path, step: int, sizes: dict[str, int]) -> None:
    files = {f"model.ckpt-{step}.{suffix}": write(tmp_path / f"{step}.{suffix}", size, step)
             for suffix, size in sizes.items()}
    commit_checkpoint(RemoteStore(url, server.storage_options), LocalCheckpoint(step, f"model.ckpt-{step}", files))


@pytest.fixture
def bucket(seaweed_server):
    name = f"vf-{uuid.uuid4().hex[:10]}"
    seaweed_server.create_bucket(name)
    return name


@pytest.mark.parametrize("kind", ["503", "reset"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_transient_error_while_re_reading_is_retried_and_verify_passes(seaweed_server, bucket, tmp_path, path,
                                                                        kind):
    url = f"s3://{bucket}/run"
    commit(seaweed_server, url, tmp_path, 5, {DATA: 6 * MiB + 7, "index": 100})
    with FaultProxy(seaweed_server.endpoint) as proxy:
        proxy.set_faults(only_methods=("GET",), path_filter=r"\.data-00000")
        proxy.fail_next(kind)
        causes: list[str] = []
        store = RemoteStore(url, {**seaweed_server.storage_options, **PATHS[path], "endpoint_url": proxy.url},
                            retry=FAST_RETRY, on_retry=causes.append)
        [info] = cloudckpt.list_checkpoints(url, seaweed_server.storage_options)
        read: list[int] = []
        report = verify_checkpoint(store, info, read.append, use_store_checksums=False)
        assert proxy.stats.get(kind) == 1
    assert report.ok, report.problems
    assert len(causes) == 1, causes  # counted by cause, as a download's retries are
    assert sum(read) == info.size  # what the failed attempt reported was taken back


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_cli_verify_retries_a_transient_error(moto_server, s3_url, tmp_path, kind, capsys):
    """`cloudckpt verify` (re-reading by default) on moto: one 503 / reset on a data GET is retried, exit 0."""
    commit(moto_server, s3_url, tmp_path, 5, {DATA: 3 * MiB, "index": 100})
    with FaultProxy(moto_server.endpoint) as proxy:
        proxy.set_faults(only_methods=("GET",), path_filter=r"\.data-00000")
        proxy.fail_next(kind)
        options = {**moto_server.storage_options, "endpoint_url": proxy.url}
        code = cli.main(["verify", s3_url, *(a for k, v in options.items() for a in ("-o", f"{k}={v}"))])
        assert proxy.stats.get(kind) == 1
    out = capsys.readouterr()
    assert code == 0, out
    assert "1 of 1 checkpoint(s)" in out.out and "verified OK" in out.out


def test_errors_that_outlast_the_retries_name_the_object_and_are_not_a_verdict(seaweed_server, bucket, tmp_path):
    url = f"s3://{bucket}/run"
    commit(seaweed_server, url, tmp_path, 5, {DATA: 2 * MiB, "index": 100})
    with FaultProxy(seaweed_server.endpoint) as proxy:
        proxy.set_faults(only_methods=("GET",), path_filter=r"\.data-00000")
        proxy.fail_next("503", count=FAST_RETRY.max_attempts)
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        with pytest.raises(RemoteError, match=rf"verify {url}/model\.ckpt-5\.{DATA} failed: SlowDown.*retried \d+ times"):
            cloudckpt.verify_checkpoints(url, storage_options=options, retry=FAST_RETRY, use_store_checksums=False)
        assert proxy.stats.get("503") == FAST_RETRY.max_attempts


def test_a_re_reading_verify_reads_one_large_data_file_over_every_stream(seaweed_server, bucket, tmp_path):
    """As a restore: the ranges of every file re-read share one pool of connections (8 by default), so the one
    data file of TF's default layout is read three 32 MiB ranges at once (2 with per-file streams: 8 // 3
    files), each checked per part as its manifest records them."""
    url = f"s3://{bucket}/run"
    commit(seaweed_server, url, tmp_path, 6, {DATA: 66 * MiB + 5, "index": 100, "meta": 3000})
    with FaultProxy(seaweed_server.endpoint) as proxy:
        proxy.set_faults(latency=0.5, only_methods=("GET",), path_filter=r"\.data-00000")
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        result = cloudckpt.verify_checkpoints(url, storage_options=options, use_store_checksums=False)
        assert proxy.most_held.get("GET") == 3, proxy.most_held
    assert result.ok and [r.status for r in result.reports] == ["ok"], result.reports
    assert {c.name: c.status for c in result.reports[0].files} == {
        f"model.ckpt-6.{s}": "ok" for s in (DATA, "index", "meta")}


@pytest.mark.parametrize("part_size", [2 * MiB, 3 * MiB])
def test_ranged_crc32c_of_an_object_matches_the_bytes_per_part(seaweed_server, bucket, tmp_path, part_size):
    """Several ranges (3 MiB range size), aligned to parts that do or do not divide it: the whole crc32c and
    each part's equal those of the local bytes."""
    size = 23 * MiB + 5
    local = write(tmp_path / "obj", size, 3)
    transport = transport_for(seaweed_server.storage_options, range_size=3 * MiB)
    try:
        transport.put_file(local, bucket, "obj")
        read: list[int] = []
        crc, parts = transport.crc32c_of_object(bucket, "obj", size, part_size=part_size, progress=read.append)
        whole, no_parts = transport.crc32c_of_object(bucket, "obj", size)
        with pytest.raises(FileNotFoundError):
            transport.crc32c_of_object(bucket, "gone", 10)
    finally:
        transport.close()
    with open(local, "rb") as f:
        _, want, want_parts = crc32c_parts_of_stream(f, part_size)
    assert (crc, parts, whole, no_parts) == (want, want_parts, want, ())
    assert sum(read) == size


_MEASURE = textwrap.dedent("""
    import json, sys
    import cloudckpt

    url, options, use_store = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"

    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    # warm up (imports, sessions, thread pools) on the small checkpoint, then measure the large one
    assert cloudckpt.verify(url, 1, storage_options=options, use_store_checksums=use_store).ok
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = kib("VmRSS")
    report = cloudckpt.verify(url, 2, storage_options=options, use_store_checksums=use_store)
    print(json.dumps({"ok": report.ok, "growth_mib": (kib("VmHWM") - before) / 1024}))
""")


@pytest.fixture(scope="module")
def large_checkpoint(seaweed_server, tmp_path_factory):
    """Step 2: 288 MiB in 4 files (3 x 96 MiB + an index) on SeaweedFS; step 1: a small one."""
    bucket = f"vf-{uuid.uuid4().hex[:10]}"
    seaweed_server.create_bucket(bucket)
    url = f"s3://{bucket}/run"
    tmp = tmp_path_factory.mktemp("large")
    commit(seaweed_server, url, tmp, 1, {DATA: MiB, "index": 100})
    commit(seaweed_server, url, tmp, 2, {f"data-0000{i}-of-00003": 96 * MiB for i in range(3)} | {"index": 100})
    for name in os.listdir(tmp):
        os.unlink(tmp / name)
    return url


@pytest.mark.parametrize("path", sorted(PATHS))
def test_re_reading_verify_memory_stays_bounded(seaweed_server, large_checkpoint, path):
    """Peak RSS growth of re-reading 288 MiB (3 files read at once) stays far below what is read: the bytes
    are checksummed and dropped (s3fs's default 50 MiB read-ahead block cost ~110-150 MiB per file)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    options = {**seaweed_server.storage_options, **PATHS[path]}
    source = os.path.dirname(os.path.dirname(cloudckpt.__file__))  # this checkout's cloudckpt
    out = subprocess.run([sys.executable, "-c", _MEASURE, large_checkpoint, json.dumps(options), "0"],
                         capture_output=True, text=True, timeout=300, cwd=source)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert result["growth_mib"] < 64, result  # 288 MiB read


def test_store_checksums_head_only_the_files_of_the_checkpoint_once_each(seaweed_server, bucket, tmp_path):
    """12 checkpoints of 2 files: verifying one sends 2 HEADs to data objects, --all 2 per checkpoint."""
    url = f"s3://{bucket}/run"
    for step in range(1, 13):
        commit(seaweed_server, url, tmp_path, step, {DATA: 1000, "index": 100})

    def data_heads(events):
        # manifests and commit-log entries are read by the directory scan (s3fs: a HEAD, then a GET)
        return sorted(p.rsplit("/", 1)[-1] for m, p, _ in events
                      if m == "HEAD" and not p.endswith(".manifest.json") and "/.cloudckpt/" not in p)

    with FaultProxy(seaweed_server.endpoint) as proxy:
        options = {**seaweed_server.storage_options, "endpoint_url": proxy.url}
        one = cloudckpt.verify_checkpoints(url, 7, storage_options=options, use_store_checksums=True)
        heads_one = data_heads(proxy.events)
        before = len(proxy.events)
        every = cloudckpt.verify_checkpoints(url, all_steps=True, storage_options=options, use_store_checksums=True)
        heads_all = data_heads(proxy.events[before:])
        before = len(proxy.events)
        code = cli.main(["verify", url, "--store-checksums",
                         *(a for k, v in options.items() for a in ("-o", f"{k}={v}"))])
        heads_cli = data_heads(proxy.events[before:])
        gets = [p for m, p, _ in proxy.events if m == "GET" and DATA in p]
    assert one.ok and every.ok and len(every.reports) == 12 and code == 0
    assert heads_cli == [f"model.ckpt-12.{DATA}", "model.ckpt-12.index"]
    assert heads_one == [f"model.ckpt-7.{DATA}", "model.ckpt-7.index"]
    assert heads_all == sorted(f"model.ckpt-{s}.{x}" for s in range(1, 13) for x in (DATA, "index"))
    assert gets == []  # SeaweedFS keeps the CRC32C: nothing re-read
