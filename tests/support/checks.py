"""Independent checks of what is in a remote directory (plain fsspec + google-crc32c, not cloudckpt's code)."""

from __future__ import annotations

import json
import posixpath
import re

import fsspec
import google_crc32c


def remote_fs(url: str, options: dict | None):
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def manifests(url: str, options: dict | None = None) -> dict[int, dict]:
    """step -> parsed manifest JSON for every manifest in the directory."""
    fs, root = remote_fs(url, options)
    out = {}
    for path in fs.ls(root, detail=False):
        m = re.match(r".*-(\d+)\.manifest\.json$", path)
        if m:
            out[int(m.group(1))] = json.loads(fs.cat_file(path))
    return out


def assert_all_committed_intact(url: str, options: dict | None = None) -> dict[int, dict]:
    """Every manifest's files exist with the listed size and crc32c; returns the manifests."""
    fs, root = remote_fs(url, options)
    found = manifests(url, options)
    for step, doc in found.items():
        assert doc["format"] == "cloudckpt.manifest" and doc["version"] == 1
        assert doc["step"] == step and doc["prefix"].endswith(f"-{step}")
        assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}", doc["created_at"])
        names = {f["name"] for f in doc["files"]}
        assert any(n.endswith(".index") for n in names) and any(".data-" in n for n in names), names
        for entry in doc["files"]:
            data = fs.cat_file(posixpath.join(root, entry["name"]))
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
