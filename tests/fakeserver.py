"""Test helpers around the fake Clado API: a manual clock, a free port, and `FakeServer`, which
serves the simulator over real loopback HTTP from a background thread (the implementation
lives in supervisor.sim.server, shared with the demo)."""

from __future__ import annotations

import socket

from supervisor.sim.server import ThreadedFakeApi as FakeServer

__all__ = ["FakeServer", "ManualClock", "free_port"]


class ManualClock:
    """A clock that only moves when a test says so; pass it as ``FakeClado(clock=...)``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (prefer FakeServer's own socket, which cannot race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
