"""The Clado client over httpx.MockTransport: no network, no real sleeps (an injected clock).

The shapes of the API's answers (created_at, counts, statuses, 429 bodies, …) have their
own tables in test_clado_shapes.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from supervisor.adapters.clado import (
    ApiKeyRejected,
    ApiUnavailable,
    CancelResult,
    CladoClient,
    CladoError,
    InvalidJobId,
    JobNotFound,
    JobStatus,
    OutOfCredits,
    RateLimited,
    RequestRejected,
    UnreadableBody,
    validate_job_id,
)

KEY = "lk_unit_secret_7d3f9a0c51e2"
BASE = "https://clado.test"
JOB = "550e8400-e29b-41d4-a716-446655440000"
STATUS_PATH = f"/api/search/deep_research/{JOB}"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


# The wall clock the client judges created_at by (2026-06-01T00:00:00Z).
NOW = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeTime(Clock):
    """The client's clock and sleep together: a sleep records its delay and moves the clock
    to its end at once, as a timer would (concurrent sleepers do not add up)."""

    def __init__(self, now: float = 1000.0) -> None:
        super().__init__(now)
        self.sleeps: list[float] = []

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        end = self.now + delay
        await asyncio.sleep(0)
        self.now = max(self.now, end)


class Recorder:
    """An async MockTransport handler: answers from `answers` in turn (the last one repeats).

    An answer is an httpx.Response, an exception to raise, or a callable(request) -> either.
    """

    def __init__(self, *answers: Any, clock: Callable[[], float] | None = None) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []  # when each request came, by `clock` (else the loop's)
        self._clock = clock

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(self._clock() if self._clock else asyncio.get_running_loop().time())
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if callable(answer) and not isinstance(answer, httpx.Response):
            answer = answer(request)
            if asyncio.iscoroutine(answer):
                answer = await answer
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @property
    def calls(self) -> int:
        return len(self.requests)


def client_for(handler: Any, **kwargs: Any) -> CladoClient:
    """A client on a MockTransport; its waits run on a FakeTime unless a test passes its own."""
    time = FakeTime()
    options: dict[str, Any] = {
        "backoff_initial": 0.001,
        "backoff_max": 0.01,
        "max_retries": 3,
        "clock": time,
        "sleep": time.sleep,
        "wall_clock": lambda: NOW,
    }
    options.update(kwargs)
    return CladoClient(BASE, KEY, transport=httpx.MockTransport(handler), **options)


def ok(body: Any = None, status: int = 200, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, json=body if body is not None else {}, **kwargs)


def raw(content: bytes | str, status: int = 200, content_type: str = "application/json") -> httpx.Response:
    return httpx.Response(status, content=content, headers={"content-type": content_type})


def status_body(status: str = "searching", **fields: Any) -> dict[str, Any]:
    return {"job_id": JOB, "status": status, "message": "m", "total_results": 3, "results": [], **fields}


def initiated(job_id: str = JOB) -> httpx.Response:
    return ok({"job_id": job_id, "status": "pending", "message": "Deep research job initiated"})


def connect_error(request: httpx.Request) -> httpx.ConnectError:
    return httpx.ConnectError("connection refused", request=request)


def connect_timeout(request: httpx.Request) -> httpx.ConnectTimeout:
    return httpx.ConnectTimeout("connect timed out", request=request)


def read_timeout(request: httpx.Request) -> httpx.ReadTimeout:
    return httpx.ReadTimeout("read timed out", request=request)


def read_error(request: httpx.Request) -> httpx.ReadError:
    return httpx.ReadError("connection reset by peer", request=request)


def dropped(request: httpx.Request) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError("peer closed connection without sending complete message body", request=request)


def bad_encoding(request: httpx.Request) -> httpx.Response:
    # Claims gzip, is not: httpx raises DecodingError (not a TransportError) reading it.
    return httpx.Response(200, content=b"not gzip at all", headers={"content-encoding": "gzip"})


# ---- job ids


VALID_IDS = [JOB, "a", "Z", "0", "A" * 128, "job_1-x", "ABCdef0123"]
# An id starts with a letter or digit, so it can never be taken for a CLI option.
LEADING_PUNCTUATION = ["-leading-dash", "_x", "-", "--"]
INVALID_IDS = [
    "",
    "A" * 129,
    "../etc/passwd",
    "..",
    ".",
    "a/b",
    "/abs",
    "a\\b",
    "a b",
    " a",
    "a\t",
    "a\x00b",
    "a\nb",
    "abc\n",
    "a\x7f",
    "j\u043eb",  # Cyrillic 'о'
    "\u0430bc",  # Cyrillic 'а'
    "\uff41bc",  # fullwidth 'ａ'
    "\u0661\u0662",  # Arabic-Indic digits
    "caf\u00e9",
    "%2e%2e",
    "%2e%2e%2fcredits",
    "a%2Fb",
    "a.b",
    "a?b",
    "a#b",
    "a;b",
    "a&page_size=1000",
    "a:b",
    "a@b",
    "a+b",
    "é",
]


@pytest.mark.parametrize("job_id", VALID_IDS)
def test_valid_job_ids_pass(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", [*INVALID_IDS, None, 123, b"abc", ["a"]])
def test_invalid_job_ids_are_rejected(job_id: Any) -> None:
    with pytest.raises(InvalidJobId) as caught:
        validate_job_id(job_id)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, CladoError)
    assert "1-128 ASCII letters" in str(caught.value)
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)


def test_invalid_job_id_message_is_bounded() -> None:
    with pytest.raises(InvalidJobId) as caught:
        validate_job_id("x" * 10_000)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("method", ["status", "cancel"])
async def test_invalid_job_ids_never_send_a_request(method: str) -> None:
    handler = Recorder(ok(status_body()))
    async with client_for(handler) as client:
        for job_id in INVALID_IDS:
            with pytest.raises(InvalidJobId):
                await getattr(client, method)(job_id)
    assert handler.calls == 0


async def test_initiate_rejects_an_invalid_job_id_from_the_api_without_retrying() -> None:
    # The job may exist: this is the API's fault (exit 1), not the caller's input (exit 2).
    handler = Recorder(initiated("../../api/credits"))
    async with client_for(handler) as client:
        with pytest.raises(ApiUnavailable, match="invalid job_id"):
            await client.initiate("q")
    assert handler.calls == 1


# ---- requests as sent


async def test_status_polls_one_small_page_with_the_key() -> None:
    handler = Recorder(ok(status_body(created_at="2026-01-02T03:04:05.678Z")))
    async with client_for(handler) as client:
        result = await client.status(JOB)
    (request,) = handler.requests
    assert request.method == "GET"
    assert request.url.path == STATUS_PATH
    assert dict(request.url.params) == {"page": "1", "page_size": "1"}
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert result == JobStatus(
        job_id=JOB,
        status="searching",
        result_count=3,
        created_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        message="m",
    )
    assert not result.is_final


async def test_initiate_posts_the_documented_body() -> None:
    handler = Recorder(initiated())
    async with client_for(handler) as client:
        assert await client.initiate("engineers in SF", 50, ["https://acme.com"]) == JOB
        assert await client.initiate("q") == JOB
    first, second = handler.requests
    assert (first.method, first.url.path) == ("POST", "/api/search/deep_research")
    assert json.loads(first.content) == {
        "query": "engineers in SF",
        "limit": 50,
        "hard_filter_company_urls": ["https://acme.com"],
    }
    assert json.loads(second.content) == {"query": "q", "limit": 30}


@pytest.mark.parametrize("code", [201, 202])
async def test_initiate_takes_any_success_code(code: int) -> None:
    async with client_for(Recorder(ok({"job_id": JOB, "status": "pending"}, code))) as client:
        assert await client.initiate("q") == JOB


async def test_cancel_and_credits_hit_their_endpoints() -> None:
    handler = Recorder(
        ok({"success": True, "message": "Deep research job cancelled successfully"}),
        ok({"credits": 4321}),
    )
    async with client_for(handler) as client:
        assert await client.cancel(JOB) == CancelResult(True, "Deep research job cancelled successfully")
        assert await client.credits() == 4321
    cancel, credits = handler.requests
    assert (cancel.method, cancel.url.path) == ("POST", f"{STATUS_PATH}/cancel")
    assert (credits.method, credits.url.path) == ("GET", "/api/credits")


# ---- typed results


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"final_results_count": 7}, 7),
        ({"total_results": 5}, 5),
        ({"pagination": {"total_results": 9, "has_next": True}, "results": [{}]}, 9),
        ({"total": 11}, 11),  # the older docs
        ({"results": [{}, {}, {}]}, 3),
        ({"results": []}, 0),
        ({"results": [{}], "pagination": {"page": 1, "page_size": 1, "has_next": False}}, 1),
        ({"results": [], "pagination": {"page": 1, "page_size": 1, "has_next": False}}, 0),
        # Several fields: the largest, which is what is billed.
        ({"final_results_count": 7, "total_results": 5, "pagination": {"total_results": 4}}, 7),
        ({"total_results": 5, "pagination": {"total_results": 4}}, 5),
        ({"final_results_count": 5, "total": 8}, 8),
        # Unusable values are passed over.
        ({"final_results_count": None, "total_results": 5}, 5),
        ({"final_results_count": True, "total_results": 5}, 5),
        ({"final_results_count": -1, "total_results": 5}, 5),
        ({"final_results_count": "7", "total_results": 5}, 7),
        ({"total_results": 2.5, "results": [{}]}, 1),
        ({"pagination": [1, 2], "results": [{}, {}]}, 2),
        ({"total_results": 0}, 0),
        ({"total_results": 10**12}, 10**12),
    ],
)
async def test_status_reads_the_count_from_whichever_field_the_body_has(body: dict[str, Any], expected: int) -> None:
    handler = Recorder(ok({"job_id": JOB, "status": "searching", **body}))
    async with client_for(handler) as client:
        assert (await client.status(JOB)).result_count == expected


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"results": "3"},
        {"total_results": "x"},
        {"pagination": {"page": 1}},
        {"total_results": -5, "final_results_count": True},
    ],
)
async def test_a_status_without_a_readable_count_has_no_count_never_zero(body: dict[str, Any]) -> None:
    handler = Recorder(ok({"job_id": JOB, "status": "searching", **body}))
    async with client_for(handler, max_retries=1) as client:
        result = await client.status(JOB)
    assert (result.status, result.result_count, result.count_source) == ("searching", None, None)
    # Not retried (the same answer would come again): the alternatives were asked instead.
    asked = [dict(request.url.params) for request in handler.requests]
    assert asked[0] == {"page": "1", "page_size": "1"}
    assert {} in asked  # the unpaged answer
    assert {"page": "1", "page_size": "100"} in asked  # the page walk


@pytest.mark.parametrize(
    ("status", "final"),
    [
        ("pending", False),
        ("searching", False),
        ("processing", False),
        ("completed", True),
        ("error", True),
        ("cancelled", True),
    ],
)
async def test_every_documented_status_is_typed(status: str, final: bool) -> None:
    handler = Recorder(ok(status_body(status, final_results_count=4)))
    async with client_for(handler) as client:
        result = await client.status(JOB)
    assert (result.status, result.is_final, result.result_count) == (status, final, 4)


async def test_status_message_is_bounded_and_cannot_forge_log_lines() -> None:
    handler = Recorder(ok(status_body(message="line1\nline2\x1b[31m" + "x" * 1000)))
    async with client_for(handler) as client:
        message = (await client.status(JOB)).message
    assert len(message) == 500
    assert "\n" not in message and "\x1b" not in message


# ---- results-only status bodies: the count is found by probing one-result pages


def results_only(total: int) -> Handler:
    """A status endpoint that carries no count field, only `results` and pagination flags."""

    async def handle(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page"])
        size = int(request.url.params["page_size"])
        start = (page - 1) * size
        results = [{"name": f"p{i}"} for i in range(start, min(total, start + size))]
        pagination = {"page": page, "page_size": size, "has_next": start + size < total, "has_prev": page > 1}
        body = {"job_id": JOB, "status": "searching", "message": "m", "results": results, "pagination": pagination}
        return ok(body)

    return handle


@pytest.mark.parametrize("total", [0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 100, 1000, 4097])
async def test_results_only_bodies_are_counted_exactly(total: int) -> None:
    handler = Recorder(results_only(total))
    async with client_for(handler) as client:
        assert (await client.status(JOB)).result_count == total
    # Every request is a one-result page, and there are O(log n) of them.
    assert {r.url.params["page_size"] for r in handler.requests} == {"1"}
    assert handler.calls <= 2 * max(1, total).bit_length() + 2


async def test_results_only_probe_stops_early_on_a_count_field() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.params["page"] == "1":
            return ok({"status": "searching", "results": [{}], "pagination": {"has_next": True}})
        return ok({"status": "searching", "results": [{}], "total_results": 42})

    handler = Recorder(handle)
    async with client_for(handler) as client:
        assert (await client.status(JOB)).result_count == 42
    assert handler.calls == 2


# ---- malformed bodies are retried like a 5xx, never a crash


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


MALFORMED_STATUS = {
    "html": raw("<html><body>oops</body></html>", content_type="text/html"),
    "truncated json": raw('{"job_id": "'),
    "empty body": raw(b""),
    "invalid utf-8": raw(b'{"status": "\xff\xfe"}'),
    "json array": ok([status_body()]),
    "json string": ok("completed"),
    "json null": raw(b"null"),
    "json number": raw(b"3"),
    "deeply nested": raw(nested(100_000)),
    "status missing": ok({"job_id": JOB, "total_results": 3}),
    "status empty": ok(status_body("  ")),
    "status null": ok(status_body(None)),
    "status list": ok(status_body(["completed"])),
    "status object": ok(status_body({"state": "completed"})),
    "bad content-encoding": bad_encoding,
}


@pytest.mark.parametrize("answer", MALFORMED_STATUS.values(), ids=MALFORMED_STATUS.keys())
async def test_malformed_status_bodies_are_retried_then_api_unavailable(answer: Any) -> None:
    handler = Recorder(answer)
    async with client_for(handler, max_retries=2) as client:
        with pytest.raises(UnreadableBody if answer is not bad_encoding else ApiUnavailable):
            await client.status(JOB)
        assert handler.calls == 3
        assert client.retries == 2


@pytest.mark.parametrize("answer", MALFORMED_STATUS.values(), ids=MALFORMED_STATUS.keys())
async def test_a_malformed_status_body_then_a_good_one_recovers(answer: Any) -> None:
    handler = Recorder(answer, ok(status_body("completed", final_results_count=8)))
    async with client_for(handler) as client:
        result = await client.status(JOB)
        assert client.retries == 1
    assert (result.status, result.result_count) == ("completed", 8)


@pytest.mark.parametrize(
    "answer",
    [
        raw("<html>portal</html>", content_type="text/html"),
        ok([]),
        ok({"balance": 3}),
        ok({"credits": "100"}),
        ok({"credits": True}),
        ok({"credits": None}),
        raw(b'{"credits": NaN}'),
        raw(b'{"credits": Infinity}'),
        raw(b'{"credits": 1e999}'),
    ],
    ids=["html", "array", "no credits", "string", "bool", "null", "nan", "infinity", "overflow"],
)
async def test_malformed_credits_bodies_are_errors_not_crashes(answer: httpx.Response) -> None:
    handler = Recorder(answer)
    async with client_for(handler, max_retries=1) as client:
        with pytest.raises(ApiUnavailable):
            await client.credits()
    assert handler.calls == 2


@pytest.mark.parametrize(("credits", "expected"), [(0, 0), (17, 17), (-3, -3), (12.9, 12)])
async def test_credits(credits: float, expected: int) -> None:
    async with client_for(Recorder(ok({"credits": credits}))) as client:
        assert await client.credits() == expected


# ---- retry rules for idempotent calls (status; cancel and credits share the code)


RETRIED = {
    "500": ok({"detail": "Internal server error"}, 500),
    "502 html": raw("<html>Bad Gateway</html>", 502, "text/html"),
    "503 html": raw("<html>Try later</html>", 503, "text/html"),
    "504": ok({}, 504),
    "429": ok({"detail": "Rate limit exceeded"}, 429, headers={"Retry-After": "0"}),
    "429 without retry-after": ok({}, 429),
    "connect error": connect_error,
    "connect timeout": connect_timeout,
    "read timeout": read_timeout,
    "read error": read_error,
    "dropped mid-response": dropped,
    "pool timeout": lambda r: httpx.PoolTimeout("pool", request=r),
    "write error": lambda r: httpx.WriteError("broken pipe", request=r),
}


@pytest.mark.parametrize("answer", RETRIED.values(), ids=RETRIED.keys())
async def test_transient_failures_are_retried_then_succeed(answer: Any) -> None:
    handler = Recorder(answer, answer, ok(status_body()))
    async with client_for(handler) as client:
        assert (await client.status(JOB)).result_count == 3
        assert client.retries == 2
    assert handler.calls == 3


@pytest.mark.parametrize("answer", RETRIED.values(), ids=RETRIED.keys())
async def test_transient_failures_exhaust_retries_as_api_unavailable(answer: Any) -> None:
    handler = Recorder(answer)
    async with client_for(handler, max_retries=3) as client:
        with pytest.raises(ApiUnavailable) as caught:
            await client.status(JOB)
        assert client.retries == 3
    assert handler.calls == 4
    assert caught.value.__cause__ is None  # no chained httpx error carrying request details


async def test_max_retries_zero_means_one_attempt() -> None:
    handler = Recorder(ok({}, 500))
    async with client_for(handler, max_retries=0) as client:
        with pytest.raises(ApiUnavailable):
            await client.status(JOB)
    assert handler.calls == 1


NOT_RETRIED = [
    (ok({"detail": "Job not found"}, 404), JobNotFound, "Job not found"),
    (raw(b"", 404), JobNotFound, "job not found"),
    (ok({"detail": "Insufficient credits"}, 402), OutOfCredits, "Insufficient credits"),
    (ok({"detail": "bad page"}, 400), RequestRejected, "HTTP 400: bad page"),
    (ok({"message": "forbidden"}, 403), RequestRejected, "HTTP 403: forbidden"),
    (ok({"error": "gone"}, 410), RequestRejected, "HTTP 410: gone"),
    (ok({"detail": [{"loc": "q"}]}, 422), RequestRejected, "HTTP 422"),
    (raw("<html>teapot</html>", 418, "text/html"), RequestRejected, "HTTP 418: <html>teapot</html>"),
    (ok([1, 2], 400), RequestRejected, "HTTP 400"),
    (httpx.Response(302, headers={"location": "https://evil.test/"}), RequestRejected, "HTTP 302"),
    (ok({"detail": "Invalid or missing API key"}, 401), ApiKeyRejected, "API key rejected"),
]


@pytest.mark.parametrize(("answer", "error", "message"), NOT_RETRIED)
async def test_other_4xx_are_not_retried(answer: httpx.Response, error: type[Exception], message: str) -> None:
    handler = Recorder(answer)
    async with client_for(handler) as client:
        with pytest.raises(error, match=message) as caught:
            await client.status(JOB)
        assert client.retries == 0
    assert handler.calls == 1
    if isinstance(caught.value, RequestRejected):
        assert caught.value.status_code == answer.status_code


async def test_redirects_are_not_followed() -> None:
    handler = Recorder(httpx.Response(307, headers={"location": f"{BASE}/elsewhere"}))
    async with client_for(handler) as client:
        with pytest.raises(RequestRejected):
            await client.credits()
    assert [r.url.path for r in handler.requests] == ["/api/credits"]


# ---- POST initiate is not idempotent: retried only when it certainly did not arrive

INITIATE_RETRIED = {
    "connect error": connect_error,
    "connect timeout": connect_timeout,
    "pool timeout": lambda r: httpx.PoolTimeout("pool", request=r),
    "429": ok({"detail": "Rate limit exceeded"}, 429, headers={"Retry-After": "0"}),
    "503": raw("<html>Try later</html>", 503, "text/html"),
}

INITIATE_NOT_RETRIED = {
    "read timeout": read_timeout,
    "write timeout": lambda r: httpx.WriteTimeout("write", request=r),
    "read error": read_error,
    "write error": lambda r: httpx.WriteError("broken pipe", request=r),
    "dropped after sending": dropped,
    "500": ok({"detail": "Internal server error"}, 500),
    "502": raw("<html>Bad Gateway</html>", 502, "text/html"),
    "504": ok({}, 504),
    "200 not json": raw("<html>oops</html>", content_type="text/html"),
    "200 truncated json": raw('{"job_id": "'),
    "200 json array": ok([{"job_id": JOB}]),
    "200 without job_id": ok({"status": "pending"}),
    "200 job_id not a string": ok({"job_id": 12345}),
    "200 bad content-encoding": bad_encoding,
}


@pytest.mark.parametrize("answer", INITIATE_RETRIED.values(), ids=INITIATE_RETRIED.keys())
async def test_initiate_is_retried_when_the_request_certainly_did_not_arrive(answer: Any) -> None:
    handler = Recorder(answer, initiated())
    async with client_for(handler) as client:
        assert await client.initiate("q") == JOB
        assert client.retries == 1
    assert handler.calls == 2


@pytest.mark.parametrize("answer", INITIATE_NOT_RETRIED.values(), ids=INITIATE_NOT_RETRIED.keys())
async def test_initiate_is_not_retried_when_the_request_may_have_arrived(answer: Any) -> None:
    handler = Recorder(answer, initiated())
    async with client_for(handler) as client:
        with pytest.raises(ApiUnavailable, match="not retried"):
            await client.initiate("q")
        assert client.retries == 0
    assert handler.calls == 1


async def test_initiate_waits_out_429s_for_initiate_wait_not_max_retries() -> None:
    # 429 at 0 s, 60 s and 120 s: a third 60 s wait would go past the 120 s initiate_wait.
    time = FakeTime()
    handler = Recorder(ok({"error": "Rate limit exceeded", "retry_after": 60}, 429), clock=time)
    async with client_for(handler, max_retries=0, initiate_wait=120, clock=time, sleep=time.sleep) as client:
        with pytest.raises(RateLimited, match="held off for another 60s") as caught:
            await client.initiate("q")
    assert handler.times == [1000.0, 1060.0, 1120.0]
    assert caught.value.retry_in == 60
    assert isinstance(caught.value, ApiUnavailable)  # callers that handle "API down" handle this


async def test_initiate_after_a_retried_503_does_not_retry_a_following_500() -> None:
    handler = Recorder(raw("busy", 503), ok({}, 500), initiated())
    async with client_for(handler) as client:
        with pytest.raises(ApiUnavailable):
            await client.initiate("q")
    assert handler.calls == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (ok({"detail": "Insufficient credits"}, 402), OutOfCredits),
        (ok({"detail": "limit must be an integer"}, 400), RequestRejected),
        (ok({"detail": "Invalid or missing API key"}, 401), ApiKeyRejected),
    ],
)
async def test_initiate_4xx(answer: httpx.Response, error: type[Exception]) -> None:
    handler = Recorder(answer)
    async with client_for(handler) as client:
        with pytest.raises(error):
            await client.initiate("q")
    assert handler.calls == 1


# ---- timeouts: every attempt has a deadline, even when the transport has none


def stalls(seconds: float) -> Callable[[httpx.Request], Awaitable[httpx.Response]]:
    async def handle(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(seconds)
        return ok(status_body())

    return handle


async def test_a_stalled_status_call_times_out_and_is_retried() -> None:
    handler = Recorder(stalls(5))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client_for(handler, timeout=0.05, max_retries=2) as client:
        with pytest.raises(ApiUnavailable, match="timed out"):
            await client.status(JOB)
    assert handler.calls == 3
    assert loop.time() - started < 1.0


async def test_a_slow_answer_within_the_timeout_is_fine() -> None:
    handler = Recorder(stalls(0.01))
    async with client_for(handler, timeout=1.0) as client:
        assert (await client.status(JOB)).result_count == 3


async def test_a_stalled_initiate_times_out_without_a_retry() -> None:
    handler = Recorder(stalls(5), initiated())
    async with client_for(handler, timeout=0.05) as client:
        with pytest.raises(ApiUnavailable, match="timed out"):
            await client.initiate("q")
    assert handler.calls == 1


@pytest.mark.parametrize("method", ["cancel", "credits"])
async def test_every_call_has_the_deadline(method: str) -> None:
    handler = Recorder(stalls(5))
    async with client_for(handler, timeout=0.03, max_retries=0) as client:
        call = getattr(client, method)
        with pytest.raises(ApiUnavailable, match="timed out"):
            await (call(JOB) if method == "cancel" else call())


# ---- backoff, jitter and Retry-After (waits recorded, not slept)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


async def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    sleeps = Sleeps()
    handler = Recorder(ok({}, 500))
    async with client_for(handler, max_retries=6, backoff_initial=1.0, backoff_max=8.0, sleep=sleeps) as client:
        with pytest.raises(ApiUnavailable):
            await client.status(JOB)
    caps = [1, 2, 4, 8, 8, 8]
    assert len(sleeps.delays) == len(caps)
    for delay, cap in zip(sleeps.delays, caps, strict=True):
        assert cap / 2 <= delay <= cap


async def test_backoff_has_jitter() -> None:
    sleeps = Sleeps()
    for _ in range(20):
        async with client_for(Recorder(ok({}, 500)), max_retries=1, backoff_initial=1.0, sleep=sleeps) as client:
            with pytest.raises(ApiUnavailable):
                await client.status(JOB)
    assert len(set(sleeps.delays)) > 1


@pytest.mark.parametrize(
    ("retry_after", "held"),
    [
        ("30", 30),
        ("2.5", 2.5),
        ("0", 1),  # a 429 holds off at least a second, whatever it says
        ("soon", 1),  # unparseable: the same
        ("-5", 1),
        ("nan", 1),
        ("100", 100),
    ],
)
async def test_retry_after_is_honoured(retry_after: str, held: float) -> None:
    time = FakeTime()
    handler = Recorder(ok({}, 429, headers={"Retry-After": retry_after}), ok(status_body()), clock=time)
    async with client_for(handler, clock=time, sleep=time.sleep) as client:
        await client.status(JOB)
    assert time.sleeps == [held]
    assert handler.times == [1000.0, 1000.0 + held]  # not a moment sooner


@pytest.mark.parametrize("retry_after", ["99999", "inf", "300"])
async def test_a_hold_off_longer_than_a_call_may_wait_fails_fast(retry_after: str) -> None:
    # Capped at 5 minutes (a broken header must not park the client for a day), which is
    # still longer than a status poll waits: it fails at once instead of sleeping.
    handler = Recorder(ok({}, 429, headers={"Retry-After": retry_after}), ok(status_body()))
    async with client_for(handler) as client:
        with pytest.raises(RateLimited, match="held off for another 300s") as caught:
            await client.status(JOB)
        assert client.held_off_for == 300
    assert caught.value.retry_in == 300
    assert handler.calls == 1


async def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 40, UTC), usegmt=True)
    time = FakeTime()
    handler = Recorder(ok({}, 429, headers={"Retry-After": when}), ok(status_body()))
    async with client_for(handler, clock=time, sleep=time.sleep) as client:
        await client.status(JOB)
    assert time.sleeps == [40.0]


async def test_retry_after_on_a_503_is_honoured_too() -> None:
    time = FakeTime()
    busy = httpx.Response(503, content=b"busy", headers={"Retry-After": "7"})
    handler = Recorder(busy, ok(status_body()))
    async with client_for(handler, clock=time, sleep=time.sleep) as client:
        await client.status(JOB)
    assert time.sleeps == [7.0]


async def test_retry_after_is_really_waited_for_with_the_default_sleep() -> None:
    """The real clock and asyncio.sleep: the second attempt comes a hold-off (1 s) later."""
    handler = Recorder(ok({}, 429, headers={"Retry-After": "0"}), initiated())
    async with CladoClient(BASE, KEY, transport=httpx.MockTransport(handler)) as client:
        assert await client.initiate("q") == JOB
    first, second = handler.times
    assert second - first >= 1.0


# ---- cancel


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ok({"success": True, "message": "Deep research job cancelled successfully"}),
         CancelResult(True, "Deep research job cancelled successfully")),
        (ok({}), CancelResult(True, "")),
        (ok({}, 202), CancelResult(True, "")),
        (ok({"success": True, "message": "accepted"}, 202), CancelResult(True, "accepted")),
        (httpx.Response(204), CancelResult(True, "")),
        (raw(b"", 200), CancelResult(True, "")),
        (ok({"success": False, "message": "Cannot cancel job: already completed"}),
         CancelResult(False, "Cannot cancel job: already completed")),
        (ok({"success": False, "message": "Cannot cancel job: already completed"}, 409),
         CancelResult(False, "Cannot cancel job: already completed")),
        (ok({"detail": "Conflict"}, 409), CancelResult(False, "")),
        (ok({"success": False, "message": "Only pending jobs can be cancelled"}, 202),
         CancelResult(False, "Only pending jobs can be cancelled")),
    ],
)  # fmt: skip
async def test_cancel_answers(answer: httpx.Response, expected: CancelResult) -> None:
    handler = Recorder(answer)
    async with client_for(handler) as client:
        assert await client.cancel(JOB) == expected
    assert handler.calls == 1


async def test_cancel_404_is_job_not_found() -> None:
    handler = Recorder(ok({"detail": "Job not found"}, 404))
    async with client_for(handler) as client:
        with pytest.raises(JobNotFound):
            await client.cancel(JOB)
    assert handler.calls == 1


async def test_cancel_500_is_retried() -> None:
    handler = Recorder(ok({"detail": "Error cancelling job"}, 500), ok({"success": True}))
    async with client_for(handler) as client:
        assert (await client.cancel(JOB)).accepted
    assert handler.calls == 2


async def test_cancel_409_with_garbage_body_is_retried() -> None:
    handler = Recorder(raw("<html>conflict</html>", 409, "text/html"), ok({"success": False}, 409))
    async with client_for(handler) as client:
        assert not (await client.cancel(JOB)).accepted
    assert handler.calls == 2


# ---- 401: logged once, then fail fast under a growing backoff


def rejected() -> httpx.Response:
    return ok({"detail": "Invalid or missing API key"}, 401)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_401_logs_once_then_fails_fast_under_a_growing_backoff() -> None:
    clock = Clock()
    handler = Recorder(rejected())
    async with client_for(handler, clock=clock) as client:
        with capture_logs() as logs:
            with pytest.raises(ApiKeyRejected, match="HTTP 401"):
                await client.status(JOB)
            assert client.api_key_rejected
            calls = handler.calls
            for backoff in (30, 60, 120, 240, 480, 600, 600, 600):
                # Inside the backoff: every call fails fast, without a request.
                for call in (client.status(JOB), client.cancel(JOB), client.credits(), client.initiate("q")):
                    with pytest.raises(ApiKeyRejected, match="backing off"):
                        await call
                clock.now += backoff - 0.5
                assert client.api_key_rejected
                with pytest.raises(ApiKeyRejected, match="backing off"):
                    await client.credits()
                assert handler.calls == calls
                clock.now += 0.5
                assert not client.api_key_rejected
                # After it: one request goes out, is rejected again, and the backoff grows.
                with pytest.raises(ApiKeyRejected, match="HTTP 401"):
                    await client.status(JOB)
                calls += 1
                assert handler.calls == calls
        assert client.retries == 0
    rejections = events(logs, "API key rejected")
    assert len(rejections) == 1
    assert rejections[0]["log_level"] == "error"
    assert not events(logs, "API key accepted again")


async def test_a_success_after_the_backoff_logs_once_and_resets() -> None:
    clock = Clock()
    handler = Recorder(rejected(), rejected(), ok(status_body()))
    async with client_for(handler, clock=clock) as client:
        with capture_logs() as logs:
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)
            clock.now += 30
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)  # backoff now 60
            clock.now += 60
            await client.status(JOB)
            await client.status(JOB)
            assert not client.api_key_rejected
            # Reset: the next rejection starts from 30 s again, and is logged again.
            handler.answers.append(rejected())
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)
            clock.now += 30
            assert not client.api_key_rejected
    assert [e["event"] for e in logs if "API key" in e["event"]] == [
        "API key rejected",
        "API key accepted again",
        "API key rejected",
    ]
    assert events(logs, "API key accepted again")[0]["log_level"] == "info"


async def test_concurrent_401s_do_not_multiply_the_backoff() -> None:
    clock = Clock()
    gate = asyncio.Event()

    async def slow_401(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        clock.now += 0.5  # the 401s come back one after another, not at the same instant
        return rejected()

    handler = Recorder(slow_401)
    async with client_for(handler, clock=clock, max_concurrency=50) as client:
        with capture_logs() as logs:
            start = clock.now
            calls = [asyncio.create_task(client.status(JOB)) for _ in range(40)]
            while handler.calls < 40:  # noqa: ASYNC110 - yield to the 40 tasks until each has sent
                await asyncio.sleep(0)
            gate.set()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, ApiKeyRejected) for o in outcomes)
            # One 30 s backoff from the first 401, not 30 * 2**39.
            first_401 = start + 0.5
            clock.now = first_401 + 29.9
            assert client.api_key_rejected
            clock.now = first_401 + 30
            assert not client.api_key_rejected
            # The next round is 60 s, even though 40 401s came in before.
            handler.answers = [rejected()]
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)
            clock.now += 59.9
            assert client.api_key_rejected
            clock.now += 0.1
            assert not client.api_key_rejected
    assert len(events(logs, "API key rejected")) == 1


async def test_a_success_that_was_in_flight_before_the_401_does_not_end_the_backoff() -> None:
    clock = Clock()
    release = asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/credits":
            await release.wait()
            return ok({"credits": 5})
        return rejected()

    async with client_for(Recorder(handle), clock=clock) as client:
        with capture_logs() as logs:
            slow = asyncio.create_task(client.credits())
            await asyncio.sleep(0.01)
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)
            release.set()
            assert await slow == 5
            assert client.api_key_rejected
    assert not events(logs, "API key accepted again")


async def test_calls_waiting_for_a_slot_do_not_send_after_a_401() -> None:
    clock = Clock()
    gate = asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return rejected()

    handler = Recorder(handle)
    async with client_for(handler, clock=clock, max_concurrency=1) as client:
        calls = [asyncio.create_task(client.status(JOB)) for _ in range(5)]
        await asyncio.sleep(0.01)
        gate.set()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ApiKeyRejected) for o in outcomes)
    assert handler.calls == 1


async def test_a_401_during_retries_stops_them() -> None:
    handler = Recorder(ok({}, 503), rejected(), ok(status_body()))
    async with client_for(handler, clock=Clock()) as client:
        with pytest.raises(ApiKeyRejected):
            await client.status(JOB)
    assert handler.calls == 2


@pytest.mark.parametrize("code", [429, 500, 503])
async def test_throttling_or_errors_after_the_backoff_do_not_count_as_accepted(code: int) -> None:
    clock = Clock()
    handler = Recorder(rejected(), ok({}, code), rejected())
    async with client_for(handler, clock=clock, max_retries=0) as client:
        with capture_logs() as logs:
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)
            clock.now += 30
            with pytest.raises(ApiUnavailable):
                await client.status(JOB)
            with pytest.raises(ApiKeyRejected):
                await client.status(JOB)
            # Still the same rejection: the backoff grew to 60 s, nothing was "accepted".
            clock.now += 59.9
            assert client.api_key_rejected
    assert not events(logs, "API key accepted again")
    assert len(events(logs, "API key rejected")) == 1


@pytest.mark.parametrize("code", [404, 409])
async def test_a_404_or_409_after_the_backoff_proves_the_key(code: int) -> None:
    clock = Clock()
    handler = Recorder(rejected(), ok({"success": False}, code))
    async with client_for(handler, clock=clock) as client:
        with capture_logs() as logs:
            with pytest.raises(ApiKeyRejected):
                await client.cancel(JOB)
            clock.now += 30
            with contextlib.suppress(JobNotFound):
                await client.cancel(JOB)
    assert len(events(logs, "API key accepted again")) == 1


# ---- the key never leaks


def chain(exc: BaseException | None) -> list[BaseException]:
    """The exception and everything linked to it (cause and context), as a tool may walk it."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


async def test_the_key_never_appears_in_repr_messages_or_logs() -> None:
    echo = f"invalid token Bearer {KEY}"
    answers = [
        ok({"detail": echo}, 400),
        ok({"detail": echo}, 403),
        raw(f"<html>{echo}</html>", 418, "text/html"),
        ok({"detail": echo}, 404),
        ok({"detail": echo}, 402),
        ok({"detail": echo}, 500),
        raw(f"<html>{echo}</html>", 502, "text/html"),
        lambda r: httpx.ConnectError(f"cannot connect with {r.headers['authorization']}", request=r),
        lambda r: httpx.ReadTimeout(f"timeout {r.headers['authorization']}", request=r),
        lambda r: httpx.RemoteProtocolError(f"dropped {r.headers['authorization']}", request=r),
        raw(f"<html>{echo}</html>", 200, "text/html"),
        ok({"detail": echo}, 401),
    ]
    messages: list[str] = []
    clock = Clock()
    with capture_logs() as logs:
        for answer in answers:
            async with client_for(Recorder(answer), clock=clock, max_retries=1) as client:
                messages.append(repr(client))
                messages.append(str(client))
                for call in (client.status(JOB), client.cancel(JOB), client.credits(), client.initiate("q")):
                    try:
                        await call
                    except CladoError as exc:
                        for linked in chain(exc):
                            messages.extend([str(linked), repr(linked), repr(linked.args)])
                            messages.append(repr(vars(linked)))  # e.g. a JSONDecodeError's doc
    assert any("[REDACTED]" in m for m in messages)
    for text in messages + [repr(entry) for entry in logs]:
        assert KEY not in text
        assert KEY[3:] not in text
    assert repr(CladoClient(BASE, KEY)) == f"CladoClient(base_url={BASE!r})"


async def test_key_is_redacted_before_truncation() -> None:
    # An echo that straddles the 200-character cut must not leave a prefix of the key.
    body = "x" * 190 + KEY
    async with client_for(Recorder(raw(body, 400, "text/plain"))) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.credits()
    assert KEY[:10] not in str(caught.value)


# ---- bounded concurrency


@pytest.mark.parametrize("limit", [1, 3, 8])
async def test_never_more_than_max_concurrency_requests_in_flight(limit: int) -> None:
    in_flight = 0
    peak = 0
    seen = 0

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak, seen
        in_flight += 1
        seen += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.002)
            if request.url.params.get("page") and seen <= 10:
                return ok({}, 503)  # retries must respect the bound too
            return ok(status_body(credits=5))
        finally:
            in_flight -= 1

    async with client_for(Recorder(handle), max_concurrency=limit, max_retries=10) as client:
        results = await asyncio.gather(*(client.status(JOB) for _ in range(30)), client.credits())
    assert len(results) == 31
    assert peak == limit


# ---- construction


@pytest.mark.parametrize(
    "kwargs",
    [{"max_concurrency": 0}, {"max_retries": -1}, {"timeout": 0}, {"timeout": -1.0}, {"timeout": float("inf")}],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):  # any of the settings' own messages
        CladoClient(BASE, KEY, **kwargs)


async def test_aclose_closes_the_http_client() -> None:
    client = client_for(Recorder(ok(status_body())))
    async with client:
        await client.status(JOB)
    with pytest.raises(RuntimeError):
        await client.status(JOB)


@pytest.mark.parametrize("job_id", LEADING_PUNCTUATION)
def test_ids_must_start_with_a_letter_or_digit(job_id: str) -> None:
    with pytest.raises(InvalidJobId, match="starting with a letter or digit"):
        validate_job_id(job_id)
