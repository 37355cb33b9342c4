"""The Clado deep research API over httpx: typed results, typed errors, retries.

Retry rules: timeouts, connection errors, 5xx, 429 (honouring Retry-After) and bodies that
are not the JSON the docs promise are retried with exponential backoff and jitter; other
4xx are not. Starting a job is not idempotent, so it is retried only when the request
certainly did not reach the server (connection refused or timed out, 429, 503); after a
read timeout, a dropped connection, a 500/502/504 or an unreadable answer it fails with
`ApiUnavailable` at once, because a retry could start a second, billed job.

Every attempt has a deadline (`timeout`), on top of httpx's per-read timeouts, so a server
that trickles its answer cannot hold a call forever.

A 401 is logged once as "API key rejected"; after it every call fails fast without a
request until a growing backoff (30 s, 60 s, … 600 s) has passed, so a revoked key does not
hammer the API. Only answers to requests sent after the last 401 move that backoff: the
401s of requests that were already in flight do not multiply it, and their successes do
not end it.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from supervisor.adapters import metrics
from supervisor.core.states import REMOTE_STATUSES

log = structlog.get_logger("supervisor.clado")

T = TypeVar("T")

# UUIDs and similar opaque ids: ASCII letters, digits, '-' and '_', 1 to 128 characters.
# Starts with a letter or digit, so an id is never mistaken for a command-line option.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", re.ASCII)
_AUTH_BACKOFF_FIRST = 30.0
_AUTH_BACKOFF_MAX = 600.0
_RETRY_AFTER_MAX = 120.0
# Answers only an authenticated caller gets: after a 401, one of these ends the backoff.
_KEY_ACCEPTED = frozenset({200, 201, 202, 204, 402, 404, 409})
# Results-only status bodies: how far the page probe may go (2**40 results is absurd).
_PROBE_MAX_PAGE = 2**40
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


class CladoError(Exception):
    """Anything the API call could not do. Messages never contain the API key."""


class InvalidJobId(CladoError, ValueError):
    pass


class ApiKeyRejected(CladoError):
    pass


class JobNotFound(CladoError):
    pass


class OutOfCredits(CladoError):
    pass


class RequestRejected(CladoError):
    """A 4xx other than 401/402/404/409/429: retrying the same request will not help."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


class ApiUnavailable(CladoError):
    """Transient failures outlasted the retries (API down, throttling, garbage)."""


class _Transient(Exception):
    """A failure worth retrying. `sent=False` when the server certainly did not act on it."""

    def __init__(self, reason: str, retry_after: float | None = None, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.sent = sent


def validate_job_id(job_id: str) -> str:
    """Reject anything that is not a plain id before it can touch a URL path."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) and len(job_id) <= 40 else f"{str(job_id)[:40]}…"
        raise InvalidJobId(
            f"invalid job id {shown!r}: use 1-128 ASCII letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return job_id


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str  # pending | searching | processing | completed | error | cancelled
    result_count: int
    created_at: datetime | None
    message: str = ""

    @property
    def is_final(self) -> bool:
        return self.status in ("completed", "error", "cancelled")


@dataclass(frozen=True)
class CancelResult:
    accepted: bool  # 200: the API took the cancel; False: 409, the job was already final
    message: str


def _count_value(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _field_count(body: dict[str, Any]) -> int | None:
    """The count from a field that carries it (final_results_count, total_results, pagination)."""
    pagination = body.get("pagination")
    for value in (
        body.get("final_results_count"),
        body.get("total_results"),
        pagination.get("total_results") if isinstance(pagination, dict) else None,
    ):
        count = _count_value(value)
        if count is not None:
            return count
    return None


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


def result_count(body: dict[str, Any]) -> int:
    """The job's result count, from whichever field this response carries.

    `results` counts only when it is the whole list; for one page of several (pagination
    says there is a next page) the count is unknown here and this raises, like a body with
    no count at all. `CladoClient.status` then finds the count by probing pages.
    """
    count = _field_count(body)
    if count is not None:
        return count
    results = body.get("results")
    if isinstance(results, list) and not _page_is_partial(body, page_size=1):
        return len(results)
    if isinstance(results, list):
        raise _Transient("status body has only a page of results and no result count")
    raise _Transient("status body has no result count")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _remote_status(body: dict[str, Any]) -> str:
    status = body.get("status")
    if not isinstance(status, str) or status not in REMOTE_STATUSES:
        raise _Transient(f"unknown job status {str(status)[:40]!r}")
    return status


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
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> None:
        """`clock` times the 401 backoff; `sleep` waits between retries (tests pass fakes)."""
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        self._base_url = base_url
        self._secret = api_key
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
            follow_redirects=False,
        )
        # Bound in-flight requests ourselves: httpx's pool degrades with many waiters.
        self._slots = asyncio.Semaphore(max_concurrency)
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._sleep: Callable[[float], Awaitable[Any]] = sleep or asyncio.sleep
        self._auth_blocked_until = 0.0
        self._auth_backoff = 0.0
        # Bumped by each 401 that moves the backoff; a request remembers the epoch it was sent
        # in, so answers to requests that were in flight before a 401 cannot move it again.
        self._auth_epoch = 0
        self.retries = 0  # total retried attempts, for metrics and tests

    def __repr__(self) -> str:
        return f"CladoClient(base_url={self._base_url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> CladoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def api_key_rejected(self) -> bool:
        return self._clock() < self._auth_blocked_until

    # -- the four endpoints -------------------------------------------------------------

    async def initiate(
        self, query: str, limit: int = 30, hard_filter_company_urls: list[str] | None = None
    ) -> str:
        payload: dict[str, Any] = {"query": query, "limit": limit}
        if hard_filter_company_urls:
            payload["hard_filter_company_urls"] = hard_filter_company_urls

        async def call() -> str:
            # Any 2xx means a job was started: never mistake a 201/202 for a rejection.
            _, body = await self._request(
                "POST", "/api/search/deep_research", json=payload, accept={200, 201, 202}
            )
            job_id = body.get("job_id")
            # The job may exist: this is an ApiUnavailable (not retried), not the caller's
            # invalid input.
            if not isinstance(job_id, str):
                raise _Transient("initiate answer has no job_id")
            if not _JOB_ID.fullmatch(job_id):
                raise _Transient("initiate answer has an invalid job_id")
            return job_id

        return await self._retrying(call, endpoint="initiate", idempotent=False)

    async def status(self, job_id: str) -> JobStatus:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"

        async def call() -> JobStatus:
            # One small page: a poll costs the same whatever the job's result count.
            body = await self._status_page(path, 1)
            status = _remote_status(body)
            count = _field_count(body)
            if count is None:
                count = await self._count_by_pages(path, body)
            return JobStatus(
                job_id=job_id,
                status=status,
                result_count=count,
                created_at=_parse_time(body.get("created_at")),
                message=_clean(str(body.get("message") or ""), 500),
            )

        return await self._retrying(call, endpoint="status")

    async def cancel(self, job_id: str) -> CancelResult:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}/cancel"

        async def call() -> CancelResult:
            code, body = await self._request("POST", path, accept={200, 409})
            return CancelResult(
                accepted=code == 200 and body.get("success") is not False,
                message=_clean(str(body.get("message") or ""), 500),
            )

        return await self._retrying(call, endpoint="cancel")

    async def credits(self) -> int:
        async def call() -> int:
            _, body = await self._request("GET", "/api/credits")
            value = body.get("credits")
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise _Transient("credits answer has no credits")
            return int(value)

        return await self._retrying(call, endpoint="credits")

    # -- plumbing -----------------------------------------------------------------------

    async def _status_page(self, path: str, page: int) -> dict[str, Any]:
        _, body = await self._request("GET", path, params={"page": page, "page_size": 1})
        return body

    async def _count_by_pages(self, path: str, first: dict[str, Any]) -> int:
        """The count of a job whose status bodies carry no count field, only `results`.

        With page_size=1, page p holds a result exactly when the job has at least p, so an
        exponential search then a bisection finds the count in O(log n) one-result requests:
        still a constant size each, never the whole list.
        """
        results = first.get("results")
        if not isinstance(results, list):
            raise _Transient("status body has no result count")
        if not _page_is_partial(first, page_size=1):
            return len(results)
        if not results:
            return 0

        async def probe(page: int) -> tuple[bool, bool, int | None]:
            """(page has a result, it is the last one, a count field if the body has one)."""
            body = await self._status_page(path, page)
            found = body.get("results")
            if not isinstance(found, list):
                raise _Transient("status body has no results list")
            pagination = body.get("pagination")
            last = isinstance(pagination, dict) and pagination.get("has_next") is False
            return bool(found), bool(found) and last, _field_count(body)

        low, high = 1, None  # page `low` has a result; page `high` (once known) has none
        page = 2
        while high is None:
            if page > _PROBE_MAX_PAGE:
                raise _Transient("status body has no usable result count")
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

    async def _retrying(
        self, call: Callable[[], Awaitable[T]], *, endpoint: str, idempotent: bool = True
    ) -> T:

        def counted(retry_state: Any) -> None:
            metrics.API_RETRIES.labels(endpoint).inc()
            self._count_retry(retry_state)

        def retryable(exc: BaseException) -> bool:
            # A request that may have reached the server is not repeated unless idempotent.
            return isinstance(exc, _Transient) and (idempotent or not exc.sent)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            before_sleep=counted,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await call()
        except _Transient as exc:
            if not idempotent and exc.sent:
                raise ApiUnavailable(
                    f"{exc} (not retried: the request may have reached the API)"
                ) from None
            raise ApiUnavailable(str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        exponential = min(self._backoff_max, self._backoff_initial * 2 ** (retry_state.attempt_number - 1))
        delay = random.uniform(exponential / 2, exponential)  # jitter
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, _RETRY_AFTER_MAX))
        return delay

    def _count_retry(self, retry_state: Any) -> None:
        self.retries += 1
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.debug("api retry", attempt=retry_state.attempt_number, error=str(exc))

    def _check_key(self) -> None:
        if self.api_key_rejected:
            raise ApiKeyRejected("API key rejected (backing off before trying again)")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        accept: frozenset[int] | set[int] = frozenset({200}),
    ) -> tuple[int, dict[str, Any]]:
        self._check_key()
        async with self._slots:
            # A 401 may have come in while this call waited for a slot.
            self._check_key()
            epoch = self._auth_epoch
            failure: _Transient | None = None
            endpoint = _endpoint(method, path)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._http.request(method, path, params=params, json=json)
                metrics.API_REQUESTS.labels(endpoint, str(response.status_code)).inc()
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
                metrics.API_LATENCY.labels(endpoint).observe(time.perf_counter() - started)
        if failure is not None:
            metrics.API_REQUESTS.labels(endpoint, "error").inc()
            # Raised outside the handler, so no httpx error (which holds the request and its
            # Authorization header) rides along as __context__.
            raise failure
        code = response.status_code
        if code == 401:
            self._key_rejected(epoch)
        if code in _KEY_ACCEPTED:
            self._key_accepted(epoch)
        if code == 429:
            raise _Transient("throttled (429)", retry_after=_retry_after(response), sent=False)
        if code >= 500:
            # A 503 is the documented "not now": the request was not acted on.
            raise _Transient(
                f"API error HTTP {code}", retry_after=_retry_after(response), sent=code != 503
            )
        if code not in accept:
            message = _error_message(response, self._secret)
            if code == 404:
                raise JobNotFound(message or "job not found")
            if code == 402:
                raise OutOfCredits(message or "out of credits")
            raise RequestRejected(code, message)
        body = _json_or_none(response)
        if body is None:
            raise _Transient(f"API answered HTTP {code} with a body that is not JSON")
        if not isinstance(body, dict):
            raise _Transient(f"API answered HTTP {code} with JSON that is not an object")
        return code, body

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


def _endpoint(method: str, path: str) -> str:
    """The metric label of a request: initiate, status, cancel or credits."""
    if path == "/api/credits":
        return "credits"
    if path.endswith("/cancel"):
        return "cancel"
    return "initiate" if method == "POST" else "status"


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return _RETRY_AFTER_MAX if seconds > 0 else None
    return max(0.0, seconds)


def _clean(text: str, limit: int) -> str:
    """Server text fit for a log line: no control characters (no forged lines), bounded."""
    return _CONTROL.sub(" ", text)[:limit]


def _json_or_none(response: httpx.Response) -> Any:
    """The parsed body, or None when it is not JSON (or is JSON null).

    Returns rather than raises, so the decode error (whose `doc` holds the whole body) is
    never chained to the exception the caller raises.
    """
    try:
        return response.json()
    except (ValueError, RecursionError):
        return None


def _error_message(response: httpx.Response, secret: str = "") -> str:
    """The error's text for an exception message, without the key (some servers echo it)."""
    body = _json_or_none(response)
    if body is None:
        text = response.text
    elif isinstance(body, dict):
        text = str(body.get("detail") or body.get("message") or body.get("error") or "")
    else:
        return ""
    if secret:
        text = text.replace(secret, "[REDACTED]")
    return _clean(text, 200)
