"""Serving the admin API with uvicorn on the daemon's own event loop, guarded against slow
and too many clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from supervisor.adapters import limits
from supervisor.app.http.guards import BodyDeadline
from supervisor.config import split_address

if TYPE_CHECKING:
    from supervisor.app.http.api import AdminApi

log = structlog.get_logger("supervisor.http")


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# Slow clients must not hold the admin API's connections (file descriptors the daemon needs
# to enforce): a request's head must arrive within HEAD_TIMEOUT of the connection opening or
# of the previous answer, and its body within BODY_TIMEOUT of its head. An idle keep-alive
# connection is closed after KEEP_ALIVE. Heads are bounded in size (h11's incomplete-event
# bound), bodies by http.max_body_bytes.
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
KEEP_ALIVE = 5
MAX_HEAD_BYTES = 16 * 1024


def _plain_answer(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
    return (head + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_REFUSED = _plain_answer(503, "Service Unavailable", "too many connections to the admin API")
_HEAD_TIMED_OUT = _plain_answer(408, "Request Timeout", "the request did not arrive in time")


def _guarded_protocol(max_connections: int, head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with two guards it lacks: connections beyond `max_connections`
    are answered 503 and closed at once (uvicorn's own limit only answers complete requests,
    so idle connections could pile up without bound), and a request head that is not whole
    within `head_timeout` closes its connection (uvicorn has no header timeout)."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("admin API connection refused: too many connections", limit=max_connections)
                transport.write(_REFUSED)
                transport.close()
                return
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request on this connection gets its own

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request being answered: its body has BodyDeadline
            # IDLE: no whole request head yet (a slow loris, a half-open connection);
            # SEND_BODY: the rest of a body that was answered without being read.
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return
            log.warning("admin API connection closed: no complete request in time", timeout_s=head_timeout)
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_HEAD_TIMED_OUT)
            self.transport.close()

    return GuardedH11Protocol


class AdminServer:
    def __init__(self, api: AdminApi, listen: str) -> None:
        self._api = api
        self._listen = listen
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        host, port = split_address(self._listen)
        # Bind here, so "address in use" is our clear error, not uvicorn's exit.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # The explicit IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets
        # whose proto says TCP; without it every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"admin API cannot listen on {self._listen}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        # A share of the file descriptors (adapters/limits.py): the rest stay enforcement's.
        max_connections = limits.admin_connection_bound()
        config = uvicorn.Config(
            BodyDeadline(self._api.app(), BODY_TIMEOUT),
            http=_guarded_protocol(max_connections, HEAD_TIMEOUT),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            limit_concurrency=max_connections,  # requests beyond it: 503
            # asyncio accepts up to `backlog` sockets in one go before any is looked at: this
            # bounds the descriptors a burst of connections can take at once.
            backlog=max_connections,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("admin API stopped during startup")
            await asyncio.sleep(0.01)
        log.info(
            "admin API listening",
            address=f"{host}:{self.port}",
            auth=self._api.auth_enabled,
            max_connections=max_connections,
        )

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=10)
        self._server = self._task = None
