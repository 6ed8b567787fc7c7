"""Independent checks of what is in a remote directory (plain fsspec + google-crc32c, not cloudckpt's code)."""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor

import fsspec
import google_crc32c


def remote_fs(url: str, options: dict | None):
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return fs, root.rstrip("/")


_ENTRIES: dict[tuple[str, str], dict] = {}  # (url, path) -> entry: log entries are immutable


def log_entries(url: str, options: dict | None = None) -> list[dict]:
    """The commit log's entries (``.cloudckpt/log/<partition>/<index>.json``), in order; [] without a log."""
    fs, root = remote_fs(url, options)
    try:
        paths = sorted((p for p in fs.find(f"{root}/.cloudckpt/log") if re.search(r"/\d{20}\.json$", p)),
                       key=lambda p: p.rsplit("/", 1)[-1])
    except FileNotFoundError:
        return []
    missing = [p for p in paths if (url, p) not in _ENTRIES]
    with ThreadPoolExecutor(8) as pool:
        for path, doc in zip(missing, pool.map(lambda p: json.loads(fs.cat_file(p)), missing)):
            _ENTRIES[(url, path)] = doc
    return [_ENTRIES[(url, p)] for p in paths]


def newest_writer_id(url: str, options: dict | None = None) -> str:
    """The writer id of the directory's newest registered writer (its commit log)."""
    from cloudckpt.remote import RemoteStore
    from cloudckpt.writers import Writer

    return Writer(RemoteStore(url, options)).state().newest_writer.writer_id


def committed_manifest_names(url: str, options: dict | None = None) -> dict[str, str | None] | None:
    """With a commit log: manifest name -> commit id (None for adopted version 1 ones) of every commit that is
    not retired, counting only commits of the newest writer at their position; None without a log."""
    entries = log_entries(url, options)
    if not entries:
        return None
    epoch, live = None, {}
    for index, doc in enumerate(entries, start=1):
        if doc["type"] == "writer":
            if epoch is None:
                for prefix, _ in doc.get("legacy") or ():
                    live[f"legacy:{prefix}"] = f"{prefix}.manifest.json"
            epoch = index
        elif doc["type"] == "commit" and doc["epoch"] == epoch:
            live[doc["commit_id"]] = doc["manifest"]
        elif doc["type"] == "delete":
            for cid in doc.get("retire") or ():
                live.pop(cid, None)
    return {name: (None if cid.startswith("legacy:") else cid) for cid, name in live.items()}


def manifests(url: str, options: dict | None = None) -> dict[int, dict]:
    """step -> parsed manifest JSON for every committed manifest in the directory (with a commit log:
    named by a live commit entry with the same commit id; without: every manifest).

    On a live directory (a writer committing and retiring meanwhile) the log is read before the listing and
    again after the manifests: a manifest counts when the commit it names is live in either reading, so one
    committed while the manifests are read counts, and one whose name was retired and committed again (a
    new commit id) is matched against the newer reading."""
    fs, root = remote_fs(url, options)
    before = committed_manifest_names(url, options)
    found = {}
    for path in fs.ls(root, detail=False):
        m = re.match(r".*-(\d+)\.manifest\.json$", path)
        if not m:
            continue
        try:
            found[path] = (int(m.group(1)), json.loads(fs.cat_file(path)))
        except FileNotFoundError:  # retired and deleted since the listing (a live directory)
            continue
    after = committed_manifest_names(url, options) if before is not None else None
    out = {}
    for path, (step, doc) in found.items():
        name = path.rsplit("/", 1)[-1]
        if before is not None and doc.get("commit_id") not in (before.get(name, False), after.get(name, False)):
            continue  # debris: an upload (or a fenced writer's manifest) that never committed
        out[step] = doc
    return out


def assert_all_committed_intact(url: str, options: dict | None = None) -> dict[int, dict]:
    """Every manifest's files exist with the listed size and crc32c; returns the manifests."""
    fs, root = remote_fs(url, options)
    found = manifests(url, options)
    for step, doc in found.items():
        assert doc["format"] == "cloudckpt.manifest" and doc["version"] in (1, 2)
        assert doc["step"] == step and doc["prefix"].endswith(f"-{step}")
        assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", doc["created_at"])
        names = {f["name"] for f in doc["files"]}
        assert any(n.endswith(".index") for n in names) and any(".data-" in n for n in names), names
        for entry in doc["files"]:
            try:
                data = fs.cat_file(posixpath.join(root, entry["name"]))
            except FileNotFoundError:
                data = None
            if data is None or len(data) != entry["size"]:
                # on a live directory a writer's retention may have retired it since: then it is not committed
                still = committed_manifest_names(url, options)
                if still is not None and f"{doc['prefix']}.manifest.json" not in still:
                    break
            assert data is not None, (step, entry, "missing")
            assert len(data) == entry["size"], (step, entry)
            assert f"{google_crc32c.value(data):08x}" == entry["crc32c"], (step, entry)
    return found


def state_file(url: str, options: dict | None = None) -> dict[str, list[str]]:
    """The remote TF ``checkpoint`` state file parsed into {field: [values]}."""
    fs, root = remote_fs(url, options)
    text = fs.cat_file(posixpath.join(root, "checkpoint")).decode()
    out: dict[str, list[str]] = {}
    for key, value in re.findall(r'^(\w+): "([^"]*)"$', text, re.M):
        out.setdefault(key, []).append(value)
    return out


def read_scalars(directory) -> dict[str, dict[int, float]]:
    """tag (without ``cloudckpt/``) -> step -> value, from every event file in ``directory``."""
    import tensorflow as tf  # here: a test reading summaries has TensorFlow, other users of this module need not

    found: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(str(directory), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag.removeprefix("cloudckpt/"), {})[event.step] = value.simple_value
    return found
