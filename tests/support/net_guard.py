"""A socket guard for tests: record every outgoing connection, refuse any that is not to the loopback address.

Patches ``socket.socket.connect`` / ``connect_ex`` (what urllib3, aiohttp's
event loop and http.client end up calling). A refused connection raises
``ConnectionRefusedError`` before anything is sent, and is recorded in
``violations`` so the test fails even if the code under test swallowed or
retried the error.
"""

from __future__ import annotations

import socket
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import pytest

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass
class NetGuard:
    """What the guarded code tried: every address, and the ones refused for not being loopback."""

    connections: list[Any] = field(default_factory=list)
    violations: list[Any] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # per connection: the thread and the code that made it

    def check(self, sock: socket.socket, address: Any) -> None:
        self.connections.append(address)
        frames = "".join(traceback.format_stack(limit=12)[:-2])
        self.origins.append(f"{address!r} from thread {threading.current_thread().name}:\n{frames}")
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            self.violations.append(address)
            raise ConnectionRefusedError(f"test network guard: connection to {address!r} refused (only "
                                         "127.0.0.1 may be a target of test traffic)")


def install(monkeypatch: pytest.MonkeyPatch) -> NetGuard:
    """Guard every socket connect until ``monkeypatch`` is undone; returns the record."""
    guard = NetGuard()
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_connect(self: socket.socket, address: Any) -> None:
        guard.check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> int:
        guard.check(self, address)
        return connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    return guard
