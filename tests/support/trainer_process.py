"""Run a training script of tests/support (crash_trainer.py by default) as a child process and follow its progress."""

from __future__ import annotations

import os
import queue
import re
import signal
import threading
import time
from pathlib import Path

TRAINER = Path(__file__).with_name("crash_trainer.py")


def foreign_thread(name: str) -> bool:
    """Threads of other libraries that outlive a session by design: fsspec's shared IO loop and its
    asyncio default executor, and the event writer of TF's summary-writer cache (TF's own
    CheckpointSaverHook opens it)."""
    return name in ("fsspecIO", "EventLoggerThread") or name.startswith("asyncio_")


class TrainerProcess:
    """A training subprocess whose stdout lines (FIRST_STEP/STEP/DONE) are read in a background thread."""

    def __init__(self, url: str, endpoint: str, local_dir: str, *args: str, env: dict | None = None,
                 script: Path = TRAINER) -> None:
        from support.forkserver import FORK_SERVERS  # here: the training scripts import this module too

        self.proc = FORK_SERVERS.start(script, [url, endpoint, local_dir, *args], {**os.environ, **(env or {})})
        self._start_readers()

    def _start_readers(self) -> None:
        """Follow ``self.proc``'s stdout (parsed lines) and stderr from daemon threads."""
        self.first_step: int | None = None
        self.step = -1
        self.done: str | None = None
        self.output: list[str] = []
        self.writer_id: str | None = None
        self.fenced: str | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if m := re.match(r"WRITER (\w+)", line):
                self.writer_id = m.group(1)
            elif line.startswith("FENCED "):
                self.fenced = line[len("FENCED "):].strip()
            elif m := re.match(r"FIRST_STEP (\d+)", line):
                self.first_step = int(m.group(1))
            elif m := re.match(r"STEP (\d+)", line):
                self.step = int(m.group(1))
            elif line.startswith("DONE"):
                self.done = line.strip()
            self.output.append(line)
            self._lines.put(line)

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        """Block until the trainer reports ``step`` (or fail with its stderr)."""
        end = time.monotonic() + timeout
        while self.step < step:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"trainer did not reach step {step} (rc={self.proc.poll()}):\n{self.stderr}")
            time.sleep(0.01)

    def wait_for_line(self, prefix: str, timeout: float = 120) -> str:
        """Block until the trainer prints a line starting with ``prefix``; return it."""
        end = time.monotonic() + timeout
        while True:
            for line in list(self.output):
                if line.startswith(prefix):
                    return line.strip()
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"trainer never printed {prefix!r} (rc={self.proc.poll()}):\n{self.stderr}")
            time.sleep(0.01)

    def wait_for_text(self, text: str, timeout: float = 120) -> None:
        """Block until ``text`` appears in the trainer's stderr (or fail with it)."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self._stderr)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"trainer never logged {text!r} (rc={self.proc.poll()}):\n{self.stderr}")
            time.sleep(0.005)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.05)  # let the reader threads drain
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self._stderr[-60:])

    @property
    def all_stderr(self) -> str:
        """All of stderr so far (``stderr`` is its last 60 lines, for failure messages)."""
        return "".join(self._stderr)
