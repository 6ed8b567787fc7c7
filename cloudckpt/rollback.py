"""Rolling a checkpoint directory back on purpose: make a committed checkpoint the latest again.

A rollback registers a writer (``writers.py``) that resumes from the chosen
checkpoint and commits nothing: the chosen checkpoint becomes the head of the
current lineage, every newer checkpoint becomes superseded (kept, listed,
never restored, removed first by retention), and any writer still running on
the directory is fenced. Nothing is deleted. The next run (a restart on any
VM) resumes from the chosen step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .catalog import CheckpointInfo, scan_directory
from .commit import write_state_file
from .errors import ConfigError, IntegrityError
from .lineage import LogState
from .remote import open_directory
from .restore import CheckpointNotFoundError, no_checkpoint_named, verify_checkpoint
from .retry import RetryPolicy
from .writers import Writer

log = logging.getLogger("cloudckpt")


@dataclass(frozen=True)
class RollbackResult:
    """What ``rollback`` did.

    Attributes:
        latest: the checkpoint that is now the latest (the head of the current lineage).
        superseded: committed checkpoints that are now superseded, by step.
        writer_id: the id of the rollback's ``writer`` entry in the commit log (named by ``FencedError``).
    """

    latest: CheckpointInfo
    superseded: list[CheckpointInfo]
    writer_id: str


def rollback(url: str, step: int | None = None, *, name: str | None = None,
             storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None) -> RollbackResult:
    """Make the committed checkpoint at ``step``, or the one named ``name``, the latest of the directory at
    ``url`` (exactly one of the two).

    The checkpoint is verified first (sizes and crc32c). At ``step``, a
    checkpoint of the current lineage is preferred to a superseded one, and of
    two names committed at one step (a Keras template with a metric, fit again
    from scratch) the newer commit, as ``download_checkpoint`` takes it;
    ``name`` (``CheckpointInfo.name``, as ``cloudckpt ls`` shows it, e.g.
    ``model.ckpt-30``) picks any committed or superseded one.

    Raises:
        CheckpointNotFoundError: nothing is committed at ``step`` / of that ``name`` (or it was deleted
            meanwhile).
        IntegrityError: the checkpoint does not verify.
        ConfigError: both or neither of ``step`` and ``name``; the bucket or local directory does not exist,
            or the URL is unusable.
        RemoteError: the directory cannot be read or written.
    """
    if (step is None) == (name is None):
        raise ConfigError("Pass step or name (one of them): the checkpoint to roll back to." if step is None else
                          f"Pass step ({step}) or name ({name!r}), not both: each picks one checkpoint.")
    store = open_directory(url, storage_options, retry=retry)
    scan = scan_directory(store)
    if name is not None:
        named = [c for c in scan.committed + scan.superseded if c.name == name]
        if not named:
            raise no_checkpoint_named(store, name, scan.committed + scan.superseded)
        target = named[0]
    else:
        current = [c for c in scan.committed if c.step == step]  # in lineage order: the newer commit last
        superseded = [c for c in scan.superseded if c.step == step]
        if not current and not superseded:
            steps = sorted({c.step for c in scan.committed + scan.superseded})
            raise CheckpointNotFoundError(f"No committed checkpoint at step {step} in {store.url} (committed steps: "
                                          f"{steps}); nothing was changed.")
        target = current[-1] if current else superseded[-1]
    what = f"step {target.step} ({target.name})"
    report = verify_checkpoint(store, target, use_store_checksums=True)
    if not report.ok:
        problems = ", ".join(f"{p.name}: {p.status}" for p in report.problems)
        raise IntegrityError(f"Checkpoint {what} in {store.url} does not verify ({problems}); not rolling back "
                             "to it. Choose another step (cloudckpt ls).")

    def resume(state: LogState) -> str | None:
        if target.commit_id in state.retired:
            raise CheckpointNotFoundError(f"Checkpoint {what} in {store.url} was deleted while rolling back; "
                                          "nothing was changed.")
        return target.commit_id

    writer = Writer(store)
    legacy = [(c.name, c.step) for c in scan.committed] if scan.log is None else []
    writer.register(resume, reason="rollback", legacy=lambda: legacy)
    write_state_file(store)
    after = scan_directory(store)
    latest = after.committed[-1] if after.committed else target
    log.info("Rolled back %s to %s; %d newer checkpoint(s) are superseded; running writers are fenced.",
             store.url, what, len([c for c in after.superseded if c.step > target.step]))
    return RollbackResult(latest=latest, superseded=after.superseded, writer_id=writer.writer_id)
