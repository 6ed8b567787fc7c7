"""The commit path: one directory listing per commit, manifests read once per process, bulk deletes, nothing
heavy in the training thread (in place, no hard links), TransferOptions, commit lag and TensorBoard summaries.

Requests are counted where they happen: at a real HTTP proxy in front of the moto server.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import tensorflow as tf

import cloudckpt
from cloudckpt import CheckpointEngine, TransferOptions
from cloudckpt.commitlog import CommitLog, new_entry
from cloudckpt.engine import STAGING_DIR
from cloudckpt.remote import RemoteStore
from cloudckpt.retention import RetentionPolicy
from cloudckpt.retry import RetryPolicy
from cloudckpt.s3_transport import MULTIPART_THRESHOLD, PART_SIZE, PARTS_IN_FLIGHT
from cloudckpt.writers import Writer
from cloudckpt.testing import assert_committed
from support.checks import assert_all_committed_intact, read_scalars
from support.fault_proxy import FaultProxy
from support.tf_model import train
from test_engine import write_checkpoint


@pytest.fixture
def counted(moto_server):
    """(url, proxy, storage options through the counting proxy, direct options) on a fresh bucket."""
    bucket = f"count-{uuid.uuid4().hex[:10]}"
    moto_server.create_bucket(bucket)
    with FaultProxy(moto_server.endpoint) as proxy:
        yield (f"s3://{bucket}/runs/exp1", proxy, {**moto_server.storage_options, "endpoint_url": proxy.url},
               moto_server.storage_options)


def requests_since(proxy: FaultProxy, start: int) -> dict[str, int]:
    """Requests after event ``start``, by kind: directory / log listings, manifest GETs, deletes."""
    counts = {"dir_listings": 0, "log_listings": 0, "manifest_gets": 0, "bulk_deletes": 0, "single_deletes": 0}
    for method, path, _ in proxy.events[start:]:
        parts = urlsplit(path)
        query = parse_qs(parts.query)
        if method == "GET" and "list-type" in query:
            prefix = query.get("prefix", [""])[0]
            counts["log_listings" if "/.cloudckpt/" in prefix else "dir_listings"] += 1
        elif method == "GET" and parts.path.endswith(".manifest.json"):
            counts["manifest_gets"] += 1
        elif method == "POST" and "delete" in query or parts.query == "delete":
            counts["bulk_deletes"] += 1
        elif method == "DELETE":
            counts["single_deletes"] += 1
    return counts


def test_one_directory_listing_per_commit_and_manifests_read_once_per_process(counted, tmp_path):
    url, proxy, options, direct = counted
    engine = CheckpointEngine(url, str(tmp_path / "a"), storage_options=options,
                              retention=RetentionPolicy(max_to_keep=2))
    engine.open()
    engine.resume()
    per_commit = []
    for step in range(1, 7):
        start = len(proxy.events)
        engine.submit(step, write_checkpoint(tmp_path / "a", step))
        engine.wait(120)
        per_commit.append(requests_since(proxy, start))
    engine.close()
    assert engine.stats().committed == 6
    for step, counts in enumerate(per_commit, start=1):
        assert counts["dir_listings"] == 1, (step, counts)  # commit, state file and retention share one scan
        # the commit log's newest entries (fencing, see writers): read before the upload and again before the
        # commit's entry is appended, and once more before retention appends its deletion
        assert counts["log_listings"] == (3 if step > 2 else 2), (step, counts)
        assert counts["manifest_gets"] == 0, (step, counts)  # this process wrote them all
        assert counts["single_deletes"] == 0, (step, counts)
        assert counts["bulk_deletes"] == (1 if step > 2 else 0), (step, counts)  # the old checkpoint, one request
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [5, 6]
    assert_all_committed_intact(url, direct)

    # A new process (a new engine and store): every committed manifest is read once, at resume, then never again.
    start = len(proxy.events)
    engine = CheckpointEngine(url, str(tmp_path / "b"), storage_options=options,
                              retention=RetentionPolicy(max_to_keep=2))
    engine.open()
    engine.resume(download=False)
    assert requests_since(proxy, start)["manifest_gets"] == 2
    for step in (7, 8):
        start = len(proxy.events)
        engine.submit(step, write_checkpoint(tmp_path / "b", step))
        engine.wait(120)
        counts = requests_since(proxy, start)
        assert (counts["dir_listings"], counts["manifest_gets"], counts["bulk_deletes"]) == (1, 0, 1), (step, counts)
    engine.close()
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [7, 8]


def by_operation(proxy: FaultProxy, start: int) -> dict[str, int]:
    """Requests after event ``start`` by S3 operation: HEAD, GET (objects), LIST, PUT, DELETE (one key),
    BULK_DELETE (DeleteObjects), and HEAD_JSON / GET_MANIFEST / GET_LOG (small objects, by kind)."""
    counts = dict.fromkeys(("HEAD", "GET", "LIST", "PUT", "DELETE", "BULK_DELETE", "HEAD_JSON", "GET_MANIFEST",
                            "GET_LOG"), 0)
    for method, path, _ in proxy.events[start:]:
        parts = urlsplit(path)
        query = parse_qs(parts.query, keep_blank_values=True)
        if method == "GET" and "list-type" in query:
            counts["LIST"] += 1
        elif method == "POST" and "delete" in query:
            counts["BULK_DELETE"] += 1
        elif method in counts:
            counts[method] += 1
            if method == "HEAD" and parts.path.endswith(".json"):
                counts["HEAD_JSON"] += 1
            elif method == "GET" and parts.path.endswith(".manifest.json"):
                counts["GET_MANIFEST"] += 1
            elif method == "GET" and "/.cloudckpt/log/" in parts.path:
                counts["GET_LOG"] += 1
    return counts


def test_requests_at_50_checkpoints_do_not_grow_per_checkpoint_beyond_one_get(counted, tmp_path, capsys):
    """At 50 committed checkpoints: a process that resumes reads each manifest and log entry with one GET
    (no HEAD first) and lists a constant number of times; a commit with retention lists once and deletes in
    bulk; `cloudckpt ls` and `verify --all` list the directory once, not once per checkpoint."""
    url, proxy, options, direct = counted
    n = 50
    engine = CheckpointEngine(url, str(tmp_path / "a"), storage_options=direct,
                              retention=RetentionPolicy(max_to_keep=n))
    engine.open()
    engine.resume()
    for step in range(1, n + 1):
        engine.submit(step, write_checkpoint(tmp_path / "a", step))
        engine.wait(120)
    engine.close()
    entries = len(RemoteStore(url, direct).list_under(".cloudckpt/log/0000000000"))  # < 100: one partition

    # (a) A new process: begin, resume (restore the newest).
    start = len(proxy.events)
    engine = CheckpointEngine(url, str(tmp_path / "b"), storage_options=options,
                              retention=RetentionPolicy(max_to_keep=n))
    engine.open()
    restored = engine.resume()
    assert restored is not None and restored.step == n
    counts = by_operation(proxy, start)
    files = len(restored.files)
    assert counts["HEAD_JSON"] == 0 and counts["HEAD"] <= files, counts  # was one HEAD per manifest and entry
    assert counts["GET_MANIFEST"] == n and counts["GET_LOG"] == entries, counts
    assert counts["GET"] == n + entries + files, counts
    assert counts["LIST"] <= 4, counts  # the bucket check, the log (partitions, entries), the directory
    assert counts["PUT"] == 1 and counts["DELETE"] == counts["BULK_DELETE"] == 0, counts  # the writer entry

    # (b) One more commit; retention deletes the oldest.
    start = len(proxy.events)
    engine.submit(n + 1, write_checkpoint(tmp_path / "b", n + 1))
    engine.wait(120)
    engine.close()
    counts = by_operation(proxy, start)
    assert counts["GET"] == counts["HEAD"] == 0, counts  # manifests cached, the log read since resume
    assert counts["LIST"] <= 4 and counts["BULK_DELETE"] == 1 and counts["DELETE"] == 0, counts
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == list(range(2, n + 2))

    # (c) The CLI: every manifest and log entry once, the directory listed once (plus the bucket check).
    from cloudckpt import cli

    entries = len(RemoteStore(url, direct).list_under(".cloudckpt/log/0000000000"))
    for command, data_gets in ((["ls"], 0), (["verify", "--all"], 2 * n)):
        start = len(proxy.events)
        assert cli.main([*command, url, "-o", f"endpoint_url={proxy.url}"]) == 0, capsys.readouterr()
        counts = by_operation(proxy, start)
        assert counts["HEAD"] == 0, (command, counts)
        assert counts["GET"] == n + entries + data_gets and counts["GET_MANIFEST"] == n, (command, counts)
        assert counts["LIST"] <= 4, (command, counts)  # verify --all listed once per checkpoint

    # (d) `cloudckpt gc --keep 5`: 45 checkpoints retired by one log entry, their objects gone in one request
    # (was a log listing, a log entry and a bulk delete per checkpoint).
    start = len(proxy.events)
    assert cli.main(["gc", url, "--keep", "5", "-o", f"endpoint_url={proxy.url}"]) == 0, capsys.readouterr()
    counts = by_operation(proxy, start)
    assert counts["BULK_DELETE"] == 1 and counts["DELETE"] == 0 and counts["HEAD"] == 0, counts
    assert counts["PUT"] <= 2 and counts["LIST"] <= 5, counts  # the delete entry and the state file
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == list(range(n - 3, n + 2))
    assert_all_committed_intact(url, direct)
    remaining = {o.name.split(".")[0] for o in RemoteStore(url, direct).list_objects()}
    assert not remaining & {f"ckpt-{step}" for step in range(2, n - 3)}, sorted(remaining)
    capsys.readouterr()


def test_read_many_is_one_get_each_and_keeps_retries_and_errors(counted):
    """RemoteStore.read_many: one GET per object (no HEAD), a missing object is None, a read that fails in
    the concurrent batch is read again with the retry policy, and a lasting failure names its object."""
    url, proxy, options, _ = counted
    store = RemoteStore(url, storage_options=options, retry=RetryPolicy(max_attempts=3, initial_backoff=0.01))
    names = [f"obj-{i}.json" for i in range(6)]
    for name in names:
        store.write_atomic(name, name.encode())
    start = len(proxy.events)
    assert store.read_many([*names, "absent.json"]) == {**{n: n.encode() for n in names}, "absent.json": None}
    methods = [method for method, _, _ in proxy.events[start:]]
    assert methods == ["GET"] * 7, methods

    proxy.set_faults(only_methods=["GET"], path_filter=r"obj-3\.json")
    proxy.fail_next("503", 2)  # the batch's read, then the first retry: the third attempt reads it
    assert store.read_many(names)["obj-3.json"] == b"obj-3.json"
    proxy.fail_next("500", 10)
    with pytest.raises(cloudckpt.RemoteError, match=r"read .*/obj-3\.json failed: InternalError"):
        store.read_many(names)
    proxy.set_faults()


def test_keys_a_bulk_delete_refused_are_an_error_not_a_deletion(counted, tmp_path):
    """S3 answers DeleteObjects with HTTP 200 and an Error per refused key (AccessDenied without
    s3:DeleteObject); s3fs ignores those. Retention must report the failure and keep retrying, not believe
    the old checkpoint gone."""
    url, proxy, options, direct = counted
    store = RemoteStore(url, storage_options=options)
    for name in ("a", "b"):
        store.write_atomic(name, b"x")
    proxy.set_faults(path_filter=r"\?delete")
    proxy.fail_next("refuse-keys")
    with pytest.raises(cloudckpt.RemoteError, match="AccessDenied.*2 of 2 keys were not deleted") as caught:
        store.delete_before(["a", "b"], deadline=float("inf"))
    assert not caught.value.transient
    assert {"a", "b"} <= {o.name for o in store.list_objects()}

    engine = CheckpointEngine(url + "/run", str(tmp_path / "a"), storage_options=options,
                              retention=RetentionPolicy(max_to_keep=1))
    engine.open()
    engine.resume()
    for step in (1, 2):
        if step == 2:
            proxy.fail_next("refuse-keys")
        engine.submit(step, write_checkpoint(tmp_path / "a", step))
        engine.wait(120)
    stats = engine.stats()
    assert stats.housekeeping_failures >= 1 and "AccessDenied" in stats.last_housekeeping_error, stats
    engine.submit(3, write_checkpoint(tmp_path / "a", 3))  # the refused delete is retried, now allowed
    engine.wait(120)
    engine.close()
    remaining = {o.name for o in RemoteStore(url + "/run", storage_options=direct).list_objects()}
    assert not any(n.startswith(("model.ckpt-1.", "model.ckpt-2.")) for n in remaining), remaining
    assert [c.step for c in cloudckpt.list_checkpoints(url + "/run", direct)] == [3]


def test_debris_at_a_checkpoints_names_is_still_replaced(counted, tmp_path):
    """Without the listing before the upload, a name already taken (a crashed upload) is found by the
    create-only write: the commit lists then, removes the debris and commits."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    paths = write_checkpoint(local, 3)
    with open(paths[0], "rb") as f:
        RemoteStore(url, direct).write_atomic(os.path.basename(paths[0]), f.read()[:10])  # a truncated leftover
    with CheckpointEngine(url, str(local), storage_options=options) as engine:
        engine.open()
        engine.resume(download=False)
        engine.submit(3, paths)
        engine.wait(120)
        assert engine.stats().committed == 1
    assert_committed(url, step=3, storage_options=direct)


def file_requests(proxy: FaultProxy, start: int, name: str) -> list[tuple[str, str]]:
    """(method, query) of the PUTs and POSTs after event ``start`` that upload object ``name``."""
    return [(method, urlsplit(path).query) for method, path, _ in proxy.events[start:]
            if method in ("PUT", "POST") and urlsplit(path).path.endswith(f"/{name}")]


@pytest.mark.parametrize("debris, multipart, known", [("index", False, True), ("index", True, True),
                                                       ("data-00000-of-00001", False, True), ("index", False, False),
                                                       ("index", True, False), ("data-00000-of-00001", False, False)])
def test_a_resumed_commit_keeps_what_it_uploaded_and_replaces_only_the_debris(counted, tmp_path, debris, multipart,
                                                                               known):
    """A run killed while step 7 uploaded left one of its objects (``debris``) in the store, uncommitted. The
    resumed run commits step 7 again.

    ``known``: the debris was there when the run resumed (its scan saw it): the commit is taken up again and
    lists the directory before it sends anything; the debris alone is deleted (announced), each file is sent
    once. Was: the first round uploaded create-only without listing, the store refused the debris' name only
    after its whole body, the next round listed, deleted the debris and sent that file again (twice the bytes).

    Not ``known`` (the debris appeared after the resume, nothing told the engine): the fresh save's fast path,
    no listing first; the create-only upload of that name is refused while the other file is stored; the commit
    lists, deletes the debris alone and uploads only that file again. The other file is sent once (its parts
    once), never deleted; ``bytes_uploaded`` counts the bytes that went over the wire (the refused create's too).
    Was: every present name was taken for debris -- the file this commit had just uploaded deleted and sent
    again, ``bytes_uploaded`` counting each file once. Either way the checkpoint commits and verifies."""
    url, proxy, options, direct = counted
    mib = 1 << 20
    transfer = TransferOptions(part_size=5 * mib, multipart_threshold=5 * mib)
    local = tmp_path / "local"
    paths = write_checkpoint(local, 7, size=6 * mib if multipart else 200_000)
    with open(paths[1], "wb") as f:  # the index: small (one PUT)
        f.write(os.urandom(3000))
    taken = f"ckpt-7.{debris}"
    other = next(os.path.basename(p) for p in paths if os.path.basename(p) != taken)
    if known:
        RemoteStore(url, direct).write_atomic(taken, b"debris of a killed run")
    with CheckpointEngine(url, str(local), storage_options=options, transfer=transfer) as engine:
        engine.open()
        engine.resume(download=False)
        if not known:
            RemoteStore(url, direct).write_atomic(taken, b"debris of a killed run")
        start = len(proxy.events)
        engine.submit(7, paths)
        engine.wait(120)
        stats = engine.stats()
    assert (stats.committed, stats.failed) == (1, 0), stats
    sizes = {os.path.basename(p): os.path.getsize(p) for p in paths}
    mine = file_requests(proxy, start, other)
    if multipart:  # one multipart upload: created once, its two parts sent once, completed once
        assert sorted(q.split("=")[0] for m, q in mine) == ["partNumber", "partNumber", "uploadId", "uploads"], mine
    else:
        assert mine == [("PUT", "")], mine  # sent once
    sent = 1 if known else 2  # known: after the debris' deletion; else refused (the debris), then after it
    assert file_requests(proxy, start, taken) == [("PUT", "")] * sent
    deletes = [e.doc for e in CommitLog(RemoteStore(url, direct)).refresh() if e.kind == "delete"]
    assert [d["names"] for d in deletes] == [[taken]], deletes  # only the debris was deleted
    assert stats.bytes_uploaded == sizes[other] + sent * sizes[taken], stats  # a refused create's bytes were sent
    assert requests_since(proxy, start)["dir_listings"] == 2  # the round's listing (known: before any upload), the check
    assert [c["step"] for c in commit_entries(url, direct)] == [7]
    assert_committed(url, step=7, storage_options=direct)
    with open(os.path.join(local, taken), "rb") as f:
        assert RemoteStore(url, direct).read_bytes(taken) == f.read()  # the debris was replaced


def test_a_commit_a_crashed_run_had_snapshotted_lists_first(counted, tmp_path):
    """A run killed while step 7 uploaded left its snapshot in ``.cloudckpt-staging`` and the index in the store.
    The next run registers without a resume (Keras' way: no scan of the directory) and saves step 7 again: the
    snapshot the engine clears at ``open`` says the commit is taken up again, so it lists first and the index is
    sent once. Was: sent twice (refused create-only upload of the whole body, then again after the deletion)."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    paths = write_checkpoint(local, 7, size=200_000)
    taken = "ckpt-7.index"
    RemoteStore(url, direct).write_atomic(taken, b"debris of a killed run")
    os.makedirs(local / STAGING_DIR / "ckpt-7-0123abcd")
    with CheckpointEngine(url, str(local), storage_options=options) as engine:
        engine.open()
        engine.register()
        start = len(proxy.events)
        engine.submit(7, paths)
        engine.wait(120)
        stats = engine.stats()
    assert (stats.committed, stats.failed) == (1, 0), stats
    assert file_requests(proxy, start, taken) == [("PUT", "")]
    assert not os.path.exists(local / STAGING_DIR / "ckpt-7-0123abcd")
    assert_committed(url, step=7, storage_options=direct)


def test_a_failed_commit_submitted_again_lists_first(counted, tmp_path):
    """A commit of step 7 fails after storing the data file (the index's uploads fail until the retry policy
    gives up; ``on_error="warn"``). Step 7 submitted again is taken up again: the commit lists first, clears the
    data file the failed attempt left (uncommitted debris now) and sends each file once. Was: the data file sent
    twice (its create-only upload refused after the whole body)."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    paths = write_checkpoint(local, 7, size=200_000)
    data = next(os.path.basename(p) for p in paths if ".data-" in p)
    with CheckpointEngine(url, str(local), storage_options=options, retry=FAST_RETRY, on_error="warn") as engine:
        engine.open()
        engine.resume(download=False)
        proxy.set_faults(only_methods=["PUT"], path_filter=r"/ckpt-7\.index$")
        proxy.fail_next("500", FAST_RETRY.max_attempts)
        engine.submit(7, paths)
        engine.wait(120)
        assert engine.stats().failed == 1
        proxy.set_faults()
        start = len(proxy.events)
        engine.submit(7, paths)
        engine.wait(120)
        stats = engine.stats()
    assert stats.committed == 1, stats
    assert file_requests(proxy, start, data) == [("PUT", "")]
    assert_committed(url, step=7, storage_options=direct)


def test_an_own_object_replaced_by_another_of_the_same_size_between_rounds_is_uploaded_again(counted, tmp_path):
    """Debris appears at the index's name after the resume (nothing told the engine): the first round stores the
    data file and is refused the index. Before the next round lists, another party replaces the data file -- this
    commit's own, still uncommitted -- by other bytes of the same size. The round recognises its own objects by
    their size and the store's crc32c (a HEAD), not by size alone: the data file is cleared and uploaded again,
    and the committed checkpoint holds this save's bytes. Was: kept as this commit's own (same size), the
    checkpoint committed over the other party's bytes (verify failed)."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    paths = write_checkpoint(local, 7, size=200_000)
    data = next(os.path.basename(p) for p in paths if ".data-" in p)
    taken = "ckpt-7.index"
    held, release = threading.Event(), threading.Event()

    def round_two_listing(path: str) -> bool:  # the commit's first listing of the directory: held
        query = parse_qs(urlsplit(path).query)
        if "list-type" not in query or "/.cloudckpt/" in query.get("prefix", [""])[0] or held.is_set():
            return False
        held.set()
        return True

    with CheckpointEngine(url, str(local), storage_options=options) as engine:
        engine.open()
        engine.resume(download=False)
        RemoteStore(url, direct).write_atomic(taken, b"debris of a killed run")
        start = len(proxy.events)
        proxy.set_faults(only_methods=["GET"], path_filter=round_two_listing, until=release)
        engine.submit(7, paths)
        assert held.wait(60)
        size = os.path.getsize(os.path.join(local, data))
        RemoteStore(url, direct).write_atomic(data, os.urandom(size))  # another party's bytes, same size
        release.set()
        engine.wait(120)
        proxy.set_faults()
        stats = engine.stats()
    assert (stats.committed, stats.failed) == (1, 0), stats
    assert file_requests(proxy, start, data) == [("PUT", "")] * 2  # stored, then again over the other bytes
    assert file_requests(proxy, start, taken) == [("PUT", "")] * 2  # refused (the debris), then after it
    deletes = [e.doc for e in CommitLog(RemoteStore(url, direct)).refresh() if e.kind == "delete"]
    assert [sorted(d["names"]) for d in deletes] == [sorted([data, taken])], deletes
    assert_committed(url, step=7, storage_options=direct)
    with open(os.path.join(local, data), "rb") as f:
        assert RemoteStore(url, direct).read_bytes(data) == f.read()


LOG_ENTRY = r"/\.cloudckpt/log/\d+/\d+\.json$"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)  # 3 attempts, no long waits


def commit_entries(url: str, options: dict) -> list[dict]:
    """The documents of the commit log's ``commit`` entries, in log order (read by a fresh store)."""
    return [e.doc for e in CommitLog(RemoteStore(url, options)).refresh() if e.kind == "commit"]


def puts_of(proxy: FaultProxy, start: int, pattern: str) -> list[tuple[str, str | None]]:
    """(method, fault) of the PUTs and POSTs after event ``start`` whose path matches ``pattern``."""
    return [(method, kind) for method, path, kind in proxy.events[start:]
            if method in ("PUT", "POST") and re.search(pattern, urlsplit(path).path)]


@pytest.mark.parametrize("retries", ["412", "500"])
def test_a_commit_entry_whose_answer_was_lost_is_recognised_as_committed(counted, tmp_path, retries):
    """The commit entry's PUT reaches the store, its answer is lost; the retry is answered 412 (the first
    attempt's object is there) or 500 until the retry policy gives up. The entry is this writer's (its nonce):
    the checkpoint is committed once, reported committed, and the next commit names it as its parent. Was,
    for 500s: the commit reported failed although its entry was in the log, and the next commit's parent the
    checkpoint before it."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    with CheckpointEngine(url, str(local), storage_options=options, retry=FAST_RETRY, on_error="warn") as engine:
        engine.open()
        engine.resume(download=False)
        engine.submit(1, write_checkpoint(local, 1))
        engine.wait(120)
        start = len(proxy.events)
        proxy.set_faults(only_methods=["PUT"], path_filter=LOG_ENTRY)
        proxy.fail_next("lose_response")
        if retries == "500":
            proxy.fail_next("500", FAST_RETRY.max_attempts - 1)
        engine.submit(2, write_checkpoint(local, 2))
        engine.wait(120)
        proxy.set_faults()
        expected = [None] if retries == "412" else ["500"] * (FAST_RETRY.max_attempts - 1)
        assert [kind for _, kind in puts_of(proxy, start, LOG_ENTRY)] == ["lose_response", *expected]
        stats = engine.stats()
        assert (stats.committed, stats.failed, stats.last_committed_step) == (2, 0, 2), stats
        engine.submit(3, write_checkpoint(local, 3))
        engine.wait(120)
    commits = commit_entries(url, direct)
    assert [c["step"] for c in commits] == [1, 2, 3]
    assert commits[2]["parent"] == commits[1]["commit_id"] and commits[1]["parent"] == commits[0]["commit_id"]
    assert [c.step for c in cloudckpt.list_checkpoints(url, direct)] == [1, 2, 3]
    assert_all_committed_intact(url, direct)


def test_a_commit_entry_that_failed_where_another_party_appended_is_appended_again(counted, tmp_path):
    """The commit entry's PUT fails on every attempt (answered 500 by the proxy: it never reaches the store)
    while another party (``cloudckpt gc``'s maintenance role) appends its own entry at that index. Read back,
    the entry is not this writer's: it lost the race and appends at the next index. Was: the write's error
    failed the commit."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    raced: list[int] = []

    def race_first_commit_entry(path: str) -> bool:
        if not re.search(LOG_ENTRY, urlsplit(path).path):
            return False
        if not raced:  # before the proxy answers our first attempt: another party takes the index
            gc = Writer(RemoteStore(url, direct), role="maintenance")
            raced.append(gc.append(new_entry("delete", names=[], retire=[], reason="test")).index)
        return True

    with CheckpointEngine(url, str(local), storage_options=options, retry=FAST_RETRY, on_error="warn") as engine:
        engine.open()
        engine.resume(download=False)
        start = len(proxy.events)
        proxy.set_faults(only_methods=["PUT"], path_filter=race_first_commit_entry)
        proxy.fail_next("500", FAST_RETRY.max_attempts)
        engine.submit(6, write_checkpoint(local, 6))
        engine.wait(120)
        proxy.set_faults()
        stats = engine.stats()
    assert (stats.committed, stats.failed) == (1, 0), stats
    assert [kind for _, kind in puts_of(proxy, start, LOG_ENTRY)] == ["500"] * FAST_RETRY.max_attempts + [None]
    entries = CommitLog(RemoteStore(url, direct)).refresh()
    assert [(e.index, e.kind) for e in entries] == [(1, "writer"), (raced[0], "delete"), (raced[0] + 1, "commit")]
    assert_committed(url, step=6, storage_options=direct)


@pytest.mark.parametrize("retries", ["412", "500"])
def test_a_manifest_whose_answer_was_lost_is_recognised_and_nothing_is_uploaded_again(counted, tmp_path, retries):
    """The manifest's create-only PUT reaches the store, its answer is lost; the retry is answered 412 or 500
    until the policy gives up. The object holds this commit's manifest (its bytes, with their fresh commit
    id): the commit goes on. Each data file is sent once. Was: 412 sent the commit round again, which took its
    own manifest for debris, deleted the checkpoint's objects and uploaded them all again; 500s failed it."""
    url, proxy, options, direct = counted
    local = tmp_path / "local"
    with CheckpointEngine(url, str(local), storage_options=options, retry=FAST_RETRY, on_error="warn") as engine:
        engine.open()
        engine.resume(download=False)
        start = len(proxy.events)
        proxy.set_faults(only_methods=["PUT"], path_filter=r"\.manifest\.json$")
        proxy.fail_next("lose_response")
        if retries == "500":
            proxy.fail_next("500", FAST_RETRY.max_attempts - 1)
        engine.submit(4, write_checkpoint(local, 4))
        engine.wait(120)
        proxy.set_faults()
        stats = engine.stats()
    assert (stats.committed, stats.failed) == (1, 0), stats
    expected = [None] if retries == "412" else ["500"] * (FAST_RETRY.max_attempts - 1)
    assert [kind for _, kind in puts_of(proxy, start, r"\.manifest\.json$")] == ["lose_response", *expected]
    for suffix in ("data-00000-of-00001", "index"):
        assert puts_of(proxy, start, rf"/ckpt-4\.{suffix}$") == [("PUT", None)], suffix  # sent once
    assert not any(method in ("DELETE", "POST") and "delete" in path for method, path, _ in proxy.events[start:])
    assert [c["step"] for c in commit_entries(url, direct)] == [4]
    assert_committed(url, step=4, storage_options=direct)


def _commit_with_faults_on_final_request(counted, tmp_path, step, multipart, faults):
    """Commit step ``step`` (one data file: 1 MiB, or 6 MiB in two 5 MiB parts) with ``faults`` (kind, count)
    scripted on the last request of its data file's upload (its PutObject, or its CompleteMultipartUpload).
    Returns (the engine's stats, the proxy's events since, that request's (method, path regex))."""
    url, proxy, options, _ = counted
    local = tmp_path / "local"
    mib = 1 << 20
    transfer = TransferOptions(part_size=5 * mib, multipart_threshold=5 * mib)
    final = (("POST", rf"/ckpt-{step}\.data-00000-of-00001\?uploadId=") if multipart
             else ("PUT", rf"/ckpt-{step}\.data-00000-of-00001$"))
    with CheckpointEngine(url, str(local), storage_options=options, retry=FAST_RETRY, on_error="warn",
                          transfer=transfer) as engine:
        engine.open()
        engine.resume(download=False)
        start = len(proxy.events)
        proxy.set_faults(only_methods=[final[0]], path_filter=final[1])
        for kind, count in faults:
            proxy.fail_next(kind, count)
        engine.submit(step, write_checkpoint(local, step, size=(6 if multipart else 1) * mib))
        engine.wait(120)
        proxy.set_faults()
        stats = engine.stats()
    return stats, proxy.events[start:], final


@pytest.mark.parametrize("multipart", [False, True])
@pytest.mark.parametrize("retries", ["412", "500"])
def test_a_data_file_whose_final_request_lost_its_answer_is_not_uploaded_again(counted, tmp_path, multipart,
                                                                                retries):
    """The last request of a data file's create-only upload (its PutObject, or its CompleteMultipartUpload)
    reaches the store, its answer is lost; the retry is answered 412 (the object exists) or 500. The object
    holds the file's bytes (one HEAD: the store's crc32c of it, or its ETag, the MD5 of the bytes or the
    multipart ETag of the upload's parts): it is this upload's, and the commit goes on; the file is sent once.
    Was: the commit went round again (its own object taken for debris, deleted, the checkpoint uploaded again)
    or failed. (moto answers a retried CompleteMultipartUpload 200, not 412: that case passed before.)"""
    url, _, _, direct = counted
    faults = [("lose_response", 1)] + ([("500", FAST_RETRY.max_attempts - 1)] if retries == "500" else [])
    stats, events, final = _commit_with_faults_on_final_request(counted, tmp_path, 5, multipart, faults)
    faults = [kind for method, path, kind in events if method == final[0] and re.search(final[1], path)]
    assert faults[0] == "lose_response", faults
    assert (stats.committed, stats.failed) == (1, 0), stats
    data = [(method, urlsplit(path).query) for method, path, _ in events
            if "/ckpt-5.data-00000-of-00001" in urlsplit(path).path and method in ("PUT", "POST")]
    if multipart:  # one upload: created once, its two parts sent once
        assert sum(1 for method, query in data if method == "POST" and query == "uploads") == 1, data
        assert sum(1 for method, query in data if method == "PUT" and "partNumber" in query) == 2, data
    else:
        assert len(data) == len(faults), data  # the PUT and its retries only: never a new upload
    assert not any("delete" in path for _, path, _ in events)
    assert [c["step"] for c in commit_entries(url, direct)] == [5]
    assert_committed(url, step=5, storage_options=direct)


@pytest.mark.parametrize("multipart", [False, True])
def test_a_data_file_whose_attempts_never_arrived_is_retried_to_the_end(counted, tmp_path, multipart):
    """The last request of a data file's create-only upload fails twice before the store executed it (a 500
    from the proxy, never forwarded; then, for a PutObject, a reset half-way through its body); the retry
    after the second finds no object (HEAD: 404) and the policy goes on: the third attempt commits. Was
    (PutObject): the HEAD's 404 became the attempt's error's
    ``__context__``, ``retry.is_transient`` read the chain, took the reset for a fatal NoSuchKey and gave up
    (seen in the 20 %-failure soak: "upload ... failed: NoSuchKey: Connection reset by peer")."""
    url, _, _, direct = counted
    stats, events, final = _commit_with_faults_on_final_request(
        counted, tmp_path, 6, multipart, [("500", 1), ("reset" if not multipart else "500", 1)])
    faults = [kind for method, path, kind in events if method == final[0] and re.search(final[1], path)]
    assert faults[:2] == ["500", "reset" if not multipart else "500"], faults
    assert (stats.committed, stats.failed) == (1, 0), stats
    assert [c["step"] for c in commit_entries(url, direct)] == [6]
    assert_committed(url, step=6, storage_options=direct)


def test_no_hard_links_the_training_thread_copies_nothing(cloudckpt_s3, tmp_path, monkeypatch):
    """A local directory without hard links (gcsfuse, NFS): submit only holds the files open; the uploader
    thread copies them, and a file the framework deletes meanwhile is still committed as saved."""
    def no_links(src, dst, *args, **kwargs):
        raise OSError(1, "Operation not permitted")  # what gcsfuse answers to link(2)

    monkeypatch.setattr(os, "link", no_links)
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    local = tmp_path / "local"
    local.mkdir()
    release = threading.Event()
    with CheckpointEngine(url, str(local), storage_options=options, max_pending=3) as engine:
        engine.open()
        assert engine.hard_links is False
        engine.submit(1, write_checkpoint(local, 1), on_committed=lambda result: release.wait(120))
        paths = write_checkpoint(local, 2, size=3 << 20)
        saved = {os.path.basename(p): open(p, "rb").read() for p in paths}
        engine.submit(2, paths)  # the uploader is busy with step 1: nothing of step 2 may be copied yet
        staged = glob.glob(str(local / STAGING_DIR / "ckpt-2-*" / "*"))
        assert staged == []
        for path in paths:  # the framework's max_to_keep deletes them before the uploader gets to them
            os.remove(path)
        release.set()
        engine.wait(120)
        assert engine.stats().committed == 2 and engine.stats().failed == 0
    assert_committed(url, step=2, storage_options=options)
    pulled = tmp_path / "pulled"
    cloudckpt.download_checkpoint(url, str(pulled), step=2, storage_options=options)
    assert {name: (pulled / name).read_bytes() for name in saved} == saved
    assert not os.listdir(local / STAGING_DIR)


def test_hook_without_hard_links_and_max_to_keep_1_commits_every_save(cloudckpt_s3, tmp_path, monkeypatch):
    def no_links(src, dst, *args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=2, scaffold=scaffold, local_dir=str(tmp_path),
                                                   storage_options=options, max_pending=100, remote_max_to_keep=0))
        return hooks[-1]

    train(make_hook, last_step=10, max_to_keep=1)
    stats = hooks[0].stats()
    assert stats.failed == 0 and stats.dropped == 0
    assert set(assert_all_committed_intact(url, options)) == {0, 2, 4, 6, 8, 10}


def test_in_place_after_save_only_queues(tmp_path, caplog):
    """In place (a plain local path), checksums, the commit and the directory scan run in the uploader thread;
    the final save is committed before end() returns."""
    directory = tmp_path / "run"
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(str(directory), save_steps=3, scaffold=scaffold))
        return hooks[-1]

    with caplog.at_level("INFO", logger="cloudckpt"):
        train(make_hook, last_step=10, max_to_keep=2)
    commits = [r for r in caplog.records if r.getMessage().startswith("Committed checkpoint step")]
    assert commits and {r.threadName for r in commits} == {"cloudckpt-uploader"}
    assert "step 10 " in commits[-1].getMessage()  # the final save, committed before end() returned
    assert hooks[0].stats().failed == 0
    assert [c.step for c in cloudckpt.list_checkpoints(str(directory))] == [9, 10]
    assert_committed(str(directory), step=10)


@pytest.mark.parametrize("field, value, allowed", [
    ("part_size", 1 << 20, "[5242880, 5368709120]"),
    ("part_size", (8 << 20) + 1, "multiple of 256 KiB"),
    ("part_size", "8MiB", "[5242880, 5368709120]"),
    ("max_files_in_flight", 0, "[1, 64]"),
    ("max_parts_in_flight", 65, "[1, 64]"),
    ("max_parts_in_flight", True, "[1, 64]"),
    ("max_download_streams", np.True_, "[1, 64]"),
    ("part_size", float(16 << 20), "[5242880, 5368709120]"),
    ("max_files_in_flight", np.float64(4), "[1, 64]"),
    ("max_download_streams", np.int64(65), "[1, 64]"),
    ("multipart_threshold", 6 << 30, "[5242880, 5368709120]"),
    ("multipart_threshold", 1 << 20, "[5242880, 5368709120]"),
])
def test_transfer_options_are_validated(field, value, allowed):
    with pytest.raises(cloudckpt.ConfigError, match=rf"TransferOptions\.{field} must be .*{re.escape(allowed)}"):
        TransferOptions(**{field: value})


def test_transfer_options_take_numpy_integers_as_ints():
    """An integer computed with numpy (``np.int64(16 << 20)``) is an integer: stored as the plain int; a numpy
    bool is a bool (``incremental=np.False_`` was refused)."""
    options = TransferOptions(part_size=np.int64(16 << 20), multipart_threshold=np.uint64(100 << 20),
                              max_files_in_flight=np.int32(2), max_parts_in_flight=np.uint8(3),
                              max_download_streams=np.array(8))
    fields = (options.part_size, options.multipart_threshold, options.max_files_in_flight,
              options.max_parts_in_flight, options.max_download_streams)
    assert fields == (16 << 20, 100 << 20, 2, 3, 8) and {type(f) for f in fields} == {int}
    assert options == TransferOptions(part_size=16 << 20, multipart_threshold=100 << 20, max_files_in_flight=2,
                                      max_parts_in_flight=3, max_download_streams=8)
    flag = np.arange(3).sum() > 5  # a numpy bool (np.False_), what a comparison of numpy values gives
    assert TransferOptions(incremental=flag).incremental is False
    with pytest.raises(cloudckpt.ConfigError, match=r"TransferOptions\.incremental must be True or False"):
        TransferOptions(incremental=np.int64(0))


def test_transfer_options_reach_the_store(counted, tmp_path):
    url, proxy, options, direct = counted
    with pytest.raises(cloudckpt.ConfigError, match="transfer must be a cloudckpt.TransferOptions"):
        CheckpointEngine(url, str(tmp_path), storage_options=options, transfer={"part_size": 5 << 20})
    transfer = TransferOptions(part_size=5 << 20, max_files_in_flight=1, max_parts_in_flight=1,
                               multipart_threshold=5 << 20)
    with CheckpointEngine(url, str(tmp_path), storage_options=options, transfer=transfer) as engine:
        assert engine.transfer is transfer and engine.store.transfer is transfer
        engine.open()
        start = len(proxy.events)
        engine.submit(1, write_checkpoint(tmp_path, 1, size=12 << 20))  # 12 MiB files: 3 parts of 5 MiB each
        engine.wait(120)
    parts = [p for m, p, _ in proxy.events[start:] if m == "PUT" and "partNumber=" in p and ".data-" in p]
    assert len(parts) == 3
    assert_committed(url, step=1, storage_options=direct)


def test_transfer_options_defaults_are_the_defaults_without_one(counted, tmp_path):
    """``TransferOptions(incremental=False)`` changes copying only: its uploads use the same parts as
    ``transfer=None`` (the transport's measured 16 MiB x 4, and one PutObject below its 200 MiB multipart
    threshold), and the s3fs fallback's fsspec path takes the same part size."""
    url, proxy, options, direct = counted
    defaults = TransferOptions()
    assert (defaults.part_size, defaults.max_parts_in_flight) == (PART_SIZE, PARTS_IN_FLIGHT) == (16 << 20, 4)
    assert defaults.max_buffer_bytes == 4 * 4 * (16 << 20)
    assert defaults.multipart_threshold == MULTIPART_THRESHOLD == 200 << 20
    size = 40 << 20  # (+ a few bytes) s3fs: 16 + 16 + 8 MiB, 3 parts (8 MiB parts would make 6); the transport: one PUT
    fallback = {**options, "s3_additional_kwargs": {"StorageClass": "STANDARD"}}  # keeps the data path on s3fs
    cases = {"none": (None, options), "not-incremental": (TransferOptions(incremental=False), options),
             "s3fs": (None, fallback)}
    parts: dict[str, int] = {}
    for name, (transfer, storage_options) in cases.items():
        local = tmp_path / name
        with CheckpointEngine(f"{url}/{name}", str(local), storage_options=storage_options,
                              transfer=transfer) as engine:
            transport = engine.store._transport
            if name == "s3fs":
                assert transport is None
            else:
                assert (transport.part_size, transport.parts_in_flight, transport.multipart_threshold) == \
                    (PART_SIZE, PARTS_IN_FLIGHT, MULTIPART_THRESHOLD)
            engine.open()
            start = len(proxy.events)
            engine.submit(1, write_checkpoint(local, 1, size=size))
            engine.wait(120)
            assert engine.stats().last_committed_step == 1
        puts = [p for m, p, _ in proxy.events[start:] if m == "PUT" and f"/{name}/" in p and ".data-" in p]
        parts[name] = (sum("partNumber=" in p for p in puts), len(puts))
        assert_committed(f"{url}/{name}", step=1, storage_options=direct)
    assert parts == {"none": (0, 1), "not-incremental": (0, 1), "s3fs": (3, 3)}


def test_stats_report_commit_lag_and_queue_depth(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    held, release = threading.Event(), threading.Event()
    summaries = tmp_path / "tb"
    with CheckpointEngine(url, str(tmp_path / "local"), storage_options=options, max_pending=3,
                          summary_dir=str(summaries)) as engine:
        engine.open()
        assert engine.stats().queue_depth == 0 and engine.stats().last_commit_lag_seconds is None
        engine.submit(1, write_checkpoint(tmp_path / "local", 1),
                      on_committed=lambda result: (held.set(), release.wait(120)))
        engine.submit(2, write_checkpoint(tmp_path / "local", 2))
        engine.submit(3, write_checkpoint(tmp_path / "local", 3))
        assert held.wait(120)
        # step 1 is committed (its follow-up held): not counted; 2 and 3 waiting
        assert engine.stats().queue_depth == 2 and engine.pending_steps() == [1, 2, 3]
        release.set()
        engine.wait(120)
        stats = engine.stats()
    assert stats.queue_depth == 0 and stats.last_committed_step == 3
    assert stats.last_commit_lag_steps == 0 and stats.last_commit_lag_seconds >= 0
    scalars = read_scalars(summaries)
    # Steps saved after each by the time it committed: step 2 committed after step 3 was submitted.
    assert scalars["commit_lag_steps"][2] == 1.0 and scalars["commit_lag_steps"][3] == 0.0
    assert scalars["queue_depth"] == {1: 2.0, 2: 1.0, 3: 0.0}  # waiting behind each when it was done
    assert all(v >= 0 for v in scalars["commit_lag_seconds"].values())


def test_summary_dir_gets_an_event_file_only_with_the_first_commit(cloudckpt_s3, tmp_path):
    """An engine that commits nothing (a non-chief worker's) leaves no empty event file in a shared summary_dir."""
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    summaries = tmp_path / "tb"
    with CheckpointEngine(url, str(tmp_path / "idle"), storage_options=options, summary_dir=str(summaries)) as engine:
        engine.open()
    assert summaries.is_dir() and not list(summaries.iterdir())  # the directory is checked at open
    with CheckpointEngine(url, str(tmp_path / "local"), storage_options=options, summary_dir=str(summaries)) as engine:
        engine.open()
        engine.submit(1, write_checkpoint(tmp_path / "local", 1))
        engine.wait(120)
    events = list(summaries.glob("events.out.tfevents.*"))
    assert len(events) == 1 and read_scalars(summaries)["failed"] == {1: 0.0}
    versions = [e.file_version for e in tf.compat.v1.train.summary_iterator(str(events[0])) if e.file_version]
    assert versions == ["brain.Event:2"]  # TensorBoard's header record comes first


def test_an_unusable_summary_dir_is_a_config_error_without_the_credentials(memory_url, tmp_path):
    """Was TensorFlow's OpError, quoting the raw URL: "File system scheme 's3' not implemented (file:
    's3://AKID:secret@...')". A URL with credentials is refused at construction (TF's file systems take none);
    a file, or a scheme TF does not open, at open(), with the display form."""
    import traceback

    secret = "summary-secret-DO-NOT-LEAK"
    with pytest.raises(cloudckpt.ConfigError) as info:
        CheckpointEngine(memory_url, str(tmp_path / "l"), summary_dir=f"s3://AKIDSUMMARY:{secret}@bucket/tb")
    assert "summary_dir 's3://***@bucket/tb' holds credentials" in str(info.value)
    assert secret not in "".join(traceback.format_exception(info.value))
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"keep")
    for directory, fragment in ((str(a_file), "is not a directory"), ("memory://x/tb", "not implemented")):
        with CheckpointEngine(memory_url, str(tmp_path / "l"), summary_dir=directory) as engine:
            with pytest.raises(cloudckpt.ConfigError) as info:
                engine.open()
        message = str(info.value)
        assert f"summary_dir {directory!r} cannot be used for TensorBoard summaries" in message and fragment in message
        assert isinstance(info.value.__cause__, tf.errors.OpError)
    assert a_file.read_bytes() == b"keep"


@pytest.mark.parametrize("directory", [123, b"/tmp/tb", ""])
def test_a_summary_dir_of_the_wrong_type_names_what_tensorflow_opens(directory, memory_url, tmp_path):
    """Was the checkpoint URL's message, "must be a non-empty local path or URL string (s3://bucket/dir, ...)":
    an s3:// summary_dir then fails at open() (TensorFlow 2.21 has no s3 file system), so it is not offered."""
    with pytest.raises(cloudckpt.ConfigError) as info:
        CheckpointEngine(memory_url, str(tmp_path / "l"), summary_dir=directory)
    message = str(info.value)
    assert message.startswith("summary_dir must be") and "s3://" not in message, message
    assert "local directory" in message and "gs://" in message, message


def test_summary_dir_records_commit_scalars_from_training(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    summaries = tmp_path / "tb"
    hooks = []

    def make_hook(scaffold):
        hooks.append(cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(tmp_path / "local"),
                                                   storage_options=options, summary_dir=str(summaries),
                                                   max_pending=100))
        return hooks[-1]

    train(make_hook, last_step=20, size=4096)
    stats = hooks[0].stats()
    scalars = read_scalars(summaries)
    assert set(scalars) >= {"commit_lag_seconds", "commit_lag_steps", "throughput_mib_per_second", "retries",
                            "dropped", "failed", "queue_depth"}
    committed = {c.step for c in cloudckpt.list_checkpoints(url, options)}
    assert set(scalars["commit_lag_seconds"]) == committed == {0, 5, 10, 15, 20}
    assert all(0 <= lag < 600 for lag in scalars["commit_lag_seconds"].values())
    assert all(mib > 0 for mib in scalars["throughput_mib_per_second"].values())
    assert scalars["retries"][20] == stats.retries == 0
    assert scalars["dropped"][20] == stats.dropped == 0 and scalars["failed"][20] == 0
    assert scalars["commit_lag_steps"][20] == 0 and scalars["queue_depth"][20] == 0


def test_tf2_manager_summary_dir_records_each_commit(memory_url, tmp_path):
    summaries = tmp_path / "tb"
    w = tf.Variable(tf.zeros([64]))
    ckpt = tf.train.Checkpoint(w=w)
    with cloudckpt.CheckpointManager(ckpt, memory_url, max_to_keep=None, local_dir=str(tmp_path / "local"),
                                     max_pending=10, summary_dir=str(summaries)) as manager:
        manager.restore_or_initialize()
        for i in range(1, 4):
            w.assign(tf.fill([64], float(i)))
            manager.save()
        manager.wait()
        stats = manager.stats()
    scalars = read_scalars(summaries)
    assert stats.committed == 3 and set(scalars["commit_lag_seconds"]) == {1, 2, 3}
    assert scalars["commit_lag_steps"][3] == 0 and scalars["failed"][3] == 0


# -- commit lag in steps: the training steps run between a save and its commit ---------------------------------
STEPS_HELD = 20  # training steps run while the proxy holds the checkpoint's manifest PUT (its commit waits)


class HoldFirst:
    """A ``FaultProxy`` path filter: the first request whose path matches ``pattern``, no other; the proxy holds
    it until ``release`` is set (``set_faults(until=)``). ``held`` turns true when that request arrives."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.paths: list[str] = []
        self.release = threading.Event()

    def __call__(self, path: str) -> bool:
        if self.paths or not self.pattern.search(path.split("?")[0]):
            return False
        self.paths.append(path)
        return True

    @property
    def held(self) -> bool:
        return bool(self.paths)

    def arm(self, proxy: FaultProxy) -> None:
        proxy.set_faults(only_methods=("PUT",), path_filter=self, until=self.release)


class LagWatch:
    """Drives and brackets a held commit from the training loop: once the loop sees the checkpoint's manifest
    PUT held (``held_at``), ``STEPS_HELD`` more training steps run, then the hold is released (``released_at``:
    the commit completes after it) and training goes on until the loop sees the commit (``seen_at``: it
    completed before). The training step at the commit lies between ``released_at`` and ``seen_at``."""

    def __init__(self, hold: HoldFirst, committed) -> None:
        self.hold, self.committed = hold, committed
        self.held_at: int | None = None
        self.released_at: int | None = None
        self.seen_at: int | None = None
        self.stats = None  # what ``committed()`` returned when the commit was first seen

    def observe(self, training_step: int) -> bool:
        """After a training step (``training_step``: the step training has reached): True once the commit is seen."""
        if self.held_at is None and self.hold.held:
            self.held_at = training_step
        if self.held_at is not None and self.released_at is None and training_step - self.held_at >= STEPS_HELD:
            self.released_at = training_step
            self.hold.release.set()
        if self.released_at is not None and self.seen_at is None:
            stats = self.committed()
            if stats is not None:
                self.seen_at, self.stats = training_step, stats
        return self.seen_at is not None

    def assert_lag(self, lag: int, checkpoint_step: int, slack: int = 0) -> None:
        """``lag`` is the training steps between ``checkpoint_step``'s save and its commit (``slack`` fewer
        allowed): at least the steps run until the hold was released, at most those run until it was seen."""
        assert self.released_at is not None and self.seen_at is not None, (self.held_at, self.released_at)
        assert self.released_at - checkpoint_step - slack <= lag <= self.seen_at - checkpoint_step, \
            (lag, checkpoint_step, self.held_at, self.released_at, self.seen_at)
        assert lag >= STEPS_HELD - slack


def test_engine_step_source_sets_the_training_step_of_the_commit_lag(memory_url, tmp_path):
    local = tmp_path / "local"
    with CheckpointEngine(memory_url, str(local)) as engine:
        engine.open()
        engine.step_source = lambda: 7
        engine.submit(1, write_checkpoint(local, 1))
        engine.wait(60)
        assert engine.stats().last_commit_lag_steps == 6
        engine.step_source = lambda: None  # not known: the newest step submitted stands in
        engine.submit(2, write_checkpoint(local, 2))
        engine.wait(60)
        assert engine.stats().last_commit_lag_steps == 0

        def broken() -> int:
            raise RuntimeError("no step here")

        engine.step_source = broken  # a statistic never fails a commit
        engine.submit(3, write_checkpoint(local, 3))
        engine.wait(60)
        assert engine.stats().committed == 3 and engine.stats().last_commit_lag_steps == 0
        with pytest.raises(cloudckpt.ConfigError, match="step_source must be a callable"):
            engine.step_source = 5  # type: ignore[assignment]


def test_hook_commit_lag_counts_the_global_steps_run_until_the_commit(counted, tmp_path):
    """Was: the newest step saved by the commit minus the committed one, so 0 here (no other save in between)
    although training ran on while step 0's commit was held. Now: the global step TF's hook fetched with the
    last run before the commit completed, minus 0 (the fetch may see the step before that run's increment: one
    step fewer allowed). The TensorBoard scalar says the same."""
    url, proxy, options, _ = counted
    summaries = tmp_path / "tb"
    hold = HoldFirst(r"/model\.ckpt-0\.manifest\.json$")
    hold.arm(proxy)
    with tf.Graph().as_default():
        global_step = tf.compat.v1.train.get_or_create_global_step()
        tf.compat.v1.get_variable("w", shape=[256])
        train_op = tf.compat.v1.assign_add(global_step, 1)
        hook = cloudckpt.CheckpointSaverHook(url, save_steps=100_000, local_dir=str(tmp_path / "local"),
                                             storage_options=options, summary_dir=str(summaries))

        def committed():
            stats = hook.stats()
            return stats if stats.last_committed_step == 0 else None

        watch = LagWatch(hold, committed)
        try:
            with tf.compat.v1.train.MonitoredTrainingSession(
                    checkpoint_dir=hook.local_dir, save_checkpoint_secs=None, save_checkpoint_steps=None,
                    save_summaries_steps=None, save_summaries_secs=None, log_step_count_steps=None,
                    hooks=[hook]) as sess:
                deadline = time.monotonic() + 120
                step = 0
                while time.monotonic() < deadline:
                    sess.run(train_op)
                    step += 1  # the global step now: one increment per run
                    if watch.observe(step):
                        break
                    time.sleep(0.002)
        finally:
            hold.release.set()
    lag = watch.stats.last_commit_lag_steps
    watch.assert_lag(lag, 0, slack=1)
    assert read_scalars(summaries)["commit_lag_steps"][0] == lag


@pytest.mark.parametrize("numbered_by", ["variable", "step_counter", "save_counter"])
def test_tf2_manager_commit_lag_reads_the_step_variable_that_numbers_its_checkpoints(numbered_by, counted, tmp_path):
    """``save(checkpoint_number=step)`` with the variable, or with its value when it is the ``step_counter``:
    the variable is read when the commit completes, so the lag is the steps it advanced while step 5's commit was
    held (was 0: the newest number saved minus 5). Numbered by ``save_counter`` the lag counts saves: 0 here, as
    documented (no other save in between)."""
    url, proxy, options, _ = counted
    summaries = tmp_path / "tb"
    step = tf.Variable(0, dtype=tf.int64)
    w = tf.Variable(tf.zeros([256]))

    @tf.function
    def train_step():
        w.assign_add(tf.ones([256]))
        step.assign_add(1)

    number = 5 if numbered_by != "save_counter" else 1
    hold = HoldFirst(rf"/ckpt-{number}\.manifest\.json$")
    try:
        with cloudckpt.CheckpointManager(tf.train.Checkpoint(step=step, w=w), url, max_to_keep=3,
                                         step_counter=step if numbered_by == "step_counter" else None,
                                         local_dir=str(tmp_path / "local"), storage_options=options,
                                         summary_dir=str(summaries)) as manager:
            manager.restore_or_initialize()
            for _ in range(5):
                train_step()
            hold.arm(proxy)
            manager.save(checkpoint_number={"variable": step, "step_counter": int(step),
                                            "save_counter": None}[numbered_by])

            def committed():
                stats = manager.stats()
                return stats if stats.last_committed_step == number else None

            watch = LagWatch(hold, committed)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                train_step()
                if watch.observe(int(step)):
                    break
                time.sleep(0.002)
            lag = watch.stats.last_commit_lag_steps
    finally:
        hold.release.set()
    if numbered_by == "save_counter":
        assert lag == 0 and watch.seen_at - watch.held_at >= STEPS_HELD
    else:
        watch.assert_lag(lag, 5)
    assert read_scalars(summaries)["commit_lag_steps"][number] == lag


@pytest.mark.parametrize("kind", ["BackupAndRestore", "ModelCheckpoint"])
def test_keras_commit_lag_counts_the_batches_run_until_the_commit(kind, counted, tmp_path):
    """A save's step is ``optimizer.iterations``; the lag is the batches ``fit`` ran between the save (end of
    epoch 1, step 80) and its commit, held by the proxy (was 0: no other save in between; the next one, step 160,
    comes after the commit)."""
    import keras

    import cloudckpt.keras
    from support.keras_model import BATCH_SIZE, data, make_model

    url, proxy, options, _ = counted
    summaries = tmp_path / "tb"
    x, y = data()
    x, y = np.tile(x, (20, 1)), np.tile(y, (20, 1))  # 80 batches an epoch
    if kind == "BackupAndRestore":
        callback = cloudckpt.keras.BackupAndRestore(url, storage_options=options, local_dir=str(tmp_path / "local"),
                                                    delete_checkpoint=False, summary_dir=str(summaries))
    else:
        callback = cloudckpt.keras.ModelCheckpoint(f"{url}/model-{{epoch:02d}}.keras", storage_options=options,
                                                   summary_dir=str(summaries))
    hold = HoldFirst(r"\.manifest\.json$")
    hold.arm(proxy)

    def committed():
        stats = callback.stats()
        return stats if stats.last_committed_step is not None else None

    watch = LagWatch(hold, committed)

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            iterations = int(self.model.optimizer.iterations)
            if iterations > 80 and not hold.held:  # step 80 is saved: training waits until its manifest is held
                deadline = time.monotonic() + 60
                while not hold.held and time.monotonic() < deadline:
                    time.sleep(0.005)
            if watch.observe(iterations):
                self.model.stop_training = True
            elif watch.released_at is not None:
                time.sleep(0.01)  # while the commit completes: far from the next save (step 160)

    try:
        make_model().fit(x, y, batch_size=BATCH_SIZE, epochs=50, verbose=0, callbacks=[callback, Probe()])
    finally:
        hold.release.set()
        callback.close()
    lag = read_scalars(summaries)["commit_lag_steps"][80]
    watch.assert_lag(int(lag), 80)
    if watch.stats.last_committed_step == 80:  # (not step 160's already: the uploader commits them in order)
        assert watch.stats.last_commit_lag_steps == lag


@pytest.mark.parametrize("retries", ["412", "503"])
def test_a_gs_data_file_whose_single_request_upload_lost_its_answer_is_not_uploaded_again(gcs_emulator, tmp_path,
                                                                                         retries):
    """gs://: a data file under the resumable threshold goes in one create-only request (gcsfs's
    ``uploadType=multipart`` POST with ``ifGenerationMatch=0``). It reaches the store, its answer is lost; the retry
    is answered 412 (the object exists) or 503. The object holds the file's bytes (one
    metadata GET: its size and the crc32c GCS keeps of it, the manifest's): it is this upload's, the commit goes on
    and no new upload starts (bytes of the requests counted at the proxy). Was: the 412 made the upload return
    "exists", the commit went round again, took its own object for debris, deleted it and sent the file again
    (3 MiB sent); after the 503, the next retry got 412, the same (4 MiB)."""
    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    gcs_emulator.make_bucket(bucket)
    url, direct = f"gs://{bucket}/run", gcs_emulator.storage_options()
    local = tmp_path / "local"
    size = 1 << 20  # under gcsfs's resumable threshold, and larger than every other object of the commit
    single = r"/upload/storage/v1/b/[^/]+/o\?.*uploadType=multipart"  # (the object's name is in the body)
    with FaultProxy(gcs_emulator.endpoint, seed=0) as proxy:
        options = {**direct, "endpoint_url": proxy.url}
        with CheckpointEngine(url, str(local), storage_options=options, retry=FAST_RETRY, on_error="warn") as engine:
            engine.open()
            engine.resume(download=False)
            start, received = len(proxy.events), proxy.received_bytes
            proxy.set_faults(only_methods=["POST"], path_filter=single, min_body=size)
            proxy.fail_next("lose_response")
            if retries == "503":
                proxy.fail_next("503")
            paths = write_checkpoint(local, 5, size=size)
            with open(paths[1], "wb") as f:  # a small index: the data file is the one large request
                f.write(b"index")
            engine.submit(5, paths)
            engine.wait(120)
            proxy.set_faults()
            stats = engine.stats()
        events, sent = proxy.events[start:], proxy.received_bytes - received
    faults = [kind for _, _, kind in events if kind is not None]
    assert faults == ["lose_response"] + (["503"] if retries == "503" else []), faults
    # the data file's request and its one retry, each with its bytes; the commit's other objects are small
    assert 2 * size < sent < 3 * size, sent  # was: the file once more (412), or a failed commit (503)
    assert (stats.committed, stats.failed) == (1, 0), stats
    assert not any(method == "DELETE" for method, _, _ in events), [e for e in events if e[0] == "DELETE"]
    assert [c["step"] for c in commit_entries(url, direct)] == [5]
    assert_committed(url, step=5, storage_options=direct)


def test_an_s3fs_fallback_data_file_whose_put_lost_its_answer_is_not_uploaded_again(counted, tmp_path):
    """The s3fs fallback (a ``storage_options`` cloudckpt's transport does not take keeps the data path on s3fs):
    a data file's create-only PutObject (``If-None-Match: *``) reaches the store, its answer is lost. aiohttp
    itself sends an idempotent PUT again once when a reused connection drops (its
    ``retry_persistent_connection``): that copy is answered 500 here, so the policy retries, and its attempt is
    answered 412. The object's size and ETag (the MD5 of a single PutObject's bytes, compared with the file's)
    say it is this upload's: the commit goes on, the file is not uploaded again, nothing is deleted. Was: the
    412 sent the commit round again (its own object deleted as debris, the file sent again). (Without the 500,
    aiohttp's own copy gets the 412, on cloudckpt's first attempt: taken for someone else's object, as before.)"""
    url, proxy, options, direct = counted
    fallback = {**options, "s3_additional_kwargs": {"StorageClass": "STANDARD"}}  # keeps the data path on s3fs
    local = tmp_path / "local"
    data_file = r"/ckpt-7\.data-00000-of-00001$"
    with CheckpointEngine(url, str(local), storage_options=fallback, retry=FAST_RETRY, on_error="warn") as engine:
        assert engine.store._transport is None
        engine.open()
        engine.resume(download=False)
        start = len(proxy.events)
        proxy.set_faults(only_methods=["PUT"], path_filter=data_file)
        proxy.fail_next("lose_response")
        proxy.fail_next("500")
        engine.submit(7, write_checkpoint(local, 7, size=1 << 20))
        engine.wait(120)
        proxy.set_faults()
        stats = engine.stats()
    assert (stats.committed, stats.failed) == (1, 0), stats
    # the PUT, aiohttp's copy, the policy's retry (412): no new upload
    assert [kind for _, kind in puts_of(proxy, start, data_file)] == ["lose_response", "500", None]
    assert not any(method == "DELETE" or "delete" in path for method, path, _ in proxy.events[start:])
    assert [c["step"] for c in commit_entries(url, direct)] == [7]
    assert_committed(url, step=7, storage_options=direct)
