"""cloudckpt.testing, the pytest plugin users test their training code with (issue 18).

Sample user suites run in a fresh pytest process through ``pytester`` (pytest's
own fixture for testing plugins), loading the plugin the way users do: through
the ``pytest11`` entry point declared in pyproject.toml, or ``-p``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import cloudckpt
from cloudckpt.testing import EmulatedBucket, assert_committed
from support.tf_model import train

pytest_plugins = ["pytester"]

REPO = Path(cloudckpt.__file__).resolve().parent.parent
ENTRY_POINTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]

USER_SUITE = '''
import os
import sys
import threading

import fsspec
import pytest
import tensorflow as tf

import cloudckpt
from cloudckpt.testing import assert_committed


def train(url, options, local_dir, last_step):
    """The user's training code: graph mode, MonitoredTrainingSession, cloudckpt's hook."""
    with tf.Graph().as_default():
        step = tf.compat.v1.train.get_or_create_global_step()
        w = tf.compat.v1.get_variable("w", [16], initializer=tf.compat.v1.zeros_initializer())
        train_op = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(
            tf.reduce_sum(tf.square(w - 1.0)), global_step=step)
        hook = cloudckpt.CheckpointSaverHook(url, save_steps=5, local_dir=str(local_dir), storage_options=options)
        with tf.compat.v1.train.MonitoredTrainingSession(
                hooks=[hook, tf.compat.v1.train.StopAtStepHook(last_step=last_step)], save_checkpoint_secs=None,
                save_summaries_steps=None, save_summaries_secs=None, log_step_count_steps=None) as sess:
            while not sess.should_stop():
                sess.run(train_op)


def test_a_no_server_until_a_test_asks():
    assert "moto.server" not in sys.modules and "gcp_storage_emulator" not in sys.modules
    assert threading.active_count() == 1


def test_s3_checkpoints_are_committed(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    assert cloudckpt_s3.endpoint.startswith("http://127.0.0.1:") and url.startswith("s3://")
    train(url, options, tmp_path, 10)
    assert assert_committed(url, storage_options=options).step == 10
    assert_committed(url, step=5, storage_options=options)


def test_gcs_checkpoints_are_committed(cloudckpt_gcs, tmp_path):
    url, options = cloudckpt_gcs.url("run"), cloudckpt_gcs.storage_options
    train(url, options, tmp_path, 5)
    assert assert_committed(url, storage_options=options).step == 5


def test_corrupted_checkpoint(cloudckpt_s3, tmp_path):
    url, options = cloudckpt_s3.url("run"), cloudckpt_s3.storage_options
    train(url, options, tmp_path, 10)
    fs, root = fsspec.core.url_to_fs(url, **options)
    path = f"{root}/model.ckpt-10.data-00000-of-00001"
    data = bytearray(fs.cat_file(path))
    data[0] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    assert_committed(url, storage_options=options)


def test_nothing_committed(cloudckpt_s3):
    assert_committed(cloudckpt_s3.url("empty"), storage_options=cloudckpt_s3.storage_options)


def test_z_every_test_bucket_was_deleted(cloudckpt_s3_server, cloudckpt_gcs_server):
    assert cloudckpt_s3_server.client().list_buckets()["Buckets"] == []
    fs = fsspec.filesystem("gs", **cloudckpt_gcs_server.storage_options(), skip_instance_cache=True)
    assert fs.ls("") == []
'''


def subprocess_env(monkeypatch, *paths: Path) -> None:
    """The inner pytest imports this checkout's cloudckpt (and ``paths``), like an installed one."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*map(str, paths), str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_sample_user_suite_passes_and_reports_corruption_readably(pytester, monkeypatch):
    subprocess_env(monkeypatch)
    # The plugin's own GCS fixture must set this before gcsfs is imported; nothing in the environment does.
    monkeypatch.delenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest_subprocess("-p", "cloudckpt.testing", "-p", "no:cacheprovider", "-W",
                                           "error::UserWarning", timeout=240)
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines([
        "*AssertionError: checkpoint step 10 in s3://ckpt-*/run is not intact: "
        "1 of 3 file(s) differ from the manifest",
        "*  model.ckpt-10.data-00000-of-00001: checksum mismatch (expected crc32c *, found *)",
    ])
    result.stdout.fnmatch_lines([
        "*AssertionError: expected a committed checkpoint in s3://ckpt-*/empty: "
        "CheckpointNotFoundError: No committed checkpoint in s3://ckpt-*/empty.",
    ])
    assert "storage_options = " not in result.stdout.str()  # no library frame's arguments (credentials)


def test_entry_point_loads_the_plugin(pytester, monkeypatch):
    assert ENTRY_POINTS == {"cloudckpt.testing": "cloudckpt.testing"}
    # An installed distribution carrying exactly pyproject's pytest11 table.
    dist = pytester.mkdir("site") / "cloudckpt_entry_point_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cloudckpt-entry-point-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{name} = {target}\n" for name, target in ENTRY_POINTS.items()))
    subprocess_env(monkeypatch, pytester.path / "site")
    pytester.makepyfile(test_plugin="""
        def test_plugin_is_loaded(request):
            assert request.config.pluginmanager.has_plugin("cloudckpt.testing")
    """)

    def run(*args):
        listing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures", *args)
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args), listing.stdout.str()

    result, fixtures = run()  # autoloaded through the entry point
    result.assert_outcomes(passed=1)
    assert "cloudckpt_s3 -- " in fixtures and "cloudckpt_gcs -- " in fixtures
    # Loading it by name as well (a conftest's pytest_plugins, or -p) is harmless ...
    pytester.makeconftest('pytest_plugins = ["cloudckpt.testing"]')
    run("-p", "cloudckpt.testing")[0].assert_outcomes(passed=1)
    # ... and the usual switch turns it off.
    (pytester.path / "conftest.py").unlink()
    result, fixtures = run("-p", "no:cloudckpt.testing")
    result.assert_outcomes(failed=1)
    assert "cloudckpt_s3" not in fixtures


def test_importing_the_plugin_starts_and_imports_nothing_heavy():
    code = ("import sys, threading, cloudckpt.testing; "
            "print(sorted(m for m in ('tensorflow', 'moto', 'gcsfs', 's3fs', 'boto3', 'gcp_storage_emulator') "
            "if m in sys.modules), threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.split() == ["[]", "1"]


# -- assert_committed in-process ------------------------------------------------------------------

@pytest.fixture
def committed(memory_url, tmp_path):
    train(lambda s: cloudckpt.CheckpointSaverHook(memory_url, save_steps=10, local_dir=str(tmp_path)), last_step=20)
    fs, root = fsspec.core.url_to_fs(memory_url)
    return memory_url, fs, root


def test_assert_committed_passes_and_returns_the_report(committed):
    url, _, _ = committed
    report = assert_committed(url)
    assert report.ok and report.step == 20 and len(report.files) == 3
    assert assert_committed(url, step=10).step == 10


def test_assert_committed_names_a_missing_and_a_truncated_file(committed):
    url, fs, root = committed
    fs.rm_file(f"{root}/model.ckpt-20.index")
    data = fs.cat_file(f"{root}/model.ckpt-20.meta")
    fs.pipe_file(f"{root}/model.ckpt-20.meta", data[:-5])
    with pytest.raises(AssertionError) as info:
        assert_committed(url)
    lines = str(info.value).splitlines()
    assert lines[0] == f"checkpoint step 20 in {url} is not intact: 2 of 3 file(s) differ from the manifest"
    assert f"  model.ckpt-20.meta: size mismatch (expected {len(data)} bytes, found {len(data) - 5})" in lines
    assert any(line.startswith("  model.ckpt-20.index: missing (expected ") and line.endswith("found no object)")
               for line in lines), lines
    assert_committed(url, step=10)  # the older one is intact


def test_assert_committed_without_the_step(committed):
    url, _, _ = committed
    with pytest.raises(AssertionError, match=r"expected a committed checkpoint at step 15 in memory://.*"
                                             r"committed steps: \[0, 10, 20\]"):
        assert_committed(url, step=15)


# -- the fixtures' buckets ------------------------------------------------------------------------

def test_emulated_bucket_urls_and_options():
    bucket = EmulatedBucket("s3", "ckpt-x", "http://127.0.0.1:1", {"client_kwargs": {"region_name": "r"}})
    assert bucket.url() == "s3://ckpt-x/run" and bucket.url("/a/b/") == "s3://ckpt-x/a/b" and \
        bucket.url("") == "s3://ckpt-x"
    bucket.storage_options["client_kwargs"]["region_name"] = "changed"  # a copy: the test cannot spoil it
    assert bucket.storage_options == {"client_kwargs": {"region_name": "r"}}
    assert "region_name" not in repr(bucket)


def test_s3_delete_bucket_removes_objects_and_unfinished_uploads(cloudckpt_s3_server):
    name = f"del-{uuid.uuid4().hex[:12]}"
    client = cloudckpt_s3_server.client()
    cloudckpt_s3_server.create_bucket(name)
    for i in range(3):
        client.put_object(Bucket=name, Key=f"run/{i}", Body=b"x")
    client.create_multipart_upload(Bucket=name, Key="run/partial")
    cloudckpt_s3_server.delete_bucket(name)
    assert name not in {b["Name"] for b in client.list_buckets()["Buckets"]}
    cloudckpt_s3_server.delete_bucket(name)  # already gone: no error


def test_gcs_delete_bucket_removes_objects(cloudckpt_gcs_server):
    name = f"del-{uuid.uuid4().hex[:12]}"
    cloudckpt_gcs_server.make_bucket(name)
    fs = cloudckpt_gcs_server.filesystem()
    fs.pipe({f"{name}/run/a": b"1", f"{name}/run/b": b"2"})
    cloudckpt_gcs_server.delete_bucket(name)
    fs.invalidate_cache()
    assert not fs.exists(name)
    cloudckpt_gcs_server.delete_bucket(name)  # already gone: no error


def test_embedded_server_removes_the_environment_it_set(monkeypatch):
    from cloudckpt.embedded import EmbeddedS3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # the user's own: kept as it is
    with EmbeddedS3() as server:
        assert os.environ["AWS_ACCESS_KEY_ID"] == server.storage_options["key"]
        assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"
