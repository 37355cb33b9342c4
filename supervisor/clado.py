"""The Clado deep research API over httpx: typed results, typed errors, retries.

Retry rules: timeouts, connection errors, 5xx, 429 (honouring Retry-After) and bodies that
are not the JSON the docs promise are retried with exponential backoff and jitter; other
4xx are not. Starting a job is not idempotent, so it is retried only when the request
certainly did not reach the server (connection refused, 429).

A 401 is logged once as "API key rejected"; after it every call fails fast without a
request until a growing backoff has passed, so a revoked key does not hammer the API.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from .lifecycle import REMOTE_STATUSES

log = structlog.get_logger("supervisor.clado")

T = TypeVar("T")

# UUIDs and similar opaque ids: ASCII letters, digits, '-' and '_', at most 128 characters.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", re.ASCII)
_AUTH_BACKOFF_FIRST = 30.0
_AUTH_BACKOFF_MAX = 600.0
_RETRY_AFTER_MAX = 120.0


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
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def validate_job_id(job_id: str) -> str:
    """Reject anything that is not a plain id before it can touch a URL path."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) and len(job_id) <= 40 else f"{str(job_id)[:40]}…"
        raise InvalidJobId(
            f"invalid job id {shown!r}: use 1-128 ASCII letters, digits, '-' or '_'"
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


def result_count(body: dict[str, Any]) -> int:
    """The job's result count, from whichever field this response carries."""
    for value in (
        body.get("final_results_count"),
        body.get("total_results"),
        (body.get("pagination") or {}).get("total_results")
        if isinstance(body.get("pagination"), dict)
        else None,
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    results = body.get("results")
    if isinstance(results, list):
        return len(results)
    raise _Transient("status body has no result count")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


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
    ) -> None:
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
        self._max_retries = max_retries
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._auth_blocked_until = 0.0
        self._auth_backoff = 0.0
        self.retries = 0  # total retried attempts, for metrics and tests

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
            _, body = await self._request(
                "POST", "/api/search/deep_research", json=payload, idempotent=False
            )
            job_id = body.get("job_id")
            if not isinstance(job_id, str):
                raise _Transient("initiate answer has no job_id")
            return validate_job_id(job_id)

        return await self._retrying(call)

    async def status(self, job_id: str) -> JobStatus:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"

        async def call() -> JobStatus:
            # One small page: a poll costs the same whatever the job's result count.
            _, body = await self._request("GET", path, params={"page": 1, "page_size": 1})
            status = body.get("status")
            if status not in REMOTE_STATUSES:
                raise _Transient(f"unknown job status {str(status)[:40]!r}")
            return JobStatus(
                job_id=job_id,
                status=status,
                result_count=result_count(body),
                created_at=_parse_time(body.get("created_at")),
                message=str(body.get("message") or "")[:500],
            )

        return await self._retrying(call)

    async def cancel(self, job_id: str) -> CancelResult:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}/cancel"

        async def call() -> CancelResult:
            code, body = await self._request("POST", path, accept={200, 409})
            return CancelResult(
                accepted=code == 200 and body.get("success") is not False,
                message=str(body.get("message") or "")[:500],
            )

        return await self._retrying(call)

    async def credits(self) -> int:
        async def call() -> int:
            _, body = await self._request("GET", "/api/credits")
            value = body.get("credits")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _Transient("credits answer has no credits")
            return int(value)

        return await self._retrying(call)

    # -- plumbing -----------------------------------------------------------------------

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await call()
        except _Transient as exc:
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

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        accept: frozenset[int] | set[int] = frozenset({200}),
        idempotent: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        if self.api_key_rejected:
            raise ApiKeyRejected("API key rejected (backing off before trying again)")
        async with self._slots:
            try:
                response = await self._http.request(method, path, params=params, json=json)
            except httpx.ConnectError as exc:
                raise _Transient(f"cannot connect to the API: {type(exc).__name__}") from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if not idempotent:
                    # The server may have acted on it; a retry could start a second job.
                    raise ApiUnavailable(f"API request failed: {type(exc).__name__}") from None
                raise _Transient(f"API request failed: {type(exc).__name__}") from None
        code = response.status_code
        if code == 401:
            self._key_rejected()
        if self._auth_backoff:
            log.info("API key accepted again")
            self._auth_backoff = 0.0
            self._auth_blocked_until = 0.0
        if code == 429:
            raise _Transient("throttled (429)", retry_after=_retry_after(response))
        if code >= 500:
            if not idempotent and code != 503:
                raise ApiUnavailable(f"API error HTTP {code}")
            raise _Transient(f"API error HTTP {code}")
        if code not in accept:
            message = _error_message(response)
            if code == 404:
                raise JobNotFound(message or "job not found")
            if code == 402:
                raise OutOfCredits(message or "out of credits")
            raise RequestRejected(code, message)
        try:
            body = response.json()
        except ValueError:
            raise _Transient(f"API answered HTTP {code} with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise _Transient(f"API answered HTTP {code} with JSON that is not an object")
        return code, body

    def _key_rejected(self) -> None:
        now = self._clock()
        # Concurrent calls that were already in flight must not each double the backoff.
        if now >= self._auth_blocked_until:
            if not self._auth_backoff:
                log.error("API key rejected", hint="check api.api_key_env / api.api_key_file")
            self._auth_backoff = min(_AUTH_BACKOFF_MAX, (self._auth_backoff * 2) or _AUTH_BACKOFF_FIRST)
            self._auth_blocked_until = now + self._auth_backoff
        raise ApiKeyRejected("API key rejected (HTTP 401)")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("message") or body.get("error") or "")[:200]
    return ""
