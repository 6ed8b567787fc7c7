"""The SIGTERM rules (cloudckpt/preemption/signals.py): the decision table without signals, the handler and its
installation in this process (no SIGTERM sent here), then the real thing: child processes that set a disposition,
run watchers and get real SIGTERMs (tests/support/sigterm_child.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudckpt.preemption import PreemptionWatcher, _reset_last_notice
from cloudckpt.preemption.signals import (
    SigtermHandler,
    Step,
    decide,
    install_handler,
    replaced_behaviour,
    uninstall_handler,
    unwrap,
)
from support.fake_metadata import FakeAwsMetadata, FakeGceMetadata

TESTS = Path(__file__).resolve().parent
CHILD = TESTS / "support" / "sigterm_child.py"
DIED_BY_SIGTERM = -signal.SIGTERM  # subprocess's returncode for "terminated by SIGTERM" (143 in a shell)


def python_handler(signum, frame):  # a replaced disposition that is a Python callable
    pass


DISPOSITIONS = [signal.SIG_DFL, None, signal.SIG_IGN, python_handler]


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved if saved is not None else signal.SIG_DFL)
    _reset_last_notice()


# ------------------------------------------------------------- the decision, without signals


@pytest.mark.parametrize("previous, behaviour", [
    (signal.SIG_DFL, Step.TERMINATE), (None, Step.TERMINATE), (signal.SIG_IGN, Step.IGNORE),
    (python_handler, Step.CALL), (SigtermHandler(signal.SIG_DFL, lambda: None), Step.CALL),
])
def test_replaced_behaviour(previous, behaviour):
    assert replaced_behaviour(previous) is behaviour


@pytest.mark.parametrize("previous", DISPOSITIONS)
def test_first_sigterm_while_active_is_only_recorded(previous):
    # never kills, even under SIG_DFL; a replaced callable is deferred until the final checkpoint is in
    assert decide(previous, active=True, first=True) == (
        (Step.RECORD, Step.CALL) if isinstance(previous, SigtermHandler) else (Step.RECORD,))


def test_first_sigterm_reaches_a_running_watcher_underneath():
    underneath = SigtermHandler(signal.SIG_DFL, lambda: None)
    assert decide(underneath, active=True, first=True) == (Step.RECORD, Step.CALL)
    assert decide(python_handler, active=True, first=True) == (Step.RECORD,)


@pytest.mark.parametrize("previous", DISPOSITIONS)
@pytest.mark.parametrize("active, first", [(True, False), (False, True), (False, False)])
def test_second_sigterm_or_inactive_handler_behaves_as_replaced(previous, active, first):
    assert decide(previous, active=active, first=first) == (replaced_behaviour(previous),)


def test_handler_records_once_then_calls_the_previous_callable():
    calls: list[int] = []
    notices: list[str] = []
    handler = SigtermHandler(lambda signum, frame: calls.append(signum), lambda: notices.append("n"))
    handler(signal.SIGTERM, None)
    assert (notices, calls) == (["n"], [])  # recorded; the callable is deferred
    handler(signal.SIGTERM, None)
    assert (notices, calls) == (["n"], [signal.SIGTERM])  # escalation = the callable
    handler.active = False
    handler(signal.SIGTERM, None)
    assert (notices, calls) == (["n"], [signal.SIGTERM] * 2)


def test_inactive_handler_never_records_nor_uses_up_the_first():
    notices: list[str] = []
    shared = threading.Lock()
    handler = SigtermHandler(python_handler, lambda: notices.append("n"), shared)
    handler.active = False
    handler(signal.SIGTERM, None)
    assert notices == [] and not shared.locked()
    handler.active = True
    handler(signal.SIGTERM, None)
    assert notices == ["n"] and shared.locked()
    again = SigtermHandler(python_handler, lambda: notices.append("again"), shared)  # a restarted watcher
    again(signal.SIGTERM, None)
    assert notices == ["n"]  # the shared first was used up: this one is a second SIGTERM


def test_unwrap_skips_inactive_cloudckpt_handlers_only():
    bottom = SigtermHandler(signal.SIG_IGN, lambda: None)
    middle = SigtermHandler(bottom, lambda: None)
    top = SigtermHandler(middle, lambda: None)
    assert unwrap(top) is top
    top.active = middle.active = False
    assert unwrap(top) is bottom
    bottom.active = False
    assert unwrap(top) == signal.SIG_IGN
    assert unwrap(python_handler) is python_handler and unwrap(None) is None


# ------------------------------------------- installing and restoring, in this process (no SIGTERM sent)


def stop_in_thread(handler: SigtermHandler) -> None:
    t = threading.Thread(target=uninstall_handler, args=(handler,))
    t.start()
    t.join()


@pytest.mark.parametrize("original", [signal.SIG_DFL, signal.SIG_IGN, python_handler])
@pytest.mark.parametrize("stops", [("A", "B"), ("B", "A"), ("A-thread", "B"), ("B-thread", "A")])
def test_nested_handlers_restore_the_original_in_any_stop_order(original, stops):
    signal.signal(signal.SIGTERM, original)
    handlers = {"A": install_handler(lambda: None), "B": install_handler(lambda: None)}
    assert handlers["B"].previous is handlers["A"] and handlers["A"].previous == original
    for stop in stops:
        name, _, where = stop.partition("-")
        (stop_in_thread if where else uninstall_handler)(handlers[name])
    assert not handlers["A"].active and not handlers["B"].active
    current = signal.getsignal(signal.SIGTERM)
    assert current is original if callable(original) else current == original


def test_stop_from_a_thread_leaves_a_transparent_handler_that_the_next_install_drops():
    signal.signal(signal.SIGTERM, python_handler)
    handler = install_handler(lambda: None)
    stop_in_thread(handler)
    assert signal.getsignal(signal.SIGTERM) is handler and not handler.active
    assert decide(handler.previous, active=handler.active, first=True) == (Step.CALL,)
    fresh = install_handler(lambda: None)
    assert fresh.previous is python_handler  # the inactive one was unwrapped, not stacked
    uninstall_handler(fresh)
    assert signal.getsignal(signal.SIGTERM) is python_handler


def test_a_handler_installed_on_top_is_left_in_place():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ours = install_handler(lambda: None)
    signal.signal(signal.SIGTERM, python_handler)
    uninstall_handler(ours)
    assert signal.getsignal(signal.SIGTERM) is python_handler and not ours.active


def test_sigint_is_never_touched():
    before = signal.getsignal(signal.SIGINT)
    w = PreemptionWatcher(("sigterm",))
    w.start()
    try:
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        w.stop()
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------ the poller thread ends with stop()


def wait_until(predicate, timeout: float) -> bool:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        event.wait(0.01)
    return bool(predicate())


def cloudckpt_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cloudckpt")]


def test_stop_waits_for_the_poller_request_in_flight():
    with FakeGceMetadata() as gce:
        gce.delay = 0.5  # every answer is held back: stop() comes while a request is in flight
        w = PreemptionWatcher(("gce",), gce_metadata_url=gce.url, poll_interval=0.05, request_timeout=5)
        before = set(threading.enumerate())
        w.start()
        assert wait_until(lambda: gce.arrivals > len(gce.requests), timeout=10)  # arrived, not answered yet
        in_flight = gce.arrivals
        w.stop()
        # stop() joined the poller; the fake server's own request thread may still be finishing its answer
        assert {t for t in set(threading.enumerate()) - before if "process_request_thread" not in t.name} == set()
        assert cloudckpt_threads() == []
        assert len(gce.requests) >= in_flight  # the request in flight was answered before stop() returned
        assert not w.running and w.active_sources == ()


# ------------------------------------------------------------------------- real SIGTERMs, in children


@dataclass
class Child:
    returncode: int
    lines: list[str]
    stderr: str

    def output_of(self, step: str):
        """The JSON line a step printed (the line before ``done <step>``)."""
        index = self.lines.index(f"done {step}")
        return json.loads(self.lines[index - 1])

    def ran(self, step: str) -> bool:
        return f"done {step}" in self.lines


@pytest.fixture(scope="module")
def quiet_metadata() -> Iterator[tuple[str, str]]:
    """GCE and AWS fakes that never announce anything: the children's pollers stay busy until stop()."""
    with FakeGceMetadata() as gce, FakeAwsMetadata() as aws:
        yield gce.url, aws.url


@pytest.fixture
def run(quiet_metadata):
    def run_child(disposition: str, *steps: str, gce: str | None = None, aws: str | None = None) -> Child:
        env = dict(os.environ, CLOUDCKPT_GCE_METADATA_URL=gce or quiet_metadata[0],
                   CLOUDCKPT_AWS_METADATA_URL=aws or quiet_metadata[1],
                   PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, str(CHILD), disposition, *steps], env=env, capture_output=True,
                              text=True, timeout=120)
        return Child(proc.returncode, proc.stdout.splitlines(), proc.stderr)
    return run_child


def called_lines(child: Child) -> int:
    return child.lines.count(f"called {int(signal.SIGTERM)}")


@pytest.mark.parametrize("disposition", ["dfl", "ign", "call"])
def test_metadata_notice_then_sigterm_is_not_an_escalation(run, disposition):
    """Issue 12, example 1: trigger("gce") then the shutdown script's SIGTERM must not kill the process."""
    child = run(disposition, "start:w:sigterm,gce", "trigger:w:gce:25", "term", "report:w", "stop:w",
                "disposition", "threads")
    assert child.returncode == 0, child.stderr
    assert child.ran("term 1") and child.ran("threads"), child.lines
    notices = child.output_of("report:w")["notices"]
    assert [n[0] for n in notices] == ["gce", "sigterm"]  # the first notice stays the GCE one
    assert notices[0][2] == notices[1][2] == 25.0  # same grace period: the earlier notice sets the hard stop
    assert child.output_of("report:w")["hard_stop_at"] == notices[0][1] + notices[0][2]
    assert "disposition original" in child.lines
    assert child.output_of("threads") == []
    assert called_lines(child) == 0  # the first SIGTERM's replaced callable is deferred (to the hook's end)


@pytest.mark.parametrize("disposition, returncode, survives, calls", [
    ("dfl", DIED_BY_SIGTERM, False, 0), ("ign", 0, True, 0), ("call", 0, True, 1)])
@pytest.mark.parametrize("before", [[], ["trigger:w:gce:25"]], ids=["sigterm-first", "gce-first"])
def test_second_sigterm_escalates_to_the_replaced_disposition(run, before, disposition, returncode, survives, calls):
    child = run(disposition, "start:w:sigterm,gce", *before, "term", "term")
    assert child.returncode == returncode, child.stderr
    assert child.ran("term 1")
    assert child.ran("term 2") is survives
    assert called_lines(child) == calls


def test_gce_metadata_then_sigterm_from_the_fake_server(run):
    with FakeGceMetadata() as gce:
        gce.preempt()
        child = run("dfl", "start:w:sigterm,gce", "wait:w", "term", "report:w", "term", gce=gce.url)
    assert child.returncode == DIED_BY_SIGTERM  # only the second SIGTERM killed it
    assert child.ran("term 1") and not child.ran("term 2")
    notices = child.output_of("report:w")["notices"]
    assert [n[0] for n in notices] == ["gce", "sigterm"]
    assert child.output_of("report:w")["hard_stop_at"] == notices[0][1] + notices[0][2]  # GCE's came first


def test_aws_notice_then_sigterm_tightens_the_hard_stop(run):
    with FakeAwsMetadata() as aws:
        aws.preempt()
        child = run("dfl", "start:w:sigterm,aws", "wait:w", "term", "report:w", "stop:w", aws=aws.url)
    assert child.returncode == 0, child.stderr
    report = child.output_of("report:w")
    (first, aws_at, aws_deadline), (second, term_at, term_deadline) = report["notices"]
    assert (first, aws_deadline, second, term_deadline) == ("aws", 100.0, "sigterm", 25.0)
    assert term_at + term_deadline < aws_at + aws_deadline  # so the SIGTERM's deadline is the binding one
    assert report["hard_stop_at"] == term_at + term_deadline


def test_sigterm_then_metadata_notice(run):
    child = run("dfl", "start:w:sigterm,gce", "term", "trigger:w:gce:25", "report:w", "stop:w")
    assert child.returncode == 0, child.stderr
    notices = child.output_of("report:w")["notices"]
    assert [n[0] for n in notices] == ["sigterm", "gce"]
    assert child.output_of("report:w")["hard_stop_at"] == notices[0][1] + notices[0][2]


@pytest.mark.parametrize("disposition, returncode, survives, calls", [
    ("dfl", DIED_BY_SIGTERM, False, 0), ("ign", 0, True, 0), ("call", 0, True, 1)])
@pytest.mark.parametrize("wrapped", [False, True], ids=["restored", "ours-under-another"])
def test_stopped_watcher_sigterm_behaves_as_the_replaced_disposition(run, wrapped, disposition, returncode,
                                                                      survives, calls):
    steps = ["start:w", *(["wrap"] if wrapped else []), "stop:w", "disposition", "term"]
    child = run(disposition, *steps)
    assert child.returncode == returncode, child.stderr
    assert child.ran("disposition") and child.ran("term 1") is survives
    # Another handler installed on top of ours stays; ours, under it, is only transparent.
    assert ("disposition original" in child.lines) is not wrapped
    assert ("wrapper" in child.lines) is wrapped
    assert called_lines(child) == calls


@pytest.mark.parametrize("disposition, returncode, survives", [
    ("dfl", DIED_BY_SIGTERM, False), ("ign", 0, True), ("call", 0, True)])
@pytest.mark.parametrize("stops", [("stop:A", "stop:B"), ("stop:B", "stop:A"), ("stop-thread:A", "stop:B"),
                                   ("stop-thread:B", "stop:A"), ("stop-thread:A", "stop-thread:B")])
def test_two_watchers_stopped_in_any_order_leave_the_original_behaviour(run, stops, disposition, returncode,
                                                                       survives):
    child = run(disposition, "start:A:sigterm,gce", "start:B:sigterm,aws", *stops, "disposition", "threads",
                "term")
    assert child.returncode == returncode, child.stderr
    assert child.output_of("threads") == []
    both_from_threads = all("thread" in s for s in stops)  # then nobody could call signal.signal
    assert ("disposition original" in child.lines) is not both_from_threads
    assert child.ran("term 1") is survives
    assert called_lines(child) == (1 if disposition == "call" else 0)


@pytest.mark.parametrize("stop_a", ["stop:A", "stop-thread:A"])
def test_running_watcher_over_a_stopped_one_still_takes_the_first_sigterm_as_a_notice(run, stop_a):
    """A then B started, A stopped first: A's inactive handler stays under B's and must not make B's first
    SIGTERM lethal; B's second one is."""
    child = run("dfl", "start:A", "start:B", stop_a, "term", "report:B", "report:A", "term")
    assert child.returncode == DIED_BY_SIGTERM
    assert child.ran("term 1") and not child.ran("term 2")
    assert [n[0] for n in child.output_of("report:B")["notices"]] == ["sigterm"]
    assert child.output_of("report:A")["notices"] == []  # a stopped watcher records nothing


@pytest.mark.parametrize("disposition, returncode, survives", [
    ("dfl", DIED_BY_SIGTERM, False), ("ign", 0, True), ("call", 0, True)])
def test_stop_from_a_non_main_thread_makes_the_handler_transparent(run, disposition, returncode, survives):
    child = run(disposition, "start:w:sigterm,gce,aws", "threads", "stop-thread:w", "threads", "term")
    assert child.returncode == returncode, child.stderr
    started, after_stop = (json.loads(child.lines[i - 1]) for i, line in enumerate(child.lines)
                           if line == "done threads")
    assert started == ["cloudckpt-preemption-poller"] and after_stop == []
    assert child.ran("term 1") is survives
    assert called_lines(child) == (1 if disposition == "call" else 0)


def test_a_restarted_watcher_keeps_its_sigterm_count(run):
    child = run("dfl", "start:w", "term", "stop:w", "start:w", "disposition", "term")
    assert child.returncode == DIED_BY_SIGTERM
    assert child.ran("term 1") and child.ran("start:w") and not child.ran("term 2")
    assert "disposition changed" in " ".join(child.lines)  # the restarted watcher's handler is installed


@pytest.mark.parametrize("steps", [["start:w:sigterm,gce,aws"], ["start:w", "term"]], ids=["running", "notified"])
def test_ctrl_c_still_raises_keyboard_interrupt(run, steps):
    child = run("dfl", *steps, "int", "stop:w", "disposition")
    assert child.returncode == 0, child.stderr
    assert "keyboardinterrupt" in child.lines and "disposition original" in child.lines
