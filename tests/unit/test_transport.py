"""The client's transports (api.transport): which failures count as "maybe sent".

A POST initiate that may have reached the API is never repeated (a second, billed job); one
that surely did not is retried. httpx-aiohttp reports every aiohttp connection error as
httpx.ConnectTimeout ("never sent"), so the client maps aiohttp's errors itself. Proved over
loopback with raw asyncio servers that count the requests they read, on both transports.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from supervisor.adapters.clado import (
    MAX_BODY,
    ApiUnavailable,
    CladoClient,
    TransportName,
    UnreadableBody,
    _unsent_or_not,
)
from supervisor.config import ConfigError, load_config
from supervisor.service.wiring import client_for

KEY = "lk_transport_3c9e51d0a7"
JOB = "550e8400-e29b-41d4-a716-446655440000"
RETRIES = 2
TRANSPORTS: list[TransportName] = ["aiohttp", "httpx"]

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Counter:
    """How many whole requests the server read (a request line, headers and body)."""

    def __init__(self) -> None:
        self.requests = 0


async def read_request(reader: asyncio.StreamReader, counter: Counter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    counter.requests += 1


@asynccontextmanager
async def loopback(serve: Serve) -> AsyncIterator[str]:
    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        await listener.wait_closed()


def client(base_url: str, transport: TransportName, **kwargs: float) -> CladoClient:
    options: dict[str, float] = {"timeout": 2.0, "max_retries": RETRIES, "backoff_initial": 0.001, "backoff_max": 0.01}
    options.update(kwargs)
    return CladoClient(base_url, KEY, transport=transport, **options)  # type: ignore[arg-type]


def hang_up(counter: Counter, *, reset: bool = False, after: bytes = b"") -> Serve:
    """A server that reads the whole request (the API has it: a job may have started), writes
    `after` (nothing, or a status line and headers), then closes or resets the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, counter)
        if after:
            writer.write(after)
            await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()

    return serve


HALF_ANSWER = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"job_id"'


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("how", "reset", "after"),
    [
        ("closed before any answer", False, b""),
        ("reset before any answer", True, b""),
        ("closed halfway through the answer", False, HALF_ANSWER),
    ],
)
async def test_an_initiate_the_server_read_is_never_sent_again(
    transport: TransportName, how: str, reset: bool, after: bytes
) -> None:
    counter = Counter()
    async with loopback(hang_up(counter, reset=reset, after=after)) as base, client(base, transport) as api:
        with pytest.raises(ApiUnavailable, match="not retried"):
            await api.initiate("q", 10)
        assert api.retries == 0
    assert counter.requests == 1, how  # a second one would have started a second, billed job


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_status_poll_the_server_hung_up_on_is_retried(transport: TransportName) -> None:
    counter = Counter()
    async with loopback(hang_up(counter)) as base, client(base, transport) as api:
        with pytest.raises(ApiUnavailable):
            await api.status(JOB)
        assert api.retries == RETRIES
    # aiohttp itself sends an idempotent GET a second time after a disconnect: harmless for
    # a status poll, and it never does so for a POST (the initiate tests above).
    assert counter.requests == (RETRIES + 1) * (2 if transport == "aiohttp" else 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_initiate_to_a_refused_port_is_retried(transport: TransportName) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    async with client(f"http://127.0.0.1:{port}", transport) as api:
        with pytest.raises(ApiUnavailable, match="cannot connect"):
            await api.initiate("q")
        assert api.retries == RETRIES  # nothing was sent: safe to retry even a POST


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_initiate_to_an_unknown_host_is_retried(transport: TransportName) -> None:
    # .invalid never resolves (RFC 2606): the name fails before any connection exists.
    async with client("http://clado.invalid", transport) as api:
        with pytest.raises(ApiUnavailable, match="cannot connect"):
            await api.initiate("q")
        assert api.retries == RETRIES


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_initiate_that_gets_no_answer_in_time_is_not_retried(transport: TransportName) -> None:
    counter = Counter()
    released = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, counter)
        await released.wait()
        writer.close()

    async with loopback(silent) as base:
        async with client(base, transport, timeout=0.2) as api:
            with pytest.raises(ApiUnavailable, match="not retried"):
                await api.initiate("q")
        released.set()
    assert counter.requests == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_declared_oversized_body_is_refused_unread(transport: TransportName) -> None:
    counter = Counter()
    sent = asyncio.Event()

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, counter)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n")
        await writer.drain()
        sent.set()
        await asyncio.sleep(30)  # never sends the body: a client that waited for it would time out

    # A cancel answer has nothing to read in part (a status answer's leading fields are read).
    async with loopback(huge) as base, client(base, transport, timeout=5, max_retries=0) as api:
        with pytest.raises(UnreadableBody, match=f"over {MAX_BODY} bytes"):
            await api.cancel(JOB)
    assert sent.is_set()


def os_error(cls: type[aiohttp.ClientConnectorError]) -> aiohttp.ClientConnectorError:
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("clado.test", 443, True, True, None, None, None)
    return cls(key, OSError(111, "refused"))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (os_error(aiohttp.ClientConnectorError), httpx.ConnectError),
        (os_error(aiohttp.ClientConnectorDNSError), httpx.ConnectError),
        (aiohttp.ConnectionTimeoutError(), httpx.ConnectTimeout),
        (aiohttp.SocketTimeoutError(), httpx.ReadTimeout),
        (aiohttp.ServerDisconnectedError(), httpx.ReadError),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (aiohttp.ClientPayloadError("cut"), httpx.ReadError),
        (aiohttp.ClientConnectionResetError("reset"), httpx.ReadError),
        (ValueError("not aiohttp's"), None),
    ],
)
def test_aiohttp_errors_map_to_sent_or_not(error: BaseException, expected: type[httpx.TransportError] | None) -> None:
    # Only the connect-phase ones are "not sent" (ConnectError, ConnectTimeout: the client
    # retries those for initiate); every other one reads "may have been sent".
    assert _unsent_or_not(error) is expected


def write(tmp_path: Path, api: str) -> Path:
    path = tmp_path / "supervisor.toml"
    path.write_text(f'[api]\nbase_url = "http://127.0.0.1:9"\n{api}\n[policies.default]\nmax_credits = 10\n')
    return path


async def test_the_default_transport_is_aiohttp_and_httpx_can_be_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLADO_API_KEY", KEY)
    default = load_config(write(tmp_path, ""))
    assert default.api.transport == "aiohttp"
    chosen = load_config(write(tmp_path, 'transport = "httpx"'))
    assert chosen.api.transport == "httpx"
    for config, kind in ((default, AiohttpTransport), (chosen, httpx.AsyncHTTPTransport)):
        api = client_for(config)
        assert isinstance(api._http._transport, kind)
        await api.aclose()


def test_an_unknown_transport_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.transport"):
        load_config(write(tmp_path, 'transport = "requests"'))
