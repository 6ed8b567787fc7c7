"""``CommitSummaryWriter``: commit lag, throughput, retries and drops as TensorBoard scalars (``summary_dir=``).

Opt-in: an engine creates one only when given ``summary_dir``, and only then is
TensorFlow imported (the engine itself needs no framework). Events are written
as ``tf.compat.v1.Event`` records with ``simple_value`` scalars through
``tf.io.TFRecordWriter`` -- what ``tf.summary`` writes, readable by
TensorBoard and ``tf.compat.v1.train.summary_iterator`` -- from the uploader
thread, whatever the training thread's graph or eager mode.

Scalars (tag ``cloudckpt/<name>``), written after each checkpoint's outcome (committed, failed, refused,
dropped) at that checkpoint's step, so an outage shows as points too (failures and drops), not as a gap:

* ``commit_lag_seconds``: from the save to the commit of that checkpoint (committed ones only);
* ``commit_lag_steps``: training steps run between its save and its commit, in the unit of its step
  (the training step when the commit completed minus its step; ``UploadStats``, and
  ``CheckpointEngine.step_source`` for what each adapter counts; committed ones only);
* ``throughput_mib_per_second``: that commit's send rate: bytes it sent / the time it spent sending them
  (``UploadStats.last_upload_mib_per_second``; server-side copies excluded; committed ones that sent bytes);
* ``copied_mib``: MiB of that checkpoint the store copied server-side (incremental commits), not sent;
* ``uncommitted_seconds``, ``uncommitted_steps``: what a preemption at that moment would lose: time since
  the newest committed checkpoint was saved, and training steps run since it (``UploadStats``); they climb
  during an outage;
* ``queue_depth``: checkpoints waiting or in flight after it;
* ``retries``, ``dropped``, ``failed``: the run's totals so far.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Mapping

from ._frameworks import import_framework
from .errors import ConfigError
from .urls import as_url, display_url, parse_url, redact, sanitized_cause

log = logging.getLogger("cloudckpt")

__all__ = ["CommitSummaryWriter", "TAG_PREFIX"]

TAG_PREFIX = "cloudckpt/"


def check_summary_dir(directory: "str | os.PathLike[str]") -> str:
    """``directory`` as a str, checked before anything is written (see ``CommitSummaryWriter``).

    Raises:
        ConfigError: not a path or URL string, or a URL with credentials (userinfo or a query).
    """
    text = os.fspath(directory) if isinstance(directory, os.PathLike) else directory
    if not isinstance(text, str) or not text:
        got = repr(text) if isinstance(text, str) else f"a value of type {type(text).__name__}"
        # Not as_url's message, which offers s3://: TensorFlow (2.21) opens no s3:// file system.
        raise ConfigError(f"summary_dir must be a local directory path or a URL TensorFlow's file systems open "
                          f"(gs://bucket/tb), got {got}.")
    directory = as_url(text, "summary_dir")
    location = parse_url(directory)
    if location.userinfo is not None or location.query is not None:
        raise ConfigError(f"summary_dir {location.display!r} holds credentials: TensorFlow's file systems take "
                          "none in the URL (they use the environment's); pass the directory without them.")
    return directory


class CommitSummaryWriter:
    """Appends scalar summaries to one TensorBoard event file in ``directory``.

    The event file is created with the first scalars: an engine that commits
    nothing (a non-chief worker of a multi-worker job, whose saves are never
    committed) leaves no empty event file in a ``summary_dir`` shared by the job.

    Args:
        directory: a local directory or any URL TensorFlow's file system opens
            (``gs://``); created if needed.

    Raises:
        ModuleNotFoundError: TensorFlow is not installed (the message names the pip command).
        ConfigError: the directory cannot be created (a file, a scheme TensorFlow does not open, a URL
            with credentials: TensorFlow's file systems take them from the environment); raised here, not
            mid-run; a failure to create the event file later is logged by the uploader, and the commit
            goes on. The message shows the directory in display form; TensorFlow's error is the cause.
    """

    def __init__(self, directory: str) -> None:
        self._tf = import_framework("tensorflow", "summary_dir= (TensorBoard summaries)")
        self.directory = check_summary_dir(directory)
        shown = display_url(self.directory)
        failure: str | None = None
        try:
            self._tf.io.gfile.makedirs(self.directory)
        except self._tf.errors.OpError as exc:
            failure = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            cause = sanitized_cause(exc)
        if failure is not None:  # raised outside the handler: TF's text rides along only as the cause
            raise ConfigError(f"summary_dir {shown!r} cannot be used for TensorBoard summaries: {failure}. Pass a "
                              "writable local directory or a URL TensorFlow opens (gs://...).") from cause
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.cloudckpt"
        self.path = os.path.join(self.directory, name) if "://" not in self.directory else f"{self.directory}/{name}"
        self._lock = threading.Lock()
        self._writer: Any = None
        self._closed = False

    def scalars(self, step: int, values: Mapping[str, float | int | None]) -> None:
        """Write ``values`` (name -> number; None is skipped) at ``step`` and flush."""
        summary = self._tf.compat.v1.Summary(value=[
            self._tf.compat.v1.Summary.Value(tag=TAG_PREFIX + name, simple_value=float(value))
            for name, value in values.items() if value is not None])
        self._write(self._tf.compat.v1.Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        """Flush and close the event file; idempotent."""
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _write(self, event: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if self._writer is None:  # the first scalars: the event file starts with its version record
                self._writer = self._tf.io.TFRecordWriter(self.path)
                header = self._tf.compat.v1.Event(wall_time=event.wall_time, file_version="brain.Event:2")
                self._writer.write(header.SerializeToString())
            self._writer.write(event.SerializeToString())
            self._writer.flush()
