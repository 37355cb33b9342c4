"""How the client sends: one request at a time per slot, its retries, and the client-wide
waits (the API's rate-limit hold-off, the backoff after a rejected key).

Retry rules: timeouts, connection errors, 5xx, 429 and bodies that are not the JSON the docs
promise are retried with exponential backoff and jitter; other 4xx are not. Starting a job is
not idempotent, so it is retried only when the request certainly did not reach the server
(connection refused or timed out, 429, 503); after a read timeout, a dropped connection, a
500/502/504 or an unreadable answer it fails with `ApiUnavailable` at once, because a retry
could start a second, billed job.

Rate limits: a 429 (its `retry_after` in the body or a Retry-After header, whichever is
larger) or a 503 with Retry-After holds off the whole client, not only the call that got it:
every request waits until the hold-off ends, or fails fast with `RateLimited` when it would
wait longer than the call may (`initiate_wait` for initiate, two minutes for the others).
A 429 to initiate is retried for as long as `initiate_wait` allows, not `max_retries` times.

Every attempt has a deadline (`timeout`), on top of httpx's per-read timeouts, so a server
that trickles its answer cannot hold a call forever, and every body is read with a bound
(`max_body`): a larger one is refused after its first `max_body` bytes (never held whole), or,
where the caller can use them, read for the fields that come before the bound.

A 401 is logged once as "API key rejected"; after it every call fails fast without a
request until a growing backoff (30 s, 60 s, … 600 s) has passed, so a revoked key does not
hammer the API. Only answers to requests sent after the last 401 move that backoff: the
401s of requests that were already in flight do not multiply it, and their successes do
not end it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import structlog

from supervisor.adapters import metrics
from supervisor.adapters.clado.errors import (
    ApiKeyRejected,
    BodyTooLarge,
    CladoError,
    JobNotFound,
    OutOfCredits,
    RateLimited,
    RequestRejected,
    Transient,
    UnreadableBody,
    unreadable,
)
from supervisor.adapters.clado.shapes import (
    HOLD_OFF_MAX,
    error_message,
    json_or_none,
    leading_fields,
    retry_after_body,
    retry_after_header,
)

log = structlog.get_logger("supervisor.clado")

T = TypeVar("T")

_AUTH_BACKOFF_FIRST = 30.0
_AUTH_BACKOFF_MAX = 600.0
# A 429 that says "retry now" (or nothing) still holds off a second, so a misbehaving server
# cannot turn the retries into a busy loop.
_HOLD_OFF_MIN = 1.0
# The longest a call other than initiate waits for a hold-off before it fails fast.
_WAIT_MAX = 120.0
# Status pages are a few KB (one result each); anything this big is not an answer we want.
MAX_BODY = 1_000_000
SUCCESS = frozenset(range(200, 300))
# Answers only an authenticated caller gets: after a 401, one of these ends the backoff.
_KEY_ACCEPTED = SUCCESS | {402, 404, 409}


@dataclass
class Wait:
    """How long one call may spend waiting out the client's hold-off, and how long it has."""

    endpoint: str
    limit: float
    waited: float = 0.0


class Session:
    """Sends the client's requests over `http` and reads their answers into bodies or typed
    errors. One per client: the hold-off and the key's backoff are shared by all its calls."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        secret: str,
        *,
        timeout: float,
        max_concurrency: int,
        max_retries: int,
        backoff_initial: float,
        backoff_max: float,
        initiate_wait: float,
        max_body: int,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[Any]],
    ) -> None:
        self._http = http
        self._base_url = base_url
        self._secret = secret
        # Bound in-flight requests ourselves: httpx's pool degrades with many waiters.
        self._slots = asyncio.Semaphore(max_concurrency)
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._initiate_wait = initiate_wait
        self._max_body = max_body
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._auth_blocked_until = 0.0
        self._auth_backoff = 0.0
        # Bumped by each 401 that moves the backoff; a request remembers the epoch it was sent
        # in, so answers to requests that were in flight before a 401 cannot move it again.
        self._auth_epoch = 0
        # The client-wide hold-off; its generation moves each time it is pushed later, so a
        # waiter knows whether the hold-off it waited out is still the current one.
        self._held_until = 0.0
        self._hold_generation = 0
        self.retries = 0  # total retried attempts, for metrics and tests

    @property
    def api_key_rejected(self) -> bool:
        return self._clock() < self._auth_blocked_until

    @property
    def held_off_for(self) -> float:
        """Seconds the client still holds every request off for the API's rate limit."""
        return max(0.0, self._held_until - self._clock())

    async def retrying(
        self,
        call: Callable[[Wait], Awaitable[T]],
        *,
        endpoint: str,
        idempotent: bool = True,
        retry_unreadable: bool = True,
    ) -> T:
        """`call` until it returns, retrying what `Transient` says may be retried. A plain
        loop, not a retry library's: it runs on every poll, and the first attempt (almost
        every call's only one) then costs nothing beyond the call itself."""
        wait = Wait(endpoint, _WAIT_MAX if idempotent else self._initiate_wait)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(wait)
            except Transient as exc:
                failure = exc
            # A request that may have reached the server is not repeated unless idempotent.
            if not idempotent and failure.sent:
                error = failure.error(f"{failure} (not retried: the request may have reached the API)")
                error.maybe_sent = True
                raise error from None
            # A throttled initiate started nothing: it waits for as long as initiate_wait
            # allows (the hold-off raises RateLimited once it cannot), not max_retries.
            if attempt > self._max_retries and (idempotent or not failure.throttled):
                raise failure.error(str(failure)) from None
            if not retry_unreadable and issubclass(failure.error, UnreadableBody):
                raise failure.error(str(failure)) from None
            metrics.API_RETRIES.labels(endpoint).inc()
            self.retries += 1
            log.debug("api retry", attempt=attempt, error=str(failure))
            if not failure.held:  # a held-off retry waits in _await_hold_off instead
                await self._sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Exponential with jitter: after the first failure between half and all of
        `backoff_initial`, doubling up to `backoff_max`."""
        exponential = min(self._backoff_max, self._backoff_initial * 2 ** (attempt - 1))
        return random.uniform(exponential / 2, exponential)  # noqa: S311 - jitter, not a secret

    def _hold_off(self, seconds: float, cause: str) -> None:
        """Hold every request of this client off for `seconds` (never shortening a hold-off)."""
        now = self._clock()
        until = now + min(seconds, HOLD_OFF_MAX)
        if until <= self._held_until:
            return
        if self._held_until <= now:
            log.warning("API asked to slow down: holding off every request", seconds=round(until - now, 3), cause=cause)
        self._held_until = until
        self._hold_generation += 1

    async def _await_hold_off(self, wait: Wait) -> int:
        """Wait out the client's hold-off, or raise RateLimited if this call may not wait that
        long. Returns the generation of the hold-off waited out."""
        while (remaining := self._held_until - self._clock()) > 0:
            if wait.waited + remaining > wait.limit:
                raise RateLimited(
                    f"API rate limit: every request is held off for another {remaining:.0f}s, "
                    f"longer than this {wait.endpoint} call may wait ({wait.limit:.0f}s)",
                    retry_in=remaining,
                )
            generation = self._hold_generation
            if wait.endpoint == "initiate":
                log.info("initiate waits for the API's rate limit", seconds=round(remaining, 3))
            wait.waited += remaining
            await self._sleep(remaining)
            if generation == self._hold_generation:
                break  # waited out the hold-off as it was set: trust the sleep over the clock
        return self._hold_generation

    def _check_key(self) -> None:
        if self.api_key_rejected:
            raise ApiKeyRejected("API key rejected (backing off before trying again)")

    # -- one request ----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        wait: Wait,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        accept: frozenset[int] = frozenset({200}),
        empty_ok: bool = False,
        not_found: tuple[type[CladoError], str] = (JobNotFound, "job not found"),
        partial: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        """One attempt, its answer read as the docs describe it (or a typed error). With
        `partial`, a body over the bound is read for the fields that come before the bound
        (shapes.leading_fields) rather than refused."""
        epoch, code, headers, content, prefix = await self._attempt(method, path, wait, params, json, partial)
        if code == 401:
            self._key_rejected(epoch)
        if code in _KEY_ACCEPTED:
            self._key_accepted(epoch)
        too_large = content is None
        content = content or b""
        if code == 429:
            header = retry_after_header(headers, self._wall_clock()) or 0.0
            self._hold_off(max(header, retry_after_body(content) or 0.0, _HOLD_OFF_MIN), "HTTP 429")
            raise Transient("throttled (429)", sent=False, held=True, throttled=True)
        if code >= 500:
            hint = retry_after_header(headers, self._wall_clock())
            if hint:
                self._hold_off(hint, f"HTTP {code}")
            # A 503 is the documented "not now": the request was not acted on.
            raise Transient(f"API error HTTP {code}", sent=code != 503, held=bool(hint))
        if code not in accept:
            message = error_message(content, self._secret)
            if code == 404:
                error, default = not_found
                raise error(message or default)
            if code == 402:
                raise OutOfCredits(message or "out of credits")
            raise RequestRejected(code, message)
        if too_large:
            leading = leading_fields(prefix) if partial else {}
            if not leading:
                raise unreadable(
                    f"API answered HTTP {code} with a body over {self._max_body} bytes (refused unread)", BodyTooLarge
                )
            return code, leading
        if empty_ok and not content.strip():
            return code, {}
        body = json_or_none(content)
        if body is None:
            raise unreadable(f"API answered HTTP {code} with a body that is not JSON")
        if not isinstance(body, dict):
            raise unreadable(f"API answered HTTP {code} with JSON that is not an object")
        return code, body

    async def _attempt(
        self,
        method: str,
        path: str,
        wait: Wait,
        params: dict[str, Any] | None,
        json: dict[str, Any] | None,
        partial: bool,
    ) -> tuple[int, int, httpx.Headers, bytes | None, bytes]:
        """Send once the key and the hold-off allow: (auth epoch it was sent in, code, headers,
        body or None when it was over the bound, the body or its first `max_body` bytes)."""
        while True:
            self._check_key()
            generation = await self._await_hold_off(wait)
            async with self._slots:
                # A 401 or a 429 may have come in while this call waited for a slot.
                self._check_key()
                if generation != self._hold_generation and self.held_off_for > 0:
                    continue
                epoch = self._auth_epoch
                failure: Transient | None = None
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(self._timeout):
                        code, headers, content, cut = await self._send(method, path, params, json, partial)
                    metrics.API_REQUESTS.labels(wait.endpoint, str(code)).inc()
                    return epoch, code, headers, None if cut else content, content
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                    # No connection, so nothing was sent: safe to retry even a POST initiate.
                    failure = Transient(f"cannot connect to the API: {type(exc).__name__}", sent=False)
                except (TimeoutError, httpx.TimeoutException):
                    failure = Transient(f"API request timed out after {self._timeout:g}s")
                except httpx.RequestError as exc:
                    # Dropped connections, protocol errors, undecodable content: the request may
                    # have been sent and acted on.
                    failure = Transient(f"API request failed: {type(exc).__name__}")
                finally:
                    metrics.API_LATENCY.labels(wait.endpoint).observe(time.perf_counter() - started)
            metrics.API_REQUESTS.labels(wait.endpoint, "error").inc()
            # Raised outside the handler, so no httpx error (which holds the request and its
            # Authorization header) rides along as __context__.
            raise failure

    async def _send(
        self, method: str, path: str, params: dict[str, Any] | None, json: dict[str, Any] | None, partial: bool
    ) -> tuple[int, httpx.Headers, bytes, bool]:
        """(status code, headers, body, cut): a body over `max_body` is read no further than
        its first `max_body` bytes (`cut` is then True; not at all when it says so up front
        and the caller cannot use a part) and the connection closed, so memory stays bounded
        whatever the server sends."""
        # An absolute URL, its query already encoded: httpx merging a base URL and params
        # parses the URL three times, a third of the client's own CPU per poll.
        url = f"{self._base_url}{path}?{urlencode(params)}" if params else f"{self._base_url}{path}"
        request = self._http.build_request(method, url, json=json)
        response = await self._http.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if not partial and declared.isdigit() and int(declared) > self._max_body:
                return response.status_code, response.headers, b"", True
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                if size + len(chunk) > self._max_body:
                    chunks.append(chunk[: self._max_body - size])
                    return response.status_code, response.headers, b"".join(chunks), True
                size += len(chunk)
                chunks.append(chunk)
        finally:
            await response.aclose()
        return response.status_code, response.headers, b"".join(chunks), False

    def _key_rejected(self, epoch: int) -> None:
        # Only the first 401 to a request sent since the last one moves the backoff: the
        # other requests that were in flight with it must not each double it.
        if epoch == self._auth_epoch:
            self._auth_epoch += 1
            if not self._auth_backoff:
                log.error("API key rejected", hint="check api.api_key_env / api.api_key_file")
            self._auth_backoff = min(_AUTH_BACKOFF_MAX, (self._auth_backoff * 2) or _AUTH_BACKOFF_FIRST)
            self._auth_blocked_until = self._clock() + self._auth_backoff
        raise ApiKeyRejected("API key rejected (HTTP 401)")

    def _key_accepted(self, epoch: int) -> None:
        # A success counts only if the request was sent after the last 401 (so after the
        # backoff): one already in flight before it proves nothing about the key now.
        if self._auth_backoff and epoch == self._auth_epoch:
            log.info("API key accepted again")
            self._auth_backoff = 0.0
            self._auth_blocked_until = 0.0
