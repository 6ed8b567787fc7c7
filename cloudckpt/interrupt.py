"""Ctrl-C during a transfer: stop the store's transfers instead of waiting for them to finish.

A ``KeyboardInterrupt`` reaches the main thread only; the threads of a
``ThreadPoolExecutor`` moving files go on, and leaving the executor's ``with``
block (or interpreter exit) waits for every file already started. Here the
store's ``cancel`` is set first: on ``s3://`` each request in flight stops
within ``s3_transport.SEND_SLICE`` bytes (uploads) or one ``READ_BUFFER`` chunk
(downloads), multipart uploads started are aborted, and files not yet started
never start. On ``gs://`` a resumable upload (a file from 5 MiB) stops before
its next chunk (``gcs_resumable``). Other backends (fsspec) stop between files.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .remote import RemoteStore


@contextlib.contextmanager
def cancelling_pool(store: RemoteStore, pool: ThreadPoolExecutor) -> Iterator[ThreadPoolExecutor]:
    """``with cancelling_pool(store, ThreadPoolExecutor(...)) as pool:`` -- ``with pool:``, except that an
    interrupt (``KeyboardInterrupt``, the CLI's SIGTERM, ``SystemExit``) raised in the block cancels the
    store's transfers and the pool's queued work before the pool is waited for. ``store.cancel`` is cleared
    again once the pool's threads are done (the store stays usable). Ordinary exceptions: as ``with pool:``.
    """
    try:
        yield pool
    except BaseException as exc:
        if not isinstance(exc, Exception):
            store.cancel_transfers()
            try:
                pool.shutdown(wait=True, cancel_futures=True)
            finally:
                store.cancel.clear()
        raise
    finally:
        pool.shutdown(wait=True)
