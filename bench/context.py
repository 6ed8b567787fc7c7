"""What every scenario gets: the S3 server (moto or SeaweedFS), a bucket, a scratch directory and a log function."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .common import Config, make_checkpoint_files
from .server import ServerProcess


@dataclass
class Context:
    cfg: Config
    server: ServerProcess
    bucket: str
    workdir: str
    verbose: bool = True
    server_name: str = "moto"
    shared: dict[str, Any] = field(default_factory=dict)
    _files: dict[tuple[int, int], dict[str, str]] = field(default_factory=dict)
    _t0: float = field(default_factory=time.monotonic)

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[{time.monotonic() - self._t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def scratch(self, name: str) -> str:
        """A fresh empty directory under the work directory."""
        os.makedirs(self.workdir, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)

    def checkpoint_files(self, total_bytes: int, shards: int) -> dict[str, str]:
        """A TF-shaped checkpoint of ``total_bytes`` in ``shards`` data files (generated once per run)."""
        key = (total_bytes, shards)
        if key not in self._files:
            directory = os.path.join(self.workdir, f"ckpt-{total_bytes}-{shards}")
            self.log(f"writing a {total_bytes / (1 << 20):.0f} MiB checkpoint in {shards} shards")
            self._files[key] = make_checkpoint_files(directory, total_bytes, shards)
        return dict(self._files[key])

    def clean_bucket(self) -> None:
        self.server.empty_bucket(self.bucket)
