"""The daemon speaks systemd's notify protocol to whatever listens on $NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from .conftest import DaemonProcess, cli_env


def _messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams received until one contains `until` (bounded by `timeout`)."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in received[-1]:
            return received
    raise AssertionError(f"no {until!r} within {timeout}s; got {received}")


def test_ready_watchdog_status_and_stopping(workdir: Path, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = cli_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")  # ping every 0.2 s
        daemon = DaemonProcess(workdir, env)
        try:
            startup = _messages(sock, "READY=1", timeout=30)
            ready = next(m for m in startup if "READY=1" in m)
            assert "STATUS=" in ready
            # WATCHDOG=1 comes from the tick loop, again and again while it runs.
            pings = [m for m in _messages(sock, "STATUS=supervising", timeout=15) if m == "WATCHDOG=1"]
            pings += [m for m in _messages(sock, "WATCHDOG=1", timeout=5) if m == "WATCHDOG=1"]
            pings += [m for m in _messages(sock, "WATCHDOG=1", timeout=5) if m == "WATCHDOG=1"]
            assert len(pings) >= 2
        finally:
            daemon.proc.send_signal(signal.SIGTERM)
            stopping = _messages(sock, "STOPPING=1", timeout=30)
            assert daemon.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in stopping)
