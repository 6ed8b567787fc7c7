"""The S3 server the benchmarks talk to: cloudckpt's ``EmbeddedS3`` (moto), in a child process.

It runs in its own process so that neither its CPU (it shares the GIL with
nothing we measure) nor its memory (moto keeps every object in RAM) is
counted against the process doing the uploads. ``python -m bench.server PORT``
serves until its stdin is closed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

from cloudckpt.embedded import EmbeddedS3, free_port


class ServerProcess:
    """What the bench does with any S3 server child: buckets, cleanup, the child's memory.

    Subclasses set ``_proc`` (the child) and provide ``client()`` (a boto3 client) and ``start``/``stop``.
    """

    _proc: "subprocess.Popen[bytes] | None"

    @property
    def pid(self) -> int | None:
        """The server child's process id (``taskset`` execs it: the same process), None when not started."""
        return self._proc.pid if self._proc is not None else None

    def client(self) -> Any:
        raise NotImplementedError

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def create_bucket(self, name: str) -> str:
        """Create a bucket; return its ``s3://`` URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def empty_bucket(self, bucket: str) -> int:
        """Delete every object of ``bucket`` (moto holds them in RAM); returns how many were deleted."""
        client = self.client()
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
                count += len(keys)
        return count

    def object_sizes(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size of the objects under ``prefix``."""
        client = self.client()
        out: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: int(o["Size"]) for o in page.get("Contents", [])})
        return out

    def rss_mb(self) -> float | None:
        """Resident memory of the server process, MB (None if unknown)."""
        if self._proc is None:
            return None
        try:
            with open(f"/proc/{self._proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()



class S3Server(ServerProcess):
    """Start/stop a moto S3 server child process and talk to it (buckets, cleanup, reset).

    Args:
        cpus: ``taskset -c`` CPU list for the server process (e.g. "1"), or None.
    """

    name = "moto"
    description = "cloudckpt.embedded.EmbeddedS3 (moto, in-memory, Python) in a child process, 127.0.0.1"

    def __init__(self, cpus: str | None = None) -> None:
        self.cpus = cpus
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._probe: EmbeddedS3 | None = None

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3fs to reach the server."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def start(self, timeout: float = 60.0) -> "S3Server":
        """Spawn the child and wait until it answers HTTP."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        pin = ["taskset", "-c", self.cpus] if self.cpus is not None else []
        self._proc = subprocess.Popen(pin + [sys.executable, "-m", "bench.server", str(self.port)],
                                      stdin=subprocess.PIPE, env=env,
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"S3 server child exited with code {self._proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/data.json", timeout=2).read()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"S3 server on {self.endpoint} did not come up in {timeout}s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the child (closing its stdin; killed if it does not exit)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def client(self) -> Any:
        """A boto3 S3 client for the server (botocore's default configuration, as users have it)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def reset(self) -> None:
        """Drop all buckets and objects (frees the server's memory between scenarios)."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=60).read()

def main(argv: list[str]) -> None:
    port = int(argv[0])
    server = EmbeddedS3(port=port).start()
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
