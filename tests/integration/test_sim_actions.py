"""The simulator's cancel variants, continue / more, rate limits and credits, over real loopback
HTTP with a hand-moved clock (no sleeps)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakeserver import FakeServer, ManualClock
from supervisor.sim.server import FakeClado

KEY = "lk_test"
JOBS = "/api/search/deep_research"
PAGE1 = {"page": 1, "page_size": 1}
ACCEPTED = {"success": True, "message": "Deep research job cancelled successfully"}
ONLY_PENDING = {"success": False, "message": "Cannot cancel job: only pending jobs can be cancelled"}
RATE_LIMITED = {"error": "Rate limit exceeded", "retry_after": 60}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fake(clock: ManualClock) -> FakeClado:
    return FakeClado(clock=clock, seed=5, account_credits=10_000)


@pytest.fixture
def server(fake: FakeClado) -> Iterator[FakeServer]:
    with FakeServer(fake) as srv:
        yield srv


def _client(server: FakeServer, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=5)


@pytest.fixture
def client(server: FakeServer) -> Iterator[httpx.Client]:
    with _client(server) as http:
        yield http


def poll(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"{JOBS}/{job_id}", params=PAGE1)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def state(client: httpx.Client, job_id: str) -> tuple[str, int]:
    body = poll(client, job_id)
    return body["status"], body["total_results"]


def cancel(client: httpx.Client, job_id: str) -> httpx.Response:
    return client.post(f"{JOBS}/{job_id}/cancel")


def continue_(client: httpx.Client, job_id: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return client.post(f"{JOBS}/{job_id}/continue", json=body if body is not None else {})


def credits(client: httpx.Client) -> int:
    value: int = client.get("/api/credits").json()["credits"]
    return value


# ---- cancel variants


def test_a_202_cancel_still_cancels(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1, accept_status=202)
    clock.advance(3)
    response = cancel(client, job_id)
    assert (response.status_code, response.json()) == (202, ACCEPTED)
    assert state(client, job_id) == ("cancelled", 3)


def test_a_cancel_accepted_and_ignored(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=10, rate=1, cancel_ignored=True)
    clock.advance(3)
    for _ in range(2):
        response = cancel(client, job_id)
        assert (response.status_code, response.json()) == (200, ACCEPTED)
    clock.advance(3)
    assert state(client, job_id) == ("searching", 6)  # still running, still billing
    clock.advance(10)
    assert state(client, job_id) == ("completed", 10)
    assert credits(client) == 10_000 - 10
    info = fake.job_info(job_id)
    assert (info["cancel_calls"], info["cancel_requested_at"]) == (2, info["created_at_ts"] + 3)


@pytest.mark.parametrize("refuse_status", [200, 409])
def test_only_pending_jobs_can_be_cancelled(
    client: httpx.Client, fake: FakeClado, clock: ManualClock, refuse_status: int
) -> None:
    queued = fake.create_job(queue_for=10, cancel_only_pending=True, refuse_status=refuse_status)
    running = fake.create_job(limit=30, rate=1, cancel_only_pending=True, refuse_status=refuse_status)
    clock.advance(2)
    assert (cancel(client, queued).status_code, state(client, queued)) == (200, ("cancelled", 0))
    refused = cancel(client, running)
    assert (refused.status_code, refused.json()) == (refuse_status, ONLY_PENDING)
    clock.advance(3)
    assert state(client, running) == ("searching", 5)


# ---- continue and more


def test_continue_reopens_the_same_job_and_bills_what_it_adds(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=10, rate=2, queue_for=1)
    clock.advance(6)  # 1 s queued + 5 s at 2/s
    assert state(client, job_id) == ("completed", 10)
    first_ten = client.get(f"{JOBS}/{job_id}").json()["results"]
    response = continue_(client, job_id, {"additionalLimit": 4})
    assert response.status_code == 200
    assert response.json()["job_id"] == job_id
    assert response.json()["status"] == "pending"
    assert state(client, job_id) == ("pending", 10)
    clock.advance(1)
    assert state(client, job_id) == ("searching", 10)
    clock.advance(1)
    assert state(client, job_id) == ("searching", 12)  # appending at its rate, 2/s
    assert credits(client) == 10_000 - 12  # each appended result costs 1 credit
    clock.advance(100)
    body = client.get(f"{JOBS}/{job_id}").json()
    assert (body["status"], body["total_results"], body["final_results_count"]) == ("completed", 14, 14)
    assert body["results"][:10] == first_ten  # appended, never replaced
    info = fake.job_info(job_id)
    assert (info["rounds"], info["limit"], info["continue_calls"]) == (2, 14, 1)
    assert fake.stats()["credits_charged"] == 14


def test_continue_needs_a_completed_job(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    running = fake.create_job(limit=30, rate=1)
    failed = fake.create_job(limit=30, rate=1, fail_after=1)
    clock.advance(2)
    for job_id in (running, failed):
        response = continue_(client, job_id)
        assert response.status_code == 409
        assert "completed" in response.json()["detail"]
    assert state(client, running) == ("searching", 2)
    assert continue_(client, "no-such-job").status_code == 404


def test_continue_defaults_to_30_and_more_reads_its_own_field(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    plain, misspelt, more = (fake.create_job(limit=1, rate=100) for _ in range(3))
    clock.advance(1)
    assert continue_(client, plain).status_code == 200
    # /continue's field is camelCase: a snake_case one is ignored, and the default applies.
    assert continue_(client, misspelt, {"additional_limit": 5}).status_code == 200
    assert client.post(f"{JOBS}/{more}/more", json={"additional_limit": 5}).status_code == 200
    clock.advance(10)
    assert [fake.job_info(job_id)["results"] for job_id in (plain, misspelt, more)] == [31, 31, 6]
    assert fake.stats()["more"] == 1


@pytest.mark.parametrize("value", [0, 1001, "5", True, None])
def test_continue_rejects_a_bad_count(client: httpx.Client, fake: FakeClado, clock: ManualClock, value: Any) -> None:
    job_id = fake.create_job(limit=1, rate=100)
    clock.advance(1)
    response = continue_(client, job_id, {"additionalLimit": value})
    assert response.status_code == 400
    assert "additionalLimit" in response.json()["detail"]
    assert client.post(f"{JOBS}/{job_id}/more", content=b"[1]").status_code == 400


def test_continue_stops_at_what_the_search_can_find(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    small = fake.create_job(limit=10, rate=100, max_results=12)
    full = fake.create_job(limit=1000, rate=1000)  # the docs' ~1,000 results per job
    clock.advance(2)
    assert continue_(client, small, {"additionalLimit": 30}).status_code == 200
    clock.advance(2)
    assert state(client, small) == ("completed", 12)
    for job_id in (small, full):
        response = continue_(client, job_id)
        assert (response.status_code, response.json()) == (409, {"detail": "No more results can be found for this job"})


def test_a_search_that_finds_less_than_its_limit_completes_early(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=30, rate=1, max_results=5)
    clock.advance(5)
    assert state(client, job_id) == ("completed", 5)


def test_continue_needs_credit(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=5, rate=5)
    clock.advance(1)
    fake.set_account_credits(0)
    assert continue_(client, job_id).json() == {"detail": "Insufficient credits"}
    assert continue_(client, job_id).status_code == 402
    fake.set_account_credits(1)
    assert continue_(client, job_id).status_code == 200


def test_a_continued_job_charges_against_the_initiate_credit_check(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=10, rate=10)
    clock.advance(1)
    fake.set_account_credits(5)  # counted while the job sat completed
    assert continue_(client, job_id, {"additionalLimit": 100}).status_code == 200
    clock.advance(1)  # 10 more charged: 5 over
    assert client.post(JOBS, json={"query": "q"}).status_code == 402
    assert credits(client) == -5


def test_a_continued_job_can_be_cancelled_and_keeps_its_partial_results(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=5, rate=1, cancel_delay=10)
    clock.advance(4)
    assert cancel(client, job_id).status_code == 200  # lands after the job completes: moot
    clock.advance(1)
    assert continue_(client, job_id, {"additionalLimit": 100}).status_code == 200
    clock.advance(12)  # the stale cancel's moment (t=14) passed: the new round went on
    assert state(client, job_id) == ("searching", 17)
    assert cancel(client, job_id).status_code == 200
    clock.advance(20)  # it landed at t=27
    assert state(client, job_id) == ("cancelled", 27)
    assert credits(client) == 10_000 - 27


def test_continue_is_limited_to_5_a_minute_per_key(
    server: FakeServer, client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=5, rate=5)
    clock.advance(1)
    codes = [continue_(client, job_id).status_code for _ in range(3)]
    codes += [client.post(f"{JOBS}/{job_id}/more", json={}).status_code for _ in range(2)]
    assert codes == [200, 409, 409, 409, 409]  # refused requests count too
    throttled = continue_(client, job_id)
    assert (throttled.status_code, throttled.json()) == (429, RATE_LIMITED)
    assert "Retry-After" not in throttled.headers
    with _client(server, "lk_other") as other:
        assert continue_(other, job_id).status_code == 409  # its own minute
    clock.advance(59)
    assert continue_(client, job_id).json()["retry_after"] == 1
    clock.advance(1)  # the minute of the first five has passed (and the job completed again)
    assert continue_(client, job_id).status_code == 200
    assert fake.stats()["rate_limited"] == 2


# ---- initiate rate limits


def test_initiate_is_unlimited_by_default(client: httpx.Client) -> None:
    assert {client.post(JOBS, json={"query": "q"}).status_code for _ in range(20)} == {200}


@pytest.mark.parametrize(("tier", "per_minute"), [("free", 5), ("paid", 5), ("paid_50", 50), ("paid_250", 100)])
def test_initiate_limits_by_tier(
    server: FakeServer, client: httpx.Client, fake: FakeClado, clock: ManualClock, tier: str, per_minute: int
) -> None:
    assert fake.set_limits(tier=tier)["initiate_per_minute"] == per_minute
    codes = [client.post(JOBS, json={"query": "q"}).status_code for _ in range(per_minute + 1)]
    assert codes == [200] * per_minute + [429]
    assert fake.stats()["jobs"] == per_minute
    with _client(server, "lk_other") as other:
        assert other.post(JOBS, json={"query": "q"}).status_code == 200
    clock.advance(60)
    assert client.post(JOBS, json={"query": "q"}).status_code == 200


def test_limits_through_the_control_endpoint(server: FakeServer, client: httpx.Client) -> None:
    with httpx.Client(base_url=server.base_url) as control:
        limits = control.post("/_fake/limits", json={"initiate_per_minute": 1, "retry_after_header": True})
        assert limits.json() == {"initiate_per_minute": 1, "continue_per_minute": 5, "retry_after_header": True}
        assert control.post("/_fake/limits", json={"tier": "gold"}).status_code == 400
        assert control.post("/_fake/limits", json={"per_hour": 3}).status_code == 400
    assert client.post(JOBS, json={"query": "q"}).status_code == 200
    throttled = client.post(JOBS, json={"query": "q"})
    assert (throttled.status_code, throttled.json(), throttled.headers["Retry-After"]) == (429, RATE_LIMITED, "60")


# ---- credits


def test_credits_report_the_last_top_up(server: FakeServer, client: httpx.Client, clock: ManualClock) -> None:
    assert client.get("/api/credits").json() == {"credits": 10_000, "last_topup_at": None}
    clock.advance(0.5)
    with httpx.Client(base_url=server.base_url) as control:
        topped = control.post("/_fake/account", json={"top_up": 500}).json()
        assert topped == {"credits": 10_500, "last_topup_at": "2023-11-14T22:13:20.500Z"}
        assert control.post("/_fake/account", json={"credits": 1, "top_up": 1}).status_code == 400
    assert client.get("/api/credits").json() == topped
