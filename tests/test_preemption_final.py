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


# -- the commit point: the point of no return of an upload --------------------------------------------------------
HOLD = 1.0  # seconds the proxy holds the request under test before forwarding it to the store
TARGETS = {  # what the proxy holds: a create-only PUT of step 150's commit point
    "manifest": r"/ckpt-150\.manifest\.json$",
    "commit entry": r"/\.cloudckpt/log/\d+/\d+\.json$",  # the first log entry written after arming: 150's commit
    "data": r"/ckpt-150\.index$",  # one of its data files (the other is copied server-side)
}


class HoldOnce:
    """A ``FaultProxy`` path filter: the first request whose path matches ``pattern`` (once armed), no other."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.held: list[str] = []

    def __call__(self, path: str) -> bool:
        if self.held or not self.pattern.search(path.split("?")[0]):
            return False
        self.held.append(path)
        return True


def checkpoint_of(directory, step: int, data: bytes, index_size: int = 1000):
    """A ``LocalCheckpoint`` of step ``step``: a data file of ``data`` and a random index."""
    from cloudckpt.commit import LocalCheckpoint

    os.makedirs(directory, exist_ok=True)
    files = {}
    for suffix, content in (("data-00000-of-00001", data), ("index", os.urandom(index_size))):
        name = f"ckpt-{step}.{suffix}"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)
        files[name] = os.path.join(directory, name)
    return LocalCheckpoint(step=step, prefix=f"ckpt-{step}", files=files)


def hold_step_150(slow_link, tmp_path, target: str, hold: float = HOLD):
    """An uploader through the proxy that committed step 1 (16 MiB of data), then submitted step 150 with the
    same data (copied server-side: an incremental commit sends only its index); returns (uploader, proxy, url,
    direct options) once the proxy holds step 150's request of ``target`` (``TARGETS``) for ``hold`` s."""
    from cloudckpt.remote import RemoteStore
    from cloudckpt.uploader import Uploader, UploadJob

    url, proxy, options, direct, bucket = slow_link
    uploader = Uploader(RemoteStore(url, options, transfer=TRANSFER), max_pending=2)
    uploader.start()
    data = os.urandom(16 * MiB)
    uploader.submit(UploadJob(checkpoint_of(tmp_path / "local", 1, data)))
    assert uploader.wait(60) and uploader.stats().committed == 1
    hold_once = HoldOnce(TARGETS[target])
    proxy.set_faults(latency=hold, only_methods=("PUT",), path_filter=hold_once)
    uploader.submit(UploadJob(checkpoint_of(tmp_path / "local", 150, data)))
    wait_for(lambda: proxy.most_held.get("PUT", 0) >= 1, 60, f"the proxy to hold step 150's {target}")
    return uploader, proxy, url, direct


@pytest.mark.parametrize("target", ["manifest", "commit entry"])
def test_an_older_upload_writing_its_commit_point_cannot_be_abandoned(slow_link, tmp_path, caplog, target):
    """Step 150 (an incremental commit: 16 MiB copied server-side, 1 KB sent) is writing its commit point, held
    by the store for 1 s, when the final step 175 is queued with 2 s left. Its figures call for an abandon (no
    throughput figure; copied bytes are never "sent", so 16 MiB look left to send, more than the final's 2 KB),
    but it is past its point of no return: not abandoned, the plan says "could not abandon it: it is
    committing"; it commits and is counted and logged committed, then step 175 commits.

    Before: the abandon cut the request in flight. The store applied it nonetheless (the proxy forwards what
    it holds, as a PUT that arrived before the client dropped the connection): with the commit entry, step
    150 was committed in the bucket while the uploader counted it dropped and logged "nothing of it was
    committed"."""
    from cloudckpt.uploader import UploadJob

    caplog.set_level(logging.INFO, logger="cloudckpt")
    uploader, proxy, url, direct = hold_step_150(slow_link, tmp_path, target)
    try:
        uploader.submit(UploadJob(checkpoint_of(tmp_path / "final", 175, os.urandom(1000)), required=True))
        plan = uploader.favour_final(175, time.monotonic() + 2.0)
        assert (plan.action, plan.case) == ("keep", "older is committing"), plan
        assert plan.reason.startswith("could not abandon it: it is committing"), plan.reason
        assert "the figures called for it: no upload throughput measured yet" in plan.reason, plan.reason
        assert uploader.favour_final(175, time.monotonic() + 2.0).case == "older is committing"  # logged once
        assert uploader.wait(60)
    finally:
        uploader.close()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (3, 0, 0, 175), stats
    assert stats.bytes_copied >= 16 * MiB  # step 150's data was copied, never sent: why its figures misled
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [1, 150, 175]
    assert sorted(assert_all_committed_intact(url, direct)) == [1, 150, 175]
    messages = [r.getMessage() for r in caplog.records]
    (line,) = [m for m in messages if "letting the upload of checkpoint step 150 finish" in m]
    assert "could not abandon it: it is committing" in line, line
    assert not [m for m in messages if "abandoning the upload" in m or "nothing of it was committed" in m], messages
    assert any(m.startswith("Committed checkpoint step 150 ") for m in messages), messages


def test_an_older_upload_still_sending_its_data_is_abandoned(slow_link, tmp_path, caplog):
    """The same, with step 150's data still on its way (its index held by the store) when the final step 175 is
    queued: abandoned for the final one (its point of no return not reached, and never reached after the cancel:
    its manifest is never written), counted as dropped; step 175 commits."""
    from cloudckpt.uploader import UploadJob

    caplog.set_level(logging.INFO, logger="cloudckpt")
    uploader, proxy, url, direct = hold_step_150(slow_link, tmp_path, "data")
    try:
        uploader.submit(UploadJob(checkpoint_of(tmp_path / "final", 175, os.urandom(1000)), required=True))
        plan = uploader.favour_final(175, time.monotonic() + 2.0)
        assert (plan.action, plan.case) == ("abandon", "no figure"), plan
        assert uploader.wait(60)
        time.sleep(HOLD)  # the held index reaches the store (debris): still nothing of step 150 is committed
    finally:
        uploader.close()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (2, 1, 0, 175), stats
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [1, 175]
    from cloudckpt.remote import RemoteStore
    assert "ckpt-150.manifest.json" not in {o.name for o in RemoteStore(url, direct).list_objects()}
    assert "Upload of checkpoint step 150 stopped (abandoned for the final checkpoint)" in caplog.text


def test_close_does_not_cut_a_commit_point_in_flight(slow_link, tmp_path, caplog):
    """``close(timeout=0)`` (a Ctrl-C, the deadline of a final wait) while step 150 writes its commit-log entry,
    the commit point, held by the store for 0.5 s: it is not abandoned but finishes within close's grace, and is
    counted, logged and in the bucket as committed. Before: close cut the request; the store applied it anyway,
    so step 150 was committed in the bucket while the uploader counted it dropped ("stopped (abandoned)")."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    uploader, proxy, url, direct = hold_step_150(slow_link, tmp_path, "commit entry", hold=0.5)
    started = time.monotonic()
    uploader.close(timeout=0)
    took = time.monotonic() - started
    assert uploader.pending_steps() == [], "close returned with the commit still going"
    time.sleep(0.5)  # (before the fix: the held entry reaches the store after close returned)
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (2, 0, 0, 150), stats
    assert took < 2.0
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [1, 150]
    assert "Not abandoning checkpoint step 150: it is writing its commit point" in caplog.text
    assert "stopped (abandoned)" not in caplog.text and "Abandoning upload" not in caplog.text


def test_the_point_of_no_return_of_a_transfer_scope(memory_url):
    """A scope's cancel and its point of no return exclude each other: passed, neither ``cancel_transfers(scope)``
    nor the store-wide cancel reaches its transfers (a retry's wait is not cut short either); refused once either
    cancel came first; left (a commit round starting again), the scope can be cancelled, and a store-wide cancel
    set meanwhile applies to it."""
    from cloudckpt.remote import RemoteStore

    store = RemoteStore(memory_url)
    with store.transfer_scope() as scope:
        assert scope.enter_commit_point() and scope.committing
        assert store.cancel_transfers(scope) is False and not scope.cancelled
        assert store.cancel_transfers() is True  # the store-wide one: set, but not in this scope
        assert store.cancel.all_set() and not store.cancel.is_set()
        assert store.cancel.wait(0.05) is False
        store.write_if_absent("x", b"1")  # requests go on
        scope.leave_commit_point()
        assert store.cancel.is_set() and store.cancel.wait(0) is True
        assert not scope.enter_commit_point()  # the store is cancelled: refused
    store.cancel.clear()
    with store.transfer_scope() as scope:
        assert store.cancel_transfers(scope) is True
        assert not scope.enter_commit_point() and not scope.committing
    assert store.read_bytes("x") == b"1"



HEALED_DATA = "ckpt-150.data-00000-of-00001"


def heal_step_150(slow_link, tmp_path, release: threading.Event, *, hold: str = "PUT",
                  also_deleted: tuple[str, ...] = ()):
    """An uploader through the proxy that committed step 150 (4 MiB of data: one PUT); its data object (and
    ``also_deleted``) is then deleted from the store and the same step saved again (as after a restore): its commit
    heals it, re-uploading the data object, whose PUT the proxy holds until ``release`` (``hold="PUT"``); with
    ``hold="GET"`` the proxy holds the save's first request instead (its read of the commit log), before its commit
    has found step 150 committed. Returns the uploader once the request is held."""
    from cloudckpt.remote import RemoteStore
    from cloudckpt.uploader import Uploader, UploadJob

    url, proxy, options, direct, bucket = slow_link
    uploader = Uploader(RemoteStore(url, options, transfer=TRANSFER), max_pending=2)
    uploader.start()
    ckpt = checkpoint_of(tmp_path / "local", 150, os.urandom(4 * MiB))  # below the multipart threshold: one PUT
    uploader.submit(UploadJob(ckpt))
    assert uploader.wait(60) and uploader.stats().committed == 1
    RemoteStore(url, direct).delete([HEALED_DATA, *also_deleted])  # gone from the store: the step needs healing
    if hold == "PUT":
        proxy.set_faults(only_methods=("PUT",), path_filter=re.escape(HEALED_DATA), until=release)
    else:
        proxy.set_faults(only_methods=(hold,), until=release)
    uploader.submit(UploadJob(ckpt))  # the same step, the same tensors, saved again: a heal
    wait_for(lambda: proxy.most_held.get(hold, 0) >= 1, 60, f"the proxy to hold the heal's {hold}")
    return uploader


def assert_heal_abandoned(uploader, slow_link, messages: list[str], *, committed: int, last: int) -> None:
    """Step 150 stays committed, its data object still missing; the cut heal is a housekeeping failure, not a
    dropped (nor failed) save, and no log line says nothing of it was committed."""
    from cloudckpt.remote import RemoteStore

    url, proxy, options, direct, bucket = slow_link
    stats = uploader.stats()
    assert (stats.committed, stats.healed, stats.dropped, stats.failed, stats.last_committed_step) == \
        (committed, 0, 0, 0, last), stats
    assert stats.housekeeping_failures == 1 and "step 150: its heal was abandoned" in stats.last_housekeeping_error
    assert 150 in [c.step for c in cloudckpt.list_checkpoints(url, direct)]  # it stays committed
    assert HEALED_DATA not in {o.name for o in RemoteStore(url, direct).list_objects()}  # not healed
    assert not [m for m in messages if "nothing of it was committed" in m or "Nothing of step 150" in m
                or "Upload of checkpoint step 150 stopped" in m], messages
    assert any(m.startswith("Checkpoint step 150 stays committed") and "its heal" in m and "was abandoned" in m
               for m in messages), messages


def test_a_heal_abandoned_for_the_final_checkpoint_leaves_its_step_committed_not_dropped(slow_link, tmp_path, caplog):
    """Step 150 is committed, then healed by a save of the same step (its data object went missing) when the
    final step 175 is queued: favour_final abandons the heal (no throughput figure, ~4 MiB left against the
    final's 2 KB). Step 150 stays committed (the heal was to repair it; nothing committed is lost): not counted
    as dropped nor logged "nothing of it was committed", but as a housekeeping failure; step 175 commits.
    Before: dropped == 1, and "Nothing of step 150 is committed" logged of a committed step."""
    from cloudckpt.uploader import UploadJob

    caplog.set_level(logging.INFO, logger="cloudckpt")
    release = threading.Event()
    try:
        uploader = heal_step_150(slow_link, tmp_path, release)
        try:
            assert f"Re-uploading ['{HEALED_DATA}'] of committed step 150" in caplog.text
            uploader.submit(UploadJob(checkpoint_of(tmp_path / "final", 175, os.urandom(1000)), required=True))
            plan = uploader.favour_final(175, time.monotonic() + 5.0)
            assert (plan.action, plan.case) == ("abandon", "no figure"), plan
            assert uploader.wait(60)
        finally:
            uploader.close()
    finally:
        release.set()  # the held PUT was cut by the client: never forwarded whole
    messages = [r.getMessage() for r in caplog.records]
    assert_heal_abandoned(uploader, slow_link, messages, committed=2, last=175)
    assert [c.step for c in cloudckpt.list_checkpoints(slow_link[0], slow_link[3])] == [150, 175]
    (line,) = [m for m in messages if "abandoning the heal of committed checkpoint step 150" in m]
    assert "Step 150 stays committed" in line, line


def test_a_heal_abandoned_by_close_leaves_its_step_committed_not_dropped(slow_link, tmp_path, caplog):
    """The same heal cut by ``close(timeout=0)`` (a Ctrl-C, upload_timeout): step 150 stays committed; a
    housekeeping failure, not a dropped save. Before: dropped == 1, "Upload of checkpoint step 150 stopped"."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    release = threading.Event()
    try:
        uploader = heal_step_150(slow_link, tmp_path, release)
        uploader.close(timeout=0)
        assert uploader.pending_steps() == []
    finally:
        release.set()
    assert_heal_abandoned(uploader, slow_link, [r.getMessage() for r in caplog.records], committed=1, last=150)
    # nor is it among the steps the engine's close WARNING calls abandoned, "not committed"
    assert uploader.take_abandoned() == []


def abandon_heal_before_it_starts(slow_link, tmp_path, *, by: str, also_deleted: tuple[str, ...] = ()):
    """``heal_step_150`` with its save's first request (a GET) held, then cut (``by``: ``"final"``, favour_final
    for a final step 175 queued behind; ``"close"``, ``close(timeout=0)``) before its commit has found step 150
    committed; the hold is released once the cut is decided. Returns the uploader, closed."""
    from cloudckpt.uploader import UploadJob

    release = threading.Event()
    try:
        uploader = heal_step_150(slow_link, tmp_path, release, hold="GET", also_deleted=also_deleted)
        try:
            if by == "final":
                uploader.submit(UploadJob(checkpoint_of(tmp_path / "final", 175, os.urandom(1000)), required=True))
                plan = uploader.favour_final(175, time.monotonic() + 5.0)
                assert (plan.action, plan.case) == ("abandon", "no figure"), plan
                release.set()
                assert uploader.wait(60)
            else:
                threading.Timer(0.5, release.set).start()  # whatever the GET's transport, it ends
                uploader.close(timeout=0)
                uploader.close()  # waits (ABANDON_GRACE at most) for the worker to record the cut save
                assert uploader.pending_steps() == []
        finally:
            uploader.close()
    finally:
        release.set()
    return uploader


@pytest.mark.parametrize("by", ["final", "close"])
def test_a_heal_abandoned_before_its_commit_found_the_step_committed_leaves_it_committed(
        slow_link, tmp_path, caplog, by):
    """The heal of step 150 cut (for the final checkpoint, or by close) before its commit has even read the log
    and found step 150 committed: step 150 is still committed (the catalog lists it), so the cut save is no
    dropped save but a housekeeping failure (the committed objects were not checked: not verified); no line
    says nothing of it was committed. Before: dropped == 1 and "Nothing of step 150 is committed" (or "stopped
    (abandoned)") of a committed step."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    uploader = abandon_heal_before_it_starts(slow_link, tmp_path, by=by)
    url, direct = slow_link[0], slow_link[3]
    stats = uploader.stats()
    committed, last = (2, 175) if by == "final" else (1, 150)
    assert (stats.committed, stats.healed, stats.dropped, stats.failed, stats.last_committed_step) == \
        (committed, 0, 0, 0, last), stats
    assert stats.housekeeping_failures == 1, stats
    assert "step 150: its save was abandoned before its commit checked" in stats.last_housekeeping_error, stats
    assert 150 in [c.step for c in cloudckpt.list_checkpoints(url, direct)]
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "nothing of it was committed" in m or "Nothing of step 150" in m
                or "Upload of checkpoint step 150 stopped" in m], messages
    assert any(m.startswith("Checkpoint step 150 stays committed") and "not verified" in m for m in messages), \
        messages
    if by == "final":
        (line,) = [m for m in messages if "abandoning the save of checkpoint step 150" in m]
        assert "committed already" in line, line
    else:  # nor is it among the steps the engine's close WARNING calls abandoned, "not committed"
        assert uploader.take_abandoned() == []


def test_a_heal_abandoned_before_it_started_of_a_step_no_longer_committed_is_dropped_with_a_warning(
        slow_link, tmp_path, caplog):
    """The same (for the final checkpoint) with step 150's manifest gone too: the catalog no longer lists step 150
    (the uploader's log still has its commit entry), so the cut save is a dropped one -- counted so, and said at
    WARNING: step 150 is not committed any more. Before: counted dropped, but only said at INFO ("nothing of it was
    committed"). (Cut by close, no request may start: the log as last read answers, which still lists it.)"""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    uploader = abandon_heal_before_it_starts(slow_link, tmp_path, by="final",
                                             also_deleted=("ckpt-150.manifest.json",))
    url, direct = slow_link[0], slow_link[3]
    stats = uploader.stats()
    assert (stats.dropped, stats.failed, stats.healed, stats.housekeeping_failures) == (1, 0, 0, 0), stats
    assert 150 not in [c.step for c in cloudckpt.list_checkpoints(url, direct)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.getMessage().startswith("Checkpoint step 150 is not committed")]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "dropped" in warnings[0] and "no longer lists it" in warnings[0], warnings[0]
    assert "manifest ckpt-150.manifest.json is gone" in warnings[0], warnings[0]
    assert "Checkpoint step 150 stays committed" not in caplog.text


def test_a_stalled_check_of_a_save_cut_before_it_found_its_step_committed_does_not_hold_up_the_final_checkpoint(
        slow_link, tmp_path, caplog):
    """The save of committed step 150 cut for the final step 175 before its commit found step 150 committed (as in
    ``abandon_heal_before_it_starts``); the store then stalls the worker's check of it (the HEAD of step 150's
    manifest, held by the proxy until the end of the test). The check gets ``CUT_CHECK_SHARE`` of the seconds left
    until the deadline: unanswered then, the log as last read answers (step 150 stays committed: a housekeeping
    failure, said "not checked again") and the final checkpoint commits well before the deadline. Before: the
    worker waited for the HEAD (s3fs's 60 s read timeout, then retries) and the final checkpoint missed it."""
    from cloudckpt.uploader import UploadJob

    caplog.set_level(logging.INFO, logger="cloudckpt")
    url, proxy, options, direct, bucket = slow_link
    release, stall = threading.Event(), threading.Event()
    try:
        uploader = heal_step_150(slow_link, tmp_path, release, hold="GET")
        try:
            uploader.submit(UploadJob(checkpoint_of(tmp_path / "final", 175, os.urandom(1000)), required=True))
            deadline_at = time.monotonic() + 8.0
            plan = uploader.favour_final(175, deadline_at)
            assert (plan.action, plan.case) == ("abandon", "no figure"), plan
            proxy.set_faults(only_methods=("HEAD",), path_filter=re.escape("ckpt-150.manifest.json"), until=stall)
            release.set()  # the cut save's held GET ends; its check's HEAD is held instead
            assert uploader.wait(max(0.0, deadline_at - time.monotonic())), \
                "the final checkpoint was not committed by the deadline"
            assert proxy.most_held.get("HEAD", 0) >= 1  # the check was stalled, not skipped
        finally:
            stall.set()
            uploader.close()
    finally:
        release.set()
        stall.set()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (2, 0, 0, 175), stats
    assert stats.housekeeping_failures == 1, stats
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [150, 175]
    assert any(m.startswith("Checkpoint step 150 stays committed") and "not checked again, the store did not "
               "answer within" in m for m in [r.getMessage() for r in caplog.records]), caplog.text


def test_a_scope_counts_what_is_left_from_the_start_of_its_current_round(memory_url):
    """``bytes_left``: before any round is announced, the files' total less what the scope sent; once a round
    starts (``begin_round``: a commit going round again announces what it still has to send), that round's bytes
    less what was sent since. Was: the total less everything sent, so after a round ~0 looked left."""
    from cloudckpt.remote import RemoteStore

    store = RemoteStore(memory_url)
    with store.transfer_scope() as scope:
        assert scope.bytes_left(10 * MiB) == 10 * MiB
        scope.note_sent(10 * MiB)  # the first round sent every file; one name was taken (debris)
        assert scope.bytes_left(10 * MiB) == 0
        scope.begin_round(8 * MiB)  # the next round re-sends the file debris had taken
        assert scope.bytes_left(10 * MiB) == 8 * MiB
        scope.note_sent(3 * MiB)
        assert scope.bytes_left(10 * MiB) == 5 * MiB
        scope.note_sent(6 * MiB)  # a retry's bytes count again: never below 0
        assert scope.bytes_left(10 * MiB) == 0


class HoldSecondUpload:
    """A ``FaultProxy`` path filter: the part uploads of ``name``'s second multipart upload (its first upload's
    requests pass)."""

    def __init__(self, name: str) -> None:
        self.name, self.first = name, None

    def __call__(self, path: str) -> bool:
        key, _, query = path.partition("?")
        if not key.endswith("/" + self.name) or "partNumber=" not in query:
            return False
        upload = re.search(r"uploadId=([^&]+)", query).group(1)
        self.first = self.first or upload
        return upload != self.first


def test_favour_final_counts_what_a_commit_gone_round_again_still_has_to_send(slow_link, tmp_path, caplog):
    """A resumed run's step 150 (48 MiB of data) finds debris of a killed run at its data name: its first round
    sends the data (refused at completion: the name is taken) and its index, then it goes round again, deletes the
    debris and uploads the data again, whose parts the proxy holds. The final step 175 (2 KB) is queued with 1.5 s
    left: the older upload still has its data to send (48 MiB less at most the 4 parts of 5 MiB in flight), which
    the plan quotes, and is abandoned for the final one, which commits. Before: its figure was its files' size
    less everything its scope ever sent, the first round's 48 MiB included: only what the send queues held
    uncounted (~0: "it has sent its files and is committing", kept -- the final checkpoint lost; or a few MiB)."""
    from cloudckpt.remote import RemoteStore
    from cloudckpt.uploader import Uploader, UploadJob

    caplog.set_level(logging.INFO, logger="cloudckpt")
    url, proxy, options, direct, bucket = slow_link
    data = "ckpt-150.data-00000-of-00001"
    RemoteStore(url, direct).write_atomic(data, b"debris of a killed run")
    release = threading.Event()
    uploader = Uploader(RemoteStore(url, options, transfer=TRANSFER), max_pending=2)
    try:
        uploader.start()
        proxy.set_faults(only_methods=("PUT",), path_filter=HoldSecondUpload(data), until=release)
        uploader.submit(UploadJob(checkpoint_of(tmp_path / "local", 150, os.urandom(48 * MiB))))
        wait_for(lambda: proxy.most_held.get("PUT", 0) >= 1, 60, "the proxy to hold step 150's second round")
        uploader.submit(UploadJob(checkpoint_of(tmp_path / "final", 175, os.urandom(1000)), required=True))
        plan = uploader.favour_final(175, time.monotonic() + 1.5)
        assert plan.action == "abandon", plan
        left = float(re.search(r"([\d.]+) MiB (?:left|to send)", plan.reason).group(1))
        assert 28.0 <= left <= 48.0, plan.reason  # the current round's data (at most 4 parts of 5 MiB delivered)
        assert uploader.wait(60)
    finally:
        uploader.close()
        release.set()
    stats = uploader.stats()
    assert (stats.committed, stats.dropped, stats.failed, stats.last_committed_step) == (1, 1, 0, 175), stats
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [175]
    assert "abandoning the upload of checkpoint step 150" in caplog.text
