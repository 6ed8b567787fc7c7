"""Where a writer resumes, and making the local directory hold it: what a hook does in ``begin()``.

The resume point is the head of the directory's lineage (``lineage.py``),
except when the local directory says otherwise on purpose:

* **TF-way rollback.** The local ``checkpoint`` state file points at an older
  step while the local directory still holds newer checkpoints of the current
  lineage (the user pointed it back): that checkpoint is the resume point;
  committed checkpoints after it become superseded once this writer commits.
  (A local directory that is only behind, because another VM went on, holds
  none of those: it catches up with the head.)
* **Ahead of the store.** A local checkpoint newer than anything committed
  (its upload never finished) is resumed from, continuing the head.

Local copies are checked, not trusted: a local checkpoint that has a
committed manifest is compared with it (sizes and crc32c of the ``.index``
and ``.data-*`` files, what a restore reads); on a mismatch the committed
copy is downloaded (or the next older one of the lineage that verifies),
logged at WARNING. The writer then registers with the commit it resumed
from, which fences every older writer.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

from .catalog import CheckpointInfo, DirectoryScan, scan_directory
from .errors import IntegrityError
from .layout import TF, PrefixLayout, parse_manifest_name, state_file_prefix, step_of
from .lineage import LogState
from .manifest import crc32c_of_file
from .remote import RemoteStore
from .restore import download_verified
from .writers import Writer

__all__ = ["resume_and_register", "resume_point", "state_file_prefix", "local_copy_problems"]

log = logging.getLogger("cloudckpt")


def resume_and_register(store: RemoteStore, writer: Writer, local_dir: str, *, download: bool,
                        layout: PrefixLayout = TF,
                        check: Callable[[CheckpointInfo | None], None] | None = None,
                        on_scan: Callable[[DirectoryScan], None] | None = None) -> CheckpointInfo | None:
    """Bring ``local_dir`` to the resume point (downloading only if ``download``) and register ``writer``.

    ``layout`` names the local checkpoints (TF's by default). ``check(downloaded)`` runs once ``local_dir``
    holds the resume point (``downloaded``: the checkpoint brought there, or None), before ``writer``
    registers, and again at each new decision: what it raises propagates, and no older writer is fenced.
    ``on_scan(scan)`` is given the directory's scan the decision was made from (the last one), once
    ``writer`` registered (its ``incomplete``: the upload debris of earlier runs).

    Returns:
        The committed checkpoint downloaded, or None if the local directory was used as it is.

    Raises:
        IntegrityError: checkpoints are committed but none that should be resumed from verifies,
            and there is no local checkpoint to fall back on.
        FencedError / RemoteError: the store could not be read or written.
    """
    outcome: dict[str, object] = {}

    def decide(state: LogState) -> str | None:
        # The writer has just read the log (``state``): the scan lists the directory, not the log again.
        scan = scan_directory(store, state=state if state.last_index else None)
        outcome["scan"] = scan
        # decide() runs again when another writer appended to the log meanwhile: what the previous attempt
        # downloaded is this run's own, not a state file pointing back on purpose.
        earlier = outcome.get("restored")
        restored, resumed = resume_point(store, scan, local_dir, download=download, layout=layout,
                                         downloaded=earlier.name if isinstance(earlier, CheckpointInfo) else None)
        if restored is None and isinstance(earlier, CheckpointInfo) and earlier.commit_id == resumed:
            restored = earlier  # the previous attempt's download is still what this resume restored
        outcome["restored"] = restored
        if check is not None:
            check(restored)
        return resumed

    def legacy() -> list[tuple[str, int]]:
        scan = outcome["scan"]
        assert isinstance(scan, DirectoryScan)
        return [(c.name, c.step) for c in scan.committed] if scan.log is None else []

    writer.register(decide, legacy=legacy)
    scan = outcome.get("scan")
    if on_scan is not None and isinstance(scan, DirectoryScan):
        on_scan(scan)
    restored = outcome.get("restored")
    return restored if isinstance(restored, CheckpointInfo) else None


def resume_point(store: RemoteStore, scan: DirectoryScan, local_dir: str, *, download: bool,
                 layout: PrefixLayout = TF, downloaded: str | None = None) -> tuple[CheckpointInfo | None, str | None]:
    """(checkpoint downloaded or None, commit id resumed from or None): see the module docstring.
    ``downloaded``: the prefix an earlier attempt of this resume downloaded (the state file points at it)."""
    lineage = scan.committed
    known = {c.name: c for c in [*scan.superseded, *lineage]}  # the current lineage wins a shared prefix
    local = layout.local_prefixes(local_dir)
    pointed = state_file_prefix(local_dir)
    chosen = pointed if pointed in local else None  # what TF restores: the state file's checkpoint
    head = lineage[-1] if lineage else None
    # A rollback the TF way: the state file points before the head while this disk still holds newer
    # checkpoints of the current lineage (ones this run committed). A disk that is merely behind (another
    # VM went on) holds none: it catches up with the head instead.
    newer_current = [p for p in local if chosen is not None and _step(p) > _step(chosen)
                     and (c := known.get(p)) is not None and c.status == "committed"]
    rolled_back = bool(newer_current) and head is not None and _step(chosen) < head.step  # type: ignore[arg-type]
    newest = newer_current[-1] if newer_current else None

    if chosen is None:
        if not download:
            if lineage:
                log.warning("Starting without restoring a checkpoint of %s although step %d is committed: this "
                            "run starts a new lineage; the committed checkpoints become superseded when it "
                            "commits its first checkpoint. To resume instead, restore first (the TF1 hook's "
                            "restore=True, the default).",
                            store.url, head.step)  # type: ignore[union-attr]
            return None, None
        restored = _download_first(store, scan, list(reversed(lineage)), local_dir, local_step=None)
        return restored, restored.commit_id if restored else None

    step = _step(chosen)
    match = known.get(chosen)
    earlier = [c for c in lineage if c.step < step]
    if rolled_back:
        log.warning("Rolling back: the local state file of %s points at step %d while newer local checkpoints exist "
                    "(up to step %d); resuming from step %d. Committed checkpoints of %s after it become superseded "
                    "once this run commits.", local_dir, step, _step(newest), step, store.url)  # type: ignore[arg-type]
        if match is None:
            return None, earlier[-1].commit_id if earlier else None
        return _checked(store, scan, match, [*reversed(earlier)], local_dir, download=download,
                        layout=layout)
    if match is not None and match.status == "committed":
        if download and head is not None and head.step > step:
            newer = [c for c in reversed(lineage) if c.step > step]
            restored = _download_first(store, scan, newer, local_dir, local_step=step)
            if restored is not None and chosen == downloaded:  # committed by the writer still at work there
                log.info("%s committed step %d while this run resumed from step %d; resuming from step %d.",
                         store.url, restored.step, step, restored.step)
                return restored, restored.commit_id
            if restored is not None:
                log.warning("The local state file of %s points at committed step %d, but %s has newer committed "
                            "checkpoints of the same lineage: resuming from step %d. To go back to step %d on "
                            "purpose, run `cloudckpt rollback %s --step %d` first.", local_dir, step, store.url,
                            restored.step, step, store.url, step)
                return restored, restored.commit_id
        return _checked(store, scan, match, [*reversed(earlier)], local_dir, download=download,
                        layout=layout)
    if match is not None:  # committed in an abandoned lineage
        if not download:
            return None, match.commit_id
        log.warning("Local checkpoint step %d in %s belongs to a superseded lineage of %s; restoring the latest "
                    "committed checkpoint instead.", step, local_dir, store.url)
        restored = _download_first(store, scan, list(reversed(lineage)), local_dir, local_step=None)
        return restored, restored.commit_id if restored else None
    # Not committed: ahead of the store (its upload never finished), or behind it.
    if head is None or step > head.step:
        log.info("Local checkpoint step %d in %s is newer than anything committed to %s; resuming from it.",
                 step, local_dir, store.url)
        return None, head.commit_id if head else None
    if download:
        newer = [c for c in reversed(lineage) if c.step > step]
        restored = _download_first(store, scan, newer, local_dir, local_step=step)
        if restored is not None:
            return restored, restored.commit_id
    return None, earlier[-1].commit_id if earlier else None


def local_copy_problems(local_dir: str, info: CheckpointInfo, layout: PrefixLayout = TF) -> list[str]:
    """What differs between the local copy of ``info`` and its manifest, over the files a restore reads
    (``layout.is_restored``; TF: ``.index`` and ``.data-*``, not ``.meta``, which TF rewrites when it
    re-saves after a restore)."""
    problems = []
    for entry in info.files:
        if not layout.is_restored(entry.name):
            continue
        path = os.path.join(local_dir, entry.name)
        if not os.path.isfile(path):
            problems.append(f"{entry.name}: missing")
            continue
        size = os.path.getsize(path)
        if size != entry.size:
            problems.append(f"{entry.name}: {size} bytes, the manifest says {entry.size}")
            continue
        _, crc = crc32c_of_file(path)
        if crc != entry.crc32c:
            problems.append(f"{entry.name}: crc32c {crc}, the manifest says {entry.crc32c}")
    return problems


def _checked(store: RemoteStore, scan: DirectoryScan, match: CheckpointInfo, older: Sequence[CheckpointInfo],
             local_dir: str, *, download: bool, layout: PrefixLayout) -> tuple[CheckpointInfo | None, str | None]:
    """Resume from the local copy of committed ``match`` if it matches its manifest; else download it
    (or the newest of ``older`` that verifies)."""
    if store.is_local and os.path.abspath(store.root) == os.path.abspath(local_dir):
        return None, match.commit_id  # in place: the local files are the committed objects
    problems = local_copy_problems(local_dir, match, layout)
    if not problems:
        log.info("Local checkpoint step %d in %s is up to date with %s (it matches its committed manifest).",
                 match.step, local_dir, store.url)
        return None, match.commit_id
    if not download:
        log.warning("Local checkpoint step %d in %s does not match its committed manifest in %s (%s); restore=False, "
                    "so it is used as it is.", match.step, local_dir, store.url, "; ".join(problems))
        return None, match.commit_id
    log.warning("Local checkpoint step %d in %s does not match its committed manifest (%s); downloading the "
                "committed copy from %s.", match.step, local_dir, "; ".join(problems), store.url)
    restored = _download_first(store, scan, [match, *older], local_dir, local_step=None)
    return restored, restored.commit_id if restored else None


def _download_first(store: RemoteStore, scan: DirectoryScan, candidates: Sequence[CheckpointInfo], local_dir: str,
                    *, local_step: int | None) -> CheckpointInfo | None:
    """Download the first of ``candidates`` (newest first) that verifies.

    A candidate that fails verification (or whose manifest cannot be read) is
    logged at ERROR and the next is tried. None if nothing was downloaded and
    ``local_step`` (a usable local checkpoint) exists.

    Raises:
        IntegrityError: candidates exist, none verifies, and there is no local checkpoint.
    """
    steps = {c.step for c in candidates}
    lowest = min(steps, default=-1)
    unreadable = [(s, e) for name, e in scan.unreadable.items() if (s := (parse_manifest_name(name) or ("", -1))[1])
                  > max(lowest, local_step if local_step is not None else -1) and s not in steps]
    queue: list[tuple[int, CheckpointInfo | Exception]] = sorted(
        [*((c.step, c) for c in candidates), *unreadable], key=lambda item: item[0], reverse=True)
    failed: list[str] = []
    for step, item in queue:
        try:
            if isinstance(item, Exception):
                raise item
            download_verified(store, item, local_dir, objects=scan.objects)
        except IntegrityError as exc:
            failed.append(f"step {step}: {exc}")
            log.error("Committed checkpoint step %d failed verification: %s Falling back to the next older "
                      "committed checkpoint.", step, exc)
            continue
        if failed:
            log.warning("Restored step %d from %s instead of newer step(s) that failed verification: %s",
                        step, store.url, "; ".join(failed))
        return item
    if not queue:
        return None
    if local_step is not None:
        log.warning("No committed checkpoint newer than local step %d verifies; continuing from the local one.",
                    local_step)
        return None
    raise IntegrityError(
        f"None of the {len(failed)} committed checkpoint(s) in {store.url} verifies, so training will not silently "
        f"restart from step 0. Inspect with `cloudckpt verify {store.url} --all`; to start over on purpose, use a "
        f"new checkpoint_dir or pass restore=False. Failures: " + " | ".join(failed))


def _step(prefix: str) -> int:
    return step_of(prefix)
