"""Start the training scripts of tests/support without paying TensorFlow's import each time.

A fork server (this file run as a script) imports what every training script imports first (NumPy,
TensorFlow, cloudckpt and its hook: 3-5 s of CPU), then forks one process per script. A script runs in
its fork exactly as ``python SCRIPT ARGS`` with that environment would: ``__main__``, its directory first
on ``sys.path``, its own stdout/stderr pipes, stdin from /dev/null, Python's top-level handling of
exceptions, ``SystemExit`` and ``KeyboardInterrupt``. The fork is made a child of the test process
(which is a child subreaper, ``PR_SET_CHILD_SUBREAPER``), so the test waits for it, signals it and reads
its exit status as for any subprocess: ``start_script`` returns a ``Popen``-like ``ForkedProcess``.

One server per environment that matters while TensorFlow is imported (variables of
``RUNTIME_VARIABLES`` aside: a script reads those when it runs). TensorFlow creates no threads on
import (NumPy's OpenBLAS pool handles fork itself); the first session or eager op of the script creates
them in its own process. Where a server cannot be used, the script is started the ordinary way.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PRELOADED = ("numpy", "tensorflow", "cloudckpt", "cloudckpt.hook")
# What a script reads from its environment when it runs, not while TensorFlow is imported.
RUNTIME_VARIABLES = ("CLOUDCKPT_", "PYTEST_", "AWS_", "TF_CONFIG")
PR_SET_CHILD_SUBREAPER = 36


class ForkedProcess:
    """A script forked by the server, a child of this process: ``subprocess.Popen``'s interface as the tests
    use it (pid, args, stdout/stderr text pipes, poll, wait, send_signal, terminate, kill, returncode)."""

    def __init__(self, pid: int, args: list[str], stdout_fd: int, stderr_fd: int) -> None:
        self.pid, self.args, self.returncode = pid, args, None
        self.stdin = None
        self.stdout = open(stdout_fd, encoding="utf-8", errors="replace")
        self.stderr = open(stderr_fd, encoding="utf-8", errors="replace")
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _start_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(RUNTIME_VARIABLES)))


class ForkServers:
    """The fork servers of this test process, one per start environment; all ended at exit."""

    def __init__(self) -> None:
        self._servers: dict[tuple, tuple[subprocess.Popen, socket.socket]] = {}
        self._lock = threading.Lock()
        self._subreaper: bool | None = None
        atexit.register(self.close)

    def start(self, script: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen | ForkedProcess:
        """A process running ``script`` with ``args`` and ``env``: stdout and stderr are text pipes."""
        with self._lock:
            server = self._server(env) if self._can_fork() else None
            if server is not None:
                try:
                    return self._fork(server, script, args, env)
                except OSError:  # it died or hangs: end it, start this script the ordinary way
                    self._end(self._servers.pop(_start_key(env)))
        return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    def close(self) -> None:
        for server in self._servers.values():
            self._end(server)
        self._servers.clear()

    @staticmethod
    def _end(server: tuple[subprocess.Popen, socket.socket]) -> None:
        proc, sock = server
        sock.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)

    def _can_fork(self) -> bool:
        if self._subreaper is None:
            libc = ctypes.CDLL(None, use_errno=True)
            self._subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        return self._subreaper

    def _server(self, env: dict[str, str]) -> tuple[subprocess.Popen, socket.socket] | None:
        key = _start_key(env)
        server = self._servers.get(key)
        if server is not None and server[0].poll() is not None:  # it died (killed by someone)
            self._end(server)
            server = None
        if server is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=env)
            theirs.close()
            ours.settimeout(300)  # the first reply waits for the server's imports
            server = self._servers[key] = (proc, ours)
        return server

    @staticmethod
    def _fork(server: tuple[subprocess.Popen, socket.socket], script: Path, args: list[str],
              env: dict[str, str]) -> ForkedProcess:
        _, sock = server
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            job = json.dumps({"script": str(script), "args": list(args), "env": env}).encode()
            socket.send_fds(sock, [job], [out_w, err_w])
        finally:
            os.close(out_w)
            os.close(err_w)
        reply = sock.recv(64)  # after the import, on the first job: the server's start-up time
        if not reply:
            os.close(out_r)
            os.close(err_r)
            raise OSError("the fork server ended")
        return ForkedProcess(int(reply), [sys.executable, str(script), *args], out_r, err_r)


FORK_SERVERS = ForkServers()


# -- the server -------------------------------------------------------------------------------------------

def _serve(sock: socket.socket) -> dict:
    """Fork a process per job until the test process goes away; returns (in the fork only) its job."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
        except OSError:
            sys.exit(0)
        if not message:
            sys.exit(0)
        job = json.loads(message)
        pid_r, pid_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        middle = os.fork()
        if middle == 0:  # fork again and exit: the script's process is re-parented to the test process
            script_pid = os.fork()
            if script_pid == 0:
                os.close(pid_r)
                os.close(pid_w)
                sock.close()
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                for fd in (null, *fds):
                    os.close(fd)
                return job
            os.write(pid_w, str(script_pid).encode())
            os._exit(0)
        os.close(pid_w)
        for fd in fds:
            os.close(fd)
        script_pid = int(os.read(pid_r, 64))
        os.close(pid_r)
        os.waitpid(middle, 0)  # the script's process has a new parent now
        sock.send(str(script_pid).encode())


def _run(job: dict) -> None:
    os.environ.clear()
    os.environ.update(job["env"])
    sys.argv = [job["script"], *job["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(job["script"]))
    runpy.run_path(job["script"], run_name="__main__")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as the training scripts do before importing TF
    import importlib

    for _name in PRELOADED:
        importlib.import_module(_name)
    _run(_serve(socket.socket(fileno=int(sys.argv[1]))))
