"""Who writes a local directory: one training process at a time, for one checkpoint URL.

``local_dir`` (where the framework writes checkpoints before they are committed) holds a
process's uncommitted checkpoints and its snapshots (``.cloudckpt-staging``). Two processes
writing one local directory would overwrite each other's TF files, remove each other's
snapshots (``CheckpointEngine.open`` clears what a crashed run left) and resume from each
other's uncommitted steps; a local directory reused for another URL would start that run
from the first run's weights. So ``CheckpointEngine.open()`` (``claim``):

* takes an exclusive ``flock`` on ``<local_dir>/.cloudckpt-lock`` (non-blocking) and writes
  its pid there; ``close()`` releases it. Another process gets ``ConfigError`` naming the
  directory and that pid. A killed holder's lock goes with its process (the kernel releases
  it), so a relaunch after a crash proceeds. Within one process the lock is re-entrant
  (several engines on one directory, one after another or at once: a registry keeps one
  descriptor per directory and counts its holders), and only the first holder clears stale
  snapshots. A file system that refuses ``flock`` gets no lock (logged at INFO).
* records the checkpoint URL (display form: no credentials) in ``<local_dir>/.cloudckpt-url``;
  a directory recorded for another URL is refused with ``ConfigError`` naming both. A
  directory without the record (older versions) is used as it is and gets it. Committed in
  place (the URL is the directory) nothing is recorded; a record there means the directory
  is another URL's local copy, refused the same way.

Neither file matches a checkpoint layout, so neither is uploaded, listed or retained.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time

from .errors import ConfigError
from .urls import parse_url

log = logging.getLogger("cloudckpt")

LOCK_FILE = ".cloudckpt-lock"
URL_FILE = ".cloudckpt-url"

__all__ = ["LOCK_FILE", "URL_FILE", "LocalDirClaim", "check_download_target", "claim"]

# Waits before each retry of a refused exclusive lock (None: give up): a process training there holds it for
# good, a pull's check_download_target (LOCK_SH) for an instant, which must not refuse a training start.
_PROBE_WAITS = (0.01, 0.05, 0.2, None)

_registry_lock = threading.Lock()
_held: dict[str, list[int]] = {}  # directory -> [descriptor holding the flock (-1: unlocked), holders]


def _forget_in_child() -> None:
    """A forked child does not write its parent's directories: it closes its copies of the descriptors
    (the parent's lock stays: a flock belongs to the open file, which the parent keeps)."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for fd, _ in _held.values():
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class LocalDirClaim:
    """This process's hold on a local directory (``claim``); ``release()`` once, when done writing it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._released = False

    def sole(self) -> bool:
        """True while this is the only holder of the directory in this process."""
        with _registry_lock:
            entry = _held.get(self.directory)
            return not self._released and entry is not None and entry[1] == 1

    def release(self) -> None:
        """Let go of the directory; the lock is released when this process's last holder lets go. Idempotent."""
        if self._released:
            return
        self._released = True
        with _registry_lock:
            entry = _held.get(self.directory)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[self.directory]
            fd = entry[0]
        if fd >= 0:
            try:
                os.ftruncate(fd, 0)  # no pid names a process that no longer holds it
            except OSError:
                pass
            os.close(fd)  # releases the flock


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(200).strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _lock(directory: str) -> int:
    """A descriptor of the directory's lock file holding its exclusive flock (-1: the file system refuses
    flock). Raises ConfigError when another process holds it."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"Cannot create {path!r} ({exc.strerror or exc}): local_dir must be a writable "
                          "directory; pass local_dir= another one.") from None
    try:
        for wait in _PROBE_WAITS:  # a download's check_download_target holds a shared lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait is None:
                    raise
                time.sleep(wait)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"local_dir {directory!r} is in use by another process training with cloudckpt ({_holder(path)}, "
            f"recorded in {LOCK_FILE}; a process of another host if the directory is on a network file system): "
            "two processes writing one local directory overwrite and remove each other's checkpoints. Stop that "
            "process, or pass this one a different local_dir=.") from None
    except OSError as exc:
        os.close(fd)
        log.info("%s cannot be locked (%s): another process writing the same local_dir would not be noticed.",
                 path, exc.strerror or exc)
        return -1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the lock holds; only the message of a refused process lacks the pid
    return fd


def claim(directory: str) -> LocalDirClaim:
    """Hold ``directory`` (created if missing) for this process: its exclusive lock, re-entrant in this process.

    Raises:
        ConfigError: another process holds it (the message names its pid and what to do), or it cannot be
            created.
    """
    directory = os.path.realpath(directory)  # one lock per directory, however it is named
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create local_dir {directory!r} ({exc.strerror or exc}); pass local_dir= a "
                          "writable directory.") from None
    with _registry_lock:
        entry = _held.get(directory)
        if entry is not None:
            entry[1] += 1
            return LocalDirClaim(directory)
        _held[directory] = [_lock(directory), 1]
        return LocalDirClaim(directory)


def recorded_url(directory: str) -> str | None:
    """The checkpoint URL recorded in ``directory`` (None: none, or an unreadable record)."""
    try:
        with open(os.path.join(directory, URL_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    url = data.get("url") if isinstance(data, dict) else None
    return url if isinstance(url, str) and url else None


_SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs"}  # one store, two spellings (remote._S3_PROTOCOLS, _GCS_PROTOCOLS)


def _comparable(url: str) -> str:
    """``url`` (display form) as compared with a recorded one: no trailing slash, the scheme lower-case and
    its alias resolved (``s3a://`` is ``s3://``, ``gcs://`` is ``gs://``), a local path and its ``file://``
    URL as one resolved absolute path (relative to the working directory, symlinks followed)."""
    parsed = parse_url(url.rstrip("/") or url)
    if parsed.is_local:
        return "file://" + os.path.realpath(parsed.location)
    if parsed.scheme == "file" and parsed.location.startswith("/"):
        return "file://" + os.path.realpath(parsed.location)
    scheme = _SCHEME_ALIASES.get(parsed.scheme or "", parsed.scheme)
    return f"{scheme}://{'***@' if parsed.userinfo is not None else ''}{parsed.location}"


def same_url(a: str, b: str) -> bool:
    """Whether checkpoint URLs ``a`` and ``b`` (display forms) name one directory, however spelled (``_comparable``)."""
    return a == b or _comparable(a) == _comparable(b)


def check_url(directory: str, url: str, *, in_place: bool) -> None:
    """Refuse ``directory`` when it is recorded as the local directory of a URL other than ``url`` (display
    form); record ``url`` in it when nothing is recorded (not when committed in place: the directory is the
    store). Call it holding the directory (``claim``).

    Raises:
        ConfigError: another URL is recorded (the message names both and what to do).
    """
    recorded = recorded_url(directory)
    if recorded is not None and (in_place or not same_url(recorded, url)):
        if in_place:
            raise ConfigError(
                f"Checkpoint directory {directory!r} is the local directory (local_dir) of {recorded} (recorded in "
                f"{URL_FILE}): committing in place there would mix the two. Point the checkpoint directory "
                "elsewhere, or empty that directory if its checkpoints are no longer needed.")
        raise ConfigError(
            f"local_dir {directory!r} holds the local checkpoints of {recorded} (recorded in {URL_FILE}), not of "
            f"{url}: training would resume from the other run's checkpoints. Pass a different local_dir= (or none: "
            "each URL gets its own by default), or empty that directory if its checkpoints are no longer needed.")
    if recorded is None and not in_place:
        path = os.path.join(directory, URL_FILE)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump({"url": url}, f)
                f.write("\n")
            os.replace(temporary, path)
        except OSError as exc:
            log.info("Could not record the checkpoint URL in %s (%s).", path, exc.strerror or exc)


def check_download_target(directory: str, url: str, *, source: str | None = None) -> None:
    """Refuse to download a checkpoint of ``url`` (display form) into ``directory`` where it would mix two runs
    (``pull_checkpoint``, ``download_checkpoint``): the next resume there takes the newest local checkpoint,
    so a checkpoint of another URL put into a run's local directory would become that run's resume point.
    ``source``: the directory of ``url`` when it is local (downloading a directory into itself is allowed).

    Raises:
        ConfigError: ``directory`` is recorded as the local directory of another URL, is a checkpoint
            directory committed in place (its own commit log) other than ``url``'s, or another process is
            training in it (holds its lock). The message names both and what to do.
    """
    if not os.path.isdir(directory):
        return
    where = os.path.realpath(directory)
    if source is not None and os.path.isdir(source) and os.path.samefile(source, directory):
        return
    recorded = recorded_url(directory)
    if recorded is not None and not same_url(recorded, url):
        raise ConfigError(
            f"{directory!r} is the local directory (local_dir) of {recorded} (recorded in {URL_FILE}), not of {url}: "
            f"a checkpoint of {url} put there would become the resume point of {recorded}'s next run. Download "
            "into another directory, or empty that one if its checkpoints are no longer needed.")
    if os.path.isdir(os.path.join(directory, ".cloudckpt", "log")):
        raise ConfigError(
            f"{directory!r} is a checkpoint directory committed in place (it has its own commit log, .cloudckpt/), "
            f"not {url}: a checkpoint of {url} put there would become the resume point of that directory's next "
            "run. Download into another directory.")
    with _registry_lock:
        if where in _held:
            return  # this process trains there (a download by hand next to it)
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody trains there
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"{directory!r} is the local directory of a process training with cloudckpt ({_holder(path)}, recorded "
            f"in {LOCK_FILE}): downloading into it would change the checkpoints it resumes from under it. Download "
            "into another directory, or wait until that process ends.") from None
    except OSError:
        pass  # a file system without flock: nothing to tell
    finally:
        os.close(fd)
