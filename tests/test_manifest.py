"""The manifest schema: round trip, names, checksums, validation."""

from __future__ import annotations

import io
import json

import google_crc32c
import pytest

from cloudckpt.errors import ManifestError
from cloudckpt.manifest import (
    FileEntry,
    Manifest,
    crc32c_hex,
    crc32c_of_file,
    crc32c_of_stream,
    manifest_name,
    parse_checkpoint_file_name,
    parse_manifest,
    parse_manifest_name,
)


def sample() -> Manifest:
    return Manifest(step=30, prefix="model.ckpt-30", created_at="2026-11-26T19:00:25Z", tensorflow="2.21.0",
                    cloudckpt="0.1.0", files=(FileEntry("model.ckpt-30.index", 1234, "0a1b2c3d"),
                                              FileEntry("model.ckpt-30.data-00000-of-00001", 99, "ffffffff")))


def test_round_trip_and_schema():
    m = sample()
    doc = json.loads(m.to_json())
    assert doc == {"format": "cloudckpt.manifest", "version": 1, "step": 30, "prefix": "model.ckpt-30",
                   "created_at": "2026-11-26T19:00:25Z",
                   "files": [{"name": "model.ckpt-30.index", "size": 1234, "crc32c": "0a1b2c3d"},
                             {"name": "model.ckpt-30.data-00000-of-00001", "size": 99, "crc32c": "ffffffff"}],
                   "tensorflow": "2.21.0", "cloudckpt": "0.1.0"}
    assert parse_manifest(m.to_json(), url="memory://x") == m
    assert m.name == "model.ckpt-30.manifest.json" and m.total_size == 1333


def test_same_tensors_ignores_timestamps_order_and_meta():
    a = sample()
    b = Manifest(step=30, prefix="model.ckpt-30", created_at="2030-01-01T00:00:00Z",
                 files=(*reversed(a.files), FileEntry("model.ckpt-30.meta", 5, "12345678")))
    assert a.same_tensors(b)
    c = Manifest(step=30, prefix="model.ckpt-30", files=(FileEntry("model.ckpt-30.index", 1234, "00000000"),
                                                         a.files[1]))
    assert not a.same_tensors(c)


def test_names():
    assert manifest_name("model.ckpt-30") == "model.ckpt-30.manifest.json"
    assert parse_manifest_name("model.ckpt-30.manifest.json") == ("model.ckpt-30", 30)
    assert parse_manifest_name("my-model-7.manifest.json") == ("my-model-7", 7)
    assert parse_manifest_name("checkpoint") is None
    assert parse_checkpoint_file_name("model.ckpt-30.data-00001-of-00002") == ("model.ckpt-30", 30)
    assert parse_checkpoint_file_name("model.ckpt-30.index") == ("model.ckpt-30", 30)
    for other in ("graph.pbtxt", "model.ckpt-30.index.tmp", "events.out.tfevents.1", "model.ckpt.index"):
        assert parse_checkpoint_file_name(other) is None


def test_crc32c_streams_in_chunks(tmp_path):
    data = bytes(range(256)) * 40000  # 10 MB: more than one read chunk
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = f"{google_crc32c.value(data):08x}"
    assert crc32c_hex(data) == expected
    assert crc32c_of_file(str(path)) == (len(data), expected)
    seen = []
    assert crc32c_of_stream(io.BytesIO(data), seen.append) == (len(data), expected)
    assert sum(seen) == len(data) and len(seen) > 1
    assert crc32c_hex(b"123456789") == "e3069283"  # the CRC-32C check value


@pytest.mark.parametrize("payload, message", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "is not a cloudckpt manifest"),
    (b'{"format": "other"}', "is not a cloudckpt manifest"),
    (b'{"format": "cloudckpt.manifest", "version": "1"}', "invalid version"),
    (b'{"format": "cloudckpt.manifest", "version": 9, "step": 1}', "format version 9"),
    (b'{"format": "cloudckpt.manifest", "version": 1, "step": -1, "prefix": "p", "files": []}', "malformed"),
    (b'{"format": "cloudckpt.manifest", "version": 1, "step": 1, "prefix": "p", '
     b'"files": [{"name": "a", "size": 1, "crc32c": "ABCDEF12"}]}', "malformed"),
])
def test_invalid_manifests(payload, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(payload, url="s3://b/run/model.ckpt-1.manifest.json")


def test_large_files_record_part_checksums_that_combine_to_the_file_crc(tmp_path):
    from cloudckpt.manifest import PART_SIZE, checksum_part_size, entry_for
    from cloudckpt.s3_transport import crc32c_combine

    data = bytes(range(256)) * ((2 * PART_SIZE + 1000) // 256)
    (tmp_path / "f").write_bytes(data)
    entry = entry_for("model.ckpt-1.data-00000-of-00001", str(tmp_path / "f"))
    assert entry.crc32c == crc32c_hex(data) and entry.part_size == PART_SIZE and len(entry.parts) == 3
    assert entry.parts == tuple(crc32c_hex(data[a:b]) for a, b in entry.part_spans())
    combined = int(entry.parts[0], 16)
    for (a, b), part in zip(entry.part_spans()[1:], entry.parts[1:]):
        combined = crc32c_combine(combined, int(part, 16), b - a)
    assert f"{combined:08x}" == entry.crc32c
    (tmp_path / "small").write_bytes(b"x" * 1000)
    assert entry_for("s", str(tmp_path / "small")).parts == ()  # one part: the file's crc32c says it all
    assert checksum_part_size(10) == PART_SIZE
    assert checksum_part_size(200 << 30) == 21 << 20  # at most 10,000 parts, in whole MiB


def test_part_checksums_and_etag_round_trip_and_old_manifests_stay_readable():
    entry = FileEntry("model.ckpt-30.data-00000-of-00001", 20, "ffffffff", 8, ("00000001", "00000002", "00000003"),
                      "abc-3")
    m = Manifest(step=30, prefix="model.ckpt-30", files=(sample().files[0], entry))
    doc = json.loads(m.to_json())
    assert doc["files"][1] == {"name": entry.name, "size": 20, "crc32c": "ffffffff", "part_size": 8,
                               "parts": ["00000001", "00000002", "00000003"], "etag": "abc-3"}
    assert "parts" not in doc["files"][0] and "etag" not in doc["files"][0]
    assert parse_manifest(m.to_json(), url="memory://x") == m
    assert m.same_tensors(Manifest(step=30, prefix="model.ckpt-30",
                                   files=(sample().files[0], FileEntry(entry.name, 20, "ffffffff"))))
    assert parse_manifest(sample().to_json(), url="memory://x").files[1].parts == ()  # older manifests
    for bad in ({"parts": ["00000001"], "part_size": 8}, {"parts": ["zz"] * 3, "part_size": 8},
                {"parts": ["00000001"] * 3, "part_size": "8"}, {"etag": 5}):
        broken = json.loads(m.to_json())
        broken["files"][1].update(bad)
        with pytest.raises(ManifestError, match="malformed"):
            parse_manifest(json.dumps(broken).encode(), url="memory://x")
