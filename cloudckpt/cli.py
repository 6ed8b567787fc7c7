"""The ``cloudckpt`` command line.

Subcommands::

    cloudckpt ls URL [--json]                         committed and incomplete checkpoints, by step and name
    cloudckpt verify URL [--step N | --name NAME | --all]
                                                      re-read and check size + crc32c
    cloudckpt pull URL DIR [--step N | --name NAME]   download + verify; tf.train.latest_checkpoint(DIR) works
    cloudckpt push DIR URL [--part-size SIZE] [--multipart-threshold SIZE] [--files-in-flight N]
                   [--parts-in-flight N]              upload and commit an existing local TF checkpoint directory
    cloudckpt rollback URL (--step N | --name NAME)   make it the latest again (newer ones: superseded)
    cloudckpt gc URL --keep N [--keep-every-hours H] [--grace-hours H] [--dry-run]
    cloudckpt demo                                    train a small model against an embedded S3 server

Exit codes: ``EXIT_CODES`` below, the one list of them (``--help`` prints it): 0 ok, 1 a check failed,
2 usage or configuration error, 130 interrupted (Ctrl-C), 141 the output's reader went away (SIGPIPE),
143 terminated (SIGTERM). Errors are one line on stderr; ``--debug`` shows the traceback and cloudckpt's
debug log.

Ctrl-C and SIGTERM end a command the same way: transfers in flight are
cancelled (on ``s3://``, within about 1 MiB of each request; multipart
uploads started are aborted), a ``pull`` removes its staging directory, and
nothing half-transferred is committed or moved into place. A second SIGTERM
during that cleanup terminates the process at once (exit 143 from the kill).
A Ctrl-C while the command starts (its modules loading: ``import cloudckpt``
loads its public names at first use, so they load inside ``main``) exits 130
with the same one line.

Only ``demo`` imports TensorFlow; the other subcommands stay fast to start.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import re
import signal
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from ._version import __version__
from .errors import DEBUG_HINT, CloudCkptError, ConfigError, human_size

if TYPE_CHECKING:
    from .catalog import CheckpointInfo, DirectoryScan
    from .push import PushReport
    from .remote import RemoteStore
    from .restore import VerifyReport
    from .retry import RetryPolicy
    from .transfer import TransferOptions

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM: what a shell reports for them
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away (`| head`)
DEFAULT_MAX_ATTEMPTS = 3
CLI_DEBUG_HINT = "rerun with --debug for details"  # in place of the library's errors.DEBUG_HINT
# Every exit code of the command line and what it means: ``--help`` prints this list (README's matches it).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "ok"),
    (EXIT_CHECK_FAILED, "a check failed: corrupt, missing or unreadable checkpoint, nothing committed to verify "
                        "or pull, or a storage error"),
    (EXIT_USAGE, "usage or configuration error: bad arguments or storage options, unknown URL scheme, missing "
                 "bucket or local directory"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C): transfers in flight cancelled, nothing half-transferred "
                       "committed"),
    (EXIT_BROKEN_PIPE, "the output's reader went away before the output was written (a long cloudckpt ls URL "
                       "| head -1), as a shell reports a command SIGPIPE ended"),
    (EXIT_TERMINATED, "terminated (SIGTERM: a shutdown, docker stop, kill), cleaned up as after a Ctrl-C"),
)


def _exit_codes_help() -> str:
    """``EXIT_CODES`` as an argparse epilog section: one code a paragraph, wrapped to 79 columns."""
    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES:
        lines.append(textwrap.fill(meaning, 79, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7,
                                   break_on_hyphens=False))
    return "\n".join(lines) + "\n"


STORAGE_OPTIONS_HELP = """\
storage options:
  --storage-option KEY=VALUE (repeatable) is passed to the fsspec filesystem of
  the URL (s3fs, gcsfs, adlfs...). VALUE is converted like JSON: true/false,
  null, integers and floats become those types, {...} and [...] are parsed as
  JSON; anything else is a string (quote it to force a string: token='"123"').
  A dotted KEY nests: client_kwargs.region_name=us-east-1 passes
  {"client_kwargs": {"region_name": "us-east-1"}}. Values are never printed.
  Without options the backends' usual credentials apply (AWS_ACCESS_KEY_ID /
  AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_
  CREDENTIALS, instance metadata...).
  Example: cloudckpt ls s3://bucket/run --storage-option endpoint_url=http://127.0.0.1:9000

""" + _exit_codes_help()


# -- helpers -------------------------------------------------------------------------------------

def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _err(message: str) -> None:
    print(f"cloudckpt: {message}", file=sys.stderr, flush=True)


def _coerce(value: str) -> Any:
    """``true``/``false``/``null``/numbers/JSON objects and arrays/quoted strings -> Python; else the string."""
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        pass
    if lowered not in ("nan", "inf", "-inf", "infinity", "-infinity"):
        try:
            return float(value)
        except ValueError:
            pass
    if value[:1] in ("{", "[", '"'):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(
                "a --storage-option value starting with {, [ or \" must be valid JSON") from None
    return value


def storage_option(text: str) -> tuple[list[str], Any]:
    """argparse type of ``--storage-option``: ``a.b=value`` -> (["a", "b"], coerced value).

    Error messages name the key only: values may hold secrets.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise argparse.ArgumentTypeError("expected KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
    path = key.split(".")
    if not key or any(not part for part in path):
        raise argparse.ArgumentTypeError("expected KEY=VALUE with a non-empty KEY (dotted parts non-empty)")
    return path, _coerce(value)


def build_storage_options(pairs: Sequence[tuple[list[str], Any]] | None) -> dict[str, Any]:
    """Merge parsed ``--storage-option`` pairs into one (nested) dict; conflicting keys are a ConfigError."""
    options: dict[str, Any] = {}
    for path, value in pairs or ():
        node = options
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--storage-option {'.'.join(path[:i + 1])} is given both as a value and as "
                                  f"a group of nested keys ({'.'.join(path)}).")
            node = child
        last = path[-1]
        if isinstance(node.get(last), dict) and not isinstance(value, dict):
            raise ConfigError(f"--storage-option {'.'.join(path)} is given both as a value and as a group of "
                              "nested keys.")
        node[last] = value
    return options


def _retry(args: argparse.Namespace) -> "RetryPolicy":
    """The CLI's retry policy: --max-attempts, with waits short enough for an interactive command."""
    from .retry import RetryPolicy

    return RetryPolicy(max_attempts=args.max_attempts, initial_backoff=0.5, max_backoff=8.0, deadline=120.0)


def _open_store(args: argparse.Namespace, url: str) -> "RemoteStore":
    """The directory at ``url`` (``remote.open_directory``: a missing bucket or local directory is a
    ConfigError, exit 2). Output names it by ``store.url``, its display form (credentials masked)."""
    from .remote import open_directory

    return open_directory(url, build_storage_options(args.storage_option), retry=_retry(args))


class _ByteProgress:
    """tqdm byte bars on stderr, one per checkpoint, when it is a terminal; silent otherwise (scripts, logs, CI).

    ``update(checkpoint, bytes)`` is the library's ``progress`` callback, called from several download
    threads, hence the lock; ``close`` removes the bar before a result line is printed.
    """

    def __init__(self, verb: str) -> None:
        self._verb = verb
        self._tty = sys.stderr.isatty()
        self._bar: Any = None
        self._of: "CheckpointInfo | None" = None
        self._lock = threading.Lock()

    def update(self, checkpoint: "CheckpointInfo", delta: int) -> None:
        if not self._tty or not delta:
            return
        with self._lock:
            if self._of is not checkpoint:
                self._close()
                from tqdm import tqdm

                self._of = checkpoint
                self._bar = tqdm(total=checkpoint.size, desc=f"{self._verb} step {checkpoint.step}", unit="B",
                                 unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False,
                                 dynamic_ncols=True)
            self._bar.update(delta)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = self._of = None

    def __enter__(self) -> "_ByteProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scan(store: "RemoteStore") -> "DirectoryScan":
    from .catalog import scan_directory

    return scan_directory(store)


def _manifest_step(name: str) -> int:
    from .layout import parse_manifest_name

    parsed = parse_manifest_name(name)
    return parsed[1] if parsed else -1


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, for the command's output; the library's "rerun with logging at DEBUG"
    becomes the command's ``--debug``."""
    text = str(exc).strip().replace(DEBUG_HINT, CLI_DEBUG_HINT)
    return " ".join(text.split()) if text else type(exc).__name__


def _steps(checkpoints: Sequence["CheckpointInfo"], also_named: set[int] | frozenset[int] = frozenset()) -> str:
    """``"3, 6 (ckpt-2-0.52-6), 6 (ckpt-2-0.47-6)"``: the steps of ``checkpoints``, each with its name where
    its step is there more than once or in ``also_named`` (two names committed at one step)."""
    counts: dict[int, int] = {}
    for c in checkpoints:
        counts[c.step] = counts.get(c.step, 0) + 1
    return ", ".join(f"{c.step} ({c.name})" if counts[c.step] > 1 or c.step in also_named else str(c.step)
                     for c in checkpoints)


def _checkpoint_name(text: str) -> str:
    """argparse type of ``--name``: a checkpoint's name as ``cloudckpt ls`` shows it (no directory part)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a checkpoint name as cloudckpt ls shows it, e.g. model.ckpt-30")
    if "/" in text:
        raise argparse.ArgumentTypeError(f"expected a checkpoint name as cloudckpt ls shows it (e.g. "
                                         f"{text.rstrip('/').rsplit('/', 1)[-1] or 'model.ckpt-30'}), without "
                                         f"its directory, got {text!r}")
    return text


# -- ls ------------------------------------------------------------------------------------------

def cmd_ls(args: argparse.Namespace) -> int:
    """List the checkpoints in a remote directory: committed ones (the current lineage, whose last one
    is the latest), superseded ones (committed in an abandoned lineage: after a rollback, or by a
    writer that a newer one replaced), incomplete uploads (files of no committed checkpoint) and
    unreadable manifests."""
    from .layout import parse_manifest_name, parse_object_name

    store = _open_store(args, args.url)
    scan = _scan(store)
    rows: list[dict[str, Any]] = []
    latest = scan.committed[-1] if scan.committed else None
    commit_order: dict[str, int] = {}  # prefix -> place in its list (the current lineage: oldest commit first)
    for checkpoints in (scan.committed, scan.superseded):
        for i, c in enumerate(checkpoints):
            commit_order[c.prefix] = i
            rows.append({"step": c.step, "status": c.status, "created_at": c.created_at, "size": c.size,
                         "files": len(c.files), "name": c.name, "prefix": c.prefix, "latest": c is latest,
                         "commit_id": c.commit_id, "writer_id": c.writer_id})
    for inc in scan.incomplete:
        newest = max((o.modified for o in inc.objects if o.modified is not None), default=None)
        rows.append({"step": inc.step, "status": "incomplete", "created_at": _iso(newest), "size": inc.size,
                     "files": len(inc.objects), "name": inc.prefix.rsplit("/", 1)[-1], "prefix": inc.prefix})
    modified = {o.name: o.modified for o in scan.objects}
    for name, error in scan.unreadable.items():
        prefix = (parse_manifest_name(name) or (name, -1))[0]
        objs = [o for o in scan.objects if (p := parse_object_name(o.name)) and p[0] == prefix
                and o.name != name]
        rows.append({"step": _manifest_step(name), "status": "unreadable", "created_at": _iso(modified.get(name)),
                     "size": sum(o.size for o in objs), "files": len(objs), "name": prefix,
                     "prefix": store.url_of(prefix), "error": _one_line(error)})
    order = {"committed": 0, "superseded": 1, "unreadable": 2, "incomplete": 3}
    # By step; at one step (two names: a Keras template with a metric, fit again from scratch) the older commit
    # first, so the last committed row of a step is the one `--step` picks.
    rows.sort(key=lambda r: (r["step"], order[r["status"]], commit_order.get(r["prefix"], 0), r["prefix"]))

    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        from .catalog import subdirectories_hint

        print(f"No checkpoints in {store.url}.{subdirectories_hint(store)}")
    else:
        print(f"{'step':>8}  {'created (UTC)':<20}  {'size':>9}  {'files':>5}  {'status':<10}  name")
        for r in rows:
            print(f"{r['step']:>8}  {r['created_at']:<20}  {human_size(r['size']):>9}  {r['files']:>5}  "
                  f"{r['status']:<10}  {r['name']}")
    for r in rows:
        if r["status"] == "unreadable":
            _err(f"error: step {r['step']}: {r['error']}")
    return EXIT_CHECK_FAILED if scan.unreadable else EXIT_OK


# -- verify --------------------------------------------------------------------------------------

def _problem_text(check: Any) -> str:
    if check.status == "missing":
        return "missing (the manifest lists it, the store does not have it)"
    if check.status == "size mismatch":
        return f"size mismatch (expected {check.expected_size} bytes, found {check.found_size})"
    ranges = ", ".join(f"{i} (bytes {a}-{b - 1})" for i, (a, b) in zip(check.bad_parts, check.bad_ranges()))
    parts = f"; {check.part_size // (1 << 20)} MiB parts differing, from 0: {ranges}" if ranges else ""
    return f"checksum mismatch (expected crc32c {check.expected_crc32c}, found {check.found_crc32c}{parts})"


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read committed checkpoints from the store and check every file's size and crc32c against
    the manifest (--store-checksums: trust the store's own crc32c where it agrees). Checks the latest
    checkpoint by default (an unreadable newest manifest fails), the one(s) at --step N, the one named
    --name NAME (as cloudckpt ls shows it); --all includes superseded ones."""
    from .restore import verify_checkpoints

    with _ByteProgress("verify") as bars:
        def render(report: "VerifyReport") -> None:
            bars.close()
            _print_verified(report)

        result = verify_checkpoints(args.url, args.step, all_steps=args.all, name=args.name,
                                    storage_options=build_storage_options(args.storage_option), retry=_retry(args),
                                    use_store_checksums=args.store_checksums, progress=bars.update,
                                    on_report=render)
    failed = [r.step for r in result.failed]
    summary = f"{len(result.reports) - len(failed)} of {len(result.reports)} checkpoint(s) in {result.url} verified OK"
    if failed:
        _err(f"error: verification failed for step(s) {', '.join(map(str, failed))}; {summary}.")
        return EXIT_CHECK_FAILED
    print(f"{summary}.")
    return EXIT_OK


def _print_verified(report: "VerifyReport") -> None:
    from .restore import RETIRED, UNREADABLE

    superseded = "superseded, " if report.superseded else ""  # as `ls` and `gc` say it
    if report.status == UNREADABLE:
        print(f"FAILED  step {report.step}: unreadable manifest: {_one_line(report.error)}", flush=True)
    elif report.status == RETIRED:
        print(f"GONE    step {report.step}: {report.name} was retired (retention) while it was being verified",
              flush=True)
    elif report.ok:
        print(f"OK      step {report.step}: {report.name} ({superseded}{len(report.files)} files, "
              f"{human_size(report.size)})", flush=True)
    else:
        print(f"FAILED  step {report.step}: {report.name} ({superseded}{len(report.problems)} of "
              f"{len(report.files)} files bad)")
        for check in report.problems:
            print(f"          {check.name}: {_problem_text(check)}", flush=True)


# -- pull ----------------------------------------------------------------------------------------

def cmd_pull(args: argparse.Namespace) -> int:
    """Download a committed checkpoint (newest by default; --step N, --name NAME as cloudckpt ls shows it)
    into a local directory and verify every file before moving it into place; afterwards
    tf.train.latest_checkpoint(DIR) returns it. A failed pull leaves DIR as it was."""
    from .restore import pull_checkpoint
    from .transfer import TransferOptions

    transfer = TransferOptions(max_download_streams=args.streams) if args.streams is not None else None
    with _ByteProgress("pull") as bars:
        result = pull_checkpoint(args.url, args.dir, args.step, name=args.name,
                                 storage_options=build_storage_options(args.storage_option), retry=_retry(args),
                                 progress=bars.update, transfer=transfer)
    info = result.checkpoint
    if result.passed_over:
        _err(f"warning: newer step(s) {list(result.passed_over)} have unreadable manifests (see cloudckpt ls); "
             f"pulled step {info.step}.")
    print(f"Pulled step {info.step} ({len(info.files)} files, {human_size(info.size)}, verified) "
          f"into {result.local_prefix}")
    return EXIT_OK


# -- push ----------------------------------------------------------------------------------------

def cmd_push(args: argparse.Namespace) -> int:
    """Upload the checkpoints of an existing local TF checkpoint directory (e.g. written by TF's stock
    CheckpointSaverHook) and commit each with its manifest, oldest first; graph.pbtxt is uploaded too.
    Checkpoints already committed with identical content are skipped, so push can be re-run."""
    from .push import push_checkpoints

    result = push_checkpoints(args.dir, args.url, storage_options=build_storage_options(args.storage_option),
                              retry=_retry(args), on_report=_print_pushed, transfer=_push_transfer(args))
    skipped = len(result.already_there)
    print(f"Pushed {len(result.uploaded)} checkpoint(s) to {result.url}"
          + (f" ({skipped} already there)" if skipped else "") + f"; latest step {result.newest_step}.")
    return EXIT_OK


def _push_transfer(args: argparse.Namespace) -> "TransferOptions | None":
    """The ``TransferOptions`` of ``push``'s flags (each unset one the default); None when none is set.

    Raises:
        ConfigError: a combination ``TransferOptions`` refuses (each flag's own range is checked by argparse).
    """
    from .transfer import TransferOptions

    given = {field: value for field, value in (("part_size", args.part_size),
                                               ("multipart_threshold", args.multipart_threshold),
                                               ("max_files_in_flight", args.files_in_flight),
                                               ("max_parts_in_flight", args.parts_in_flight)) if value is not None}
    return TransferOptions(**given) if given else None


def _print_pushed(report: "PushReport") -> None:
    from .push import ALREADY_COMMITTED, HEALED, REFUSED, VANISHED

    if report.outcome == VANISHED:
        _err(f"warning: {report.reason}; skipped.")
    elif report.outcome == REFUSED:
        _err(f"warning: step {report.step}: not committed: {report.reason}.")
    elif report.outcome == ALREADY_COMMITTED:
        print(f"step {report.step}: {report.name} already committed with identical content, skipped", flush=True)
    elif report.outcome == HEALED:
        print(f"step {report.step}: {report.name} already committed; re-uploaded missing or truncated objects "
              f"({human_size(report.bytes_uploaded)})", flush=True)
    else:
        copied = f", {human_size(report.bytes_copied)} of it copied server-side" if report.bytes_copied else ""
        print(f"step {report.step}: committed {report.name} ({report.files} files, {human_size(report.size)}"
              f"{copied})", flush=True)


# -- rollback ------------------------------------------------------------------------------------

def cmd_rollback(args: argparse.Namespace) -> int:
    """Make the committed checkpoint at --step N (or named --name NAME) the latest again, on purpose:
    newer checkpoints become superseded (kept and listed, never restored, deleted first by retention and
    gc), any writer still running on URL is fenced (it stops with FencedError at its next commit), and the
    next run resumes from it. Nothing is deleted. The checkpoint is verified first."""
    from .rollback import rollback

    result = rollback(args.url, args.step, name=args.name,
                      storage_options=build_storage_options(args.storage_option), retry=_retry(args))
    latest = result.latest
    newer = [c for c in result.superseded if c.step >= latest.step and c.commit_id != latest.commit_id]
    print(f"Rolled back {latest.prefix.rsplit('/', 1)[0]} to step {latest.step} "
          f"({latest.name}, commit {latest.commit_id}).")
    print(f"Superseded now: {_steps(newer, also_named={latest.step}) or 'none'}. Running writers of this directory "
          f"are fenced; the next run resumes from step {latest.step}.")
    return EXIT_OK


# -- gc ------------------------------------------------------------------------------------------

def cmd_gc(args: argparse.Namespace) -> int:
    """Delete old committed checkpoints (keeping the newest --keep, and one per --keep-every-hours) and
    the files of uploads that never committed (older than --grace-hours). The newest committed
    checkpoint is always kept. Manifests go first, so a reader never sees a committed checkpoint with
    missing files."""
    from .retention import gc

    result = gc(args.url, args.keep, keep_every_hours=args.keep_every_hours, grace_seconds=args.grace_hours * 3600.0,
                dry_run=args.dry_run, storage_options=build_storage_options(args.storage_option), retry=_retry(args))
    for step, error in result.left_alone:
        _err(f"warning: leaving step {step} alone: {_one_line(error)}")
    plan = result.plan
    verb = "would delete" if args.dry_run else "delete"
    for c in plan.delete:
        what = "superseded, " if c.status == "superseded" else ""
        print(f"{verb} step {c.step}: {c.name} ({what}{len(c.files) + 1} objects, {human_size(c.size)})")
    for c in plan.vanishing:
        print(f"{verb} step {c.step}: {c.name} (being deleted by TF's max_to_keep in place; retired, "
              f"what is left of its files deleted)")
    for d in plan.debris:
        print(f"{verb} step {d.step}: {d.prefix.rsplit('/', 1)[-1]} (uncommitted upload debris, "
              f"{len(d.objects)} objects, {human_size(d.size)})")
    kept = _steps(plan.keep) or "none"
    if args.dry_run:
        print(f"Dry run: would free {human_size(plan.bytes_freed)} in {result.url}; nothing was deleted. "
              f"Keeping step(s): {kept}.")
    else:
        print(f"Freed {human_size(plan.bytes_freed)} in {result.url}. Kept step(s): {kept}.")
    return EXIT_OK


# -- demo ----------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small model with checkpoints committed to an embedded S3 server."""
    from ._frameworks import import_framework

    try:
        import_framework("tensorflow", "cloudckpt demo", install="pip install 'cloudckpt[demo]'")
    except ModuleNotFoundError as exc:
        if exc.name != "tensorflow":
            raise
        raise ConfigError(str(exc)) from exc
    from .demo import run_demo

    print(f"Training {args.steps} steps, saving every {args.save_steps}, to an in-process S3 server; then a "
          "'new VM' with an empty disk resumes from the bucket ...", flush=True)
    result = run_demo(steps=args.steps, save_steps=args.save_steps)
    print(f"\nThe new VM restored step {result.resumed_from} from the bucket and trained to step {result.last_step}.")
    print(f"\nCommitted checkpoints in {result.url}:")
    print(f"  {'step':>6}  {'created (UTC)':<20}  {'size':>9}  files")
    for c in result.checkpoints:
        print(f"  {c.step:>6}  {c.created_at:<20}  {human_size(c.size):>9}  {len(c.files)}")
    s = result.stats
    print(f"\nUploader of the new VM: {s.committed} committed, {s.dropped} dropped, {s.failed} failed, "
          f"{human_size(s.bytes_uploaded)} uploaded, {s.retries} retries; "
          f"latest committed step {s.last_committed_step}.")
    ok = (bool(result.checkpoints) and result.checkpoints[-1].step == result.last_step
          and result.resumed_from == args.steps)
    print("OK: the final checkpoint is committed." if ok else "FAILED: the final checkpoint is not committed.")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


# -- parser --------------------------------------------------------------------------------------

_DECIMAL_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")  # what a user types; int() also takes "1_0" and "١٠"


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a decimal integer in [low, high] (no upper bound when ``high`` is None); out of
    range at either end, the same error naming the range."""
    bounds = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        if not _DECIMAL_INTEGER.fullmatch(text):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


_non_negative_int = _int_in(0)
_positive_int = _int_in(1)

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30,
               "gib": 1 << 30}  # binary, as rclone's sizes (16M = 16 MiB); 16MB (decimal or not?) is refused


def _size_text(size: int) -> str:
    """``16MiB`` for a whole number of GiB, MiB or KiB, else the bytes."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _size_in(low: int, high: int, multiple_of: int = 1) -> Callable[[str], int]:
    """An argparse type: a number of bytes, plain (``16777216``) or with a binary unit (``16MiB``, ``16M``,
    ``512KiB``, ``1.5GiB``; case-insensitive), in [low, high] and a multiple of ``multiple_of``; the error
    names the range."""
    bounds = f"{_size_text(low)} to {_size_text(high)} ({low} to {high} bytes)"
    multiple = f", a multiple of {_size_text(multiple_of)} ({multiple_of} bytes)" if multiple_of > 1 else ""

    def parse(text: str) -> int:
        match = _SIZE.fullmatch(text)
        factor = _SIZE_UNITS.get(match.group(2).lower()) if match else None
        if match is not None and factor is None and match.group(2).lower() in ("kb", "mb", "gb"):
            unit = match.group(2)
            raise argparse.ArgumentTypeError(f"{unit} is ambiguous (powers of 1000 or 1024?): write "
                                             f"{match.group(1)}{unit[0].upper()}iB (powers of 1024), got {text!r}")
        if match is None or factor is None:
            raise argparse.ArgumentTypeError(f"expected bytes or a size such as 16MiB (units B, KiB, MiB, GiB, "
                                             f"or K, M, G alike: powers of 1024), got {text!r}")
        whole, _, fraction = match.group(1).partition(".")
        numerator = int(whole + fraction) * factor
        scale = 10 ** len(fraction)
        if numerator % scale:
            raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {text!r}")
        value = numerator // scale
        if not low <= value <= high or value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be {bounds}{multiple}, got {text.strip()}")
        return value
    return parse


def _float(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if "_" in text or not text.isascii() or not math.isfinite(value):  # float() also takes "1_0", "inf",
            # "nan" and other scripts' digits ("١", "１２"), which _int_in refuses
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if value <= minimum if strict else value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from .transfer import (DOWNLOAD_STREAMS, MAX_IN_FLIGHT, MAX_PART_SIZE, MAX_PUT_SIZE, MIN_PART_SIZE,
                           PART_ALIGNMENT, TransferOptions)

    defaults = TransferOptions()

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cloudckpt", formatter_class=fmt,
        description=textwrap.fill(
            "Inspect, verify, fetch, upload and clean TensorFlow checkpoints in object stores (S3, GCS or any "
            "fsspec URL). A checkpoint counts as committed only when its manifest (<prefix>.manifest.json, "
            "listing every file's size and crc32c) is written and the directory's commit log "
            "(.cloudckpt/log) records its commit.", 79),
        epilog="Run 'cloudckpt COMMAND --help' for a command's options.\n\n" + STORAGE_OPTIONS_HELP)
    parser.add_argument("--version", action="version", version=f"cloudckpt {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show tracebacks and cloudckpt's debug log (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and cloudckpt's debug log")
    remote = argparse.ArgumentParser(add_help=False)

    def add_remote_options(p: argparse.ArgumentParser, top: bool) -> None:
        # given before the command too (cloudckpt -o K=V ls URL): argparse copies a command's namespace over the
        # top level's, so -o before it goes to a list of its own, joined with the command's in _main; a command's
        # --max-attempts (SUPPRESS unless given) overrides one given before it
        p.add_argument("--storage-option", "-o", metavar="KEY=VALUE", action="append", type=storage_option,
                       default=[], dest="storage_option_before" if top else "storage_option",
                       help="option for the URL's fsspec filesystem, repeatable, e.g. "
                            "endpoint_url=http://127.0.0.1:9000; values true/false/null/numbers/JSON are "
                            "converted, dotted keys nest (client_kwargs.region_name=us-east-1); "
                            "values are never printed" + (" (also accepted after the command)" if top else ""))
        p.add_argument("--max-attempts", type=_positive_int, metavar="N",
                       default=DEFAULT_MAX_ATTEMPTS if top else argparse.SUPPRESS,
                       help="attempts per storage operation on transient errors (throttling, 5xx, connection "
                            "errors), with exponential backoff; 1 disables retries "
                            f"(default: {DEFAULT_MAX_ATTEMPTS})")
    add_remote_options(parser, top=True)
    add_remote_options(remote, top=False)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        description = textwrap.fill(" ".join((func.__doc__ or help_).split()), 79)
        p = sub.add_parser(name, help=help_, description=description,
                           parents=parents, formatter_class=fmt,
                           epilog=STORAGE_OPTIONS_HELP if remote in parents else None)
        p.set_defaults(func=func, takes_storage_options=remote in parents)
        return p

    url_help = "checkpoint directory URL, e.g. s3://bucket/runs/exp1, gs://..., memory://..., or a local path"

    ls = add("ls", cmd_ls, "list committed and incomplete checkpoints", [common, remote])
    ls.add_argument("url", metavar="URL", help=url_help)
    ls.add_argument("--json", action="store_true",
                    help="print a JSON list of objects with step (int), status (committed | superseded | "
                         "incomplete | unreadable), created_at (ISO-8601 UTC), size (bytes), files (count), "
                         "name (what --name of verify, pull and rollback takes), prefix (URL); for committed "
                         "and superseded ones latest (bool), commit_id and writer_id; for unreadable manifests, "
                         "error; instead of the table")

    verify = add("verify", cmd_verify, "re-read checkpoints and check every file's size and crc32c",
                 [common, remote])
    verify.add_argument("url", metavar="URL", help=url_help)
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--step", type=_non_negative_int, metavar="N",
                       help="verify the checkpoint at global step N, each one if several names were committed "
                            "at N (default: the newest)")
    which.add_argument("--name", type=_checkpoint_name, metavar="NAME",
                       help="verify the checkpoint named NAME, as cloudckpt ls shows it (e.g. model.ckpt-30)")
    which.add_argument("--all", action="store_true", help="verify every committed checkpoint")
    verify.add_argument("--store-checksums", action="store_true",
                        help="pass a file without reading its bytes when the crc32c the store keeps of it (S3: "
                             "the full-object CRC32C cloudckpt's uploads send, one HEAD per file; GCS: from the "
                             "listing) equals the manifest's; files without one are re-read. Faster, but it "
                             "shows the object arrived intact, not that it still reads back (rot in the store "
                             "after upload goes unseen). Default: re-read every byte, as a restore does")

    pull = add("pull", cmd_pull, "download and verify a checkpoint into a local directory", [common, remote])
    pull.add_argument("url", metavar="URL", help=url_help)
    pull.add_argument("dir", metavar="DIR", help="local directory to download into (created if missing)")
    chosen = pull.add_mutually_exclusive_group()
    chosen.add_argument("--step", type=_non_negative_int, metavar="N",
                        help="pull the checkpoint at global step N; of two names committed at N (a Keras "
                             "template with a metric, fit again from scratch), the newer commit (default: the "
                             "newest committed)")
    chosen.add_argument("--name", type=_checkpoint_name, metavar="NAME",
                        help="pull the checkpoint named NAME, as cloudckpt ls shows it (e.g. model.ckpt-30)")
    pull.add_argument("--streams", type=_int_in(1, MAX_IN_FLIGHT), metavar="N",
                      help="connections of the download (on s3://, ranged GETs of all its files from one "
                           f"queue), 1 to {MAX_IN_FLIGHT} (default: {DOWNLOAD_STREAMS}, "
                           "TransferOptions.max_download_streams; more may help on a VM with many cores and a "
                           "fast network)")

    push = add("push", cmd_push, "upload and commit an existing local TF checkpoint directory", [common, remote])
    push.add_argument("dir", metavar="DIR",
                      help="local TF checkpoint directory (files such as model.ckpt-1000.index, "
                           ".data-00000-of-00001, .meta)")
    push.add_argument("url", metavar="URL", help=url_help)
    push.add_argument("--part-size", type=_size_in(MIN_PART_SIZE, MAX_PART_SIZE, PART_ALIGNMENT), metavar="SIZE",
                      help="bytes per multipart part (S3) or resumable chunk (GCS): bytes or a size such as 16MiB, "
                           f"{_size_text(MIN_PART_SIZE)} to {_size_text(MAX_PART_SIZE)}, a multiple of "
                           f"{_size_text(PART_ALIGNMENT)} (default: {_size_text(defaults.part_size)}, "
                           "TransferOptions.part_size)")
    push.add_argument("--multipart-threshold", type=_size_in(MIN_PART_SIZE, MAX_PUT_SIZE), metavar="SIZE",
                      help="on s3://, files of at least SIZE (and larger than one part) go in a multipart upload "
                           f"of --part-size parts, smaller ones in one PUT; {_size_text(MIN_PART_SIZE)} to "
                           f"{_size_text(MAX_PUT_SIZE)} (default: {_size_text(defaults.multipart_threshold)}, "
                           "TransferOptions.multipart_threshold)")
    push.add_argument("--files-in-flight", type=_int_in(1, MAX_IN_FLIGHT), metavar="N",
                      help=f"files of a checkpoint checksummed and uploaded at once, 1 to {MAX_IN_FLIGHT} "
                           f"(default: {defaults.max_files_in_flight}, TransferOptions.max_files_in_flight)")
    push.add_argument("--parts-in-flight", type=_int_in(1, MAX_IN_FLIGHT), metavar="N",
                      help=f"parts of one file sent at once, 1 to {MAX_IN_FLIGHT} (default: "
                           f"{defaults.max_parts_in_flight}, TransferOptions.max_parts_in_flight)")

    back = add("rollback", cmd_rollback, "make an older committed checkpoint the latest (newer ones: superseded)",
               [common, remote])
    back.add_argument("url", metavar="URL", help=url_help)
    target = back.add_mutually_exclusive_group(required=True)
    target.add_argument("--step", type=_non_negative_int, metavar="N",
                        help="the committed checkpoint to resume from, by step (see cloudckpt ls); of two names "
                             "committed at N, the newer commit")
    target.add_argument("--name", type=_checkpoint_name, metavar="NAME",
                        help="the committed checkpoint to resume from, by name as cloudckpt ls shows it (e.g. "
                             "model.ckpt-30)")

    gc = add("gc", cmd_gc, "delete old checkpoints and debris of interrupted uploads", [common, remote])
    gc.add_argument("url", metavar="URL", help=url_help)
    gc.add_argument("--keep", type=_non_negative_int, metavar="N", required=True,
                    help="keep the newest N committed checkpoints (0 keeps all of them and only removes "
                         "debris); the newest is always kept. N counts checkpoints, not steps, as TF's "
                         "max_to_keep: two names committed at one step count as two")
    gc.add_argument("--keep-every-hours", type=_float(0.0, strict=True), metavar="H",
                    help="also keep one checkpoint per H hours of run time, like TF's "
                         "keep_checkpoint_every_n_hours (default: off)")
    gc.add_argument("--grace-hours", type=_float(0.0, strict=False), metavar="H", default=1.0,
                    help="remove files of uncommitted checkpoints only when older than H hours, so an "
                         "upload in flight is left alone (default: 1)")
    gc.add_argument("--dry-run", action="store_true",
                    help="only print what would be deleted and the bytes it would free; delete nothing")

    demo = add("demo", cmd_demo, "train a small model with checkpoints going to an embedded S3 server", [common])
    demo.add_argument("--steps", type=_positive_int, default=200, metavar="N",
                      help="training steps (default: 200)")
    demo.add_argument("--save-steps", type=_positive_int, default=50, metavar="N",
                      help="save a checkpoint every N steps (default: 50)")
    return parser


def _traceback_if(debug: bool) -> None:
    """With --debug, print the traceback of the error being handled; the exit code stays the documented one."""
    if debug:
        import traceback

        traceback.print_exc()


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if debug:
        logging.getLogger("cloudckpt").setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cloudckpt`` command line with ``argv`` (default: this process's arguments); its exit code
    (``EXIT_CODES``). Output goes to stdout/stderr; SIGTERM is handled like Ctrl-C while the command runs."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a command runs: while its modules load (argparse's exits are SystemExit)
        _err("interrupted")
        return EXIT_INTERRUPTED


def run() -> NoReturn:
    """Entry point of the ``cloudckpt`` console script (and of ``python -m cloudckpt``): ``main()``, then exit
    with its code. Once the command has ended (its output flushed), a SIGINT or SIGTERM during the
    interpreter's shutdown ends the process at once with that code: a finished ``pull`` is not reported as
    interrupted (130) or terminated (143) because the signal came while Python was exiting."""
    code = main()
    if threading.current_thread() is threading.main_thread():
        def exit_now(signum: int, frame: Any) -> None:
            os._exit(code)  # stdout was flushed by _main; stderr is written unbuffered
        signal.signal(signal.SIGINT, exit_now)
        signal.signal(signal.SIGTERM, exit_now)
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.storage_option = [*args.storage_option_before, *getattr(args, "storage_option", [])]
    if not args.takes_storage_options and (args.storage_option or args.max_attempts != DEFAULT_MAX_ATTEMPTS):
        parser.error(f"{args.command} takes no --storage-option or --max-attempts (it has no URL)")
    _configure_logging(args.debug)
    func: Callable[[argparse.Namespace], int] = args.func
    previous = _terminate_like_ctrl_c()
    try:
        code = func(args)
        # a reader gone (`cloudckpt ls URL | head -1`): BrokenPipeError here, not at exit's flush of a block-
        # buffered stdout (a pipe, without PYTHONUNBUFFERED), which exits 120 with "Exception ignored" on stderr
        sys.stdout.flush()
        return code
    except Terminated:
        _err("terminated")
        return EXIT_TERMINATED
    except ConfigError as exc:
        _traceback_if(args.debug)
        _err(f"error: {_one_line(exc)}")
        return EXIT_USAGE
    except CloudCkptError as exc:
        _traceback_if(args.debug)
        _err(f"error: {_one_line(exc)}")
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `cloudckpt ls URL | head`: not a failed check (1); as `yes | head` ends
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python's docs, "Note on SIGPIPE": no error at exit's flush)
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # local disk trouble: permissions, disk full...
        _traceback_if(args.debug)
        _err(f"error: {_one_line(exc)}")
        return EXIT_CHECK_FAILED
    except Exception as exc:  # noqa: BLE001 - never a bare traceback for users
        _traceback_if(args.debug)
        _err(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        return EXIT_CHECK_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread of the ``cloudckpt`` command: it unwinds like Ctrl-C (transfers
    cancelled, staging directories removed), then the command exits 143."""


def _terminate_like_ctrl_c() -> Any:
    """Make SIGTERM raise ``Terminated`` in the main thread (once: a second SIGTERM gets the disposition
    this replaced, by default terminating at once). Returns that disposition to restore, or None when
    no handler could be installed (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        raise Terminated()
    signal.signal(signal.SIGTERM, on_sigterm)
    return previous if previous is not None else signal.SIG_DFL


if __name__ == "__main__":
    run()
