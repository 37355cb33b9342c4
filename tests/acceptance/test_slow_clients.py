"""Slow and idle clients of the admin API cannot stop enforcement.

The daemon runs as a user runs it, at the common 1,024 file descriptor limit (soft and
hard, so it cannot raise it), while 500 slow-loris connections (a request head sent a line
a second, never finished) and 1,100 half-open ones (connected, nothing sent: more than the
limit) hit its admin port, reconnecting when closed, as an attacker would. Before the fix
this left 5 of 5 runaways uncancelled (169 credits against a limit of 40), the database
unopenable and 243 MB of log in 37 s.
"""

from __future__ import annotations

import errno
import json
import resource
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from conftest import config_text
from fakeserver import free_port

from .conftest import PY, FakeApiProcess, cli, cli_env, jobs_json, wait_for

FD_LIMIT = 1024
SLOW_LORIS, HALF_OPEN = 500, 1100
RUNAWAYS, RATE, MAX_CREDITS = 5, 5, 40  # 5 results a second: the limit is reached in 8 s
# A 1 s poll at 5 results a second may see the count at most one poll past the limit.
CREDIT_BOUND = MAX_CREDITS + 2 * RATE
LOG_BOUND = 1024 * 1024
TOKEN = "slow-clients-admin-token"


class Attack:
    """Up to SLOW_LORIS + HALF_OPEN connections to one port, kept up from a thread until
    stopped: each closed one (the server's doing) is counted and opened again."""

    def __init__(self, port: int) -> None:
        self._address = ("127.0.0.1", port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attack", daemon=True)
        self.closed_by_server = 0
        self.opened = 0

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self, loris: bool) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(self._address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return None
        self.opened += 1
        if loris:
            self._send(sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        return sock

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        try:
            sock.send(data)
        except (BlockingIOError, InterruptedError):
            pass  # still connecting, or the buffer is full: the attacker does not care
        except OSError as exc:
            return exc.errno in (errno.ENOTCONN, errno.EAGAIN)
        return True

    @staticmethod
    def _alive(sock: socket.socket) -> bool:
        try:
            sock.recv(4096)  # b"": closed; or an answer (408, 503) before the close
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            pass
        return False

    def _run(self) -> None:
        kinds = [True] * SLOW_LORIS + [False] * HALF_OPEN
        socks: list[socket.socket | None] = [None] * len(kinds)
        try:
            while not self._stop.is_set():
                for i, loris in enumerate(kinds):
                    sock = socks[i]
                    if sock is not None and not (self._alive(sock) and (not loris or self._send(sock, b"X-a: b\r\n"))):
                        sock.close()
                        sock = None
                        self.closed_by_server += 1
                    socks[i] = sock if sock is not None else self._open(loris)
                self._stop.wait(1.0)
        finally:
            for sock in socks:
                if sock is not None:
                    sock.close()


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """The test process holds all the attack's sockets: raise its own soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = SLOW_LORIS + HALF_OPEN + 512
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the attack needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _at_the_common_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def stalled_body(port: int, token: str = TOKEN) -> socket.socket:
    """A request whose head is whole and whose body stops after its first byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    sock.sendall(head.encode())
    return sock


def dribble(sock: socket.socket, stop: threading.Event) -> None:
    """One more byte of the body a second (which defeats a keep-alive timeout), until stopped."""
    while not stop.wait(1.0):
        try:
            sock.send(b" ")
        except OSError:
            return


def answer_of(sock: socket.socket) -> bytes:
    """What the server sent up to closing the connection after its answer: with a FIN, or with
    a reset (the kernel's close of a socket whose request was not read whole: the answer
    before it is still read, the reset then ends the loop instead of an empty read)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return data


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return int(response.status)
    except OSError:
        return 0


def test_slow_and_idle_connections_cannot_stop_enforcement(
    tmp_path: Path, fake_api: FakeApiProcess, many_descriptors: None
) -> None:
    port = free_port()
    policy = f'[policies.default]\nmax_runtime = "30m"\nmax_credits = {MAX_CREDITS}'
    text = config_text(fake_api.base_url, "sqlite:///supervisor.db", policies=policy)
    (tmp_path / "supervisor.toml").write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [PY, "-m", "supervisor", "run"],
            cwd=tmp_path,
            env=cli_env(CLADO_SUPERVISOR_TOKEN=TOKEN),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_at_the_common_limit,  # the child's own limit, set before exec
        )
    try:
        wait_for(lambda: healthz(port) == 200, timeout=60, what="the daemon's admin API")
        slow_body = stalled_body(port)
        unread_body = stalled_body(port, token="not-the-token")  # answered 401 before its body
        # Their heads are parsed (the app has the requests) before the attack fills the
        # connection cap: a request on a connection opened after them is answered only once
        # the server's loop has read theirs (a head read late would get uvicorn's own 503).
        assert healthz(port) == 200
        stop_dribbling = threading.Event()
        threading.Thread(target=dribble, args=(unread_body, stop_dribbling), daemon=True).start()
        with Attack(port) as attack:
            wait_for(lambda: attack.opened >= SLOW_LORIS + HALF_OPEN, timeout=60, what="the attack to be in place")
            ids = [fake_api.create_job(rate=RATE, limit=1000) for _ in range(RUNAWAYS)]
            tracked = cli("track", *ids, cwd=tmp_path)  # a CLI beside a daemon under attack
            assert tracked.returncode == 0, tracked.stderr

            def all_cancelled() -> bool:
                return all(fake_api.job(job_id)["status"] == "cancelled" for job_id in ids)

            wait_for(all_cancelled, timeout=45, what="every runaway to be cancelled during the attack")
            assert daemon.poll() is None
            during = jobs_json(tmp_path)  # the database is usable, by another process too
            # Slow clients were let go, not held: each slow loris was closed at least once.
            assert attack.closed_by_server >= SLOW_LORIS
            # A body that stops coming is answered (408, problem details), not waited for.
            head, _, body = answer_of(slow_body).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ")
            assert json.loads(body)["code"] == "request_timeout"
            # The rest of a body answered without being read does not hold the connection.
            assert answer_of(unread_body).startswith(b"HTTP/1.1 401 ")
            stop_dribbling.set()

        for job_id in ids:
            job = fake_api.job(job_id)
            assert job["cancel_calls"] == 1, job
            assert MAX_CREDITS <= job["results"] <= CREDIT_BOUND, job
            assert during[job_id]["state"] in ("confirming", "cancelled")
            assert during[job_id]["cancel_reason"] == "max_credits"
        wait_for(lambda: healthz(port) == 200, timeout=20, what="/healthz once the attack stopped")
        wait_for(
            lambda: all(job["state"] == "cancelled" for job_id, job in jobs_json(tmp_path).items() if job_id in ids),
            timeout=30,
            what="the cancels confirmed",
        )
    finally:
        if daemon.poll() is None:
            daemon.terminate()
        code = daemon.wait(30)
    assert code == 0
    assert log_path.stat().st_size < LOG_BOUND
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    [limit] = [line for line in lines if line["message"].startswith("file descriptor limit")]
    assert limit["soft"] == FD_LIMIT
    assert limit["admin_connections"] == FD_LIMIT // 8
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    held_back = [line for line in lines if line.get("suppressed")]
    assert held_back, "the repeated lines about closed connections are held back with a count"
