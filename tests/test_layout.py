"""cloudckpt.layout: the one place that names and recognises a checkpoint's files."""

from __future__ import annotations

import json
import os
import time

import pytest

from cloudckpt.errors import ConfigError
from cloudckpt.layout import (TF, PrefixLayout, basename_of, committed_prefixes, get_layout, manifest_name,
                              parse_manifest_name, parse_object_name, register_layout, render_state_file,
                              split_prefix, state_file_prefix, state_file_timestamps, step_of)
from cloudckpt.manifest import FileEntry, Manifest, parse_manifest

KERAS = register_layout(PrefixLayout("test-keras-file", ("keras",), marker="keras"))
GROUP = register_layout(PrefixLayout("test-keras-group", ("weights\\.h5", "json"), marker="json",
                                     not_restored=("json",)))


def touch(directory, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(name.encode())


@pytest.mark.parametrize("name, parsed", [
    ("model.ckpt-30.index", ("model.ckpt-30", 30)),
    ("model.ckpt-30.data-00000-of-00002", ("model.ckpt-30", 30)),
    ("model.ckpt-30.meta", ("model.ckpt-30", 30)),
    ("ckpt-7.index", ("ckpt-7", 7)),
    ("run-2-3.index", ("run-2-3", 3)),
    ("model.ckpt-30.index.tmp", None),
    ("model.ckpt-30.data-0-of-1", None),
    ("model.ckpt.index", None),
    ("checkpoint", None),
    ("model.ckpt-30.manifest.json", None),
])
def test_tf_layout_parses_what_the_saver_writes(name, parsed):
    assert TF.parse_file(name) == parsed


def test_tf_layout_roles_of_its_files():
    assert TF.is_marker("ckpt-1.index") and not TF.is_marker("ckpt-1.data-00000-of-00001")
    assert not TF.is_restored("ckpt-1.meta") and TF.is_restored("ckpt-1.index")
    assert TF.is_restored("ckpt-1.data-00000-of-00001")
    assert TF.prefix_of(["ckpt-4.index", "ckpt-4.data-00000-of-00001"]) == ("ckpt-4", 4)
    with pytest.raises(ConfigError, match="lack"):
        TF.prefix_of(["ckpt-4.data-00000-of-00001"])
    with pytest.raises(ConfigError, match="one checkpoint"):
        TF.prefix_of(["ckpt-4.index", "ckpt-5.index"])
    with pytest.raises(ConfigError, match="one checkpoint"):
        TF.prefix_of(["ckpt-4.index", "notes.txt"])


def test_prefix_and_manifest_names():
    assert split_prefix("model.ckpt-30") == ("model.ckpt", 30) and split_prefix("model") is None
    assert step_of("a-b-12") == 12 and basename_of("a-b-12") == "a-b" and basename_of("best") == "best"
    with pytest.raises(ValueError):
        step_of("best")
    assert manifest_name("ckpt-3") == "ckpt-3.manifest.json"
    assert parse_manifest_name("ckpt-3.manifest.json") == ("ckpt-3", 3)
    assert parse_manifest_name("ckpt.manifest.json") is None
    assert committed_prefixes(["b-10.manifest.json", "a-2.manifest.json", "b-10.index"]) == [("a-2", 2), ("b-10", 10)]


def test_other_layouts_for_keras_files():
    assert KERAS.parse_file("model-3.keras") == ("model-3", 3) and KERAS.parse_file("model-3.index") is None
    assert KERAS.prefix_of(["model-3.keras"]) == ("model-3", 3)
    assert GROUP.prefix_of(["backup-9.weights.h5", "backup-9.json"]) == ("backup-9", 9)
    with pytest.raises(ConfigError):
        GROUP.prefix_of(["backup-9.weights.h5"])  # no marker
    assert not GROUP.is_restored("backup-9.json") and GROUP.is_restored("backup-9.weights.h5")
    # debris detection knows every registered layout, and manifests
    assert parse_object_name("model-3.keras") == ("model-3", 3)
    assert parse_object_name("ckpt-3.data-00000-of-00001") == ("ckpt-3", 3)
    assert parse_object_name("x-1.manifest.json") == ("x-1", 1)
    assert parse_object_name("graph.pbtxt") is None and parse_object_name("checkpoint") is None


def test_layout_registry():
    assert get_layout(None) is TF and get_layout("tf") is TF and get_layout("test-keras-file") is KERAS
    unknown = get_layout("written-by-a-newer-cloudckpt")
    assert unknown.parse_file("thing-4.bin") == ("thing-4", 4) and unknown.is_complete(["thing-4.bin"])
    assert register_layout(PrefixLayout("test-keras-file", ("keras",), marker="keras")) == KERAS  # same: fine
    with pytest.raises(ConfigError, match="registered"):
        register_layout(PrefixLayout("test-keras-file", ("h5",), marker="h5"))
    with pytest.raises(ConfigError):
        PrefixLayout("", ("x",), marker="x")
    with pytest.raises(ConfigError):
        PrefixLayout("bad", (), marker="x")
    with pytest.raises(ConfigError, match="invalid"):
        PrefixLayout("bad", ("(",), marker="x")


def test_local_directory(tmp_path):
    touch(tmp_path, "ckpt-10.index", "ckpt-10.data-00000-of-00001", "ckpt-2.index", "ckpt-2.data-00000-of-00001",
          "ckpt-30.data-00000-of-00001", "other.txt", "ckpt-30.index.tempstate123")
    assert TF.local_prefixes(str(tmp_path)) == ["ckpt-2", "ckpt-10"]  # by step; 30 has no .index
    found = TF.find_local(str(tmp_path), "ckpt-10")
    assert found is not None and found.step == 10 and found.layout == "tf"
    assert sorted(found.files) == ["ckpt-10.data-00000-of-00001", "ckpt-10.index"]
    assert TF.find_local(str(tmp_path), "ckpt-30") is None
    assert TF.marker_path(str(tmp_path), "ckpt-2") == str(tmp_path / "ckpt-2.index")
    assert TF.local_prefixes(str(tmp_path / "missing")) == []


def test_find_saved_prefers_the_state_files_checkpoint(tmp_path):
    touch(tmp_path, "a-5.index", "b-5.index")
    os.utime(tmp_path / "a-5.index", (time.time() + 100, time.time() + 100))
    assert TF.find_saved(str(tmp_path), 5).prefix == "a-5"  # no state file: the newest .index of the step
    (tmp_path / "checkpoint").write_bytes(render_state_file(["b-5"]))
    assert state_file_prefix(str(tmp_path)) == "b-5"
    assert TF.find_saved(str(tmp_path), 5).prefix == "b-5"
    assert TF.find_saved(str(tmp_path), 6) is None


def test_state_file_with_checkpoint_manager_fields_reads_back_in_tf(tmp_path):
    tf = pytest.importorskip("tensorflow")
    prefixes = ['ckpt-1', 'q"uote-2']
    (tmp_path / "checkpoint").write_bytes(render_state_file(prefixes, timestamps=[1000.5, 2000.25],
                                                            last_preserved=999.5))
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / p) for p in prefixes]
    assert list(state.all_model_checkpoint_timestamps) == [1000.5, 2000.25]
    assert state.last_preserved_timestamp == 999.5
    with pytest.raises(ValueError):
        render_state_file(prefixes, timestamps=[1.0])


def test_state_file_timestamps():
    assert state_file_timestamps(["a-1", "a-2"], {}) == (None, None)
    assert state_file_timestamps(["a-1", "a-2", "a-3"], {"a-2": 50.0, "a-3": 60.0}) == ([50.0, 50.0, 60.0], 49.0)


def test_manifests_name_their_layout_only_when_not_tf():
    files = (FileEntry("model-3.keras", 10, "0000abcd"),)
    keras = Manifest(step=3, prefix="model-3", files=files, layout="test-keras-file")
    doc = json.loads(keras.to_json())
    assert doc["layout"] == "test-keras-file"
    assert parse_manifest(keras.to_json(), url="x").layout == "test-keras-file"
    tf_manifest = Manifest(step=3, prefix="ckpt-3", files=(FileEntry("ckpt-3.index", 1, "00000001"),))
    assert "layout" not in json.loads(tf_manifest.to_json())
    assert parse_manifest(tf_manifest.to_json(), url="x").layout == "tf"  # every older manifest: TF
    assert not keras.same_tensors(Manifest(step=3, prefix="model-3", files=files))  # other layout
    with pytest.raises(Exception, match="layout"):
        parse_manifest(json.dumps({**doc, "layout": 5}).encode(), url="x")
