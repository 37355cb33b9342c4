"""The Clado deep research API over httpx: typed results, typed errors, retries.

The four endpoints (initiate, status, cancel, continue) and the account's credits, each a
call that `Session` sends, retries and holds off (see `session`); this module knows what to
ask and how to read the answer (`shapes`). A status poll asks for one small page whatever the
job's size; a body with no count field is counted by probing pages of one result, or by the
documented alternatives (see `status`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, Self
from urllib.parse import quote

import httpx
import structlog

from supervisor.adapters import metrics
from supervisor.adapters.clado.errors import (
    BodyTooLarge,
    CreditsUnavailable,
    JobNotFound,
    RequestRejected,
    Transient,
    unreadable,
)
from supervisor.adapters.clado.session import MAX_BODY, SUCCESS, Session, Wait
from supervisor.adapters.clado.shapes import (
    JOB_ID,
    RESULTS_PAGE_SIZE,
    CancelResult,
    Credits,
    JobStatus,
    ResultsPage,
    clean,
    created_at,
    field_count,
    instant,
    other_count,
    page_is_partial,
    remote_status,
    results_page,
    shown,
    validate_job_id,
)
from supervisor.adapters.clado.transport import TransportName, limits, make_transport, tls

log = structlog.get_logger("supervisor.clado")

# A job's results are read at most this many pages at a time (10,000 results at 100 a page,
# ten times what the docs say one job can reach): an API that never says "last page" stops here.
RESULTS_MAX_PAGES = 100
# Results-only status bodies: how far the page probe may go (2**40 results is absurd).
_PROBE_MAX_PAGE = 2**40
# The page walk of an answer with no count and no pagination: pages of 100 (the largest the
# docs allow), at most this many (a job has up to about 1,000 results).
_WALK_PAGE_SIZE = 100
_WALK_MAX_PAGES = 20
_WARN_ONCE_KEYS = 1024


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
            limits=limits(max_concurrency),
            verify=tls(),
            transport=chosen,
            follow_redirects=False,
        )
        self._session = Session(
            self._http,
            self._base_url,
            api_key,
            timeout=timeout,
            max_concurrency=max_concurrency,
            max_retries=max_retries,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            initiate_wait=initiate_wait,
            max_body=max_body,
            clock=clock,
            wall_clock=wall_clock,
            sleep=sleep or asyncio.sleep,
        )
        self._wall_clock = wall_clock
        self._warned_created_at = _Once()
        self._warned_status = _Once()

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
        return self._session.api_key_rejected

    @property
    def held_off_for(self) -> float:
        """Seconds the client still holds every request off for the API's rate limit."""
        return self._session.held_off_for

    @property
    def retries(self) -> int:
        """Total retried attempts, for metrics and tests."""
        return self._session.retries

    # -- the four endpoints -------------------------------------------------------------

    async def initiate(self, query: str, limit: int = 30, hard_filter_company_urls: list[str] | None = None) -> str:
        payload: dict[str, Any] = {"query": query, "limit": limit}
        if hard_filter_company_urls:
            payload["hard_filter_company_urls"] = hard_filter_company_urls

        async def call(wait: Wait) -> str:
            # Any 2xx means a job was started: never mistake a 201/202 for a rejection.
            _, body = await self._session.request(
                "POST", "/api/search/deep_research", wait, json=payload, accept=SUCCESS
            )
            job_id = body.get("job_id")
            # The job may exist: this is an UnreadableBody (not retried), not the caller's
            # invalid input.
            if not isinstance(job_id, str):
                raise unreadable("initiate answer has no job_id")
            if not JOB_ID.fullmatch(job_id):
                raise unreadable("initiate answer has an invalid job_id")
            return job_id

        return await self._session.retrying(call, endpoint="initiate", idempotent=False)

    async def status(self, job_id: str, *, recover: bool = True, retry_unreadable: bool = True) -> JobStatus:
        """The job's status and count. An answer with no count field and no `pagination`
        (whose `results` length would be one page's, not the job's) is counted by the
        documented alternatives when `recover` (the caller does so every few polls): the
        unpaged answer, a walk of pages of 100, a count field of another form; else its
        `result_count` is None (`count_source` says which gave the count). Without
        `retry_unreadable` an unreadable answer fails at once (the API drifts: a retry would
        only add requests)."""
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"

        async def call(wait: Wait) -> JobStatus:
            # One small page: a poll costs the same whatever the job's result count.
            body = await self._status_page(path, 1, wait)
            status, recognized = self._remote_status(job_id, body)
            count = field_count(body)
            source: str | None = "field"
            if count is None:
                count, source = await self._recovered_count(path, body, wait, recover)
            return JobStatus(
                job_id=job_id,
                status=status,
                result_count=count,
                created_at=self._created_at(job_id, body.get("created_at")),
                message=clean(str(body.get("message") or ""), 500),
                recognized=recognized,
                count_source=source if count is not None else None,
            )

        return await self._session.retrying(call, endpoint="status", retry_unreadable=retry_unreadable)

    async def results(
        self, job_id: str, *, start: int = 0, max_pages: int = RESULTS_MAX_PAGES
    ) -> AsyncIterator[ResultsPage]:
        """The job's results from the `start`-th on (0-based), a page of up to 100 at a time,
        each page's `results` only those not yet seen. Stops after the last page, or after
        `max_pages` pages with `more` still true on the last one yielded (the caller says
        there is more: it continues from where it got to). Each page is retried like a poll;
        a page over the body bound is asked for again at half the size (results are big
        objects, and the bound is the client's), down to one result a page.
        The results are the customer's data: nothing here logs them."""
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"
        at, size, pages = start, RESULTS_PAGE_SIZE, 0
        while pages < max_pages:
            page, skip = divmod(at, size)

            async def call(wait: Wait, page: int = page + 1, size: int = size) -> ResultsPage:
                _, body = await self._session.request("GET", path, wait, params={"page": page, "page_size": size})
                return results_page(body, size)

            try:
                found = await self._session.retrying(call, endpoint="status")
            except BodyTooLarge:
                if size == 1:
                    raise
                size //= 2
                continue
            pages += 1
            fresh = found.results[skip:]
            more = found.more and bool(fresh)
            yield ResultsPage(found.status, found.recognized, fresh, found.count, more)
            if not more:
                return
            at += len(fresh)

    async def cancel(self, job_id: str) -> CancelResult:
        path = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}/cancel"

        async def call(wait: Wait) -> CancelResult:
            # 200 {success: true}, 202 and an empty 204 all mean the API took it; a 200 with
            # success false and a 409 are refusals (already final, or "only pending jobs").
            code, body = await self._session.request("POST", path, wait, accept=SUCCESS | {409}, empty_ok=True)
            return CancelResult(
                accepted=code in SUCCESS and body.get("success") is not False,
                message=clean(str(body.get("message") or ""), 500),
            )

        return await self._session.retrying(call, endpoint="cancel")

    async def continue_job(self, job_id: str, additional: int) -> None:
        """Ask a completed job for `additional` more results (billed 1 credit each): the SAME
        job id goes back to pending. The docs name it two ways: `POST …/continue
        {additionalLimit}` and, newer, `POST …/more {additional_limit}`; a 404 from the first
        (nothing was started) is asked of the second. Never retried once it may have been
        received: a second continue would bill a second batch."""
        base = f"/api/search/deep_research/{quote(validate_job_id(job_id), safe='')}"

        async def call(path: str, body: dict[str, int]) -> None:
            async def attempt(wait: Wait) -> None:
                await self._session.request("POST", path, wait, json=body, accept=SUCCESS, empty_ok=True)

            await self._session.retrying(attempt, endpoint="continue", idempotent=False)

        try:
            await call(f"{base}/continue", {"additionalLimit": additional})
        except JobNotFound:
            await call(f"{base}/more", {"additional_limit": additional})

    async def credits(self) -> int:
        """The account's remaining credits (see `account` for the last top-up too)."""
        return (await self.account()).credits

    async def account(self) -> Credits:
        async def call(wait: Wait) -> Credits:
            _, body = await self._session.request(
                "GET",
                "/api/credits",
                wait,
                not_found=(CreditsUnavailable, "unable to retrieve credit information (HTTP 404)"),
            )
            value = body.get("credits")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise unreadable("credits answer has no credits")
            return Credits(credits=int(value), last_topup_at=instant(body.get("last_topup_at")))

        return await self._session.retrying(call, endpoint="credits")

    # -- reading status bodies ----------------------------------------------------------

    def _remote_status(self, job_id: str, body: dict[str, Any]) -> tuple[str, bool]:
        """(status, recognized). An unknown status is a running job with a warning, not garbage."""
        name, recognized = remote_status(body)
        if not recognized:
            metrics.API_UNKNOWN_STATUS.inc()
            if self._warned_status.first(name):
                log.warning("unknown job status, treated as running", status=name, job_id=job_id)
        return name, recognized

    def _created_at(self, job_id: str, value: Any) -> datetime | None:
        """When the job was created, or None when the body does not say or says nonsense."""
        when, problem = created_at(value, self._wall_clock())
        if problem is not None and self._warned_created_at.first(job_id):
            log.warning("created_at ignored", job_id=job_id, value=shown(value), problem=problem)
        return when

    async def _status_page(self, path: str, page: int, wait: Wait, page_size: int = 1) -> dict[str, Any]:
        _, body = await self._session.request(
            "GET", path, wait, params={"page": page, "page_size": page_size}, partial=True
        )
        return body

    async def _recovered_count(
        self, path: str, body: dict[str, Any], wait: Wait, recover: bool
    ) -> tuple[int | None, str | None]:
        """(count, where from) of a status answer with no count field, or (None, None)."""
        if isinstance(body.get("pagination"), dict) and isinstance(body.get("results"), list):
            # The answer says whether there are more pages: pages of one result tell the count.
            return await self._count_by_pages(path, body, wait), "probe"
        if not recover:
            return None, None
        for source, alternative in (("unpaged", self._count_unpaged), ("page_walk", self._count_by_walk)):
            try:
                count = await alternative(path, wait)
            except (Transient, RequestRejected):
                count = None  # not allowed, or failed now: the next is tried
            if count is not None:
                return count, source
        other = other_count(body)
        if other is not None:
            name, count = other
            return count, f"field:{name}"
        return None, None

    async def _count_unpaged(self, path: str, wait: Wait) -> int | None:
        """The unpaged answer (every result), bounded by the body limit: its count fields or,
        if it holds the whole list, the list's length."""
        _, body = await self._session.request("GET", path, wait, partial=True)
        count = field_count(body)
        if count is not None:
            return count
        results = body.get("results")
        return len(results) if isinstance(results, list) else None

    async def _count_by_walk(self, path: str, wait: Wait) -> int | None:
        """Pages of 100 walked until a short one; None when the walk cannot tell (no results
        list, the API repeating a page, more pages than a job can have)."""
        total = 0
        previous: Any = None
        for page in range(1, _WALK_MAX_PAGES + 1):
            body = await self._status_page(path, page, wait, page_size=_WALK_PAGE_SIZE)
            results = body.get("results")
            if not isinstance(results, list):
                return None
            if len(results) > _WALK_PAGE_SIZE:
                return len(results)  # page_size ignored: this is the whole list
            if results and results[0] == previous:
                return None  # `page` ignored: the walk would count one page again and again
            total += len(results)
            if len(results) < _WALK_PAGE_SIZE:
                return total
            previous = results[0] if results else None
        return None

    async def _count_by_pages(self, path: str, first: dict[str, Any], wait: Wait) -> int:
        """The count of a job whose status bodies carry no count field, only `results` and
        `pagination`.

        With page_size=1, page p holds a result exactly when the job has at least p, so an
        exponential search then a bisection finds the count in O(log n) one-result requests:
        still a constant size each, never the whole list.
        """
        results = first["results"]
        if not page_is_partial(first, page_size=1):
            return len(results)
        if not results:
            return 0

        async def probe(page: int) -> tuple[bool, int | None]:
            """(page has a result, the job's count if this page tells it: a count field, or
            being the last page with a result)."""
            body = await self._status_page(path, page, wait)
            found = body.get("results")
            if not isinstance(found, list):
                raise unreadable("status body has no results list")
            count = field_count(body)
            if count is not None:
                return bool(found), count
            pagination = body.get("pagination")
            last = bool(found) and isinstance(pagination, dict) and pagination.get("has_next") is False
            return bool(found), page if last else None

        # Page `low` has a result; page `high`, once known, has none. Until then the probe
        # doubles (the exponential search), after it halves the gap (the bisection).
        low, high = 1, None
        while high is None or high - low > 1:
            page = low * 2 if high is None else (low + high) // 2
            if page > _PROBE_MAX_PAGE:
                raise unreadable("status body has no usable result count")
            found, count = await probe(page)
            if count is not None:
                return count
            if found:
                low = page
            else:
                high = page
        return low
