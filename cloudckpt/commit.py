"""The commit protocol: what makes a checkpoint in a remote directory "committed".

A registered writer (``writers.py``) commits a checkpoint in this order:

1. read the commit log (a newer writer: ``FencedError``, nothing is done);
2. look at the objects already under the checkpoint's names: a checkpoint committed in this
   writer's lineage is kept (identical: "already committed"; missing or truncated objects
   re-uploaded: "healed"; different tensors: "refused", unless the save asks to replace it,
   ``replace_committed``, see below); a committed checkpoint of another lineage
   (superseded) is retired, and debris of uploads that never committed is deleted, both announced
   in the log first. When no live commit names the checkpoint and the commit is a fresh save (the common
   case) this step is skipped and nothing is listed: a name someone already holds makes the create-only
   upload of 3 fail (after its whole body was sent), and the round starts again with this step. A commit
   taken up again (``resumed``: the engine found debris of an earlier attempt at the checkpoint, or a
   crashed run's snapshot of it, or this process's commit of it failed) does this step first: the debris is
   cleared before its names' files are sent, once;
3. upload every file **create-only** (an object is never overwritten; partial objects are harmless:
   nothing points at them); a name someone else created meanwhile sends us back to 2. The objects this
   commit created in an earlier round are its own: step 2 neither deletes them nor does 3 upload them again
   (only names debris had taken are cleared and uploaded); they are still uncommitted, so one another party
   deleted (gc after its grace period) or replaced meanwhile is uploaded again in a later round (step 2 finds
   it by size and, where the store tells, its checksum: ``_Own.reconcile``; step 4 or the check before the
   commit entry finds it gone). On ``s3://``
   parts unchanged since the previous committed checkpoint of the writer's lineage are copied
   server-side instead of sent (``incremental.py``);
4. check each remote size against the local file (catches truncated uploads): the commit's one listing
   of the directory, which the state file and retention reuse (``CommitResult.objects``); its ETags go
   into the manifest (what the next commit's copies check their source by);
5. write ``<prefix>.manifest.json`` create-only (version 2: commit id, writer, parent commit); a write whose
   answer was lost (its retry finds the name taken, or fails) is this commit's when the object holds its
   bytes (``_write_manifest``);
6. append the ``commit`` entry to the log: THE commit point (fenced writers cannot); an append whose answer
   was lost is recognised by the entry's nonce (``CommitLog.try_append``);
7. upload ``graph.pbtxt`` if it changed; for a TF checkpoint, rewrite the remote ``checkpoint`` state
   file (the current lineage, relative paths), unless the checkpoint is committed in place (below).

**In place** (a plain local directory whose files are the checkpoint's objects themselves: the hook or
``CheckpointManager`` with a local ``checkpoint_dir``, ``cloudckpt push DIR DIR``) the ``checkpoint`` state
file is TF's: the Saver or ``tf.train.CheckpointManager`` that wrote the files rewrites it after every save
(atomically, after the checkpoint's files), in the training thread. A commit does not touch it there: a second
writer (a commit runs in the uploader thread) made the file flip between TF's view (every checkpoint kept,
absolute paths for a TF1 Saver) and the committed lineage, for TF's readers (``tf.train.latest_checkpoint``,
a new ``tf.train.CheckpointManager``'s bookkeeping) to see either. Commands that run with no Saver writing
the directory (``cloudckpt rollback``, ``gc``) still rewrite it (``write_state_file``).

Steps 5 and 6 run past the commit's **point of no return** when it runs in a transfer scope (the uploader's
commits, ``cancel.TransferScope.enter_commit_point``): once its data is uploaded and checked, no cancel (an
older upload abandoned for a preemption's final checkpoint, a ``close`` giving up) cuts them, nor what follows in
the scope (7): a request cut there may still have been applied by the store, a checkpoint committed while its
uploader reported it abandoned. They are a few small requests. A cancel that came first stops the commit
before 5 (``UploadError``, caused by a ``TransferCancelled``); a round started again from 2 (its objects were
deleted meanwhile, its manifest's name taken) can be cancelled again.

Readers trust a checkpoint only when a log commit entry names its manifest's commit id and the
manifest exists, so they never see a half-written checkpoint, nor one of a fenced writer.

**Replacing a committed checkpoint** (``replace_committed=True``; only Keras' ``ModelCheckpoint``
asks for it, as Keras overwrites a file saved again under the same name): in step 2 a checkpoint of
this writer's lineage at the same name with different tensors is retired like a superseded one (a
``delete`` entry un-commits it, then its manifest and files are deleted), and the save goes on from
step 3 under the same name. Readers see the old checkpoint, then none, then the new one, never a
half-written one; a crash between the retirement and step 6 leaves **neither** committed for that
name. Without it (every other adapter) such a save is refused: the committed checkpoint stays.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import uuid
from concurrent.futures import Executor
from multiprocessing.pool import ThreadPool
from typing import Any, Callable, Collection, Iterable, Protocol
from dataclasses import dataclass, field, replace

from ._version import __version__
from .cancel import TransferCancelled, TransferScope
from .catalog import ManifestCache, legacy_checkpoints
from .commitlog import CommitLog
from .errors import FencedError, IntegrityError, ManifestError, RemoteError, UploadError
from .incremental import copy_source, upload_file
from .lineage import CommitRecord, LogState, fold, legacy_commit_id
from .layout import DEFAULT_LAYOUT, STATE_FILE, TF, committed_prefixes, render_state_file, state_file_timestamps
from .manifest import Manifest, entry_for, parse_manifest
from .remote import RemoteObject, RemoteStore
from .s3_transport import etag_md5, md5_of_file

from .waits import map_all
from .writers import Writer

log = logging.getLogger("cloudckpt")


class Mapper(Protocol):
    """A thread pool's ``map`` (concurrent.futures' lazy one or multiprocessing's eager one)."""

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> Iterable[Any]: ...


def _map(pool: Mapper, func: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``list(pool.map(func, items))``. On a ``concurrent.futures`` executor (``cloudckpt push``'s, waited on by
    the main thread) the results are waited for in slices (``waits.map_all``: a Ctrl-C is raised at once, and
    cancels the files not started, as ``Executor.map``); the uploader's ``multiprocessing`` pool is waited on
    by its own thread, which no Ctrl-C interrupts."""
    if isinstance(pool, Executor):
        return map_all(pool, func, items)
    return list(pool.map(func, items))


GRAPH_FILE = "graph.pbtxt"  # TF1's graph, uploaded next to the checkpoints when it changes

__all__ = ["STATE_FILE", "GRAPH_FILE", "render_state_file", "LocalCheckpoint", "CommitResult", "commit_checkpoint",
           "find_local_checkpoint", "local_checkpoint_prefixes", "build_manifest", "register_continuing",
           "write_state_file", "committed_in_place", "UPLOADED", "HEALED", "ALREADY_COMMITTED", "REFUSED"]


@dataclass(frozen=True)
class LocalCheckpoint:
    """The files of one saved checkpoint on local disk, ready to commit.

    Attributes:
        step: global step of the checkpoint.
        prefix: checkpoint prefix relative to the directory, e.g. ``model.ckpt-30``.
        files: remote name -> local path of each file the manifest will list.
        extras: files uploaded alongside but not part of the checkpoint (``graph.pbtxt``).
        layout: the name of the checkpoint's layout (``layout.py``; ``"tf"`` by default).
        saved_at: when it was saved, seconds since the epoch (None: unknown); recorded in
            the commit log, written to the remote TF state file.
    """

    step: int
    prefix: str
    files: dict[str, str]
    extras: dict[str, str] = field(default_factory=dict)
    layout: str = DEFAULT_LAYOUT
    saved_at: float | None = None

    @property
    def total_size(self) -> int:
        """Bytes on local disk of the checkpoint's files."""
        return sum(os.path.getsize(p) for p in self.files.values())


UPLOADED, HEALED, ALREADY_COMMITTED, REFUSED = "uploaded", "healed", "already committed", "refused"
MAX_ROUNDS = 5


@dataclass(frozen=True)
class CommitResult:
    """What ``commit_checkpoint`` did.

    Attributes:
        manifest: the committed manifest (for ``refused``: the one that stays committed).
        bytes_uploaded: bytes of the checkpoint sent to the store over the network, over all the rounds
            of the commit: a create-only upload the store refused (its name taken by debris) counts in full,
            its bytes were sent before the refusal.
        bytes_copied: bytes of the checkpoint the store copied server-side from the previous
            committed checkpoint (an incremental commit, ``incremental.py``); not sent.
        outcome: ``uploaded`` (a new commit), ``healed`` (already committed with the same
            tensors; missing or truncated objects re-uploaded), ``already committed``
            (identical; nothing uploaded) or ``refused`` (see ``reason``).
        reason: why a save was refused.
        housekeeping_error: what failed after the commit point, if anything (the commit stands).
        objects: for a new commit, the directory's listing taken after the upload (with the new
            manifest added): what retention plans from, so a commit lists the directory once.
        replaced: for a new commit made with ``replace_committed``, the commit ids of the committed
            checkpoints of the same name (other tensors) it replaced; empty otherwise.
    """

    manifest: Manifest
    bytes_uploaded: int
    outcome: str = UPLOADED
    reason: str = ""
    housekeeping_error: str = ""  # a follow-up step (the TF state file) failed after the commit
    objects: tuple[RemoteObject, ...] | None = None
    bytes_copied: int = 0
    replaced: tuple[str, ...] = ()

    @property
    def already_committed(self) -> bool:
        """True unless this call made a new commit (healed, already committed, refused)."""
        return self.outcome != UPLOADED


def find_local_checkpoint(directory: str, prefix: str) -> LocalCheckpoint | None:
    """The files of TF checkpoint ``prefix`` (e.g. ``model.ckpt-30``) in ``directory``, or None (``layout.TF``)."""
    return TF.find_local(directory, prefix)


def local_checkpoint_prefixes(directory: str) -> list[str]:
    """Prefixes (``model.ckpt-30``) of the TF checkpoints in a local directory (an ``.index`` file), oldest first."""
    return TF.local_prefixes(directory)


def tensorflow_version() -> str:
    """The TensorFlow version, without importing TensorFlow if it is not loaded yet."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and getattr(tf, "__version__", None):
        return str(tf.__version__)
    for dist in ("tensorflow", "tensorflow-cpu", "tf-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def build_manifest(ckpt: LocalCheckpoint, executor: Mapper | None = None) -> Manifest:
    """Checksum every file of ``ckpt`` (concurrently when an executor is given)."""
    names = sorted(ckpt.files)
    if executor is None:
        entries = [entry_for(n, ckpt.files[n]) for n in names]
    else:
        entries = _map(executor, lambda n: entry_for(n, ckpt.files[n]), names)
    return Manifest(step=ckpt.step, prefix=ckpt.prefix, files=tuple(entries),
                    tensorflow=tensorflow_version() if ckpt.layout == DEFAULT_LAYOUT else "", cloudckpt=__version__,
                    layout=ckpt.layout)


def commit_checkpoint(
    store: RemoteStore,
    ckpt: LocalCheckpoint,
    *,
    executor: Mapper | None = None,
    manifest: Manifest | None = None,
    writer: Writer | None = None,
    replace_committed: bool = False,
    resumed: bool = False,
) -> CommitResult:
    """Upload ``ckpt`` to ``store`` and commit it (see module docstring); one of four outcomes.

    Args:
        store: the remote checkpoint directory.
        ckpt: the local files (they must not change while this runs: pass a snapshot).
        executor: runs file uploads and checksums concurrently; sequential if None.
        manifest: a precomputed manifest for ``ckpt`` (computed here if None).
        writer: the registered writer committing; None registers a new one that
            continues the directory's current head (what ``cloudckpt push`` does).
        replace_committed: a checkpoint of the same name committed in the writer's lineage with
            other tensors is un-committed and deleted, then ``ckpt`` is committed in its place
            (``uploaded``, ``CommitResult.replaced``); a crash in between leaves neither. False
            (default): such a save is ``refused`` and the committed checkpoint stays.
        resumed: the commit takes up an earlier attempt at ``ckpt`` (of a previous process, or one of this
            process that failed or was abandoned): the store may hold its debris. The directory is listed
            before anything is uploaded (the round's one listing), so a name debris holds is cleared before its
            file is sent, once. False (a fresh save): nothing is listed first unless a commit names the
            checkpoint; a name found taken costs its file sent twice (the refused create-only upload's body).

    Raises:
        FencedError: a newer writer registered on the directory; nothing was committed.
        RemoteError: an upload or write failed after retries.
        IntegrityError: a remote size did not match after upload.
    """
    own_pool = executor is None
    pool = executor or ThreadPool(4)
    try:
        if writer is None:
            writer = Writer(store)
        if not writer.registered:
            register_continuing(writer)
        manifest = manifest or build_manifest(ckpt, pool)
        try:
            result = _commit(writer, ckpt, manifest, pool, replace_committed, resumed)
        except (IntegrityError, RemoteError, UploadError) as exc:
            if not isinstance(exc, FencedError):
                _raise_if_fenced(writer, ckpt.step)  # a newer writer removing our uncommitted upload: say so
            raise
        if result.outcome != REFUSED and ckpt.layout == DEFAULT_LAYOUT and not committed_in_place(store, ckpt):
            # TF's state file names TF checkpoints; in place it is the Saver's (see the module docstring)
            try:
                write_state_file(store, fold(writer.log.cached()))
            except Exception as exc:  # noqa: BLE001 - the checkpoint is committed; the state file is advisory
                log.warning("Checkpoint step %d is committed, but rewriting the TF state file of %s failed: %s",
                            ckpt.step, store.url, exc)
                return replace(result, housekeeping_error=f"state file: {type(exc).__name__}: {exc}")
        return result
    finally:
        if own_pool:
            pool.close()
            pool.join()


def _raise_if_fenced(writer: Writer, step: int) -> None:
    try:
        writer.state(step=step)
    except FencedError:
        raise
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        pass


def register_continuing(writer: Writer) -> None:
    """Register ``writer`` so that it continues the directory's current head (adopting version 1 checkpoints)."""
    legacy: list[tuple[str, int]] = []

    def adopt() -> list[tuple[str, int]]:
        legacy[:] = legacy_checkpoints(writer.store)
        return legacy

    def head(state: LogState) -> str | None:
        if state.last_index == 0:
            adopt()
            return legacy_commit_id(legacy[-1][0]) if legacy else None
        return state.head

    writer.register(head, legacy=lambda: legacy)


def committed_at(store: RemoteStore, state: LogState, prefix: str,
                 present: set[str]) -> list[tuple[CommitRecord, Manifest | None]]:
    """The live commits of checkpoint ``prefix`` whose manifest is in the store, with the manifest
    (None when it cannot be read, or belongs to another commit)."""
    found: list[tuple[CommitRecord, Manifest | None]] = []
    cache = ManifestCache.of(store)
    for record in state.live():
        if record.prefix != prefix or record.manifest not in present:
            continue
        manifest = cache.get(record.manifest, None if record.legacy else record.commit_id, None)
        if manifest is None:
            data = store.read_bytes(record.manifest)
            if data is None:
                continue
            try:
                manifest = parse_manifest(data, url=store.url_of(record.manifest))
            except ManifestError as exc:
                log.warning("The manifest of committed step %d cannot be read (%s); it will be replaced.",
                            record.step, exc)
                found.append((record, None))
                continue
        same = manifest.commit_id is None if record.legacy else manifest.commit_id == record.commit_id
        found.append((record, manifest if same and manifest.prefix == prefix else None))
    return found


class _Own:
    """What one commit did over its rounds: the objects it created (its own, still uncommitted) and the
    bytes it sent."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[int, int]] = {}  # name -> (size, log index of the round that created it)
        self.sent = 0  # bytes sent over the network, all rounds (create-only uploads refused included)
        self.copied = 0  # bytes the store copied server-side (incremental), all rounds

    def since(self, default: int) -> int:
        """The log index of the oldest round whose objects are kept (``default`` if none is kept)."""
        return min([default, *(index for _, index in self.objects.values())])

    def reconcile(self, store: RemoteStore, step: int, objects: list[RemoteObject], crc32c: dict[str, str],
                  files: dict[str, str]) -> None:
        """Forget the objects a listing (``objects``) no longer shows as this commit created them (deleted by
        another party meanwhile, or another object at the name): they are uploaded again (the latter cleared
        first, as debris).

        An object is recognised by its size and, where the store tells more of its bytes, by that:

        * the listing's crc32c (GCS computes it from the bytes it holds) against the manifest's (``crc32c``:
          name -> 8 hex digits);
        * on ``s3://`` (cloudckpt's transport), one HEAD per own object of the listed size (only rounds after
          the first have own objects): the full-object CRC32C the store keeps against the manifest's -- a
          differing figure is confirmed by reading the object's bytes, as ``verify`` does (some S3-compatible
          stores, moto among them, report a wrong one for multipart uploads); where the store keeps none (moto,
          stores that refuse checksum headers), a single-part object's ETag (the MD5 of its bytes) against the
          MD5 of the local file (``files``: name -> local path; read locally).

        Elsewhere (fsspec stores other than GCS), and for a multipart object whose store keeps no crc32c of it,
        the size alone decides: an object of the same size written at the name after ours was deleted is then
        kept as ours.
        """
        listed = {o.name: o for o in objects}
        gone = [name for name, (size, _) in self.objects.items()
                if (found := listed.get(name)) is None or found.size != size]
        kept = [name for name in self.objects if name not in gone and name in crc32c]
        changed = [name for name in kept if listed[name].crc32c is not None and listed[name].crc32c != crc32c[name]]
        headed = [name for name in kept if listed[name].crc32c is None]
        if headed and store.heads_crc32c:
            heads = store.heads(headed)
            changed += [name for name in headed if name not in heads]  # deleted since the listing
            differing = [name for name, head in heads.items() if head["crc32c"] not in (None, crc32c[name])]
            # an ETag that is an MD5 (a single-part, unencrypted object's); others (multipart "-N", SSE-KMS/C)
            # tell nothing of the bytes: the size decides
            changed += [name for name, head in heads.items() if head["crc32c"] is None and head["etag"]
                        and (md5 := etag_md5(head["etag"])) is not None and name in files
                        and md5_of_file(files[name]) != md5]
            if differing:  # the store's figure alone is not trusted: read the bytes
                read = store.read_files_crc32c([(name, self.objects[name][0], None) for name in differing],
                                               streams=store.transfer.max_download_streams)
                changed += [name for name in differing if (got := read.get(name)) is None or got[1] != crc32c[name]]
        if gone or changed:
            log.warning("Step %d: objects %s this commit uploaded in an earlier round are gone or changed in %s "
                        "(deleted, or replaced, by another party before the commit); uploading them again.", step,
                        [*gone, *changed], store.url)
        for name in [*gone, *changed]:
            del self.objects[name]


def _bytes_to_send(store: RemoteStore, ckpt: LocalCheckpoint, mine: Manifest, own: _Own) -> int:
    """Bytes of the checkpoint's files the commit still has to upload (not its own yet; none in place)."""
    return sum(f.size for f in mine.files if f.name not in own.objects and not _in_place(store, ckpt, f.name))


def _begin_round(store: RemoteStore, nbytes: int) -> None:
    """Tell the calling context's transfer scope (the uploader's commits) that the commit has ``nbytes`` left
    to send from now on (``TransferScope.begin_round``: what ``Uploader.favour_final`` plans from)."""
    scope = store.cancel.current()
    if scope is not None:
        scope.begin_round(nbytes)


def _commit(writer: Writer, ckpt: LocalCheckpoint, mine: Manifest, pool: Mapper,
            replace_committed: bool = False, resumed: bool = False) -> CommitResult:
    store = writer.store
    names = [*sorted(ckpt.files), mine.name]
    own = _Own()  # objects this commit created in earlier rounds: kept, not deleted nor uploaded again
    extras_done = False
    look_first: bool | None = None
    replaced: tuple[str, ...] = ()  # commits of this lineage retired to make room for this save
    for _ in range(MAX_ROUNDS):
        state = writer.state(step=ckpt.step)
        if not extras_done:  # not part of the checkpoint (graph.pbtxt): uploaded when it changed, once we
            _upload_changed_extras(store, ckpt.extras)  # know this writer is not fenced
            extras_done = True
        if look_first is None:
            # a commit taken up again (``resumed``) lists first: debris of its earlier attempt may hold its names
            look_first = resumed or any(record.prefix == ckpt.prefix for record in state.live())
        if not look_first:
            # The common case: a fresh save no commit names. Upload create-only without listing first;
            # a name already taken (debris of a crashed upload) sends us round again, listing this time.
            look_first = True
            result = _upload_and_commit(writer, ckpt, mine, names, state, pool, own)
            if result is not None:
                return result
            _begin_round(store, _bytes_to_send(store, ckpt, mine, own))  # what is left after this round
            continue
        listed = store.list_objects()
        sizes = {o.name: o.size for o in listed}
        own.reconcile(store, ckpt.step, listed, {f.name: f.crc32c for f in mine.files}, ckpt.files)
        owners = committed_at(store, state, ckpt.prefix, set(sizes))
        mine_lineage = set(state.ancestry(writer.head))
        ours = [(record, existing) for record, existing in owners
                if existing is not None and record.commit_id in mine_lineage]
        for record, existing in ours:
            if not replace_committed or existing.same_tensors(mine):
                return _keep_committed(writer, ckpt, mine, record, existing, sizes, state, pool)
        if ours:
            replaced = tuple(dict.fromkeys([*replaced, *(record.commit_id for record, _ in ours)]))
            log.info("Step %d: %s is committed in %s with different content (commit %s); replacing it "
                     "(replace_committed): it is un-committed and deleted before this save is uploaded.",
                     ckpt.step, ckpt.prefix, store.url, ", ".join(record.commit_id for record, _ in ours))
        # Everything else at these names is retired (a superseded checkpoint of another lineage, an
        # unreadable manifest, with replace_committed one of this lineage) or debris of an upload that
        # never committed: it goes first.
        retire = tuple(record.commit_id for record, _ in owners)
        doomed = [record.manifest for record, _ in owners]
        doomed += [f.name for _, existing in owners if existing is not None for f in existing.files
                   if not _in_place(store, ckpt, f.name)]  # in place, the name holds the Saver's new file
        doomed += [n for n in names if n in sizes and not _in_place(store, ckpt, n)]
        # what this commit created in an earlier round is its own (created create-only: no one else's object
        # was at the name then), not debris: kept, only the names debris took are cleared
        doomed = [n for n in dict.fromkeys(doomed) if n not in own.objects]
        if doomed or retire:
            what = f"{'replaced' if ours else 'superseded'} commit(s) {list(retire)} and " if retire else ""
            log.info("Step %d: removing %sobjects %s in %s before uploading.", ckpt.step, what, doomed, store.url)
            reason = "replace committed" if ours else "replace superseded" if retire else "debris"
            if not writer.delete(doomed, retire=retire, reason=reason, planned_at=state.last_index, step=ckpt.step):
                continue
            state = writer.state(step=ckpt.step)
        result = _upload_and_commit(writer, ckpt, mine, names, state, pool, own)
        if result is not None:
            return replace(result, replaced=replaced) if replaced else result
        _begin_round(store, _bytes_to_send(store, ckpt, mine, own))
    raise UploadError(f"Checkpoint step {ckpt.step} was not committed to {store.url}: another party kept "
                      f"creating or deleting objects named {names} ({MAX_ROUNDS} attempts).", url=store.url,
                      step=ckpt.step)


def _upload_and_commit(writer: Writer, ckpt: LocalCheckpoint, mine: Manifest, names: list[str], state: LogState,
                       pool: Mapper, own: _Own) -> CommitResult | None:
    """Steps 3 to 6: upload create-only the files not in ``own`` (the objects earlier rounds of this commit
    created; what this round creates is added), check sizes (the commit's one listing), write the manifest,
    append the commit entry. None when a name was taken or an object deleted meanwhile: go round again."""
    store = writer.store
    writer.wait_for_deletes(set(names), state)
    source = copy_source(writer, state, ckpt.prefix)  # incremental: unchanged parts are copied server-side
    entries = {f.name: f for f in mine.files}
    earlier = set(own.objects)
    todo = [(name, path) for name, path in sorted(ckpt.files.items()) if name not in earlier]
    _begin_round(store, _bytes_to_send(store, ckpt, mine, own))
    copied = _map(pool, lambda item: upload_file(store, item[0], item[1], entries.get(item[0]), source, ckpt.prefix),
                  todo)
    for (name, _), done in zip(todo, copied):
        size = entries[name].size if name in entries else os.path.getsize(ckpt.files[name])
        if done is not None:
            own.objects[name] = (size, state.last_index)
            own.copied += done
        if not _in_place(store, ckpt, name):  # in place: nothing is sent
            own.sent += size - (done or 0)  # refused (the name taken): its bytes were sent all the same
    if any(c is None for c in copied):
        return None  # another party created one of the names meanwhile: look again
    objects = _check_sizes(store, mine, earlier)
    if objects is None:
        return None  # an object of an earlier round was deleted meanwhile: look again
    etags = {o.name: o.etag for o in objects if o.etag}  # what the next commit's copies check their source by
    manifest = replace(mine, files=tuple(replace(f, etag=etags.get(f.name)) for f in mine.files),
                       commit_id=uuid.uuid4().hex[:16], writer_id=writer.writer_id,
                       writer_epoch=writer.epoch, parent=writer.head)
    data = manifest.to_json()
    scope = _enter_commit_point(store, ckpt.step)  # no cancel from here on: the commit point is written whole
    if not _write_manifest(store, manifest.name, data):
        _leave_commit_point(scope)
        return None
    ManifestCache.of(store).put(manifest.name, manifest, len(data))
    intact = _IntactCheck(writer, ckpt, manifest, names, own.since(state.last_index))
    try:
        writer.commit(manifest, validate=intact, saved_at=ckpt.saved_at,
                      in_place=committed_in_place(store, ckpt))
    except _Redo:  # nothing committed: the data goes up again, cancellable again
        _leave_commit_point(scope)
        return None
    listed = [o for o in (intact.objects or objects) if o.name != manifest.name]
    listed.append(RemoteObject(manifest.name, len(data), None))
    # the manifest's sizes, not the files' (counted as each round uploads): a Saver may delete the files once the
    # commit is appended (``cloudckpt push`` next to one)
    return CommitResult(manifest, own.sent, UPLOADED, objects=tuple(listed), bytes_copied=own.copied)


def _write_manifest(store: RemoteStore, name: str, data: bytes) -> bool:
    """Create manifest ``name`` with ``data``; False when another object holds the name (go round again).

    A create whose answer was lost may have been applied all the same: a retried attempt then finds the
    name taken, or the retries fail. The object is read back once: ``data`` itself (a fresh random commit
    id is in it) is this commit's own manifest, and the commit goes on.

    Raises:
        RemoteError: the create failed and the object is not this manifest (or could not be read back).
    """
    try:
        if store.write_if_absent(name, data):
            return True
    except RemoteError as exc:
        if not _holds(store, name, data):
            raise
        log.info("Writing %s failed (%s), but the store holds this manifest: the answer to the write was lost.",
                 store.url_of(name), exc)
        return True
    if _holds(store, name, data):
        log.info("%s existed already with this commit's manifest: a retried write found its own first "
                 "attempt.", store.url_of(name))
        return True
    return False


def _holds(store: RemoteStore, name: str, data: bytes) -> bool:
    """True when object ``name`` holds exactly ``data``; False when it does not, or cannot be read now."""
    try:
        return store.read_bytes(name) == data
    except RemoteError as exc:
        log.debug("Could not read back %s: %s", store.url_of(name), exc)
        return False


def _enter_commit_point(store: RemoteStore, step: int) -> TransferScope | None:
    """Pass the point of no return of the calling context's transfer scope, if it has one (the uploader's
    commits; ``cancel.TransferScope.enter_commit_point``): the manifest and the commit-log entry are then written
    whole, whatever cancel comes (a request cut there may have been applied by the store, leaving a checkpoint
    committed that its uploader reported abandoned). The scope; None without one.

    Raises:
        UploadError: the scope (or the store) was cancelled first: the commit point is not written (the cause is
            a ``TransferCancelled``).
    """
    scope = store.cancel.current()
    if scope is not None and not scope.enter_commit_point():
        error = UploadError(f"Checkpoint step {step} was not committed to {store.url}: its upload was cancelled "
                            "before its commit point.", url=store.url, step=step)
        error.__cause__ = TransferCancelled(f"commit of step {step} to {store.url} cancelled")
        raise error
    return scope


def _leave_commit_point(scope: TransferScope | None) -> None:
    """The commit point was not written after all (a round starts again): ``scope`` can be cancelled again."""
    if scope is not None:
        scope.leave_commit_point()


class _Redo(Exception):
    """An object of the commit in progress was deleted by an announced deletion: start the round again."""


class _IntactCheck:
    """Before the commit entry is appended: if someone announced deletions of the commit's objects after
    they were uploaded (``cloudckpt gc`` on what looked like old debris), wait them out and look again."""

    def __init__(self, writer: Writer, ckpt: LocalCheckpoint, manifest: Manifest, names: list[str],
                 uploaded_at: int) -> None:
        self.writer, self.ckpt, self.manifest, self.names, self.uploaded_at = writer, ckpt, manifest, names, uploaded_at
        self.objects: list[RemoteObject] | None = None  # a newer listing, when one was needed

    def __call__(self, state: LogState) -> None:
        later = [d for d in state.deletes if d.index > self.uploaded_at and d.party != self.writer.party
                 and set(self.names).intersection(d.names)]
        if not later:
            return
        self.writer.wait_for_deletes(set(self.names), state)
        self.objects = self.writer.store.list_objects()
        sizes = {o.name: o.size for o in self.objects}
        expected = {f.name: f.size for f in self.manifest.files}
        if self.manifest.name not in sizes or any(sizes.get(n) != size for n, size in expected.items()):
            log.warning("Objects of step %d were deleted before it was committed; uploading it again.", self.ckpt.step)
            raise _Redo()
        self.uploaded_at = state.last_index


def _in_place(store: RemoteStore, ckpt: LocalCheckpoint, name: str) -> bool:
    """True when the object ``name`` is the local file itself (a plain local checkpoint directory)."""
    return store.is_local and name in ckpt.files and \
        os.path.abspath(ckpt.files[name]) == os.path.abspath(store.path(name))


def committed_in_place(store: RemoteStore, ckpt: LocalCheckpoint) -> bool:
    """True when every file of ``ckpt`` is the store's own object (a plain local directory committed in place,
    no copy): the framework that wrote the files there keeps the directory's TF state file, which a commit
    then leaves alone (see the module docstring)."""
    return bool(ckpt.files) and all(_in_place(store, ckpt, name) for name in ckpt.files)


def _check_sizes(store: RemoteStore, manifest: Manifest,
                 earlier: Collection[str] = ()) -> list[RemoteObject] | None:
    """List the directory and check each uploaded file's size, and its crc32c where the listing carries the
    store's own (GCS computes it from the bytes it received; gcsfs cannot send one to be checked at write
    time); the listing. None when an object uploaded in an earlier round of the commit (``earlier``) is gone or
    has another size (or crc32c, where listed): another party deleted it meanwhile (it was uncommitted), the
    commit goes round again.

    Raises:
        IntegrityError: an object uploaded in this round has the wrong size or crc32c.
    """
    objects = store.list_objects()
    remote = {o.name: o for o in objects}
    for entry in manifest.files:
        found = remote.get(entry.name)
        if entry.name in earlier and (found is None or found.size != entry.size
                                      or found.crc32c is not None and found.crc32c != entry.crc32c):
            what = ("gone" if found is None else f"{found.size} bytes" if found.size != entry.size
                    else f"another object (crc32c {found.crc32c})")
            log.warning("%s, uploaded by this commit in an earlier round, is %s; going round again.",
                        store.url_of(entry.name), what)
            return None
        if found is None or found.size != entry.size:
            raise IntegrityError(
                f"Uploaded {store.url_of(entry.name)} has size {found and found.size}, expected {entry.size}; "
                "the checkpoint was not committed.")
        if found.crc32c is not None and found.crc32c != entry.crc32c:
            raise IntegrityError(
                f"Uploaded {store.url_of(entry.name)} has crc32c {found.crc32c} in the store, expected "
                f"{entry.crc32c} (the local file's): corrupted on the way; the checkpoint was not committed.")
    return objects


def _keep_committed(writer: Writer, ckpt: LocalCheckpoint, mine: Manifest, record: CommitRecord,
                    existing: Manifest, sizes: dict[str, int], state: LogState, pool: Mapper) -> CommitResult:
    """A save of a step already committed in this writer's lineage (typically the save TF makes right
    after a restore).

    A committed checkpoint is never replaced: if the tensors differ, the
    committed one stays and this save is refused. If they are the same,
    objects that went missing or were truncated are re-uploaded from the
    local copy, whose bytes the manifest already vouches for ("healed").
    """
    store = writer.store
    if not existing.same_tensors(mine):
        reason = (f"step {ckpt.step} is already committed in {store.url} with different tensor data (commit "
                  f"{record.commit_id}); keeping the committed checkpoint and not uploading this save (a run "
                  "restarted from an older state?)")
        log.warning("Not committing: %s.", reason)
        return CommitResult(existing, 0, REFUSED, reason)
    ours = {f.name: f for f in mine.files}
    broken = [f.name for f in existing.files if sizes.get(f.name) != f.size and f.name in ours
              and ours[f.name].key == f.key]
    if not broken:
        return CommitResult(existing, 0, ALREADY_COMMITTED)
    log.warning("Re-uploading %s of committed step %d: missing or truncated in the store.", broken, ckpt.step)
    scope = store.cancel.current()
    if scope is not None:  # the uploader's: a cancel from here on abandons a heal, not an uncommitted upload
        scope.healing = True
    short = [n for n in broken if n in sizes]
    if short and not writer.delete(short, reason="heal", planned_at=state.last_index, step=ckpt.step):
        raise UploadError(f"Could not replace truncated objects {short} of committed step {ckpt.step} in "
                          f"{store.url}: the directory changed meanwhile; the next save tries again.",
                          url=store.url, step=ckpt.step)
    writer.wait_for_deletes(set(broken), writer.state(step=ckpt.step))
    _begin_round(store, sum(ours[n].size for n in broken))  # what the heal sends, not the whole checkpoint
    _map(pool, lambda name: store.put_file_if_absent(ckpt.files[name], name, ours[name].checksummed_ranges()), broken)
    return CommitResult(existing, sum(ours[n].size for n in broken), HEALED)


def _upload_changed_extras(store: RemoteStore, extras: dict[str, str]) -> None:
    """Upload files such as ``graph.pbtxt`` whenever their content differs from the stored object
    (compared by size, and byte for byte when the sizes are equal)."""
    for name, path in sorted(extras.items()):
        if store.size(name) == os.path.getsize(path):
            with open(path, "rb") as f:
                if store.read_bytes(name) == f.read():
                    continue
        store.put_file(path, name)


def write_state_file(store: RemoteStore, state: LogState | None = None) -> None:
    """Rewrite the remote state file: the current lineage's committed checkpoints, the head last
    (without a commit log: every manifest). Removed if none is left. Checkpoints whose save time the
    log records get ``tf.train.CheckpointManager``'s timestamps (``layout.state_file_timestamps``).

    ``state``: the log as the caller just saw it (a writer after its own append); read otherwise.

    Callers: a commit to a directory that is not the checkpoint's own (``commit_checkpoint``), retention
    that deletes files (``retention.apply_retention``), ``rollback``. Never while a Saver writes the
    directory in place (a commit in place, retention after TF's ``max_to_keep``): the state file is TF's
    there, and a second writer would race it (module docstring). The write is atomic (``write_atomic``).

    Raises:
        RemoteError: the store could not be read or written.
    """
    if state is None:
        names = [o.name for o in store.list_objects()]
        entries = CommitLog.of(store).refresh()
        state = fold(entries) if entries else None
        present = set(names)
    else:
        present = None
    saved_at: dict[str, float | None] = {}
    if state is not None:
        records = [c for c in state.lineage()
                   if c.commit_id not in state.retired and (present is None or c.manifest in present)]
        prefixes = [c.prefix for c in records]
        saved_at = {c.prefix: c.saved_at for c in records}
    else:
        prefixes = [p for p, _ in committed_prefixes(names)]
    if prefixes:
        timestamps, last_preserved = state_file_timestamps(prefixes, saved_at)
        store.write_atomic(STATE_FILE, render_state_file(prefixes, timestamps=timestamps,
                                                         last_preserved=last_preserved))
    else:
        store.delete([STATE_FILE])
