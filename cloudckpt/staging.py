"""Staging directories of downloads into a local directory, and removing the ones interrupted downloads left.

A download (``restore.download_verified``: ``download_checkpoint``, ``cloudckpt pull``, a resume) writes
its files under ``<local_dir>/.cloudckpt-download-<pid>-<random>`` and moves them into place once verified.
A process killed meanwhile (SIGKILL, a second SIGTERM, a power cut) leaves that directory behind, with
files as large as the checkpoint's.

Which staging directories are stale is decided with a lock, not with process ids (which say nothing about
another host sharing the directory over NFS, and are reused): every download holds a shared ``flock`` on
``<local_dir>/.cloudckpt-download.lock`` from before it creates its staging directory until after it has
removed it. A process that gets the lock exclusively therefore knows that no download into that directory
is running, on any host whose locks reach the file system, and removes every staging directory there.
When another download is running, nothing is removed (its staging directory is left alone; a later
download or ``CheckpointEngine.open()`` in a quiet moment removes the stale ones). The lock file is
removed by the last download to finish, so a finished download leaves nothing behind.

Where the file system refuses ``flock`` nothing is removed and downloads proceed unlocked.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import uuid

log = logging.getLogger("cloudckpt")

DOWNLOAD_STAGING_PREFIX = ".cloudckpt-download-"
LOCK_FILE = ".cloudckpt-download.lock"


def _same_file(fd: int, path: str) -> bool:
    """True while ``path`` still names the file open as ``fd`` (not unlinked or replaced meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _lock(path: str, operation: int) -> int | None:
    """An fd of ``path`` (created if missing) holding ``flock(operation)``; None when ``LOCK_NB`` and taken.

    Retries when the file was unlinked by its last holder between our open and our lock.
    Raises OSError when the file system refuses locks.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _remove_all(local_dir: str) -> list[str]:
    """Remove every download staging directory in ``local_dir``; the names removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(local_dir), DOWNLOAD_STAGING_PREFIX + "*")):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(os.path.basename(path))
    if removed:
        log.info("Removed %d staging director%s of interrupted downloads from %s: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", local_dir, ", ".join(sorted(removed)))
    return removed


def remove_stale_staging(local_dir: str) -> list[str]:
    """Remove the staging directories interrupted downloads left in ``local_dir``, unless a download into it
    is running (in any process): then nothing is removed. Returns the names removed.

    Never raises for a lock the file system refuses or a directory that cannot be removed (logged at DEBUG).
    """
    path = os.path.join(local_dir, LOCK_FILE)
    try:
        fd = _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        log.debug("Not removing stale download staging directories of %s: cannot lock %s (%s).",
                  local_dir, path, exc)
        return []
    if fd is None:
        log.debug("A download into %s is running: its staging directories are left alone.", local_dir)
        return []
    try:
        return _remove_all(local_dir)
    finally:
        _unlock_and_unlink(fd, path)


def _unlock_and_unlink(fd: int, path: str) -> None:
    """Release ``fd``'s lock; remove the lock file when no one else holds it (nothing left behind)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by another download: it removes the file later
        if _same_file(fd, path):
            os.unlink(path)  # while we hold it exclusively: a waiter finds the inode gone and opens a new one
    except OSError:
        pass
    finally:
        os.close(fd)


class DownloadStaging:
    """The staging directory of one download into ``local_dir`` (created by the constructor).

    Stale staging directories of interrupted downloads are removed first when no other download into
    ``local_dir`` is running. ``path`` is the new directory; ``remove()`` deletes it and releases the lock
    (call it once, from a ``finally``).
    """

    def __init__(self, local_dir: str) -> None:
        self._lock_path = os.path.join(local_dir, LOCK_FILE)
        self._fd: int | None = None
        try:
            fd = _lock(self._lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is not None:
                try:
                    _remove_all(local_dir)  # no download holds the lock: every staging directory is stale
                    fcntl.flock(fd, fcntl.LOCK_SH)  # not atomic: another may take it exclusively in between
                except BaseException:
                    _unlock_and_unlink(fd, self._lock_path)
                    raise
                if not _same_file(fd, self._lock_path):  # ... and remove the file: lock the new one
                    os.close(fd)
                    fd = None
            self._fd = fd if fd is not None else _lock(self._lock_path, fcntl.LOCK_SH)
        except OSError as exc:
            log.debug("Cannot lock %s (%s): downloading without it; stale staging directories stay.",
                      self._lock_path, exc)
        self.path = os.path.join(local_dir, f"{DOWNLOAD_STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(self.path)
        except BaseException:
            self._release()
            raise

    def remove(self) -> None:
        """Delete the staging directory and what it holds, then release the lock."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            _unlock_and_unlink(fd, self._lock_path)
