"""Every shape of answer the public Clado docs show (and the hostile ones), read by the client.

The docs are of different ages and disagree: created_at as epoch seconds, milliseconds, a
digit string or ISO 8601; the count in any of four fields; statuses spelled by an unofficial
SDK; retry_after in a 429's body; cancel answered 200, 202 or 204; a 404 from /api/credits.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs
from test_clado import JOB, NOW, FakeTime, Recorder, client_for, initiated, ok, status_body

from supervisor.adapters import metrics
from supervisor.adapters.clado import (
    MAX_BODY,
    ApiUnavailable,
    CancelResult,
    Credits,
    CreditsUnavailable,
    JobNotFound,
    JobStatus,
    RateLimited,
    UnreadableBody,
)
from supervisor.adapters.clado.shapes import leading_fields, other_count
from supervisor.core.states import STATUS_ALIASES, normalize_status

DOCS_EXAMPLE = datetime(2023, 3, 15, 13, 20, tzinfo=UTC)  # created_at 1678886400 in the docs


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def poll(body: dict[str, Any], job_id: str = JOB, **kwargs: Any) -> JobStatus:
    async with client_for(Recorder(ok(body)), **kwargs) as client:
        return await client.status(job_id)


# ---- created_at


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        (1678886400, DOCS_EXAMPLE),  # the docs' own example: integer epoch seconds
        (1678886400000, DOCS_EXAMPLE),  # epoch milliseconds
        ("1678886400", DOCS_EXAMPLE),
        ("1678886400000", DOCS_EXAMPLE),
        (" 1678886400 ", DOCS_EXAMPLE),
        (1678886400.5, DOCS_EXAMPLE.replace(microsecond=500000)),
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.678Z", datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)),
        ("2026-01-02T03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),  # naive is UTC
        ("2026-01-02T05:04:05+02:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.000000+00:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (NOW + 120, datetime.fromtimestamp(NOW + 120, UTC)),  # within clock skew
        ("2023-01-01T00:00:00Z", datetime(2023, 1, 1, tzinfo=UTC)),
    ],
)
async def test_created_at_in_every_documented_shape(created_at: Any, expected: datetime) -> None:
    with capture_logs() as logs:
        status = await poll(status_body(created_at=created_at))
    assert status.created_at == expected
    assert status.created_at.tzinfo is not None
    assert not events(logs, "created_at ignored")


HOSTILE_CREATED_AT = {
    "year 1": "0001-01-01T00:00:00Z",
    "year 9999": "9999-12-31T23:59:59Z",
    "year 1 with an offset": "0001-01-01T00:00:00+01:00",
    "year 9999 with an offset": "9999-12-31T23:59:59-01:00",
    "zero": 0,
    "minus one": -1,
    "minus one string": "-1",
    "before the API": "2022-12-31T23:59:59Z",
    "an hour ahead": NOW + 3600,
    "an hour ahead in ms": (NOW + 3600) * 1000,
    "huge int": 10**30,
    "huge negative int": -(10**30),
    "twenty nines": "9" * 20,
    "too many digits": "9" * 400,
    "huge float": 1e308,
    "not a date": "abc",
    "yesterday": "yesterday",
    "long junk": "2026" + "x" * 10_000,
    "bool": True,
    "list": [1678886400],
    "object": {"seconds": 1678886400},
    "control characters": "2026\n\x1b[31m",
}


@pytest.mark.parametrize("created_at", HOSTILE_CREATED_AT.values(), ids=HOSTILE_CREATED_AT.keys())
async def test_a_hostile_created_at_is_ignored_with_one_warning(created_at: Any) -> None:
    with capture_logs() as logs:
        status = await poll(status_body("processing", created_at=created_at))
    assert (status.status, status.result_count, status.created_at) == ("processing", 3, None)
    (warning,) = events(logs, "created_at ignored")
    assert (warning["log_level"], warning["job_id"]) == ("warning", JOB)
    assert len(warning["value"]) <= 40
    assert "\n" not in warning["value"]


@pytest.mark.parametrize(
    "content",
    [
        b'{"status": "searching", "total_results": 3, "created_at": NaN}',
        b'{"status": "searching", "total_results": 3, "created_at": -Infinity}',
        b'{"status": "searching", "total_results": 3, "created_at": 1e999}',
    ],
)
async def test_non_finite_created_at_is_ignored(content: bytes) -> None:
    async with client_for(Recorder(httpx.Response(200, content=content))) as client:
        with capture_logs() as logs:
            assert (await client.status(JOB)).created_at is None
    assert len(events(logs, "created_at ignored")) == 1


async def test_a_non_finite_count_is_passed_over() -> None:
    content = b'{"status": "searching", "final_results_count": Infinity, "total": NaN, "total_results": 7}'
    async with client_for(Recorder(httpx.Response(200, content=content))) as client:
        assert (await client.status(JOB)).result_count == 7


@pytest.mark.parametrize("body", [status_body(), status_body(created_at=None), status_body(created_at="")])
async def test_no_created_at_is_not_worth_a_warning(body: dict[str, Any]) -> None:
    with capture_logs() as logs:
        assert (await poll(body)).created_at is None
    assert not events(logs, "created_at ignored")


async def test_the_created_at_warning_comes_once_per_job_with_bounded_memory() -> None:
    other = "7c9e6679-7425-40de-944b-e07fc1f90ae7"

    def handle(request: httpx.Request) -> httpx.Response:
        job_id = request.url.path.rsplit("/", 1)[1]
        return ok({"job_id": job_id, "status": "searching", "total_results": 1, "created_at": "9999-12-31T23:59:59Z"})

    async with client_for(Recorder(handle)) as client:
        with capture_logs() as logs:
            for _ in range(3):
                await client.status(JOB)
                await client.status(other)
        assert [e["job_id"] for e in events(logs, "created_at ignored")] == [JOB, other]
        # It remembers a bounded number of jobs: after enough others, the first warns again.
        with capture_logs() as logs:
            for n in range(2000):
                await client.status(f"job-{n}")
            await client.status(JOB)
        assert events(logs, "created_at ignored")[-1]["job_id"] == JOB


# ---- the result count


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"final_results_count": 302}, 302),
        ({"final_results_count": "302"}, 302),
        ({"total_results": " 302 "}, 302),
        ({"total": 40}, 40),  # the older docs
        ({"total": "40"}, 40),
        ({"pagination": {"total_results": "12"}}, 12),
        ({"total_results": 3.0}, 3),
        # The largest present is what is billed.
        ({"final_results_count": 10, "total_results": 12, "pagination": {"total_results": 11}, "total": 9}, 12),
        ({"final_results_count": "302", "total_results": 25}, 302),
        ({"final_results_count": 25, "total": 302}, 302),
        # Unreadable ones are passed over, not taken as 0.
        ({"final_results_count": "x", "total_results": 7}, 7),
        ({"final_results_count": -5, "total_results": 7}, 7),
        ({"final_results_count": True, "total_results": 7}, 7),
        ({"final_results_count": 9.5, "total_results": 7}, 7),
        ({"final_results_count": "3.5", "total_results": 7}, 7),
        ({"final_results_count": "-5", "total_results": 7}, 7),
        ({"final_results_count": "1e3", "total_results": 7}, 7),
        ({"final_results_count": [302], "total_results": 7}, 7),
        # None readable: the results list, as before.
        ({"final_results_count": "x", "results": [{}, {}]}, 2),
        ({"total_results": -5, "results": [{}, {}, {}]}, 3),
    ],
)
async def test_the_count_from_any_field(fields: dict[str, Any], expected: int) -> None:
    body = {"job_id": JOB, "status": "searching", **fields}
    assert (await poll(body)).result_count == expected


@pytest.mark.parametrize(
    "fields",
    [{}, {"final_results_count": "x"}, {"total_results": -5}, {"total": True}, {"pagination": {"total_results": 2.5}}],
    ids=["none", "x", "negative", "bool", "fraction"],
)
async def test_no_readable_count_is_no_count_never_zero(fields: dict[str, Any]) -> None:
    handler = Recorder(ok({"job_id": JOB, "status": "searching", **fields}))
    async with client_for(handler, max_retries=2) as client:
        result = await client.status(JOB)
        assert (result.result_count, result.count_source) == (None, None)
        asked = handler.calls
        # Not every poll tries the alternatives (the caller says when): one request only.
        assert (await client.status(JOB, recover=False)).result_count is None
    assert handler.calls == asked + 1


# ---- statuses


@pytest.mark.parametrize(
    ("raw", "status", "final"),
    [
        ("pending", "pending", False),
        ("RUNNING", "processing", False),
        ("running", "processing", False),
        ("in_progress", "processing", False),
        ("In_Progress", "processing", False),
        ("queued", "pending", False),
        (" Searching ", "searching", False),
        ("PROCESSING", "processing", False),
        ("Completed", "completed", True),
        ("completed\n", "completed", True),
        ("failed", "error", True),
        ("FAILED", "error", True),
        ("canceled", "cancelled", True),
        ("Cancelled", "cancelled", True),
        ("error", "error", True),
    ],
)
async def test_statuses_in_any_case_and_the_sdk_spellings(raw: str, status: str, final: bool) -> None:
    with capture_logs() as logs:
        result = await poll(status_body(raw, final_results_count=4))
    assert (result.status, result.is_final, result.recognized, result.result_count) == (status, final, True, 4)
    assert not events(logs, "unknown job status, treated as running")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("weird", "weird"),
        ("Finished", "finished"),
        ("  PAUSED  ", "paused"),
        ("waiting_for_validation_step", "waiting_for_vali"),  # the column is String(16)
        ("done\x1b[31m", "done [31m"),
    ],
)
async def test_an_unknown_status_is_a_running_job_with_a_warning(raw: str, status: str) -> None:
    before = metrics.API_UNKNOWN_STATUS._value.get()
    with capture_logs() as logs:
        result = await poll(status_body(raw, final_results_count=4))
    assert result == JobStatus(JOB, status, 4, None, "m", recognized=False)
    assert not result.is_final
    assert len(result.status) <= 16
    (warning,) = events(logs, "unknown job status, treated as running")
    assert (warning["log_level"], warning["status"]) == ("warning", status)
    assert metrics.API_UNKNOWN_STATUS._value.get() == before + 1


async def test_an_unknown_status_is_warned_about_once_and_counted_every_time() -> None:
    before = metrics.API_UNKNOWN_STATUS._value.get()
    async with client_for(Recorder(ok(status_body("paused")))) as client:
        with capture_logs() as logs:
            for _ in range(5):
                assert (await client.status(JOB)).status == "paused"
    assert len(events(logs, "unknown job status, treated as running")) == 1
    assert metrics.API_UNKNOWN_STATUS._value.get() == before + 5


def test_every_alias_names_a_documented_status() -> None:
    for alias, name in STATUS_ALIASES.items():
        assert normalize_status(alias.upper()) == name
        assert normalize_status(name) == name


# ---- 429: one hold-off for the whole client


class GatedTime(FakeTime):
    """A FakeTime whose sleeps last until the test opens the gate (then the clock moves)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.asleep = 0

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        end = self.now + delay
        self.asleep += 1
        await self.gate.wait()
        self.asleep -= 1
        self.now = max(self.now, end)

    async def until_asleep(self, count: int, tasks: list[asyncio.Task[Any]]) -> None:
        """Until `count` sleepers wait at the gate; fails (not hangs) if the tasks end first."""
        while self.asleep < count:
            assert not all(task.done() for task in tasks), "the calls ended without waiting"
            await asyncio.sleep(0)


def throttled(retry_after: Any = 60, **headers: str) -> httpx.Response:
    return ok({"error": "Rate limit exceeded", "retry_after": retry_after}, 429, headers=headers)


def answer_each_endpoint(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/api/credits":
        return ok({"credits": 5})
    if request.url.path.endswith("/cancel"):
        return ok({"success": True})
    if request.method == "POST":
        return initiated()
    return ok(status_body())


async def test_a_429_body_retry_after_holds_off_the_whole_client() -> None:
    time = GatedTime()
    handler = Recorder(throttled(60), answer_each_endpoint, clock=time)
    async with client_for(handler, clock=time, sleep=time.sleep) as client:
        with capture_logs() as logs:
            first = asyncio.create_task(client.status(JOB))
            await time.until_asleep(1, [first])
            assert (handler.calls, client.held_off_for) == (1, 60)
            # Thirty polls, a cancel, a credits check and a submission during the hold-off.
            others = [asyncio.create_task(client.status(JOB)) for _ in range(30)]
            others += [
                asyncio.create_task(client.cancel(JOB)),
                asyncio.create_task(client.credits()),
                asyncio.create_task(client.initiate("q")),
            ]
            await time.until_asleep(34, others)
            assert handler.calls == 1  # nobody hammers on its own
            assert time.sleeps == [60.0] * 34
            time.gate.set()
            results = await asyncio.gather(first, *others)
    assert results[-3:] == [CancelResult(True, ""), 5, JOB]
    assert handler.calls == 35
    assert handler.times == [1000.0] + [1060.0] * 34  # every later request after the hold-off
    (held,) = events(logs, "API asked to slow down: holding off every request")
    assert (held["seconds"], held["cause"]) == (60, "HTTP 429")
    assert len(events(logs, "initiate waits for the API's rate limit")) == 1


@pytest.mark.parametrize(
    ("headers", "body_retry_after", "held"),
    [
        ({}, 60, 60),
        ({"Retry-After": "10"}, 60, 60),  # the larger of the two
        ({"Retry-After": "90"}, 60, 90),
        ({"Retry-After": "90"}, None, 90),
        ({}, "45", 45),
        ({}, "soon", 1),  # unreadable: the one-second floor
        ({}, -3, 1),
        ({}, True, 1),
        ({}, None, 1),
    ],
)
async def test_the_hold_off_is_the_larger_of_body_and_header(
    headers: dict[str, str], body_retry_after: Any, held: float
) -> None:
    time = FakeTime()
    body: dict[str, Any] = {"error": "Rate limit exceeded"}
    if body_retry_after is not None:
        body["retry_after"] = body_retry_after
    handler = Recorder(ok(body, 429, headers=headers), ok(status_body()), clock=time)
    async with client_for(handler, clock=time, sleep=time.sleep) as client:
        await client.status(JOB)
    assert time.sleeps == [held]
    assert handler.times == [1000.0, 1000.0 + held]


async def test_calls_that_cannot_wait_that_long_fail_fast_without_a_request() -> None:
    time = FakeTime()
    handler = Recorder(throttled(600), clock=time)  # capped at 5 minutes
    async with client_for(handler, clock=time, sleep=time.sleep, initiate_wait=120) as client:
        with pytest.raises(RateLimited, match="held off for another 300s, longer than this status call"):
            await client.status(JOB)
        time.now += 100
        for call in (client.status(JOB), client.cancel(JOB), client.credits(), client.initiate("q")):
            with pytest.raises(RateLimited, match="another 200s") as caught:
                await call
            assert caught.value.retry_in == 200
        assert handler.calls == 1
        # Once it has passed, requests go out again.
        handler.answers = [ok(status_body())]
        time.now += 200
        assert client.held_off_for == 0
        assert (await client.status(JOB)).job_id == JOB
    assert time.sleeps == []
    assert handler.calls == 2


async def test_initiate_through_429_starts_exactly_one_job() -> None:
    time = FakeTime()
    handler = Recorder(throttled(60), throttled(30), initiated(), clock=time)
    async with client_for(handler, clock=time, sleep=time.sleep, max_retries=0) as client:
        with capture_logs() as logs:
            assert await client.initiate("engineers in SF", 20) == JOB
    assert [r.method for r in handler.requests] == ["POST"] * 3
    assert handler.times == [1000.0, 1060.0, 1090.0]
    assert [json.loads(r.content) for r in handler.requests] == [{"query": "engineers in SF", "limit": 20}] * 3
    waits = events(logs, "initiate waits for the API's rate limit")
    assert [w["seconds"] for w in waits] == [60, 30]


async def test_initiate_gives_up_at_initiate_wait() -> None:
    time = FakeTime()
    handler = Recorder(throttled(60), initiated(), clock=time)
    async with client_for(handler, clock=time, sleep=time.sleep, initiate_wait=30) as client:
        with pytest.raises(RateLimited, match="longer than this initiate call may wait"):
            await client.initiate("q")
    assert handler.calls == 1


@pytest.mark.parametrize(
    "answer",
    [ok({}, 500), httpx.Response(502, content=b"<html>bad gateway</html>"), ok({"detail": "x"}, 504)],
    ids=["500", "502", "504"],
)
async def test_initiate_is_never_retried_after_it_may_have_been_sent_even_after_a_429(answer: httpx.Response) -> None:
    handler = Recorder(throttled(5), answer, initiated())
    async with client_for(handler) as client:
        with pytest.raises(ApiUnavailable, match="not retried"):
            await client.initiate("q")
    assert handler.calls == 2


# ---- cancel answers


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ok({"success": True}), CancelResult(True, "")),
        (ok({"message": "queued for cancellation"}, 202), CancelResult(True, "queued for cancellation")),
        (httpx.Response(202), CancelResult(True, "")),
        (httpx.Response(204), CancelResult(True, "")),
        (ok({"success": False, "message": "Cannot cancel job: already completed"}),
         CancelResult(False, "Cannot cancel job: already completed")),
        (ok({"success": False, "message": "Cannot cancel job: already completed"}, 409),
         CancelResult(False, "Cannot cancel job: already completed")),
        (httpx.Response(409), CancelResult(False, "")),
    ],
)  # fmt: skip
async def test_cancel_accepts_any_2xx_and_keeps_a_refusal_message(
    answer: httpx.Response, expected: CancelResult
) -> None:
    handler = Recorder(answer)
    async with client_for(handler) as client:
        assert await client.cancel(JOB) == expected
    assert handler.calls == 1


# ---- credits


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"credits": 4321, "last_topup_at": "2026-05-01T12:00:00Z"},
         Credits(4321, datetime(2026, 5, 1, 12, tzinfo=UTC))),
        ({"credits": 10, "last_topup_at": None}, Credits(10, None)),
        ({"credits": 10}, Credits(10, None)),
        ({"credits": 10, "last_topup_at": "not a date"}, Credits(10, None)),
        ({"credits": 10, "last_topup_at": "0001-01-01T00:00:00+01:00"}, Credits(10, None)),
        ({"credits": 10, "last_topup_at": 1678886400}, Credits(10, DOCS_EXAMPLE)),
    ],
)  # fmt: skip
async def test_credits_with_the_last_top_up(body: dict[str, Any], expected: Credits) -> None:
    async with client_for(Recorder(ok(body))) as client:
        assert await client.account() == expected
        assert await client.credits() == expected.credits  # what the daemon's callers use


async def test_credits_404_is_credits_unavailable_not_job_not_found() -> None:
    handler = Recorder(ok({"detail": "Unable to retrieve credit information"}, 404))
    async with client_for(handler) as client:
        with pytest.raises(CreditsUnavailable, match="Unable to retrieve credit information") as caught:
            await client.credits()
        assert not isinstance(caught.value, JobNotFound)
        handler.answers = [httpx.Response(404)]
        with pytest.raises(CreditsUnavailable, match="unable to retrieve credit information"):
            await client.account()
    assert handler.calls == 2


# ---- bounded bodies


@pytest.mark.parametrize(
    ("head", "count"),
    [
        (b'"status": "searching", "total_results": 257, "final_results_count": 256, "padding": "', 257),
        (b'"status": "searching", "padding": "', None),  # no count before the bound: none at all
    ],
    ids=["counts first", "no count first"],
)
async def test_a_50_mb_body_is_read_up_to_the_bound_with_bounded_memory(head: bytes, count: int | None) -> None:
    sent: list[int] = []
    chunk = b" " * 65536

    async def endless() -> AsyncIterator[bytes]:
        sent.append(0)
        yield b'{"job_id": "' + JOB.encode() + b'", ' + head
        while sent[-1] < 50_000_000:
            sent[-1] += len(chunk)
            yield chunk
        yield b'"}'

    handler = Recorder(lambda request: httpx.Response(200, content=endless()))
    async with client_for(handler, max_retries=0) as client:
        tracemalloc.start()
        try:
            result = await client.status(JOB)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (result.status, result.result_count) == ("searching", count)
    assert all(size <= MAX_BODY + len(chunk) for size in sent)  # each stopped reading at the bound
    assert peak < 4 * MAX_BODY


async def test_a_50_mb_body_whose_status_is_past_the_bound_is_refused() -> None:
    padding = b'{"padding": "' + b" " * 2_000_000 + b'", "status": "searching", "total_results": 3}'
    async with client_for(Recorder(httpx.Response(200, content=padding)), max_retries=0) as client:
        # Nothing before the bound to read (the status comes after it): refused, as unparseable.
        with pytest.raises(UnreadableBody, match="body over 1000000 bytes"):
            await client.status(JOB)


async def test_a_declared_oversized_cancel_answer_is_refused_before_reading_it() -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield b"{}"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-length": "50000000"})

    handler = Recorder(answer)
    async with client_for(handler, max_retries=1) as client:
        with pytest.raises(UnreadableBody, match="refused unread"):
            await client.cancel(JOB)
    assert handler.calls == 2  # retried like garbage
    assert pulled == 0


async def test_an_oversized_initiate_answer_is_not_retried() -> None:
    handler = Recorder(ok({"job_id": JOB, "pad": "x" * 2000}), initiated())
    async with client_for(handler, max_body=1000) as client:
        with pytest.raises(UnreadableBody, match="not retried"):
            await client.initiate("q")
    assert handler.calls == 1


async def test_a_body_at_the_bound_is_read() -> None:
    body = json.dumps(status_body()).encode()
    async with client_for(Recorder(httpx.Response(200, content=body)), max_body=len(body)) as client:
        assert (await client.status(JOB)).result_count == 3


# ---- no count field: the documented alternatives, in order


def _people(n: int) -> list[dict[str, int]]:
    return [{"i": i} for i in range(n)]


def _no_count_api(results: int, *, unpaged: str = "list", walk: bool = True, other: dict[str, Any] | None = None):
    """A status endpoint with no count field and no `pagination`: the paged answer holds the
    asked-for rows only. `unpaged`: "list" (every result), "huge" (over the body bound, no
    count first), "counts" (over the bound, its counts first)."""

    def answer(request: httpx.Request) -> httpx.Response:
        params = request.url.params
        body: dict[str, Any] = {"job_id": JOB, "status": "searching", **(other or {})}
        if "page" not in params:
            if unpaged == "huge":
                return httpx.Response(200, content=b'{"status": "searching", "results": [' + b"{}," * 600_000 + b"{}]}")
            if unpaged == "counts":
                head = json.dumps({"status": "searching", "total_results": results}).encode()[:-1]
                return httpx.Response(200, content=head + b', "results": [' + b"{}," * 600_000 + b"{}]}")
            return httpx.Response(200, json={**body, "results": _people(results)})
        if not walk and params["page_size"] != "1":
            return httpx.Response(200, json={"job_id": JOB, "status": "searching"})
        page, size = int(params["page"]), int(params["page_size"])
        return httpx.Response(200, json={**body, "results": _people(results)[(page - 1) * size : page * size]})

    return answer


@pytest.mark.parametrize(
    ("api", "count", "source"),
    [
        (_no_count_api(323), 323, "unpaged"),
        (_no_count_api(323, unpaged="counts"), 323, "unpaged"),  # oversized, its counts first
        (_no_count_api(323, unpaged="huge"), 323, "page_walk"),
        (_no_count_api(300, unpaged="huge"), 300, "page_walk"),  # a last page that is full
        (
            _no_count_api(7, unpaged="huge", walk=False, other={"resultsCount": 7, "meta": {"total": 9}}),
            9,
            "field:meta.total",
        ),
        (_no_count_api(7, unpaged="huge", walk=False), None, None),
    ],
    ids=["unpaged", "unpaged counts first", "page walk", "page walk full last page", "other field", "none"],
)
async def test_a_body_without_a_count_field_is_counted_by_the_alternatives(
    api: Any, count: int | None, source: str | None
) -> None:
    handler = Recorder(api)
    async with client_for(handler) as client:
        result = await client.status(JOB)
    assert (result.result_count, result.count_source) == (count, source)
    # The one asked-for row of the paged answer is never taken for the job's total.
    assert result.result_count != 1


async def test_a_results_only_body_with_pagination_is_probed_not_walked() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        rows = _people(1) if page <= 41 else []
        return httpx.Response(200, json={"job_id": JOB, "status": "searching", "results": rows,
                                         "pagination": {"page": page, "has_next": page < 41}})  # fmt: skip

    handler = Recorder(answer)
    async with client_for(handler) as client:
        result = await client.status(JOB)
    assert (result.result_count, result.count_source) == (41, "probe")
    assert all(request.url.params["page_size"] == "1" for request in handler.requests)


@pytest.mark.parametrize(
    ("prefix", "fields"),
    [
        (
            b'{"status": "searching", "total_results": 5, "results": [{"a": 1}, {"b"',
            {"status": "searching", "total_results": 5},
        ),
        (b' { "a" : 1 , "b": {"c": [1, 2]}, "d": "x', {"a": 1, "b": {"c": [1, 2]}}),
        (b'{"status": "searching", "results": [], "total": 3}', {"status": "searching", "results": [], "total": 3}),
        (b"[1, 2", {}),
        (b'{"a": 1 "b": 2}', {"a": 1}),
        (b'{"s": "\xc3', {}),
    ],
)
def test_leading_fields_reads_the_whole_fields_before_the_cut(prefix: bytes, fields: dict[str, Any]) -> None:
    assert leading_fields(prefix) == fields


@pytest.mark.parametrize(
    ("body", "found"),
    [
        ({"results_count": 4}, ("results_count", 4)),
        ({"totalCount": "12", "count": 3}, ("totalCount", 12)),
        ({"meta": {"total": 9}, "count": 3}, ("meta.total", 9)),
        ({"pagination": {"total_results": 5}}, None),  # the documented one is not "another form"
        ({"total": 5}, None),
        ({"count": -1, "counted": True}, None),
        ({}, None),
    ],
)
def test_other_count_is_the_largest_count_of_another_form(body: dict[str, Any], found: object) -> None:
    assert other_count(body) == found
