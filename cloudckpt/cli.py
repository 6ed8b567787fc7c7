"""The ``cloudckpt`` command line.

Exit codes: 0 ok, 1 a check failed, 2 usage or configuration error. Errors
are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from ._version import __version__
from .errors import CloudCkptError, ConfigError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small model with checkpoints committed to an embedded S3 server."""
    from .demo import run_demo

    print(f"Training {args.steps} steps, saving every {args.save_steps}, to an in-process S3 server ...", flush=True)
    result = run_demo(steps=args.steps, save_steps=args.save_steps)
    print(f"\nCommitted checkpoints in {result.url}:")
    print(f"  {'step':>6}  {'created (UTC)':<20}  {'size':>9}  files")
    for c in result.checkpoints:
        print(f"  {c.step:>6}  {c.created_at:<20}  {_human_size(c.size):>9}  {len(c.files)}")
    s = result.stats
    print(f"\nUploader: {s.committed} committed, {s.dropped} dropped, {s.failed} failed, "
          f"{_human_size(s.bytes_uploaded)} uploaded, {s.retries} retries; "
          f"latest committed step {s.last_committed_step}.")
    ok = bool(result.checkpoints) and result.checkpoints[-1].step == result.last_step
    print("OK: the final checkpoint is committed." if ok else "FAILED: the final checkpoint is not committed.")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="cloudckpt", description="Inspect, verify, fetch and clean TensorFlow checkpoints in object stores.")
    parser.add_argument("--version", action="version", version=f"cloudckpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="train a small model with checkpoints going to an embedded S3 server",
                          description=cmd_demo.__doc__)
    demo.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    demo.add_argument("--save-steps", type=int, default=50, help="save a checkpoint every N steps (default: 50)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cloudckpt`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"cloudckpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CloudCkptError as exc:
        if args.debug:
            raise
        print(f"cloudckpt: error: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        print("cloudckpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
