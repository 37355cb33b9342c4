"""The Clado deep research API over httpx: typed results, typed errors, retries.

It reads every shape the public docs show (they are of different ages and disagree):
`created_at` as epoch seconds, epoch milliseconds, a digit string or ISO 8601; the result
count from the largest of `final_results_count`, `total_results`, `pagination.total_results`
and `total`; statuses in any case, with an unofficial SDK's spellings mapped to the documented
names and unknown ones kept as running jobs; any 2xx to a cancel.

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

Transport: `transport="aiohttp"` (the default) sends through httpx-aiohttp, about three
times the requests per CPU second of httpx's own transport at 32 in flight; "httpx" is
httpx's own (httpcore). httpx-aiohttp reports every aiohttp connection error, a server
hanging up after it got the request included, as httpx.ConnectTimeout, which reads "never
sent": the client maps aiohttp's errors itself (`_aiohttp_errors`), so that only a failure
before any byte left (refused, DNS, TLS handshake, connect timeout) is "not sent" and safe to
retry for initiate. The aiohttp transport does not read proxy settings from the environment
(that costs two thread hops per request): behind a proxy, use "httpx".

Every attempt has a deadline (`timeout`), on top of httpx's per-read timeouts, so a server
that trickles its answer cannot hold a call forever, and every body is read with a bound
(`max_body`): a larger one is refused without being read into memory.

A 401 is logged once as "API key rejected"; after it every call fails fast without a
request until a growing backoff (30 s, 60 s, … 600 s) has passed, so a revoked key does not
hammer the API. Only answers to requests sent after the last 401 move that backoff: the
401s of requests that were already in flight do not multiply it, and their successes do
not end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json as jsonlib
import math
import random
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import httpx
import structlog
from httpx_aiohttp import AiohttpTransport

from supervisor.adapters import metrics
from supervisor.core.states import FINAL_STATUSES, REMOTE_STATUSES, normalize_status

log = structlog.get_logger("supervisor.clado")

T = TypeVar("T")

# UUIDs and similar opaque ids: ASCII letters, digits, '-' and '_', 1 to 128 characters.
# Starts with a letter or digit, so an id is never mistaken for a command-line option.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", re.ASCII)
_AUTH_BACKOFF_FIRST = 30.0
_AUTH_BACKOFF_MAX = 600.0
# A hold-off asked for by the API is capped: a broken header must not park the client for a day.
_HOLD_OFF_MAX = 300.0
# A 429 that says "retry now" (or nothing) still holds off a second, so a misbehaving server
# cannot turn the retries into a busy loop.
_HOLD_OFF_MIN = 1.0
# The longest a call other than initiate waits for a hold-off before it fails fast.
_WAIT_MAX = 120.0
# Status pages are a few KB (one result each); anything this big is not an answer we want.
MAX_BODY = 1_000_000
_SUCCESS = frozenset(range(200, 300))
# Answers only an authenticated caller gets: after a 401, one of these ends the backoff.
_KEY_ACCEPTED = _SUCCESS | {402, 404, 409}
# Results-only status bodies: how far the page probe may go (2**40 results is absurd).
_PROBE_MAX_PAGE = 2**40
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# The count fields of a status body, in every version of the docs (`total` is the oldest).
_COUNT_FIELDS = ("final_results_count", "total_results", "pagination.total_results", "total")
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
# created_at outside [the API's launch, now + clock skew] is a broken value, not a job's age.
_API_EPOCH = datetime(2023, 1, 1, tzinfo=UTC).timestamp()
_CLOCK_SKEW = 300.0
_EPOCH_MS_FROM = 1e11  # as seconds that is the year 5138: a larger number is milliseconds
_STATUS_MAX = 16  # the remote_status column is String(16)
_WARN_ONCE_KEYS = 1024


class CladoError(Exception):
    """Anything the API call could not do. Messages never contain the API key."""

    # True when a call that is never repeated (initiate, continue) failed after it may have
    # reached the API: whatever it started may be running and billing.
    maybe_sent = False


class InvalidJobId(CladoError, ValueError):
    pass


class ApiKeyRejected(CladoError):
    pass


class JobNotFound(CladoError):
    pass


class CreditsUnavailable(CladoError):
    """404 from /api/credits: the API could not say (not a job that is missing)."""


class OutOfCredits(CladoError):
    pass


class RequestRejected(CladoError):
    """A 4xx other than 401/402/404/409/429: retrying the same request will not help."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


class ApiUnavailable(CladoError):
    """Transient failures outlasted the retries (API down, throttling, garbage)."""


class UnreadableBody(ApiUnavailable):
    """The API answered, but not with anything the docs describe (worth an alert: the API
    may have changed under us). Retried like any transient failure first."""


class RateLimited(ApiUnavailable):
    """The client is held off by the API's rate limit for longer than this call may wait."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in


class _Transient(Exception):
    """A failure worth retrying. `sent=False` when the server certainly did not act on it;
    `held` when it started a client-wide hold-off (which is then the wait before a retry);
    `error` is what it becomes once the retries are used up."""

    def __init__(
        self,
        reason: str,
        *,
        sent: bool = True,
        held: bool = False,
        throttled: bool = False,
        error: type[ApiUnavailable] = ApiUnavailable,
    ) -> None:
        super().__init__(reason)
        self.sent = sent
        self.held = held
        self.throttled = throttled
        self.error = error


TransportName = Literal["aiohttp", "httpx"]


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle costs about 40 ms a client."""
    return httpx.create_ssl_context()


def _limits(max_concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)


def make_transport(name: TransportName, max_concurrency: int) -> httpx.AsyncBaseTransport | None:
    """The transport under the client's httpx API (None: httpx's own, which httpx builds so
    that it also honours proxy settings from the environment). The benchmark's bare loop
    uses the same one."""
    if name == "aiohttp":
        return _MappedAiohttpTransport(verify=_tls(), limits=_limits(max_concurrency), trust_env=False)
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
    """httpx-aiohttp's transport with the client's own error mapping (see the module doc)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _aiohttp_errors():
            response = await super().handle_async_request(request)
        if isinstance(response.stream, httpx.AsyncByteStream):  # always, from an async transport
            response.stream = _MappedStream(response.stream)
        return response


def _unreadable(reason: str) -> _Transient:
    return _Transient(reason, error=UnreadableBody)


def validate_job_id(job_id: str) -> str:
    """Reject anything that is not a plain id before it can touch a URL path."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) and len(job_id) <= 40 else f"{str(job_id)[:40]}…"
        raise InvalidJobId(
            f"invalid job id {shown!r}: use 1-128 ASCII letters, digits, '-' or '_', starting with a letter or digit"
        )
    return job_id


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str  # pending | searching | processing | completed | error | cancelled | (unknown)
    result_count: int
    created_at: datetime | None
    message: str = ""
    # False for a status outside the documented list (aliases included): `status` is then
    # the API's own word (lowercased, at most 16 characters) and the job counts as running.
    recognized: bool = True

    @property
    def is_final(self) -> bool:
        return self.recognized and self.status in FINAL_STATUSES


@dataclass(frozen=True)
class CancelResult:
    accepted: bool  # any 2xx: the API took the cancel; False: refused (success false) or 409
    message: str


@dataclass(frozen=True)
class Credits:
    credits: int
    last_topup_at: datetime | None


@dataclass
class _Wait:
    """How long one call may spend waiting out the client's hold-off, and how long it has."""

    endpoint: str
    limit: float
    waited: float = 0.0


class _Once:
    """'Warn once per key' with bounded memory: remembers the last `size` keys seen."""

    def __init__(self, size: int = _WARN_ONCE_KEYS) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def first(self, key: str) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


def _count_value(value: Any) -> int | None:
    """A count: a non-negative integer, a whole float or a digit string ("302")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, int) and value >= 0:
        return value
    return None


def _field_count(body: dict[str, Any]) -> int | None:
    """The largest count the body carries in any of its count fields (the largest is what is
    billed), or None when none of them is readable."""
    pagination = body.get("pagination")
    paged = pagination.get("total_results") if isinstance(pagination, dict) else None
    values = (body.get("final_results_count"), body.get("total_results"), paged, body.get("total"))
    counts = [count for value in values if (count := _count_value(value)) is not None]
    return max(counts) if counts else None


def _page_is_partial(body: dict[str, Any], page_size: int) -> bool:
    """True when `results` is one page of several: its length is not the job's count."""
    pagination = body.get("pagination")
    results = body.get("results")
    if not isinstance(pagination, dict) or not isinstance(results, list):
        return False
    has_next = pagination.get("has_next")
    if has_next is True:
        return True
    # No word on a next page and a full page: there may well be more.
    return has_next is not False and len(results) >= page_size


def _epoch_seconds(value: Any) -> float | None:
    """Seconds since the epoch from an instant in any shape the docs show, or None.

    Integers (or digit strings) above 1e11 are milliseconds. ISO 8601 without an offset is
    UTC. Absurd magnitudes come back clamped (still absurd), never as an overflow.
    """
    if isinstance(value, str):
        text = value.strip()
        if _DIGITS.fullmatch(text):
            value = int(text)
        elif len(text) > 64:
            return None
        else:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            # Aware subtraction, not astimezone: 0001-01-01T00:00:00+01:00 must not overflow.
            return (parsed - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    number = max(-1e15, min(1e15, value))  # far outside any plausible window either way
    return number / 1000 if number > _EPOCH_MS_FROM else float(number)


def _instant(value: Any) -> datetime | None:
    """An instant read with no sanity window (for informational fields)."""
    seconds = _epoch_seconds(value)
    try:
        return datetime.fromtimestamp(seconds, UTC) if seconds is not None else None
    except (OverflowError, OSError, ValueError):
        return None


class CladoClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        max_concurrency: int = 32,
        max_retries: int = 3,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        initiate_wait: float = 120.0,
        max_body: int = MAX_BODY,
        transport: TransportName | httpx.AsyncBaseTransport = "aiohttp",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> None:
        """`transport` is a name (see `make_transport`) or a transport object (tests pass
        httpx.MockTransport). `clock` times the 401 backoff and the rate-limit hold-off, `wall_clock` (epoch
        seconds) judges `created_at` and HTTP-date Retry-After, `sleep` waits between retries
        and out hold-offs (tests pass fakes)."""
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if not initiate_wait >= 0:
            raise ValueError("initiate_wait must be 0 or more seconds")
        if max_body < 1:
            raise ValueError("max_body must be at least 1 byte")
        self._base_url = base_url.rstrip("/")
        self._secret = api_key
        chosen = make_transport(transport, max_concurrency) if isinstance(transport, str) else transport
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Accept": "application/json",
                # Small bodies gain nothing from compression, and an uncompressed body is
                # bounded by what comes off the wire (no decompression bomb).
                "Accept-Encoding": "identity",
            },
            timeout=timeout,
            limits=_limits(max_concurrency),
            verify=_tls(),
            transport=chosen,
            follow_redirects=False,
        )
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
        self._sleep: Callable[[float], Awaitable[Any]] = sleep or asyncio.sleep
        self._auth_blocked_until = 0.0
        self._auth_backoff = 0.0
        # Bumped by each 401 that moves the backoff; a request remembers the epoch it was sent
        # in, so answers to requests that were in flight before a 401 cannot move it again.
        self._auth_epoch = 0
        # The client-wide hold-off; its generation moves each time it is pushed later, so a
        # waiter knows whether the hold-off it waited out is still the current one.
        self._held_until = 0.0
        self._hold_generation = 0
        self._warned_created_at = _Once()
        self._warned_status = _Once()
        self.retries = 0  # total retried attempts, for metrics and tests

    def __repr__(self) -> str:
        return f"CladoClient(base_url={self._base_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def api_key_rejected(self) -> bool:
        return self._clock() < self._auth_blocked_until

    @property
    def held_off_for(self) -> float:
        """Seconds the client still holds every request off for the API's rate limit."""
        return max(0.0, self._held_until - self._clock())

    # -- the four endpoints -------------------------------------------------------------

    async def initiate(self, query: str, limit: int = 30, hard_filter_company_urls: list[str] | None = None) -> str:
        payload: dict[str, Any] = {"query": query, "limit": limit}
        if hard_filter_company_urls:
            payload["hard_filter_company_urls"] = hard_filter_company_urls

        async def call(wait: _Wait) -> str:
            # Any 2xx means a job was started: never mistake a 201/202 for a rejection.
            _, body = await self._request("POST", "/api/search/deep_research", wait, json=payload, accept=_SUCCESS)
            job_id = body.get("job_id")
            # The job may exist: this is an UnreadableBody (not retried), not the caller's
            # invalid input.
            if not isinstance(job_id, str):
                raise _unreadable("initiate answer has no job_id")
            if not _JOB_ID.fullmatch(job_id):
                raise _unreadable("initiate answer has an invalid job_id")
            return job_id

        return await self._retrying(call, endpoint="initiate", idempotent=False)

    async def status(self, job_id: str) -> JobStatus:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"

        async def call(wait: _Wait) -> JobStatus:
            # One small page: a poll costs the same whatever the job's result count.
            body = await self._status_page(path, 1, wait)
            status, recognized = self._remote_status(job_id, body)
            count = _field_count(body)
            if count is None:
                count = await self._count_by_pages(path, body, wait)
            return JobStatus(
                job_id=job_id,
                status=status,
                result_count=count,
                created_at=self._created_at(job_id, body.get("created_at")),
                message=_clean(str(body.get("message") or ""), 500),
                recognized=recognized,
            )

        return await self._retrying(call, endpoint="status")

    async def cancel(self, job_id: str) -> CancelResult:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}/cancel"

        async def call(wait: _Wait) -> CancelResult:
            # 200 {success: true}, 202 and an empty 204 all mean the API took it; a 200 with
            # success false and a 409 are refusals (already final, or "only pending jobs").
            code, body = await self._request("POST", path, wait, accept=_SUCCESS | {409}, empty_ok=True)
            return CancelResult(
                accepted=code in _SUCCESS and body.get("success") is not False,
                message=_clean(str(body.get("message") or ""), 500),
            )

        return await self._retrying(call, endpoint="cancel")

    async def continue_job(self, job_id: str, additional: int) -> None:
        """Ask a completed job for `additional` more results (billed 1 credit each): the SAME
        job id goes back to pending. The docs name it two ways: `POST …/continue
        {additionalLimit}` and, newer, `POST …/more {additional_limit}`; a 404 from the first
        (nothing was started) is asked of the second. Never retried once it may have been
        received: a second continue would bill a second batch."""
        base = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"

        async def call(path: str, body: dict[str, int]) -> None:
            async def attempt(wait: _Wait) -> None:
                await self._request("POST", path, wait, json=body, accept=_SUCCESS, empty_ok=True)

            await self._retrying(attempt, endpoint="continue", idempotent=False)

        try:
            await call(f"{base}/continue", {"additionalLimit": additional})
        except JobNotFound:
            await call(f"{base}/more", {"additional_limit": additional})

    async def credits(self) -> int:
        """The account's remaining credits (see `account` for the last top-up too)."""
        return (await self.account()).credits

    async def account(self) -> Credits:
        async def call(wait: _Wait) -> Credits:
            _, body = await self._request(
                "GET",
                "/api/credits",
                wait,
                not_found=(CreditsUnavailable, "unable to retrieve credit information (HTTP 404)"),
            )
            value = body.get("credits")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise _unreadable("credits answer has no credits")
            return Credits(credits=int(value), last_topup_at=_instant(body.get("last_topup_at")))

        return await self._retrying(call, endpoint="credits")

    # -- reading status bodies ----------------------------------------------------------

    def _remote_status(self, job_id: str, body: dict[str, Any]) -> tuple[str, bool]:
        """(status, recognized). An unknown status is a running job with a warning, not garbage."""
        raw = body.get("status")
        if not isinstance(raw, str) or not raw.strip():
            raise _unreadable(f"status body has no status (got {_shown(raw)})")
        name = normalize_status(raw)
        if name in REMOTE_STATUSES:
            return name, True
        name = _clean(name, _STATUS_MAX)
        metrics.API_UNKNOWN_STATUS.inc()
        if self._warned_status.first(name):
            log.warning("unknown job status, treated as running", status=name, job_id=job_id)
        return name, False

    def _created_at(self, job_id: str, value: Any) -> datetime | None:
        """When the job was created, or None when the body does not say or says nonsense."""
        if value is None or value == "":
            return None  # the newer docs show no created_at at all
        seconds = _epoch_seconds(value)
        if seconds is None:
            problem = "unreadable"
        elif seconds < _API_EPOCH:
            problem = "before the API existed (2023-01-01)"
        elif seconds > self._wall_clock() + _CLOCK_SKEW:
            problem = "in the future"
        else:
            return datetime.fromtimestamp(seconds, UTC)
        if self._warned_created_at.first(job_id):
            log.warning("created_at ignored", job_id=job_id, value=_shown(value), problem=problem)
        return None

    async def _status_page(self, path: str, page: int, wait: _Wait) -> dict[str, Any]:
        _, body = await self._request("GET", path, wait, params={"page": page, "page_size": 1})
        return body

    async def _count_by_pages(self, path: str, first: dict[str, Any], wait: _Wait) -> int:
        """The count of a job whose status bodies carry no count field, only `results`.

        With page_size=1, page p holds a result exactly when the job has at least p, so an
        exponential search then a bisection finds the count in O(log n) one-result requests:
        still a constant size each, never the whole list.
        """
        results = first.get("results")
        if not isinstance(results, list):
            raise _unreadable(f"status body has no readable result count (none of {', '.join(_COUNT_FIELDS)}, results)")
        if not _page_is_partial(first, page_size=1):
            return len(results)
        if not results:
            return 0

        async def probe(page: int) -> tuple[bool, bool, int | None]:
            """(page has a result, it is the last one, a count field if the body has one)."""
            body = await self._status_page(path, page, wait)
            found = body.get("results")
            if not isinstance(found, list):
                raise _unreadable("status body has no results list")
            pagination = body.get("pagination")
            last = isinstance(pagination, dict) and pagination.get("has_next") is False
            return bool(found), bool(found) and last, _field_count(body)

        low, high = 1, None  # page `low` has a result; page `high` (once known) has none
        page = 2
        while high is None:
            if page > _PROBE_MAX_PAGE:
                raise _unreadable("status body has no usable result count")
            found, last, count = await probe(page)
            if count is not None:
                return count
            if last:
                return page
            if found:
                low, page = page, page * 2
            else:
                high = page
        while high - low > 1:
            middle = (low + high) // 2
            found, last, count = await probe(middle)
            if count is not None:
                return count
            if last:
                return middle
            if found:
                low = middle
            else:
                high = middle
        return low

    # -- retries and the hold-off -------------------------------------------------------

    async def _retrying(self, call: Callable[[_Wait], Awaitable[T]], *, endpoint: str, idempotent: bool = True) -> T:
        """`call` until it returns, retrying what `_Transient` says may be retried. A plain
        loop, not a retry library's: it runs on every poll, and the first attempt (almost
        every call's only one) then costs nothing beyond the call itself."""
        wait = _Wait(endpoint, _WAIT_MAX if idempotent else self._initiate_wait)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(wait)
            except _Transient as exc:
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
        until = now + min(seconds, _HOLD_OFF_MAX)
        if until <= self._held_until:
            return
        if self._held_until <= now:
            log.warning("API asked to slow down: holding off every request", seconds=round(until - now, 3), cause=cause)
        self._held_until = until
        self._hold_generation += 1

    async def _await_hold_off(self, wait: _Wait) -> int:
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

    async def _request(
        self,
        method: str,
        path: str,
        wait: _Wait,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        accept: frozenset[int] = frozenset({200}),
        empty_ok: bool = False,
        not_found: tuple[type[CladoError], str] = (JobNotFound, "job not found"),
    ) -> tuple[int, dict[str, Any]]:
        """One attempt, its answer read as the docs describe it (or a typed error)."""
        epoch, code, headers, content = await self._attempt(method, path, wait, params, json)
        if code == 401:
            self._key_rejected(epoch)
        if code in _KEY_ACCEPTED:
            self._key_accepted(epoch)
        too_large = content is None
        content = content or b""
        if code == 429:
            header = _retry_after_header(headers, self._wall_clock()) or 0.0
            self._hold_off(max(header, _retry_after_body(content) or 0.0, _HOLD_OFF_MIN), "HTTP 429")
            raise _Transient("throttled (429)", sent=False, held=True, throttled=True)
        if code >= 500:
            hint = _retry_after_header(headers, self._wall_clock())
            if hint:
                self._hold_off(hint, f"HTTP {code}")
            # A 503 is the documented "not now": the request was not acted on.
            raise _Transient(f"API error HTTP {code}", sent=code != 503, held=bool(hint))
        if code not in accept:
            message = _error_message(content, self._secret)
            if code == 404:
                error, default = not_found
                raise error(message or default)
            if code == 402:
                raise OutOfCredits(message or "out of credits")
            raise RequestRejected(code, message)
        if too_large:
            raise _unreadable(f"API answered HTTP {code} with a body over {self._max_body} bytes (refused unread)")
        if empty_ok and not content.strip():
            return code, {}
        body = _json_or_none(content)
        if body is None:
            raise _unreadable(f"API answered HTTP {code} with a body that is not JSON")
        if not isinstance(body, dict):
            raise _unreadable(f"API answered HTTP {code} with JSON that is not an object")
        return code, body

    async def _attempt(
        self, method: str, path: str, wait: _Wait, params: dict[str, Any] | None, json: dict[str, Any] | None
    ) -> tuple[int, int, httpx.Headers, bytes | None]:
        """Send once the key and the hold-off allow: (auth epoch it was sent in, code, headers, body)."""
        while True:
            self._check_key()
            generation = await self._await_hold_off(wait)
            async with self._slots:
                # A 401 or a 429 may have come in while this call waited for a slot.
                self._check_key()
                if generation != self._hold_generation and self.held_off_for > 0:
                    continue
                epoch = self._auth_epoch
                failure: _Transient | None = None
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(self._timeout):
                        code, headers, content = await self._send(method, path, params, json)
                    metrics.API_REQUESTS.labels(wait.endpoint, str(code)).inc()
                    return epoch, code, headers, content
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                    # No connection, so nothing was sent: safe to retry even a POST initiate.
                    failure = _Transient(f"cannot connect to the API: {type(exc).__name__}", sent=False)
                except (TimeoutError, httpx.TimeoutException):
                    failure = _Transient(f"API request timed out after {self._timeout:g}s")
                except httpx.RequestError as exc:
                    # Dropped connections, protocol errors, undecodable content: the request may
                    # have been sent and acted on.
                    failure = _Transient(f"API request failed: {type(exc).__name__}")
                finally:
                    metrics.API_LATENCY.labels(wait.endpoint).observe(time.perf_counter() - started)
            metrics.API_REQUESTS.labels(wait.endpoint, "error").inc()
            # Raised outside the handler, so no httpx error (which holds the request and its
            # Authorization header) rides along as __context__.
            raise failure

    async def _send(
        self, method: str, path: str, params: dict[str, Any] | None, json: dict[str, Any] | None
    ) -> tuple[int, httpx.Headers, bytes | None]:
        """(status code, headers, body); the body is None when it is over `max_body`, in which
        case it is neither read to the end nor kept: the connection is closed instead."""
        # An absolute URL, its query already encoded: httpx merging a base URL and params
        # parses the URL three times, a third of the client's own CPU per poll.
        url = f"{self._base_url}{path}?{urlencode(params)}" if params else f"{self._base_url}{path}"
        request = self._http.build_request(method, url, json=json)
        response = await self._http.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self._max_body:
                return response.status_code, response.headers, None
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self._max_body:
                    return response.status_code, response.headers, None
                chunks.append(chunk)
        finally:
            await response.aclose()
        return response.status_code, response.headers, b"".join(chunks)

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


def _seconds(value: Any) -> float | None:
    """A non-negative finite number of seconds (a number or a numeric string), else None;
    an infinite one is the cap."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, _HOLD_OFF_MAX)


def _retry_after_header(headers: httpx.Headers, now: float) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _seconds(max(0.0, when.timestamp() - now))


def _retry_after_body(content: bytes) -> float | None:
    """`retry_after` from a 429 body: `{"error": "Rate limit exceeded", "retry_after": 60}`."""
    body = _json_or_none(content)
    return _seconds(body.get("retry_after")) if isinstance(body, dict) else None


def _clean(text: str, limit: int) -> str:
    """Server text fit for a log line: no control characters (no forged lines), bounded."""
    return _CONTROL.sub(" ", text)[:limit]


def _shown(value: Any) -> str:
    """A server value, bounded and clean, for a log line or an error message."""
    return _clean(repr(value)[:40], 40)


def _json_or_none(content: bytes) -> Any:
    """The parsed body, or None when it is not JSON (or is JSON null).

    Returns rather than raises, so the decode error (whose `doc` holds the whole body) is
    never chained to the exception the caller raises.
    """
    try:
        return jsonlib.loads(content)
    except (ValueError, RecursionError):
        return None


def _error_message(content: bytes, secret: str = "") -> str:
    """The error's text for an exception message, without the key (some servers echo it)."""
    body = _json_or_none(content)
    if body is None:
        text = content.decode("utf-8", "replace")
    elif isinstance(body, dict):
        text = str(body.get("detail") or body.get("message") or body.get("error") or "")
    else:
        return ""
    if secret:
        text = text.replace(secret, "[REDACTED]")
    return _clean(text, 200)
