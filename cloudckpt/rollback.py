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
from .errors import IntegrityError
from .lineage import LogState
from .remote import open_directory
from .restore import CheckpointNotFoundError, verify_checkpoint
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


def rollback(url: str, step: int, *, storage_options: Mapping[str, Any] | None = None,
             retry: RetryPolicy | None = None) -> RollbackResult:
    """Make the committed checkpoint at ``step`` the latest of the directory at ``url``.

    The checkpoint is verified first (sizes and crc32c). A checkpoint of the
    current lineage is preferred to a superseded one at the same step.

    Raises:
        CheckpointNotFoundError: nothing is committed at ``step`` (or it was deleted meanwhile).
        IntegrityError: the checkpoint at ``step`` does not verify.
        ConfigError: the bucket or local directory does not exist, or the URL is unusable.
        RemoteError: the directory cannot be read or written.
    """
    store = open_directory(url, storage_options, retry=retry)
    scan = scan_directory(store)
    matches = [c for c in scan.committed if c.step == step] + [c for c in scan.superseded if c.step == step]
    if not matches:
        steps = sorted({c.step for c in scan.committed + scan.superseded})
        raise CheckpointNotFoundError(f"No committed checkpoint at step {step} in {store.url} (committed steps: "
                                      f"{steps}); nothing was changed.")
    target = matches[-1] if not [c for c in scan.committed if c.step == step] else matches[0]
    report = verify_checkpoint(store, target, use_store_checksums=True)
    if not report.ok:
        problems = ", ".join(f"{p.name}: {p.status}" for p in report.problems)
        raise IntegrityError(f"Checkpoint step {step} in {store.url} does not verify ({problems}); not rolling back "
                             "to it. Choose another step (cloudckpt ls).")

    def resume(state: LogState) -> str | None:
        if target.commit_id in state.retired:
            raise CheckpointNotFoundError(f"Checkpoint step {step} in {store.url} was deleted while rolling back; "
                                          "nothing was changed.")
        return target.commit_id

    writer = Writer(store)
    legacy = [(c.name, c.step) for c in scan.committed] if scan.log is None else []
    writer.register(resume, reason="rollback", legacy=lambda: legacy)
    write_state_file(store)
    after = scan_directory(store)
    latest = after.committed[-1] if after.committed else target
    log.info("Rolled back %s to step %d; %d newer checkpoint(s) are superseded; running writers are fenced.",
                store.url, step, len([c for c in after.superseded if c.step > step]))
    return RollbackResult(latest=latest, superseded=after.superseded, writer_id=writer.writer_id)
