"""The HTTP transport under the client's httpx API, and which of its failures mean "not sent".

`transport="aiohttp"` (the default) sends through httpx-aiohttp, about three times the
requests per CPU second of httpx's own transport at 32 in flight; "httpx" is httpx's own
(httpcore). httpx-aiohttp reports every aiohttp connection error, a server hanging up after it
got the request included, as httpx.ConnectTimeout, which reads "never sent": this module maps
aiohttp's errors itself (`_aiohttp_errors`), so that only a failure before any byte left
(refused, DNS, TLS handshake, connect timeout) is "not sent" and safe to retry for initiate.
The aiohttp transport does not read proxy settings from the environment (that costs two thread
hops per request): behind a proxy, use "httpx".
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

TransportName = Literal["aiohttp", "httpx"]


@functools.cache
def tls() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle costs about 40 ms a client."""
    return httpx.create_ssl_context()


def limits(max_concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)


def make_transport(name: TransportName, max_concurrency: int) -> httpx.AsyncBaseTransport | None:
    """The transport under the client's httpx API (None: httpx's own, which httpx builds so
    that it also honours proxy settings from the environment). The benchmark's bare loop
    uses the same one."""
    if name == "aiohttp":
        return _MappedAiohttpTransport(verify=tls(), limits=limits(max_concurrency), trust_env=False)
    if name == "httpx":
        return None
    raise ValueError(f"unknown transport {name!r}: use 'aiohttp' or 'httpx'")


def _unsent_or_not(error: BaseException) -> type[httpx.TransportError] | None:
    """The httpx error an aiohttp error stands for, judged by whether the request may have
    left: None for an error that is not aiohttp's."""
    if isinstance(error, aiohttp.ClientConnectorError):
        return httpx.ConnectError  # refused, DNS, TLS handshake: no connection, nothing sent
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout  # waiting for a pooled connection or connecting
    if isinstance(error, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout  # waiting for the answer: the request went out
    if isinstance(error, aiohttp.ClientPayloadError):
        return httpx.ReadError
    if isinstance(error, aiohttp.ClientConnectionError):
        # Disconnected, reset, any OS error on an open connection: it may have been sent.
        return httpx.ReadError
    if isinstance(error, aiohttp.ClientError):
        return httpx.RemoteProtocolError  # a malformed answer: the request was received
    return None


@contextlib.contextmanager
def _aiohttp_errors() -> Iterator[None]:
    """Re-map what httpx-aiohttp raised (its error's cause is aiohttp's own) or let through."""
    try:
        yield
    except (httpx.TransportError, aiohttp.ClientError) as exc:
        cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
        kind = _unsent_or_not(cause) if cause is not None else None
        if kind is None or type(exc) is kind:
            raise
        raise kind(str(exc)) from cause


class _MappedStream(httpx.AsyncByteStream):
    """An answer's body, its read errors mapped like the request's (a server that hangs up
    halfway through the body must not read as "connect timeout")."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _aiohttp_errors():
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        with _aiohttp_errors():
            await self._inner.aclose()


class _MappedAiohttpTransport(AiohttpTransport):
    """httpx-aiohttp's transport with this module's error mapping (see the module doc)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _aiohttp_errors():
            response = await super().handle_async_request(request)
        if isinstance(response.stream, httpx.AsyncByteStream):  # always, from an async transport
            response.stream = _MappedStream(response.stream)
        return response
