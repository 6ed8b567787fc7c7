"""Child process for tests/test_signals.py: sets a SIGTERM disposition, drives watchers, reports what happens.

    python sigterm_child.py DISPOSITION STEP...

DISPOSITION: ``dfl`` (SIG_DFL), ``ign`` (SIG_IGN) or ``call`` (a Python handler printing ``called <signum>``).
Each step prints one line once it returned, so the test sees how far the process got:

    start:W[:SOURCES]        PreemptionWatcher(SOURCES (comma-separated, default sigterm), poll 0.05 s).start()
    stop:W                   W.stop() in the main thread
    stop-thread:W            W.stop() in another thread (joined)
    trigger:W:SOURCE:SECS    W.trigger(SOURCE, "test", SECS)
    wait:W                   W.wait(10): a metadata notice
    wrap                     install, on top, a Python handler printing "wrapper" and chaining to the current one
    term                     os.kill(own pid, SIGTERM), then sleep 0.2 s; prints "done term N" (N: SIGTERMs sent)
    int                      os.kill(own pid, SIGINT): prints "keyboardinterrupt" if that was raised
    report:W                 JSON {"notices": [[source, received_at, deadline], ...], "hard_stop_at": ...}
    disposition              "disposition original" or "disposition changed <repr>"
    threads                  JSON list of the names of threads alive that were not at the start

Metadata URLs come from CLOUDCKPT_*_METADATA_URL; the test points them at 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from cloudckpt.preemption import PreemptionWatcher


def out(*parts: object) -> None:
    print(*parts, flush=True)


def called(signum: int, frame: object) -> None:
    out("called", signum)


def main(argv: list[str]) -> None:
    disposition = {"dfl": signal.SIG_DFL, "ign": signal.SIG_IGN, "call": called}[argv[0]]
    signal.signal(signal.SIGTERM, disposition)
    original = signal.getsignal(signal.SIGTERM)
    threads_before = set(threading.enumerate())
    watchers: dict[str, PreemptionWatcher] = {}
    terms = 0
    for step in argv[1:]:
        op, *args = step.split(":")
        if op == "start":
            sources = args[1].split(",") if len(args) > 1 else ["sigterm"]
            watcher = watchers.setdefault(args[0], PreemptionWatcher(sources, poll_interval=0.05))
            watcher.start()
        elif op == "stop":
            watchers[args[0]].stop()
        elif op == "stop-thread":
            thread = threading.Thread(target=watchers[args[0]].stop)
            thread.start()
            thread.join()
        elif op == "trigger":
            watchers[args[0]].trigger(args[1], "test", float(args[2]))
        elif op == "wait":
            assert watchers[args[0]].wait(10), "no notice within 10 s"
        elif op == "wrap":
            below = signal.getsignal(signal.SIGTERM)

            def wrapper(signum: int, frame: object, below: object = below) -> None:
                out("wrapper")
                below(signum, frame)  # type: ignore[operator]

            signal.signal(signal.SIGTERM, wrapper)
        elif op == "term":
            terms += 1
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the Python handler has run when this returns (before the next bytecode at the latest)
            step = f"term {terms}"
        elif op == "int":
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                out("keyboardinterrupt")
        elif op == "report":
            watcher = watchers[args[0]]
            out(json.dumps({"notices": [[n.source, n.received_at, n.deadline] for n in watcher.notices],
                            "hard_stop_at": watcher.hard_stop_at}))
        elif op == "disposition":
            current = signal.getsignal(signal.SIGTERM)
            same = current is original or (not callable(original) and current == original)
            out("disposition original" if same else f"disposition changed {current!r}")
        elif op == "threads":
            out(json.dumps(sorted(t.name for t in set(threading.enumerate()) - threads_before)))
        else:
            raise SystemExit(f"unknown step {step!r}")
        out("done", step)


if __name__ == "__main__":
    main(sys.argv[1:])
