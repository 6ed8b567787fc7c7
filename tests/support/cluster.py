"""Start the tasks of a TF cluster on 127.0.0.1 as subprocesses (free ports in ``TF_CONFIG``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

from support.forkserver import FORK_SERVERS
from support.trainer_process import TrainerProcess

# gRPC honours these: cluster traffic must go straight to 127.0.0.1.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                   "no_proxy", "NO_PROXY", "grpc_proxy")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_spec(workers: int, ps: int = 0) -> dict[str, list[str]]:
    """A fresh cluster of ``workers`` workers and ``ps`` parameter servers on free ports."""
    ports = free_ports(workers + ps)
    spec = {"worker": [f"127.0.0.1:{p}" for p in ports[:workers]]}
    if ps:
        spec["ps"] = [f"127.0.0.1:{p}" for p in ports[workers:]]
    return spec


def task_env(cluster: dict, task_type: str, index: int, **extra: str) -> dict[str, str]:
    """The environment of one task: ``TF_CONFIG``, no proxies, no GPU."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}}),
               CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


class Task(TrainerProcess):
    """One task of the cluster: a script of tests/support with its own environment (not ``os.environ``)."""

    def __init__(self, script: Path, args: list[str], env: dict[str, str], prefix: list[str] | None = None) -> None:
        if prefix:  # a command around Python (another namespace): started as it is
            self.proc = subprocess.Popen([*prefix, *_python(script), *args], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env)
        else:
            self.proc = FORK_SERVERS.start(script, args, env)
        self._start_readers()

    def lines(self, prefix: str) -> list[str]:
        """Every line printed so far that starts with ``prefix``."""
        return [line.strip() for line in list(self.output) if line.startswith(prefix)]

    def finish(self, timeout: float = 180) -> int:
        """Wait for the process to exit (killing it after ``timeout``); its return code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"task did not exit within {timeout}s:\n{self.stderr}") from None

    def stop(self) -> None:
        """SIGKILL, if still running (cleanup)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


def _python(script: Path) -> list[str]:
    import sys
    return [sys.executable, str(script)]
