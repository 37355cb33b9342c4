"""The fake Clado API over real loopback HTTP, with a hand-moved clock (no sleeps)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakeserver import FakeServer, ManualClock, free_port
from supervisor.sim.server import FakeClado

KEY = "lk_test"
INITIATE = "/api/search/deep_research"
PAGE1 = {"page": 1, "page_size": 1}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fake(clock: ManualClock) -> FakeClado:
    return FakeClado(clock=clock, seed=7, account_credits=10_000)


@pytest.fixture
def server(fake: FakeClado) -> Iterator[FakeServer]:
    with FakeServer(fake) as srv:
        yield srv


@pytest.fixture
def client(server: FakeServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=5) as http:
        yield http


@pytest.fixture
def control(server: FakeServer) -> Iterator[httpx.Client]:
    """No credentials: the /_fake endpoints need none."""
    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        yield http


def status(client: httpx.Client, job_id: str, **params: Any) -> httpx.Response:
    return client.get(f"{INITIATE}/{job_id}", params=params)


def poll(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The cheap, paged status call, as the supervisor makes it."""
    response = status(client, job_id, **PAGE1)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cancel(client: httpx.Client, job_id: str) -> httpx.Response:
    return client.post(f"{INITIATE}/{job_id}/cancel")


# ---- auth and initiate


def test_requests_without_a_valid_key_get_401(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    with httpx.Client(base_url=server.base_url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer sk_wrong"}, {"Authorization": KEY}):
            for response in (
                anonymous.post(INITIATE, json={"query": "q"}, headers=headers),
                anonymous.get(f"{INITIATE}/{job_id}", headers=headers),
                anonymous.post(f"{INITIATE}/{job_id}/cancel", headers=headers),
                anonymous.get("/api/credits", headers=headers),
            ):
                assert response.status_code == 401
                assert response.json()["detail"]
    assert fake.job_info(job_id)["cancel_calls"] == 0


def test_an_explicit_key_set_replaces_the_lk_prefix_rule(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_valid_keys({"lk_other"})
    assert client.get("/api/credits").status_code == 401
    other = {"Authorization": "Bearer lk_other"}
    assert client.get("/api/credits", headers=other).status_code == 200
    fake.set_valid_keys(None)
    assert client.get("/api/credits").status_code == 200


def test_initiate_answers_pending_with_a_uuid(client: httpx.Client, fake: FakeClado) -> None:
    response = client.post(INITIATE, json={"query": "engineers in SF", "limit": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "pending"
    assert body["message"] == "Deep research job initiated"
    info = fake.job_info(body["job_id"])
    assert (info["query"], info["limit"]) == ("engineers in SF", 5)
    assert fake.job_info(client.post(INITIATE, json={"query": "q"}).json()["job_id"])["limit"] == 30


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "query"),
        ({"query": "  "}, "query"),
        ({"query": 3}, "query"),
        ({"query": "q", "limit": 0}, "limit"),
        ({"query": "q", "limit": 1001}, "limit"),
        ({"query": "q", "limit": "5"}, "limit"),
        ({"query": "q", "hard_filter_company_urls": "acme"}, "hard_filter_company_urls"),
        ({"query": "q fake:bogus=1"}, "bogus"),
        ({"query": "q fake:rate"}, "fake:key=value"),
        ({"query": "q fake:rate=fast"}, "rate"),
    ],
)
def test_initiate_rejects_bad_input(client: httpx.Client, payload: dict[str, Any], fragment: str) -> None:
    response = client.post(INITIATE, json=payload)
    assert response.status_code == 400
    assert fragment in response.json()["detail"]


def test_initiate_rejects_a_body_that_is_not_json(client: httpx.Client) -> None:
    response = client.post(INITIATE, content=b"query=q", headers={"Content-Type": "text/plain"})
    assert response.status_code == 400


def test_initiate_needs_at_least_one_credit(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_account_credits(0)
    response = client.post(INITIATE, json={"query": "q"})
    assert response.status_code == 402
    assert response.json() == {"detail": "Insufficient credits"}
    fake.set_account_credits(1)
    assert client.post(INITIATE, json={"query": "q"}).status_code == 200


def test_the_credit_check_counts_what_running_jobs_already_charged(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    fake.set_account_credits(5)
    fake.create_job(limit=10, rate=1)
    assert client.post(INITIATE, json={"query": "q"}).status_code == 200
    clock.advance(5)  # the first job has charged all 5 credits
    assert client.post(INITIATE, json={"query": "q"}).status_code == 402


def test_the_credit_check_is_exact_at_the_edge(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    fake.set_account_credits(100)
    fake.create_job(limit=1000, rate=10)
    clock.advance(9.95)  # 99 charged
    assert client.post(INITIATE, json={"query": "q"}).status_code == 200
    clock.advance(0.1)  # 100 charged
    assert client.post(INITIATE, json={"query": "q"}).status_code == 402


# ---- progress


def test_status_goes_pending_searching_processing_completed(client: httpx.Client, clock: ManualClock) -> None:
    query = "engineers fake:queue_for=5,rate=2,process_for=3"
    job_id = client.post(INITIATE, json={"query": query, "limit": 10}).json()["job_id"]
    expected = [
        (0, "pending", 0),
        (4.9, "pending", 0),
        (0.1, "searching", 0),  # t=5
        (2.5, "searching", 5),  # t=7.5
        (2.5, "processing", 10),  # t=10: the limit is reached
        (2.9, "processing", 10),
        (0.1, "completed", 10),  # t=13
        (100, "completed", 10),
    ]
    for step, expected_status, expected_results in expected:
        clock.advance(step)
        body = poll(client, job_id)
        assert (body["status"], body["total_results"]) == (expected_status, expected_results)
        assert body["final_results_count"] == expected_results  # on every body, as the docs show it


def test_status_body_shape(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=10, rate=1)
    clock.advance(4)
    body = poll(client, job_id)
    assert set(body) == {
        "job_id", "status", "message", "total_results", "final_results_count", "results", "pagination", "created_at"
    }  # fmt: skip
    assert body["job_id"] == job_id
    assert body["created_at"] == 1_700_000_000  # integer epoch seconds, the docs' 1678886400 form
    assert set(body["results"][0]) == {"name", "title", "company", "linkedin_url"}
    assert body["pagination"] == {
        "page": 1, "page_size": 1, "total_results": 4, "total_pages": 4,
        "has_next": True, "has_prev": False,
    }  # fmt: skip


def test_paged_status_size_does_not_grow_with_results(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_ids = [fake.create_job(limit=limit, rate=1000) for limit in (10, 100, 1000)]
    clock.advance(2)
    sizes = [len(status(client, job_id, **PAGE1).content) for job_id in job_ids]
    assert max(sizes) - min(sizes) <= 10, sizes  # only the digits of the counts differ
    unpaged = status(client, job_ids[2])
    assert len(unpaged.content) > 50 * max(sizes)
    body = unpaged.json()
    assert body["total_results"] == len(body["results"]) == 1000
    assert "pagination" not in body
    assert len({person["linkedin_url"] for person in body["results"]}) == 1000
    assert status(client, job_ids[2]).json()["results"] == body["results"]  # deterministic


def test_pages_slice_the_results(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=10, rate=100)
    clock.advance(1)
    everything = status(client, job_id).json()["results"]
    page3 = status(client, job_id, page=3, page_size=4).json()
    assert page3["results"] == everything[8:10]
    assert page3["pagination"] == {
        "page": 3, "page_size": 4, "total_results": 10, "total_pages": 3,
        "has_next": False, "has_prev": True,
    }  # fmt: skip
    assert status(client, job_id, page=9, page_size=4).json()["results"] == []
    assert status(client, job_id, page=1).json()["pagination"]["page_size"] == 25


@pytest.mark.parametrize(
    "params",
    [{"page": 0}, {"page": "x"}, {"page": 1, "page_size": 0}, {"page": 1, "page_size": 101}],
)
def test_bad_page_parameters_get_400(client: httpx.Client, fake: FakeClado, params: dict[str, Any]) -> None:
    response = status(client, fake.create_job(), **params)
    assert response.status_code == 400
    assert response.json()["detail"]


def test_unknown_jobs_get_404(client: httpx.Client) -> None:
    assert status(client, "no-such-job", **PAGE1).json() == {"detail": "Job not found"}
    assert status(client, "no-such-job").status_code == 404
    assert cancel(client, "no-such-job").status_code == 404


def test_stall_keeps_searching_forever(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=2, stall_after=4)
    clock.advance(10_000)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"]) == ("searching", 4)


def test_fail_after_freezes_results_in_error(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=2, fail_after=3)
    clock.advance(2.9)
    assert poll(client, job_id)["status"] == "searching"
    clock.advance(100)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"], body["final_results_count"]) == ("error", 6, 6)
    refused = cancel(client, job_id)
    assert refused.status_code == 200
    assert refused.json() == {"success": False, "message": "Cannot cancel job: already failed"}


def test_external_cancel(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1, external_cancel_after=7)
    clock.advance(50)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"]) == ("cancelled", 7)


def test_interruptions_after_completion_change_nothing(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=5, rate=1, fail_after=6, external_cancel_after=7)
    clock.advance(60)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"]) == ("completed", 5)


def test_vanished_jobs_are_404_everywhere(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1, vanish_after=5)
    clock.advance(4)
    assert poll(client, job_id)["total_results"] == 4
    clock.advance(1)
    assert status(client, job_id, **PAGE1).status_code == 404
    assert status(client, job_id).status_code == 404
    assert cancel(client, job_id).status_code == 404
    info = fake.job_info(job_id)
    assert (info["vanished"], info["results"], info["cancel_calls"]) == (True, 5, 1)


@pytest.mark.parametrize(
    ("count_field", "top_level", "in_pagination"),
    [
        ("total_results", {"total_results", "final_results_count"}, True),
        ("final_results_count_only", {"final_results_count"}, False),
        ("pagination_only", set(), True),
        ("results_only", set(), False),
    ],
)
def test_count_field_shapes(
    client: httpx.Client,
    fake: FakeClado,
    clock: ManualClock,
    count_field: str,
    top_level: set[str],
    in_pagination: bool,
) -> None:
    job_id = fake.create_job(limit=30, rate=1, count_field=count_field)
    clock.advance(3)
    body = poll(client, job_id)
    assert {"total_results", "final_results_count"} & set(body) == top_level
    for name in top_level:
        assert body[name] == 3
    assert ("total_results" in body["pagination"]) == in_pagination
    assert body["pagination"].get("total_results", 3) == 3
    assert body["pagination"]["has_next"] is True
    assert len(status(client, job_id).json()["results"]) == 3


def test_created_at_can_be_hidden(client: httpx.Client, fake: FakeClado) -> None:
    assert "created_at" not in poll(client, fake.create_job(hide_created_at=True))


# ---- cancel


def test_cancel_stops_the_job_and_a_second_cancel_is_refused(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=30, rate=1)
    clock.advance(5)
    response = cancel(client, job_id)
    assert (response.status_code, response.json()["success"]) == (200, True)
    assert response.json()["message"] == "Deep research job cancelled successfully"
    clock.advance(60)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"], body["final_results_count"]) == (
        "cancelled", 5, 5
    )  # fmt: skip
    again = cancel(client, job_id)
    assert again.status_code == 200
    assert again.json() == {"success": False, "message": "Cannot cancel job: already cancelled"}
    info = fake.job_info(job_id)
    assert info["cancel_calls"] == 2
    assert info["cancel_call_times"] == [clock.now - 60, clock.now]


def test_cancelling_a_pending_job(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(queue_for=30)
    clock.advance(1)
    assert cancel(client, job_id).status_code == 200
    assert poll(client, job_id)["status"] == "cancelled"


@pytest.mark.parametrize("refuse_status", [200, 409])
def test_cancelling_a_completed_job_is_refused(
    client: httpx.Client, fake: FakeClado, clock: ManualClock, refuse_status: int
) -> None:
    """The docs show both: a 200 {success: false} body (the default) and a 409 (a knob)."""
    knobs = {} if refuse_status == 200 else {"refuse_status": refuse_status}
    job_id = fake.create_job(limit=3, rate=1, **knobs)
    clock.advance(3)
    response = cancel(client, job_id)
    assert response.status_code == refuse_status
    assert response.json() == {"success": False, "message": "Cannot cancel job: already completed"}


def test_a_cancel_that_loses_the_race(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1, race=True)
    clock.advance(8)
    response = cancel(client, job_id)
    assert response.status_code == 200
    assert response.json() == {"success": False, "message": "Cannot cancel job: already completed"}
    clock.advance(100)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"], body["final_results_count"]) == (
        "completed", 8, 8
    )  # fmt: skip


def test_cancel_delay_keeps_charging_until_it_lands(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=100, rate=2, cancel_delay=3)
    clock.advance(5)
    assert cancel(client, job_id).status_code == 200
    clock.advance(2)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"]) == ("searching", 14)
    assert cancel(client, job_id).status_code == 200  # still propagating: accepted again
    clock.advance(1)
    body = poll(client, job_id)
    assert (body["status"], body["total_results"]) == ("cancelled", 16)
    clock.advance(100)
    assert poll(client, job_id)["total_results"] == 16
    assert cancel(client, job_id).json()["success"] is False
    info = fake.job_info(job_id)
    assert info["cancel_calls"] == 3
    assert info["cancel_requested_at"] == info["created_at_ts"] + 5


def test_a_job_that_completes_while_its_cancel_propagates_ends_completed(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=10, rate=1, cancel_delay=5)
    clock.advance(8)
    assert cancel(client, job_id).status_code == 200
    clock.advance(10)
    assert poll(client, job_id)["status"] == "completed"


# ---- credits


def test_credits_follow_results_and_stop_after_cancel(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    assert client.get("/api/credits").json() == {"credits": 10_000, "last_topup_at": None}
    first = fake.create_job(limit=100, rate=1)
    second = fake.create_job(limit=100, rate=2)
    clock.advance(10)
    assert client.get("/api/credits").json()["credits"] == 10_000 - 10 - 20
    assert cancel(client, first).status_code == 200
    clock.advance(10)
    assert client.get("/api/credits").json()["credits"] == 10_000 - 10 - 40
    clock.advance(1000)  # the second job completes at its limit
    assert client.get("/api/credits").json()["credits"] == 10_000 - 10 - 100
    assert poll(client, second)["status"] == "completed"
    assert fake.stats()["credits_charged"] == 110


def test_set_account_credits_sets_the_balance_now(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    fake.create_job(limit=100, rate=1)
    clock.advance(10)
    fake.set_account_credits(500)
    assert client.get("/api/credits").json()["credits"] == 500
    clock.advance(5)
    assert client.get("/api/credits").json()["credits"] == 495


# ---- faults


def test_fail_next_answers_503_exactly_n_times(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(fail_next=2)
    codes = [client.get("/api/credits").status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    stats = fake.stats()
    assert (stats["credits"], stats["faults_injected"]) == (4, 2)


def test_a_faulted_request_is_not_handled(client: httpx.Client, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(fail_next=1)
    assert cancel(client, job_id).status_code == 503
    assert fake.job_info(job_id)["cancel_calls"] == 0
    assert cancel(client, job_id).status_code == 200


def test_error_rate(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(error_rate=1)
    codes = {client.get("/api/credits").status_code for _ in range(30)}
    assert codes <= {500, 502, 503}
    assert len(codes) > 1


def test_throttle_answers_the_documented_429(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(throttle_rate=1)
    response = client.post(INITIATE, json={"query": "q"})
    assert response.status_code == 429
    assert response.json() == {"error": "Rate limit exceeded", "retry_after": 60}
    assert "Retry-After" not in response.headers  # none documented
    assert fake.stats()["jobs"] == 0


def test_throttle_retry_after_and_its_optional_header(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(throttle_rate=1, retry_after=7)
    fake.set_limits(retry_after_header=True)
    response = client.get("/api/credits")
    assert (response.status_code, response.json()["retry_after"]) == (429, 7)
    assert response.headers["Retry-After"] == "7"


def test_garbage_is_a_200_that_does_not_parse(client: httpx.Client, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(garbage_rate=1)
    for _ in range(5):
        response = status(client, job_id, **PAGE1)
        assert response.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            response.json()


def test_drop_cuts_the_connection_after_handling(client: httpx.Client, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(drop_rate=1)
    with pytest.raises(httpx.RemoteProtocolError):
        cancel(client, job_id)
    fake.set_faults(drop_rate=0)
    # The cancel landed even though its answer was lost.
    assert poll(client, job_id)["status"] == "cancelled"


def test_slow_delays_the_answer(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(slow_rate=1, slow_seconds=0.2)
    started = time.monotonic()
    assert client.get("/api/credits").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_random_faults_hit_about_their_rate(client: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(error_rate=0.3, seed=1)
    errors = sum(client.get("/api/credits").status_code >= 500 for _ in range(200))
    assert 30 <= errors <= 90
    assert fake.stats()["faults_injected"] == errors


def test_faults_never_touch_control_endpoints(control: httpx.Client, fake: FakeClado) -> None:
    fake.set_faults(error_rate=1)
    assert control.get("/_fake/stats").status_code == 200
    assert control.post("/_fake/jobs", json={}).status_code == 200


@pytest.mark.parametrize(
    ("knobs", "fragment"),
    [
        ({"error_rate": 2}, "error_rate"),
        ({"error_rate": 0.6, "drop_rate": 0.6}, "must be <= 1"),
        ({"nope": 1}, "nope"),
        ({"fail_next": -1}, "fail_next"),
        ({"not_found": "maybe"}, "not_found"),
    ],
)
def test_bad_fault_knobs_are_rejected(fake: FakeClado, knobs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        fake.set_faults(**knobs)


# ---- control endpoints


def test_control_endpoints(control: httpx.Client, client: httpx.Client, clock: ManualClock) -> None:
    created = control.post("/_fake/jobs", json={"query": "q", "limit": 5, "rate": 5})
    job_id = created.json()["job_id"]
    clock.advance(1)
    assert poll(client, job_id)["status"] == "completed"
    info = control.get(f"/_fake/jobs/{job_id}").json()
    assert (info["status"], info["results"], info["status_calls"]) == ("completed", 5, 1)
    assert info["scenario"]["rate"] == 5
    assert control.get("/_fake/jobs/unknown").status_code == 404

    bulk = control.post("/_fake/jobs/bulk", json={"count": 5, "stall_after": 1}).json()
    assert len(set(bulk["job_ids"])) == 5
    assert control.post("/_fake/jobs/bulk", json={"count": 0}).status_code == 400

    unknown = control.post("/_fake/jobs", json={"sttall_after": 1})
    assert unknown.status_code == 400
    assert "sttall_after" in unknown.json()["detail"]

    assert control.post("/_fake/faults", json={"fail_next": 1}).json()["fail_next"] == 1
    assert client.get("/api/credits").status_code == 503
    assert control.post("/_fake/faults", json={"error_rate": 5}).status_code == 400

    assert control.post("/_fake/keys", json={"keys": ["lk_a"]}).status_code == 200
    assert client.get("/api/credits").status_code == 401
    assert control.post("/_fake/keys", json={"keys": None}).status_code == 200

    assert control.post("/_fake/account", json={"credits": 42}).json() == {"credits": 42, "last_topup_at": None}
    assert client.get("/api/credits").json() == {"credits": 42, "last_topup_at": None}

    stats = control.get("/_fake/stats").json()
    assert (stats["status"], stats["credits"], stats["jobs"]) == (1, 3, 6)
    assert stats["bytes_sent_status"] > 0

    assert control.post("/_fake/reset").status_code == 200
    stats = control.get("/_fake/stats").json()
    assert (stats["status"], stats["faults_injected"], stats["jobs"]) == (0, 0, 0)
    assert status(client, job_id).status_code == 404
    assert client.get("/api/credits").json() == {"credits": 10_000, "last_topup_at": None}


def test_scenario_from_query_token_and_kwargs(fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job("people fake:rate=5,race=true,count_field=results_only", rate=2)
    scenario = fake.job_info(job_id)["scenario"]
    assert scenario["rate"] == 2  # an explicit knob beats the token
    assert (scenario["race"], scenario["count_field"]) == (True, "results_only")
    with pytest.raises(ValueError, match="unknown scenario knob"):
        fake.create_job(bogus=1)
    with pytest.raises(ValueError, match="count_field"):
        fake.create_job(count_field="totals")


def test_a_seed_makes_job_ids_reproducible() -> None:
    assert FakeClado(seed=3).create_job() == FakeClado(seed=3).create_job()
    assert FakeClado().create_job() != FakeClado().create_job()


def test_unknown_routes_answer_json(control: httpx.Client) -> None:
    response = control.get("/api/nothing")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})


def test_free_port_and_server_lifecycle() -> None:
    assert 0 < free_port() < 65536
    fake = FakeClado()
    with FakeServer(fake) as srv:
        assert httpx.get(f"{srv.url}/_fake/stats").status_code == 200
        assert srv.fake is fake
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/_fake/stats")
