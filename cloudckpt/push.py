"""Committing the checkpoints of an existing local TF checkpoint directory (``cloudckpt push``).

For a directory written without cloudckpt (TF's stock ``CheckpointSaverHook``,
a ``tf.train.Saver``) or by a run whose uploads never finished. Each
checkpoint is committed like the hook commits it (``commit.py``: files
create-only, manifest, then the commit log entry), oldest first, so the
newest ends up the latest. Pushing registers a writer first: a job still
writing to the same URL is fenced (``writers.py``). Checkpoints already
committed with identical content are skipped, so a push can be re-run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from .commit import (ALREADY_COMMITTED, GRAPH_FILE, HEALED, REFUSED, UPLOADED, commit_checkpoint,
                     find_local_checkpoint, local_checkpoint_prefixes, register_continuing)
from .errors import ConfigError
from .interrupt import cancelling_pool
from .layout import step_of
from .remote import open_directory
from .retry import RetryPolicy
from .transfer import TransferOptions
from .writers import Writer

__all__ = ["push_checkpoints", "PushResult", "PushReport", "UPLOADED", "ALREADY_COMMITTED", "HEALED", "REFUSED",
           "VANISHED"]

VANISHED = "vanished"


@dataclass(frozen=True)
class PushReport:
    """What ``push_checkpoints`` did with one local checkpoint.

    Attributes:
        step: global step.
        name: the checkpoint prefix, e.g. ``model.ckpt-30``.
        outcome: ``uploaded`` (committed now), ``already committed`` (identical; nothing sent),
            ``healed`` (already committed; missing or truncated objects re-uploaded), ``refused`` (a
            different checkpoint is committed under this name; see ``reason``) or ``vanished`` (deleted
            from the local directory while pushing, e.g. by a live Saver's ``max_to_keep``).
        files: number of checkpoint files.
        size: bytes of those files on local disk.
        bytes_uploaded: bytes sent to the store.
        bytes_copied: bytes the store copied server-side from the previous checkpoint (incremental commit).
        reason: why the checkpoint was refused.
    """

    step: int
    name: str
    outcome: str
    files: int = 0
    size: int = 0
    bytes_uploaded: int = 0
    reason: str = ""
    bytes_copied: int = 0


@dataclass(frozen=True)
class PushResult:
    """What ``push_checkpoints`` did.

    Attributes:
        url: the checkpoint directory, display form.
        reports: one per local checkpoint, oldest first.
    """

    url: str
    reports: tuple[PushReport, ...]

    @property
    def uploaded(self) -> list[PushReport]:
        """Checkpoints this push committed."""
        return [r for r in self.reports if r.outcome == UPLOADED]

    @property
    def already_there(self) -> list[PushReport]:
        """Checkpoints that were committed already (identical, or healed)."""
        return [r for r in self.reports if r.outcome in (ALREADY_COMMITTED, HEALED)]

    @property
    def newest_step(self) -> int:
        """The step of the newest local checkpoint."""
        return self.reports[-1].step


def push_checkpoints(
    local_dir: str,
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    on_report: Callable[[PushReport], None] | None = None,
    transfer: TransferOptions | None = None,
) -> PushResult:
    """Commit every checkpoint of the local TF checkpoint directory ``local_dir`` to ``url``, oldest first.

    ``graph.pbtxt`` is uploaded with the first checkpoint committed. A missing
    local directory at ``url`` is created. ``on_report(report)`` is called as
    each checkpoint is done. ``transfer``: how the bytes move, as for the hook
    (``TransferOptions``: ``part_size`` bytes per multipart part / GCS chunk,
    ``multipart_threshold``, ``max_parts_in_flight`` per file, ``max_files_in_flight`` files
    of a checkpoint checksummed and uploaded at once, ``incremental``); None means
    ``TransferOptions()``.

    Raises:
        ConfigError: ``local_dir`` does not exist, is a file or holds no TF checkpoint (an ``.index``
            file); the bucket of ``url`` does not exist; ``transfer`` is not a ``TransferOptions``.
        FencedError: a newer writer registered on ``url`` while pushing.
        UploadError / RemoteError: a checkpoint cannot be committed.
    """
    if not os.path.isdir(local_dir):
        raise ConfigError(f"Local directory {local_dir!r} does not exist: pass the directory your Saver or "
                          "CheckpointManager wrote (its local_dir)." if not os.path.exists(local_dir)
                          else f"{local_dir!r} is a file, not a checkpoint directory.")
    prefixes = local_checkpoint_prefixes(local_dir)
    if not prefixes:
        raise ConfigError(f"No TensorFlow checkpoint in {local_dir!r} (expected files such as "
                          "model.ckpt-1000.index): nothing to push.")
    store = open_directory(url, storage_options, retry=retry, create=True, transfer=transfer)
    writer = Writer(store)
    register_continuing(writer)
    graph = os.path.join(local_dir, GRAPH_FILE)
    graph_uploaded = not os.path.isfile(graph)
    reports: list[PushReport] = []
    # Ctrl-C: the files in flight stop and their multipart uploads are aborted (interrupt.py); nothing is committed
    with cancelling_pool(store, ThreadPoolExecutor(max_workers=store.transfer.max_files_in_flight,
                                                   thread_name_prefix="cloudckpt-push")) as pool:
        for prefix in prefixes:
            ckpt = find_local_checkpoint(local_dir, prefix)
            if ckpt is None:
                report = PushReport(step=step_of(prefix), name=prefix, outcome=VANISHED,
                                    reason=f"{prefix} disappeared from {local_dir}")
            else:
                if not graph_uploaded:
                    ckpt = replace(ckpt, extras={GRAPH_FILE: graph})
                size = ckpt.total_size  # before committing: a live Saver may delete the files afterwards
                result = commit_checkpoint(store, ckpt, executor=pool, writer=writer)
                if result.outcome != REFUSED:
                    graph_uploaded = True
                report = PushReport(step=ckpt.step, name=prefix, outcome=result.outcome, files=len(ckpt.files),
                                    size=size, bytes_uploaded=result.bytes_uploaded, reason=result.reason,
                                    bytes_copied=result.bytes_copied)
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return PushResult(url=store.url, reports=tuple(reports))
