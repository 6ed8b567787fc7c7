"""Tests for cloudckpt.preemption (SIGTERM + GCE/AWS/Azure metadata polling)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest

from cloudckpt import preemption
from cloudckpt.preemption import PreemptionNotice, PreemptionWatcher, last_notice, was_preempted
from support.fake_metadata import FakeAwsMetadata, FakeAzureMetadata, FakeGceMetadata

FAST = 0.05  # poll interval used throughout
GCE_PREEMPTED = FakeGceMetadata.PREEMPTED_PATH
AWS_ACTION = FakeAwsMetadata.ACTION_PATH
AWS_TOKEN = FakeAwsMetadata.TOKEN_PATH
AZURE_EVENTS = FakeAzureMetadata.EVENTS_PATH
AZURE_NAME = FakeAzureMetadata.NAME_PATH


def wait_until(pred: Callable[[], object], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


@pytest.fixture(autouse=True)
def _isolation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore SIGTERM disposition and the process-wide notice after each test."""
    monkeypatch.delenv(preemption.GCE_METADATA_URL_ENV, raising=False)
    monkeypatch.delenv(preemption.AWS_METADATA_URL_ENV, raising=False)
    monkeypatch.delenv(preemption.AZURE_METADATA_URL_ENV, raising=False)
    saved = signal.getsignal(signal.SIGTERM)
    preemption._reset_last_notice()
    yield
    signal.signal(signal.SIGTERM, saved if saved is not None else signal.SIG_DFL)
    preemption._reset_last_notice()


@pytest.fixture
def watchers() -> Iterator[list[PreemptionWatcher]]:
    """Collect watchers so they are always stopped."""
    created: list[PreemptionWatcher] = []
    yield created
    for w in created:
        w.stop()


@pytest.fixture
def make_watcher(watchers: list[PreemptionWatcher]) -> Callable[..., PreemptionWatcher]:
    def make(*args, **kwargs) -> PreemptionWatcher:
        kwargs.setdefault("poll_interval", FAST)
        w = PreemptionWatcher(*args, **kwargs)
        watchers.append(w)
        return w
    return make


@pytest.fixture
def closed_url() -> str:
    """URL of a local port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def gce() -> Iterator[FakeGceMetadata]:
    with FakeGceMetadata() as server:
        yield server


@pytest.fixture
def aws() -> Iterator[FakeAwsMetadata]:
    with FakeAwsMetadata() as server:
        yield server


@pytest.fixture
def azure() -> Iterator[FakeAzureMetadata]:
    with FakeAzureMetadata() as server:
        yield server


@pytest.fixture
def start_polling(make_watcher: Callable[..., PreemptionWatcher]) -> Callable[..., PreemptionWatcher]:
    """``start_polling(source, server, polled=None, count=3, **options)``: a started watcher of the metadata
    ``source`` (``"gce"``, ``"aws"``, ``"azure"``) asking the fake ``server`` (its URL as
    ``<source>_metadata_url``); with ``polled``, once it has asked ``server`` for that path ``count`` times,
    checked to have no notice yet."""
    def start(source: str, server, *, polled: str | None = None, count: int = 3, **options) -> PreemptionWatcher:
        w = make_watcher(source, **{f"{source}_metadata_url": server.url}, **options)
        w.start()
        if polled is not None:
            assert server.wait_for_requests(lambda r: r.path == polled, count=count)
            assert not w.is_preempted()
        return w
    return start


def assert_polling_stopped(w: PreemptionWatcher, server) -> None:
    """After a notice ``w`` stops polling: no source active, and ``server`` asked nothing more."""
    assert wait_until(lambda: w.active_sources == ())
    count = len(server.requests)
    time.sleep(4 * FAST)
    assert len(server.requests) == count


def send_sigterm() -> None:
    # Safety net: never SIGTERM the test process without a Python handler in place.
    assert callable(signal.getsignal(signal.SIGTERM))
    os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------- SIGTERM


def test_sigterm_records_notice_and_survives_default_disposition(make_watcher):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    w = make_watcher()
    assert not was_preempted() and last_notice() is None
    w.start()
    assert w.active_sources == ("sigterm",)
    send_sigterm()  # previous disposition is SIG_DFL: we must NOT die
    assert w.wait(timeout=2)
    notice = w.notice
    assert notice is not None
    assert (notice.source, notice.detail, notice.deadline) == ("sigterm", "SIGTERM", 25.0)
    assert 0 <= time.monotonic() - notice.received_at < 5
    assert 20 < notice.remaining() <= 25.0
    assert w.is_preempted() and was_preempted() and last_notice() is notice


def test_sigterm_defers_then_chains_previous_python_handler(make_watcher):
    calls: list[int] = []
    previous = lambda signum, frame: calls.append(signum)  # noqa: E731
    signal.signal(signal.SIGTERM, previous)
    w = make_watcher("sigterm")
    w.start()
    send_sigterm()
    assert w.wait(timeout=2)
    first = w.notice
    assert calls == [] and w.replaced_sigterm_handler() is previous  # deferred, for the hook to call
    send_sigterm()
    assert wait_until(lambda: len(calls) == 1)  # the second SIGTERM behaves as the replaced handler
    assert calls == [signal.SIGTERM]
    assert w.notice is first  # only the first notice is recorded


def test_sigterm_ignored_previous_handler_not_called(make_watcher):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    w = make_watcher()
    w.start()
    send_sigterm()
    assert w.wait(timeout=2)
    w.stop()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_start_stop_idempotent_and_restore_previous_handler(make_watcher):
    def previous(signum, frame):
        pass

    signal.signal(signal.SIGTERM, previous)
    w = make_watcher()
    w.start()
    ours = signal.getsignal(signal.SIGTERM)
    assert ours is not previous and callable(ours)
    w.start()  # no second installation on top of ours
    assert signal.getsignal(signal.SIGTERM) is ours
    assert w.running
    w.stop()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not w.running and w.active_sources == ()
    w.stop()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not w.is_preempted()


def test_stop_keeps_a_handler_installed_after_ours(make_watcher):
    def previous(signum, frame):
        pass

    def later(signum, frame):
        pass

    signal.signal(signal.SIGTERM, previous)
    w = make_watcher()
    w.start()
    ours = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, later)
    w.stop()
    assert signal.getsignal(signal.SIGTERM) is later
    # If "later" chains to ours, ours only forwards to "previous" after stop().
    calls = []
    ours.previous = lambda s, f: calls.append(s)
    ours(signal.SIGTERM, None)
    assert calls == [signal.SIGTERM] and not w.is_preempted()


def test_two_watchers_nest(make_watcher):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    a, b = make_watcher(), make_watcher()
    a.start()
    b.start()
    send_sigterm()
    assert a.wait(2) and b.wait(2)  # b chains to a
    b.stop()
    a.stop()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_start_from_non_main_thread_warns_and_leaves_signals_alone(make_watcher, caplog):
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    before = signal.getsignal(signal.SIGTERM)
    w = make_watcher()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.start()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == []
    assert w.running and w.active_sources == ()
    assert signal.getsignal(signal.SIGTERM) is before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "non-main thread" in warnings[0].getMessage()


# ------------------------------------------------------------------- GCE


def test_gce_preempted_flip(start_polling, gce):
    w = start_polling("gce", gce, polled=GCE_PREEMPTED)
    assert signal.getsignal(signal.SIGTERM) is not None  # untouched without "sigterm"
    assert w.active_sources == ("gce",)
    flipped = time.monotonic()
    gce.preempt()
    assert w.wait(timeout=2)
    assert time.monotonic() - flipped < 2.0  # a few poll intervals, with slack
    n = w.notice
    assert (n.source, n.detail, n.deadline) == ("gce", "instance/preempted=TRUE", 25.0)
    assert was_preempted()
    # Every request carried the flavor header (none was refused).
    assert all(r.header("Metadata-Flavor") == "Google" and r.status == 200
               for r in gce.requests)
    # Polling stops after the notice.
    assert_polling_stopped(w, gce)


def test_gce_terminate_maintenance_event_is_a_notice(start_polling, gce):
    gce.set_maintenance_event("TERMINATE_ON_HOST_MAINTENANCE")
    w = start_polling("gce", gce)
    assert w.wait(timeout=2)
    assert w.notice.source == "gce"
    assert "TERMINATE_ON_HOST_MAINTENANCE" in w.notice.detail


def test_gce_live_migration_is_not_a_notice(start_polling, gce):
    gce.set_maintenance_event("MIGRATE_ON_HOST_MAINTENANCE")
    start_polling("gce", gce, polled=FakeGceMetadata.MAINTENANCE_PATH)


def test_fake_gce_requires_flavor_header(gce):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(gce.url + GCE_PREEMPTED, timeout=2)
    err.value.close()
    assert err.value.code == 403


# ------------------------------------------------------------------- AWS


def test_aws_token_dance_refresh_on_401_and_notice(start_polling, aws):
    w = start_polling("aws", aws, polled=AWS_ACTION)
    log = aws.requests
    assert log[0].method == "PUT" and log[0].path == AWS_TOKEN
    assert log[0].header(FakeAwsMetadata.TTL_HEADER) == "21600" and log[0].status == 200
    gets = [r for r in log if r.path == AWS_ACTION]
    assert len(aws.tokens_issued) == 1  # the token is cached
    assert all(r.method == "GET" and r.status == 404 for r in gets)
    assert all(r.header(FakeAwsMetadata.TOKEN_HEADER) == aws.tokens_issued[0] for r in gets)

    aws.clear_log()
    aws.invalidate_tokens()
    assert wait_until(lambda: len(aws.tokens_issued) == 2)
    assert aws.wait_for_requests(
        lambda r: r.path == AWS_ACTION and r.status == 404
        and r.header(FakeAwsMetadata.TOKEN_HEADER) == aws.tokens_issued[1])
    seq = [(r.method, r.status) for r in aws.requests][:3]
    assert seq == [("GET", 401), ("PUT", 200), ("GET", 404)]

    aws.preempt(action="terminate")
    assert w.wait(timeout=2)
    n = w.notice
    assert (n.source, n.deadline) == ("aws", 100.0)
    assert n.detail == f"spot instance-action: terminate at {aws.action['time']}"
    assert was_preempted() and last_notice() is n


def test_aws_token_refreshed_before_expiry(start_polling, aws, monkeypatch):
    monkeypatch.setattr(preemption.metadata, "_AWS_TOKEN_TTL_SECONDS", 1)
    start_polling("aws", aws)
    assert wait_until(lambda: len(aws.tokens_issued) >= 2, timeout=4)
    assert not any(r.status == 401 for r in aws.requests)  # refreshed proactively
    puts = aws.requests_to(AWS_TOKEN)
    assert all(r.header(FakeAwsMetadata.TTL_HEADER) == "1" for r in puts)


@pytest.mark.parametrize("action", ["stop", "hibernate"])
def test_aws_other_actions(start_polling, aws, action):
    aws.preempt(action=action)
    w = start_polling("aws", aws)
    assert w.wait(timeout=2)
    assert w.notice.detail.startswith(f"spot instance-action: {action} at ")


def test_aws_imdsv1_fallback(make_watcher):
    with FakeAwsMetadata(imdsv1=True) as v1:
        w = make_watcher("aws", aws_metadata_url=v1.url)
        w.start()
        assert v1.wait_for_requests(lambda r: r.path == AWS_ACTION and r.status == 404, 2)
        assert not w.is_preempted()
        v1.preempt()
        assert w.wait(timeout=2)
        assert w.notice.source == "aws"
        assert all(r.header(FakeAwsMetadata.TOKEN_HEADER) is None
                   for r in v1.requests_to(AWS_ACTION))


def test_fake_aws_rejects_token_put_without_ttl(aws):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(aws.url + AWS_TOKEN, data=b"", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=2)
    err.value.close()
    assert err.value.code == 400


# ------------------------------------------------------------------ Azure


def rfc1123(when: datetime) -> str:
    """``NotBefore`` as Azure writes it: ``Mon, 19 Sep 2016 18:29:47 GMT``."""
    return when.astimezone(timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


def test_azure_preempt_for_this_vm_is_a_notice_with_the_deadline_from_not_before(start_polling, azure):
    w = start_polling("azure", azure, polled=AZURE_EVENTS)
    assert signal.getsignal(signal.SIGTERM) is not None  # untouched without "sigterm"
    assert w.active_sources == ("azure",)
    not_before = rfc1123(datetime.now(timezone.utc) + timedelta(seconds=40))
    azure.preempt(not_before=not_before)
    assert w.wait(timeout=2)
    n = w.notice
    assert n.source == "azure" and was_preempted() and last_notice() is n
    assert n.detail == f"scheduled event Preempt (Scheduled) for vm-1, NotBefore {not_before}"
    assert 33.0 <= n.deadline <= 35.0  # 40 s (less the second cut off by the format) minus the 5 s margin
    assert w.hard_stop_at == n.received_at + n.deadline
    # The name once (the presence probe), then the events; every request with "Metadata: true" and answered.
    log = azure.requests
    assert [r.path for r in log].count(AZURE_NAME) == 1 and log[0].path == AZURE_NAME
    assert all(r.method == "GET" and r.header("Metadata") == "true" and r.status == 200 for r in log)
    # Polling stops after the notice.
    assert_polling_stopped(w, azure)


@pytest.mark.parametrize("event_type", ["Terminate", "Reboot", "Redeploy"])
def test_azure_events_that_stop_the_vm_are_notices(start_polling, azure, event_type):
    azure.set_events([azure.event(event_type, resources=["vm-1"],
                                  not_before=datetime.now(timezone.utc) + timedelta(minutes=15))])
    w = start_polling("azure", azure)
    assert w.wait(timeout=2)
    assert w.notice.detail.startswith(f"scheduled event {event_type} (Scheduled) for vm-1, NotBefore ")
    assert 15 * 60 - 7 <= w.notice.deadline <= 15 * 60 - 5


def test_azure_started_event_without_not_before_gets_the_default_deadline(start_polling, azure):
    azure.set_events([azure.event("Preempt", resources=["vm-1"], status="Started", not_before="")])
    w = start_polling("azure", azure)
    assert w.wait(timeout=2)
    n = w.notice
    assert (n.source, n.detail, n.deadline) == ("azure", "scheduled event Preempt (Started) for vm-1", 25.0)


def test_azure_not_before_in_the_past_leaves_no_time(start_polling, azure):
    azure.preempt(not_before=datetime.now(timezone.utc) - timedelta(seconds=3), status="Started")
    w = start_polling("azure", azure)
    assert w.wait(timeout=2)
    assert w.notice.deadline == 0.0  # never negative


def test_azure_deadline_from_not_before():
    deadline_until = preemption.metadata._deadline_until
    now = datetime(2016, 9, 19, 18, 29, 7, tzinfo=timezone.utc)
    assert deadline_until("Mon, 19 Sep 2016 18:29:47 GMT", now) == 35.0  # 40 s, 5 s margin
    assert deadline_until("Mon, 19 Sep 2016 18:29:47 -0000", now) == 35.0  # RFC 2822's "UTC, unknown zone"
    assert deadline_until("Mon, 19 Sep 2016 20:29:47 +0200", now) == 35.0
    assert deadline_until("Mon, 19 Sep 2016 18:29:10 GMT", now) == 0.0
    assert deadline_until("", now) == deadline_until("soon", now) == 25.0


def test_azure_event_for_another_vm_is_not_a_notice(start_polling, caplog):
    """An availability set's / scale set's events list the VMs they affect: only this VM's count (its name
    from instance/compute/name, compared case-insensitively)."""
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    with FakeAzureMetadata(vm_name="trainer-3") as azure:
        azure.set_events([azure.event("Preempt", resources=["trainer-1", "trainer-2"]),
                          azure.event("Terminate", resources=["trainer-30"])])
        w = start_polling("azure", azure, polled=AZURE_EVENTS, count=5)
        assert w.active_sources == ("azure",)
        azure.set_events([*azure.document["Events"], azure.event("Preempt", resources=["trainer-2", "TRAINER-3"])])
        assert w.wait(timeout=2)
    assert w.notice.detail.startswith("scheduled event Preempt (Scheduled) for trainer-3, NotBefore ")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Preemption notice" not in r.getMessage()]


def test_azure_freeze_is_not_a_notice(start_polling, azure, caplog):
    """Freeze pauses the VM for seconds (memory-preserving maintenance, live migration): the process goes on,
    as with GCE's MIGRATE_ON_HOST_MAINTENANCE. Logged once (INFO), not a notice."""
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    azure.set_events([azure.event("Freeze", resources=["vm-1"], duration=9)])
    w = start_polling("azure", azure, polled=AZURE_EVENTS, count=5)
    assert w.active_sources == ("azure",)
    freeze = [r.getMessage() for r in caplog.records if "Freeze" in r.getMessage()]
    assert len(freeze) == 1 and "not a preemption" in freeze[0] and "about 9 s" in freeze[0], freeze
    azure.preempt()  # the watcher still sees what follows
    assert w.wait(timeout=2) and "Preempt" in w.notice.detail


def test_azure_slow_first_scheduledevents_answer_does_not_disable_the_source(start_polling, caplog):
    """The first scheduledevents request enables the feature and may take up to two minutes: its timeouts
    must neither give the source up ("not on Azure") nor warn of an outage; the VM's name answered, so this
    is Azure. A notice posted meanwhile is seen once the events answer."""
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    with FakeAzureMetadata(enable_delay=3.0) as azure:
        w = start_polling("azure", azure, request_timeout=0.2)
        # more timed-out event requests than it takes to give a source up
        assert wait_until(lambda: azure.arrivals >= 1 + 4 and not azure.requests_to(AZURE_EVENTS), timeout=5)
        assert w.active_sources == ("azure",) and not w.is_preempted()
        azure.preempt()
        assert w.wait(timeout=5)
    assert w.notice.source == "azure"
    records = [r for r in caplog.records if r.name.startswith("cloudckpt")]
    assert not [r for r in records if r.levelno == logging.INFO or
                (r.levelno >= logging.WARNING and "Preemption notice" not in r.getMessage())]
    assert any("not answering yet" in r.getMessage() for r in records if r.levelno == logging.DEBUG)


def test_azure_events_failing_after_the_enable_window_warn_once_and_keep_polling(start_polling, caplog,
                                                                                 monkeypatch):
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    monkeypatch.setattr(preemption.metadata, "_AZURE_ENABLE_SECONDS", 0.3)
    with FakeAzureMetadata(enable_delay=30) as azure:  # never answers within the test
        w = start_polling("azure", azure, request_timeout=0.1)
        assert wait_until(lambda: any(r.levelno == logging.WARNING for r in caplog.records), timeout=5)
        time.sleep(5 * FAST)
        assert w.active_sources == ("azure",)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Azure metadata server" in warnings[0] and "still polling" in warnings[0]


def test_fake_azure_requires_the_metadata_header(azure):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for headers, code in [({}, 400), ({"Metadata": "false"}, 400)]:
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(urllib.request.Request(azure.url + AZURE_EVENTS, headers=headers), timeout=2)
        err.value.close()
        assert err.value.code == code
    with opener.open(urllib.request.Request(azure.url + AZURE_NAME, headers={"Metadata": "true"}), timeout=2) as r:
        assert r.read() == b"vm-1"


def test_a_cloud_s_poller_gives_up_on_the_others_metadata_servers(make_watcher, caplog):
    """GCE's, AWS's and Azure's metadata servers share 169.254.169.254: on GCE or AWS the Azure poller is
    refused (403 without Metadata-Flavor, 401 without an IMDSv2 token, 404 on IMDSv1) and gives up quietly;
    on Azure the AWS poller's token PUT gets 405 (so IMDSv1), its GET 400 without "Metadata: true", and the
    GCE poller 400: they give up quietly too."""
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    with FakeGceMetadata() as gce, FakeAwsMetadata() as aws, FakeAwsMetadata(imdsv1=True) as v1, \
            FakeAzureMetadata() as azure:
        for server in (gce, aws, v1, azure):
            server.preempt()  # a notice on every server: none may be taken for an Azure one, or vice versa
        on_other_clouds = [make_watcher("azure", azure_metadata_url=s.url) for s in (gce, aws, v1)]
        on_azure = make_watcher(("gce", "aws"), gce_metadata_url=azure.url, aws_metadata_url=azure.url)
        for w in (*on_other_clouds, on_azure):
            w.start()
        assert wait_until(lambda: all(w.active_sources == () for w in (*on_other_clouds, on_azure)))
        assert not any(w.is_preempted() for w in (*on_other_clouds, on_azure))
        assert [r.status for r in gce.requests] == [403] * 3
        assert [r.status for r in aws.requests] == [401] * 3
        assert [r.status for r in v1.requests] == [404] * 3
        aws_on_azure = [(r.method, r.status) for r in azure.requests if r.path.startswith("/latest/")]
        assert aws_on_azure == [("PUT", 405), ("GET", 400)] * 3
        assert [r.status for r in azure.requests if r.path.startswith("/computeMetadata/")] == [400] * 3
    records = [r for r in caplog.records if r.name.startswith("cloudckpt")]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert sorted(m.split("assuming ")[1].split(",")[0] for m in infos) == [
        "not on AWS", "not on Azure", "not on Azure", "not on Azure", "not on GCE"]


def test_an_azure_notice_caps_a_longer_user_deadline(make_watcher, azure, caplog):
    """A Scheduled Event's NotBefore is the platform's hard stop: preemption_deadline=60 after it is capped."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    w = make_watcher("azure", azure_metadata_url=azure.url)
    w.deadline = 60.0
    w.start()
    assert azure.wait_for_requests(lambda r: r.path == AZURE_EVENTS, count=2)
    azure.preempt()  # NotBefore now + 30 s
    assert w.wait(timeout=2)
    n = w.notice
    assert n.source == "azure" and 23.0 <= n.deadline <= 25.0
    assert wait_until(lambda: cap_lines(caplog))
    (line,) = cap_lines(caplog)
    assert line.startswith("Preemption notice from azure")
    assert f"deadline {n.deadline:g} s: the platform's announced hard stop" in line and "=60 s" in line, line
    assert w.deadline_at == n.received_at + n.deadline == w.hard_stop_at  # not n.received_at + 60


def test_metadata_requests_ignore_proxy_environment(gce, aws, azure):
    """Metadata servers must be asked directly (Azure's IMDS requires it): an HTTP proxy set in the
    environment of the process (a recording server here) is never used, by any of the three pollers."""
    code = textwrap.dedent("""
        from cloudckpt.preemption import PreemptionWatcher
        watchers = [PreemptionWatcher(source, poll_interval=0.05) for source in ("gce", "aws", "azure")]
        for w in watchers:
            w.start()
        print("ready", flush=True)
        print(" ".join(w.notice.source if w.wait(timeout=10) else "none" for w in watchers), flush=True)
        for w in watchers:
            w.stop()
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with FakeGceMetadata() as proxy:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "all_proxy")}
        env.update(http_proxy=proxy.url, HTTP_PROXY=proxy.url, all_proxy=proxy.url, ALL_PROXY=proxy.url,
                   CLOUDCKPT_GCE_METADATA_URL=gce.url, CLOUDCKPT_AWS_METADATA_URL=aws.url,
                   CLOUDCKPT_AZURE_METADATA_URL=azure.url,
                   PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            assert gce.wait_for_requests(lambda r: r.path == GCE_PREEMPTED, 1)
            assert aws.wait_for_requests(lambda r: r.path == AWS_ACTION, 1)
            assert azure.wait_for_requests(lambda r: r.path == AZURE_EVENTS, 1)
            for server in (gce, aws, azure):
                server.preempt()
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert out.strip() == "gce aws azure"
        assert proxy.requests == []


# ------------------------------------------------ unavailable endpoints


def test_unreachable_endpoints_give_up_quietly(make_watcher, closed_url, caplog):
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    w = make_watcher(("gce", "aws", "azure"), gce_metadata_url=closed_url, aws_metadata_url=closed_url,
                     azure_metadata_url=closed_url)
    w.start()
    assert wait_until(lambda: w.active_sources == ())
    assert not w.is_preempted() and not was_preempted()
    records = [r for r in caplog.records if r.name.startswith("cloudckpt")]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(infos) == 3
    assert all(any(f"not on {cloud}" in m for m in infos) for cloud in ("GCE", "AWS", "Azure"))
    assert sum(r.levelno == logging.DEBUG and "poll failed" in r.getMessage()
               for r in records) == 6  # failures 1 and 2 of each source
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0


def test_wrong_cloud_gives_up(make_watcher, gce, aws):
    # GCE poller talking to an AWS server (401s) and vice versa (403s).
    w = make_watcher(("gce", "aws"), gce_metadata_url=aws.url, aws_metadata_url=gce.url)
    w.start()
    assert wait_until(lambda: w.active_sources == ())
    assert not w.is_preempted()


def test_source_that_worked_keeps_polling_through_outage(make_watcher, caplog):
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    server = FakeGceMetadata()
    w = make_watcher("gce", gce_metadata_url=server.url)
    w.start()
    assert server.wait_for_requests(lambda r: r.path == GCE_PREEMPTED, 1)
    server.close()
    assert wait_until(lambda: any(r.levelno == logging.WARNING for r in caplog.records))
    time.sleep(5 * FAST)
    assert w.active_sources == ("gce",)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "still polling" in warnings[0].getMessage()


def test_poll_exceptions_do_not_kill_the_poller(make_watcher, gce, monkeypatch):
    real_http = preemption.metadata._http
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ZeroDivisionError("boom")
        return real_http(*args, **kwargs)

    monkeypatch.setattr(preemption.metadata, "_http", flaky)
    gce.preempt()
    w = make_watcher("gce", gce_metadata_url=gce.url)
    w.start()
    assert w.wait(timeout=2)
    assert calls["n"] >= 3


def test_stop_ends_poller_promptly(make_watcher, gce):
    w = make_watcher("gce", gce_metadata_url=gce.url, poll_interval=60)
    w.start()
    assert gce.wait_for_requests(lambda r: r.path == GCE_PREEMPTED, 1)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.name == "cloudckpt-preemption-poller" and t.is_alive()
                   for t in threading.enumerate())


# ------------------------------------------------------------------ config


def test_env_vars_configure_urls(make_watcher, gce, aws, azure, monkeypatch):
    monkeypatch.setenv(preemption.GCE_METADATA_URL_ENV, gce.url + "/")
    monkeypatch.setenv(preemption.AWS_METADATA_URL_ENV, aws.url)
    monkeypatch.setenv(preemption.AZURE_METADATA_URL_ENV, azure.url[len("http://"):])  # scheme added
    w = make_watcher(("gce", "aws"))
    assert (w.gce_metadata_url, w.aws_metadata_url, w.azure_metadata_url) == (gce.url, aws.url, azure.url)
    explicit = PreemptionWatcher(("gce",), gce_metadata_url="http://10.9.9.9:1", azure_metadata_url="http://10.9.9.8")
    assert (explicit.gce_metadata_url, explicit.azure_metadata_url) == ("http://10.9.9.9:1", "http://10.9.9.8")
    auto = PreemptionWatcher.from_spec("auto")
    assert (auto.gce_metadata_url, auto.aws_metadata_url, auto.azure_metadata_url) == (gce.url, aws.url, azure.url)
    w.start()
    aws.preempt()
    assert w.wait(timeout=2) and w.notice.source == "aws"
    az = make_watcher("azure")
    az.start()
    azure.preempt()
    assert az.wait(timeout=2) and az.notice.source == "azure"


def test_default_urls():
    w = PreemptionWatcher()
    assert w.gce_metadata_url == "http://metadata.google.internal"
    assert w.aws_metadata_url == "http://169.254.169.254"
    assert w.azure_metadata_url == "http://169.254.169.254"
    assert w.poll_interval == 5.0 and w.sources == ("sigterm",)


def test_from_spec():
    assert PreemptionWatcher.from_spec(None) is None
    assert PreemptionWatcher.from_spec("sigterm").sources == ("sigterm",)
    assert PreemptionWatcher.from_spec("auto").sources == ("sigterm", "gce", "aws", "azure")
    w = PreemptionWatcher(("gce",))
    assert PreemptionWatcher.from_spec(w) is w


@pytest.mark.parametrize("bad", ["SIGTERM", "gce", "", True, 5, ("sigterm",)])
def test_from_spec_rejects(bad):
    with pytest.raises(ValueError) as err:
        PreemptionWatcher.from_spec(bad)
    msg = str(err.value)
    assert repr(bad) in msg
    assert all(v in msg for v in ('"sigterm"', '"auto"', "None", "PreemptionWatcher"))


def test_constructor_validation():
    with pytest.raises(ValueError, match="'oracle'") as err:
        PreemptionWatcher(("sigterm", "oracle"))
    assert "sigterm, gce, aws, azure" in str(err.value)  # the allowed ones
    with pytest.raises(ValueError, match="poll_interval"):
        PreemptionWatcher(poll_interval=0)
    with pytest.raises(ValueError, match="request_timeout"):
        PreemptionWatcher(request_timeout=-1)
    assert PreemptionWatcher("gce").sources == ("gce",)
    assert PreemptionWatcher(["aws", "aws"]).sources == ("aws",)


# --------------------------------------------------- trigger / callbacks


def test_trigger_first_only_callbacks_and_logging(caplog):
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    w = PreemptionWatcher()
    seen: list[PreemptionNotice] = []

    def bad(notice: PreemptionNotice) -> None:
        raise RuntimeError("callback bug")

    w.add_callback(bad)
    w.add_callback(seen.append)
    assert not w.wait(timeout=0.05)
    w.trigger("gce", "first", 25.0)
    w.trigger("aws", "second", 100.0)
    assert w.notice.detail == "first" and last_notice() is w.notice
    assert seen == [w.notice]
    late: list[PreemptionNotice] = []
    w.add_callback(late.append)  # already preempted: called immediately
    assert late == [w.notice] and seen == [w.notice]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "first" in warnings[0].getMessage()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "callback" in errors[0].getMessage()


def test_later_notices_tighten_hard_stop_at_and_are_logged_once_each(caplog):
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    w = PreemptionWatcher()
    seen: list[PreemptionNotice] = []
    w.add_callback(seen.append)
    assert w.hard_stop_at is None and w.notices == ()
    w.trigger("aws", "spot instance-action: terminate", 1e6)
    first = w.notice
    assert w.hard_stop_at == first.received_at + 1e6 == first.hard_stop_at
    w.trigger("sigterm", "SIGTERM", 25.0)  # a shorter grace period: the hard stop comes closer
    sigterm = w.notices[1]
    assert w.hard_stop_at == sigterm.received_at + 25.0 < first.hard_stop_at
    w.trigger("gce", "instance/preempted=TRUE", 2e6)  # would end later: changes nothing
    assert [n.source for n in w.notices] == ["aws", "sigterm", "gce"]
    assert w.hard_stop_at == sigterm.hard_stop_at
    assert w.notice is first and last_notice() is first and seen == [first]  # callbacks: first notice only
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("cloudckpt")]
    warnings = [m for level, m in records if level == logging.WARNING]
    assert len(warnings) == 2 and "from aws" in warnings[0] and "Later preemption notice from sigterm" in warnings[1]
    infos = [m for level, m in records if level == logging.INFO]
    assert len(infos) == 1 and "Later preemption notice from gce" in infos[0] and "still" in infos[0]


def cap_lines(caplog) -> list[str]:
    """The log lines saying that a hard stop the platform announced caps the user's deadline."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("cloudckpt")
            and r.levelno >= logging.INFO and "before preemption_deadline" in r.getMessage()]


@pytest.mark.parametrize("source, platform, user", [("gce", 25.0, 60.0), ("aws", 100.0, 150.0)])
def test_a_metadata_notice_caps_a_longer_user_deadline(make_watcher, gce, aws, caplog, source, platform, user):
    """GCE's instance/preempted and AWS's instance-action announce the real hard stop: a preemption_deadline
    ending later is capped to it (before: the deadline in use was the user's 60 s / 150 s, time the VM does
    not have), and the notice's WARNING says so once, with both figures."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    server = gce if source == "gce" else aws
    w = make_watcher(source, gce_metadata_url=gce.url, aws_metadata_url=aws.url)
    w.deadline = user  # what CheckpointEngine(preemption_deadline=user) sets
    w.start()
    assert server.wait_for_requests(lambda r: r.path in (GCE_PREEMPTED, AWS_ACTION), count=2)
    server.preempt()
    assert w.wait(timeout=2)
    n = w.notice
    assert (n.source, n.deadline) == (source, platform)
    assert wait_until(lambda: cap_lines(caplog))  # the poller logs just after wait() is woken
    (line,) = cap_lines(caplog)
    assert line.startswith(f"Preemption notice from {source}")
    assert f"deadline {platform:g} s: the platform's announced hard stop" in line and f"={user:g} s" in line, line
    assert w.deadline_at == n.received_at + platform == w.hard_stop_at  # not n.received_at + user
    w.trigger("sigterm", "SIGTERM", 25.0)  # the shutdown's SIGTERM: no second cap line
    assert len(cap_lines(caplog)) == 1


def test_a_sigterm_notice_does_not_cap_the_user_deadline_but_a_later_aws_notice_does(make_watcher, caplog):
    """SIGTERM's 25 s is a guess (a Kubernetes grace period may be longer): the user's 60 s stays the deadline
    in use. An AWS notice arriving after it, whose hard stop comes before those 60 s, caps it (logged once)."""
    caplog.set_level(logging.INFO, logger="cloudckpt")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    w = make_watcher("sigterm")
    w.deadline = 60.0
    w.start()
    send_sigterm()
    assert w.wait(timeout=2)
    first = w.notice
    assert first.source == "sigterm" and w.hard_stop_at == first.received_at + 25.0
    assert w.deadline_at == first.received_at + 60.0  # the user's value wins over SIGTERM's guess
    assert cap_lines(caplog) == []
    w.trigger("aws", "spot instance-action: terminate", 30.0)
    aws_notice = w.notices[1]
    assert w.deadline_at == aws_notice.received_at + 30.0 < first.received_at + 60.0
    (line,) = cap_lines(caplog)
    assert "hard stop aws announced" in line and "preemption_deadline=60 s" in line, line
    w.trigger("aws", "spot instance-action: terminate", 20.0)  # closer still: in use, not logged again
    assert w.deadline_at == w.notices[2].received_at + 20.0 and len(cap_lines(caplog)) == 1


@pytest.mark.parametrize("announced", [[None, 20.0, 30.0], [None, None, None]], ids=["announced", "guessed"])
def test_a_peer_notice_caps_the_user_deadline_when_it_relays_an_announced_hard_stop(make_watcher, caplog, announced):
    """In a multi-worker job another worker's hard stop ends the job's collective ops. Workers 1 and 2 of three got
    notices (``stop_agreed``'s all-reduce: the seconds their deadlines in use leave, 40 s on average, and per worker
    the seconds to the hard stop its platform announced, if any); worker 0 records them as a "peer" notice. When a
    platform announced one (20 s and 30 s away), the earliest caps worker 0's preemption_deadline of 60 s, as its
    own metadata notice would (logged so); when none did (SIGTERMs: 25 s, a guess), the user's 60 s stays in use.
    Before: a peer notice never capped it (the chief's final commit could run past the peer's announced hard
    stop), and its deadline was the mean of the deadlines in use."""
    from cloudckpt.distributed import relay_peer_notice

    caplog.set_level(logging.INFO, logger="cloudckpt")
    w = make_watcher("sigterm")  # never started: driven directly, as stop_agreed drives it
    w.deadline = 60.0  # CheckpointEngine(preemption_deadline=60)
    relay_peer_notice(w, noticed=2, left_total=80.0, announced_left=announced)
    n = w.notice
    assert n.source == "peer" and "2 other worker(s)" in n.detail
    if announced[1] is not None:
        assert n.deadline == 20.0 and n.announced
        assert w.deadline_at == n.received_at + 20.0 == w.hard_stop_at
        (line,) = cap_lines(caplog)
        assert line.startswith("Preemption notice from peer") and "announced hard stop" in line, line
    else:
        assert n.deadline == 40.0 and not n.announced
        assert w.deadline_at == n.received_at + 60.0
        assert cap_lines(caplog) == []


@pytest.mark.parametrize("announced", [[None, 20.0], [None, 90.0], [None, None]], ids=["sooner", "later", "none"])
def test_a_worker_with_its_own_notice_takes_a_peers_sooner_announced_hard_stop(make_watcher, caplog, announced):
    """Worker 0 got a SIGTERM of its own (its deadline in use: preemption_deadline=60 s, the 25 s guess caps
    nothing) and worker 1's platform announced a hard stop 20 s away: worker 0 records it as a later "peer"
    notice, which brings its deadline in use to 20 s (worker 1's machine, and the job's collective ops, stop
    then). A peer's hard stop later than 60 s, or none announced, records nothing. Before: a worker with a notice
    of its own never looked at its peers' (a two-worker review found it)."""
    from cloudckpt.distributed import relay_peer_notice

    caplog.set_level(logging.INFO, logger="cloudckpt")
    w = make_watcher("sigterm")
    w.deadline = 60.0
    w.trigger("sigterm", "SIGTERM", 25.0)
    first = w.notice
    relay_peer_notice(w, noticed=1, left_total=20.0 if announced[1] else 25.0, announced_left=announced, here=True)
    if announced[1] == 20.0:
        assert [n.source for n in w.notices] == ["sigterm", "peer"] and w.notices[1].announced
        assert w.deadline_at == w.notices[1].received_at + 20.0
        assert any("comes before preemption_deadline=60" in r.getMessage() for r in caplog.records)
    else:
        assert list(w.notices) == [first] and w.deadline_at == first.received_at + 60.0


def test_package_keeps_the_public_names():
    import cloudckpt

    names = ["PreemptionNotice", "PreemptionWatcher", "last_notice", "was_preempted", "_reset_last_notice",
             "GCE_METADATA_URL_ENV", "AWS_METADATA_URL_ENV", "AZURE_METADATA_URL_ENV", "DEFAULT_GCE_METADATA_URL",
             "DEFAULT_AWS_METADATA_URL", "DEFAULT_AZURE_METADATA_URL", "DEFAULT_DEADLINES", "SOURCES"]
    assert [n for n in names if not hasattr(preemption, n)] == []
    assert set(preemption.__all__) <= set(names)
    assert cloudckpt.PreemptionWatcher is PreemptionWatcher and cloudckpt.was_preempted is was_preempted
    assert (preemption.SOURCES, preemption.DEFAULT_DEADLINES) == (
        ("sigterm", "gce", "aws", "azure"), {"sigterm": 25.0, "gce": 25.0, "aws": 100.0, "azure": 25.0})
    assert preemption.notice.ANNOUNCING_SOURCES == ("gce", "aws", "azure")
    assert (preemption.AZURE_METADATA_URL_ENV, preemption.DEFAULT_AZURE_METADATA_URL) == (
        "CLOUDCKPT_AZURE_METADATA_URL", "http://169.254.169.254")


def test_trigger_concurrent_records_exactly_once():
    w = PreemptionWatcher()
    hits: list[PreemptionNotice] = []
    w.add_callback(hits.append)
    barrier = threading.Barrier(16)

    def fire(i: int) -> None:
        barrier.wait()
        w.trigger("gce", f"t{i}", 25.0)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hits) == 1 and hits[0] is w.notice


def test_wait_is_woken_from_another_thread():
    w = PreemptionWatcher()
    threading.Timer(0.1, w.trigger, args=("aws", "x", 100.0)).start()
    t0 = time.monotonic()
    assert w.wait(timeout=3)
    assert time.monotonic() - t0 < 2
    assert w.wait(0) and w.wait() and w.wait(1e12)  # stays set


def test_was_preempted_process_wide():
    assert not was_preempted() and last_notice() is None
    PreemptionWatcher().trigger("sigterm", "SIGTERM", 25.0)
    assert was_preempted() and last_notice().source == "sigterm"


# -------------------------------------------------------------- subprocess


def test_subprocess_auto_survives_sigterm(gce, aws, azure):
    """End to end: a child using from_spec("auto") with env-configured URLs
    gets SIGTERM from outside, survives it and reports the notice."""
    code = textwrap.dedent("""
        import sys
        from cloudckpt.preemption import PreemptionWatcher, was_preempted
        w = PreemptionWatcher.from_spec("auto")
        w._poll_interval = 0.05
        w.start()
        print("ready", w.gce_metadata_url, w.aws_metadata_url, w.azure_metadata_url, flush=True)
        ok = w.wait(timeout=10)
        w.stop()
        print("notice", ok, was_preempted(), w.notice.source, w.notice.detail, flush=True)
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ,
               CLOUDCKPT_GCE_METADATA_URL=gce.url, CLOUDCKPT_AWS_METADATA_URL=aws.url,
               CLOUDCKPT_AZURE_METADATA_URL=azure.url,
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line.split() == ["ready", gce.url, aws.url, azure.url], proc.stderr.read()
        assert gce.wait_for_requests(lambda r: r.path == GCE_PREEMPTED, 1)
        assert aws.wait_for_requests(lambda r: r.path == AWS_ACTION, 1)
        assert azure.wait_for_requests(lambda r: r.path == AZURE_EVENTS, 1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "notice True True sigterm SIGTERM"


def test_second_sigterm_terminates_the_process():
    """The first SIGTERM is a notice (the process saves and exits cleanly); a second one, e.g. after a run
    that failed without reaching end(), must not be swallowed."""
    script = (
        "import os, signal, time\n"
        "from cloudckpt.preemption import PreemptionWatcher\n"
        "w = PreemptionWatcher(('sigterm',)); w.start()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert w.is_preempted(); print('survived first', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5); print('survived second', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "survived first" in proc.stdout and "survived second" not in proc.stdout
    assert proc.returncode == -signal.SIGTERM
