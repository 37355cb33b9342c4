"""The simulator's status bodies and server-wide knobs, over real loopback HTTP, clock moved by hand.

Each default is the public docs' shape; each knob is a variant a client is told to accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakeserver import FakeServer, ManualClock
from supervisor.sim.server import FakeClado

KEY = "lk_test"
JOBS = "/api/search/deep_research"
PAGE1 = {"page": 1, "page_size": 1}
START = 1_700_000_000.75  # a creation time with a fraction, to see what each shape keeps of it


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def fake(clock: ManualClock) -> FakeClado:
    return FakeClado(clock=clock, seed=11, account_credits=10_000)


@pytest.fixture
def server(fake: FakeClado) -> Iterator[FakeServer]:
    with FakeServer(fake) as srv:
        yield srv


@pytest.fixture
def client(server: FakeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as http:
        yield http


@pytest.fixture
def control(server: FakeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        yield http


def poll(client: httpx.Client, job_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(f"{JOBS}/{job_id}", params=params or PAGE1)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# ---- the default shape


def test_default_body_is_the_documented_one(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = client.post(JOBS, json={"query": "engineers", "limit": 10}).json()["job_id"]
    clock.advance(3)
    paged = poll(client, job_id)
    assert set(paged) == {
        "job_id", "status", "message", "results", "total_results", "final_results_count", "pagination", "created_at"
    }  # fmt: skip
    assert (paged["status"], paged["total_results"], paged["final_results_count"]) == ("searching", 3, 3)
    assert paged["created_at"] == 1_700_000_000  # integer epoch seconds, the fraction truncated
    unpaged = client.get(f"{JOBS}/{job_id}").json()
    assert "pagination" not in unpaged
    assert len(unpaged["results"]) == unpaged["total_results"] == 3


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"created_at": "epoch_s"}, 1_700_000_000),
        ({"created_at": "epoch_ms"}, 1_700_000_000_750),
        ({"created_at": "epoch_s_string"}, "1700000000"),
        ({"created_at": "iso"}, "2023-11-14T22:13:20.750Z"),
        ({"created_at_value": "yesterday"}, "yesterday"),
        ({"created_at_value": -1}, -1),
        ({"created_at_value": 1e300}, 1e300),
    ],
)
def test_created_at_shapes(client: httpx.Client, fake: FakeClado, knobs: dict[str, Any], expected: object) -> None:
    assert poll(client, fake.create_job(**knobs))["created_at"] == expected


@pytest.mark.parametrize("knobs", [{"created_at": "absent"}, {"hide_created_at": True}])
def test_created_at_can_be_absent(client: httpx.Client, fake: FakeClado, knobs: dict[str, Any]) -> None:
    assert "created_at" not in poll(client, fake.create_job(**knobs))


def test_knobs_ride_in_the_query_of_a_real_initiate(client: httpx.Client) -> None:
    query = "designers fake:created_at=iso,count_field=total"
    job_id = client.post(JOBS, json={"query": query}).json()["job_id"]
    body = poll(client, job_id)
    assert body["created_at"] == "2023-11-14T22:13:20.750Z"
    assert "total" in body
    assert "total_results" not in body


def test_count_as_total_only(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    """The older docs' single `total` field: nothing else carries the count."""
    job_id = fake.create_job(limit=30, rate=1, count_field="total")
    clock.advance(4)
    body = poll(client, job_id)
    assert body["total"] == 4
    assert not {"total_results", "final_results_count"} & set(body)
    assert "total_results" not in body["pagination"]


def test_count_as_digit_strings(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1, count_field="string")
    clock.advance(4)
    body = poll(client, job_id)
    assert (body["total_results"], body["final_results_count"], body["pagination"]["total_results"]) == ("4",) * 3
    assert len(body["results"]) == 1


def test_a_status_name_outside_the_docs_while_running(
    client: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=4, rate=1, queue_for=1, process_for=2, running_status="in_progress")
    seen = []
    for _ in range(8):
        seen.append(poll(client, job_id)["status"])
        clock.advance(1)
    # pending and the final status keep their documented names; searching and processing do not.
    assert seen == ["pending", "in_progress", "in_progress", "in_progress", "in_progress", "in_progress",
                    "in_progress", "completed"]  # fmt: skip
    assert poll(client, fake.create_job(running_status="RUNNING"))["status"] == "RUNNING"


def test_a_documented_status_name_is_no_running_status_knob(fake: FakeClado) -> None:
    with pytest.raises(ValueError, match="running_status"):
        fake.create_job(running_status="completed")


def test_status_becomes_forbidden_after_n_seconds(client: httpx.Client, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, forbidden_after=5)
    clock.advance(4.9)
    assert poll(client, job_id)["status"] == "searching"
    clock.advance(0.1)
    response = client.get(f"{JOBS}/{job_id}", params=PAGE1)
    assert (response.status_code, response.json()) == (403, {"detail": "not authorized to access this job"})
    assert client.get(f"{JOBS}/{job_id}").status_code == 403


def test_body_bloat_is_valid_json_of_the_asked_size(client: httpx.Client, fake: FakeClado) -> None:
    response = client.get(f"{JOBS}/{fake.create_job(bloat_mb=3)}", params=PAGE1)
    assert abs(len(response.content) - 3 * 2**20) < 64
    assert json.loads(response.content)["status"] == "searching"
    assert fake.stats()["bytes_sent_status"] == len(response.content)


# ---- server-wide knobs


def test_defaults_shape_every_new_job_and_tokens_override_them(
    client: httpx.Client, control: httpx.Client, fake: FakeClado
) -> None:
    assert control.post("/_fake/defaults", json={"created_at": "iso", "refuse_status": 409}).status_code == 200
    plain = client.post(JOBS, json={"query": "q"}).json()["job_id"]
    tokened = client.post(JOBS, json={"query": "q fake:created_at=epoch_ms"}).json()["job_id"]
    assert isinstance(poll(client, plain)["created_at"], str)
    assert poll(client, tokened)["created_at"] == 1_700_000_000_750
    assert fake.job_info(tokened)["scenario"]["refuse_status"] == 409
    assert fake.set_defaults(created_at=None) == {"refuse_status": 409}
    assert control.post("/_fake/defaults", json={"created_att": "iso"}).status_code == 400
    fake.reset()
    assert isinstance(poll(client, fake.create_job())["created_at"], int)


def test_every_request_404_as_behind_a_wrong_base_path(
    client: httpx.Client, control: httpx.Client, fake: FakeClado
) -> None:
    job_id = fake.create_job()
    # A wrong base_url path is a 404 on its own...
    assert client.get("/v1/api/credits").status_code == 404
    # ...and the knob makes the right paths look like one.
    fake.set_faults(not_found=True)
    for response in (
        client.get("/api/credits"),
        client.post(JOBS, json={"query": "q"}),
        client.get(f"{JOBS}/{job_id}", params=PAGE1),
        client.post(f"{JOBS}/{job_id}/cancel"),
        client.post(f"{JOBS}/{job_id}/continue", json={}),
    ):
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    assert fake.job_info(job_id)["cancel_calls"] == 0
    assert control.get("/_fake/stats").status_code == 200
    fake.set_faults(not_found=False)
    assert client.get("/api/credits").status_code == 200


# ---- the request log


def test_the_request_log_counts_per_endpoint_and_job_in_simulator_time(
    server: FakeServer, client: httpx.Client, control: httpx.Client, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = client.post(JOBS, json={"query": "q"}).json()["job_id"]
    other = fake.create_job()
    clock.advance(2)
    poll(client, job_id)
    poll(client, other)
    fake.set_faults(fail_next=1)
    assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 503
    clock.advance(1)
    assert client.post(f"{JOBS}/{job_id}/cancel").status_code == 200
    with httpx.Client(base_url=server.base_url) as anonymous:
        assert anonymous.get("/api/credits").status_code == 401

    assert fake.requests(job_id=job_id) == [
        {"at": START, "endpoint": "initiate", "job_id": job_id, "status": 200},
        {"at": START + 2, "endpoint": "status", "job_id": job_id, "status": 200},
        {"at": START + 2, "endpoint": "cancel", "job_id": job_id, "status": 503},
        {"at": START + 3, "endpoint": "cancel", "job_id": job_id, "status": 200},
    ]
    assert fake.request_count("cancel", job_id) == 2
    assert fake.request_count("status") == 2
    assert fake.requests("credits") == [{"at": START + 3, "endpoint": "credits", "job_id": None, "status": 401}]
    remote = control.get("/_fake/requests", params={"endpoint": "status", "job_id": other}).json()
    assert remote == {"requests": [{"at": START + 2, "endpoint": "status", "job_id": other, "status": 200}]}
    # The exact handled count stays on the job: the faulted cancel never reached it.
    assert fake.job_info(job_id)["cancel_calls"] == 1


def test_the_request_log_keeps_the_latest_calls() -> None:
    small = FakeClado(request_log_size=2)
    with FakeServer(small) as srv, httpx.Client(base_url=srv.base_url) as anonymous:
        for _ in range(3):
            anonymous.get("/api/credits")
    assert small.request_count("credits") == 2
    assert small.stats()["credits"] == 3  # the counters are exact
