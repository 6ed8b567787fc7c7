"""The final checkpoint of a preemption against an older checkpoint whose upload is in flight.

Real S3 (moto's server) behind the fault proxy turned into a slow link (``FaultProxy.set_bandwidth``): the
older checkpoint's upload is slow because the link is, and its throughput is measured by the uploader.
A spot-VM trial lost its final checkpoint so: the older one in flight ran to its end first, and the final one
missed the deadline.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid

import boto3
import pytest

import cloudckpt
from cloudckpt.engine import CheckpointEngine
from support.checks import assert_all_committed_intact
from support.fault_proxy import FaultProxy

MiB = 1 << 20
LINK = 4 * MiB  # bytes/s of the slow link
# Multipart uploads of 5 MiB parts (4 in flight) from 5 MiB on: an abandoned file has parts to abort.
TRANSFER = cloudckpt.TransferOptions(part_size=5 * MiB, multipart_threshold=5 * MiB)


@pytest.fixture
def slow_link(moto_server):
    """(url through the proxy, proxy, storage options through it, direct storage options, bucket)."""
    bucket = f"final-{uuid.uuid4().hex[:10]}"
    moto_server.create_bucket(bucket)
    with FaultProxy(moto_server.endpoint) as proxy:
        options = {**moto_server.storage_options, "endpoint_url": proxy.url}
        yield f"s3://{bucket}/runs/exp1", proxy, options, moto_server.storage_options, bucket


@pytest.fixture
def watcher():
    watcher = cloudckpt.PreemptionWatcher(("gce",), gce_metadata_url="http://127.0.0.1:9", poll_interval=60)
    yield watcher
    watcher.stop()


def write_checkpoint(directory, step: int, size: int) -> list[str]:
    """A TF-named checkpoint of ``size`` bytes of data (incompressible: os.urandom) and a small index."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for suffix, nbytes in (("data-00000-of-00001", size), ("index", 1000)):
        path = os.path.join(directory, f"ckpt-{step}.{suffix}")
        with open(path, "wb") as f:
            f.write(os.urandom(nbytes))
        paths.append(path)
    return paths


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def multipart_uploads(options: dict, bucket: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                      aws_secret_access_key=options["secret"], region_name="us-east-1")
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def start_preempted_run(url, proxy, options, tmp_path, watcher, *, older_size: int, sent_before_notice: int,
                        deadline: float) -> CheckpointEngine:
    """An engine that committed step 1, then submitted step 150 (``older_size`` bytes) on the slow link; once
    the link has carried ``sent_before_notice`` bytes of it, a GCE notice arrives (``deadline`` seconds)."""
    local = tmp_path / "local"
    engine = CheckpointEngine(url, str(local), storage_options=options, preemption=watcher,
                              preemption_deadline=deadline, transfer=TRANSFER)
    engine.open()
    engine.start_watching()
    engine.submit(1, write_checkpoint(local, 1, 1000))
    engine.wait(60)  # the previous committed checkpoint, at full speed
    proxy.set_bandwidth(LINK)
    before = proxy.received_bytes
    engine.submit(150, write_checkpoint(local, 150, older_size))
    wait_for(lambda: proxy.received_bytes - before >= sent_before_notice, 60, "the upload of step 150 to get going")
    watcher.trigger("gce", "instance/preempted=TRUE", 25)
    return engine


def test_an_older_upload_in_flight_is_abandoned_when_only_the_final_checkpoint_can_make_the_deadline(
        slow_link, tmp_path, watcher, caplog):
    """Step 150 (40 MiB) is 3 s into its upload at 4 MiB/s when the notice comes (deadline 6 s): its rest (~7 s)
    and then the final step 175 (8 MiB, ~2 s) would not fit; step 175 alone does. Step 150 is abandoned (its
    multipart uploads aborted, nothing of it committed, counted as dropped) and step 175 is committed in time;
    the log says why, with the figures. Before: step 150 ran to its end and step 175 missed the deadline."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    url, proxy, options, direct, bucket = slow_link
    engine = start_preempted_run(url, proxy, options, tmp_path, watcher, older_size=40 * MiB,
                                 sent_before_notice=12 * MiB, deadline=6.0)
    try:
        assert engine.pending_steps() == [150]
        engine.prepare_final_save(175)
        engine.submit(175, write_checkpoint(tmp_path / "local", 175, 8 * MiB))
        engine.finish()
        assert engine.preempted
        took = time.monotonic() - engine.notice.received_at
        stats = engine.stats()
    finally:
        engine.close(timeout=0)
    assert took < 6.0
    assert cloudckpt.latest_checkpoint(url, direct).step == 175
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [1, 175]  # 150 never committed
    assert sorted(assert_all_committed_intact(url, direct)) == [1, 175]
    assert multipart_uploads(direct, bucket) == []  # step 150's parts were aborted, not left behind
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (2, 1, 0, 175)
    abandon = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and "abandoning the upload of checkpoint step 150" in r.getMessage()]
    assert len(abandon) == 1, [r.getMessage() for r in caplog.records]
    assert "final checkpoint (step 175)" in abandon[0] and "s are left" in abandon[0]
    # the link's throughput, measured from delivered bytes: what the sockets' send queues hold (megabytes,
    # filled at once) is not counted as sent (it was: 6.5 MiB/s measured on this 4 MiB/s link)
    rate = float(re.search(r"at ([\d.]+) MiB/s", abandon[0]).group(1))
    assert 2.5 <= rate <= 5.0, abandon[0]
    assert "stays step 1 until the final one commits" in abandon[0]
    assert "Preemption: committed final checkpoint step 175" in caplog.text


def test_the_older_upload_finishes_when_even_the_final_checkpoint_alone_would_not_make_the_deadline(
        slow_link, tmp_path, watcher, caplog):
    """Step 150 (24 MiB) is 3 s into its upload at 4 MiB/s when the notice comes (deadline 6 s); the final
    step 175 (40 MiB, ~10 s) could not make it even alone. Step 150 is let finish -- the better bet -- and
    committed; the log says why. (Abandoning it would lose both.)"""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    url, proxy, options, direct, bucket = slow_link
    engine = start_preempted_run(url, proxy, options, tmp_path, watcher, older_size=24 * MiB,
                                 sent_before_notice=12 * MiB, deadline=6.0)
    try:
        engine.prepare_final_save(175)
        engine.submit(175, write_checkpoint(tmp_path / "local", 175, 40 * MiB))
        engine.finish()  # the deadline passes with step 175 uploading: logged, not raised (preempted)
        assert engine.preempted
        stats = engine.stats()
    finally:
        engine.close(timeout=0)
    assert cloudckpt.latest_checkpoint(url, direct).step == 150
    assert sorted(assert_all_committed_intact(url, direct)) == [1, 150]
    assert stats.last_committed_step == 150 and stats.committed == 2
    keep = [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "letting the upload of checkpoint step 150 finish" in r.getMessage()]
    assert len(keep) == 1, [r.getMessage() for r in caplog.records]
    assert "even the final one alone would not make the deadline" in keep[0] and "better bet" in keep[0]
    assert "abandoning the upload" not in caplog.text
    assert "the final checkpoint (step 175) was not committed" in caplog.text


def test_cancelling_one_transfer_scope_leaves_the_others_going(slow_link, tmp_path):
    """Two uploads in flight at once through one store, each in its own transfer scope, on the slow link:
    cancelling scope A stops A's requests (its multipart upload aborted, no object) and nothing else. B, and
    an upload started afterwards outside any scope, complete; A's scope counted what it delivered."""
    from cloudckpt.remote import RemoteStore
    from cloudckpt.cancel import TransferCancelled

    url, proxy, options, direct, bucket = slow_link
    store = RemoteStore(url, options, transfer=TRANSFER)
    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = str(tmp_path / name)
        with open(paths[name], "wb") as f:
            f.write(os.urandom(10 * MiB))
    proxy.set_bandwidth(2 * LINK)
    scopes, outcomes = {}, {}

    def upload(name):
        with store.transfer_scope() as scope:
            scopes[name] = scope
            try:
                outcomes[name] = store.put_file_if_absent(paths[name], name)
            except Exception as exc:  # noqa: BLE001 - what the test looks at
                outcomes[name] = exc

    threads = {name: threading.Thread(target=upload, args=(name,)) for name in ("a", "b")}
    for thread in threads.values():
        thread.start()
    wait_for(lambda: len(scopes) == 2 and proxy.received_bytes >= 4 * MiB, 60, "both uploads to get going")
    store.cancel_transfers(scopes["a"])
    threads["a"].join(10)
    assert not threads["a"].is_alive(), "the cancelled upload did not stop"
    assert isinstance(outcomes["a"], Exception) and isinstance(outcomes["a"].__cause__, TransferCancelled), \
        outcomes["a"]
    assert not store.cancel.is_set()  # the store's other transfers were never cancelled
    assert store.put_file_if_absent(paths["c"], "c")  # outside any scope, while B still uploads
    threads["b"].join(60)
    assert outcomes["b"] is True
    assert 0 < scopes["a"].bytes_sent < 10 * MiB and scopes["b"].bytes_sent == 10 * MiB
    names = {o.name: o.size for o in store.list_objects()}
    assert names == {"b": 10 * MiB, "c": 10 * MiB}
    assert multipart_uploads(direct, bucket) == []


def test_the_notice_log_line_quotes_the_deadline_in_use(tmp_path, memory_url, watcher, caplog):
    """With preemption_deadline shorter than the platform's grace period, the notice's WARNING names the
    deadline in use (12 s), not only the platform's 25 s (a spot-VM trial read '25 s' and expected that)."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    engine = CheckpointEngine(memory_url, str(tmp_path), preemption=watcher, preemption_deadline=12)
    engine.open()
    engine.start_watching()
    watcher.trigger("gce", "instance/preempted=TRUE", 25)
    engine.close()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Preemption notice from gce")]
    assert "deadline 12 s: preemption_deadline" in line and "hard stop is about 25 s away" in line, line
