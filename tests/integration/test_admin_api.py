"""The admin API over real loopback HTTP, in front of a daemon on the test's event loop.

The daemon polls the fake Clado API (also over loopback); requests go through httpx to
uvicorn on an ephemeral port, exactly as an operator's curl would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import config_text, eventually, load, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, utcnow
from supervisor.app.http import AdminApi, AdminServer
from supervisor.config import Config
from supervisor.core.states import State
from supervisor.service.runtime import Daemon

TOKEN = "adm-7c1d9e0f4b2a8e6d5c3b"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 1024

POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 200

[policies.tight]
max_credits = 3

[policies.growth]
match = { team = "growth" }
max_credits = 500
"""

V1_ROUTES = [
    ("GET", "/v1/jobs", None),
    ("POST", "/v1/jobs", {"job_ids": ["abc-1"]}),
    ("GET", "/v1/jobs/abc-1", None),
    ("POST", "/v1/jobs/abc-1/cancel", {}),
    ("POST", "/v1/submit", {"query": "engineers in Paris"}),
]


@dataclass
class Admin:
    daemon: Daemon
    http: httpx.AsyncClient  # no credentials: pass headers=AUTH where needed
    port: int

    async def v1(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        return await self.http.request(method, path, headers=headers, **kwargs)


def write_config(tmp_path: Path, base_url: str, db_url: str) -> Config:
    text = config_text(base_url, db_url, policies=POLICIES)
    # The [http] section of the shared test config; its body limit is lowered to the minimum.
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:0"\nmax_body_bytes = {MAX_BODY}')
    path = tmp_path / "supervisor.toml"
    path.write_text(text, encoding="utf-8")
    config = load(path)
    assert config.http.max_body_bytes == MAX_BODY
    return config


@asynccontextmanager
async def admin_api(config: Config, token: str | None) -> AsyncIterator[Admin]:
    """The daemon plus its admin API on an ephemeral loopback port, both stopped at the end
    (the API first, as `run_until_signalled` does)."""
    async with running_daemon(config) as daemon:
        server = AdminServer(AdminApi(daemon, token, config.http.max_body_bytes), config.http.listen)
        await server.start()
        assert server.port
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
                yield Admin(daemon, http, server.port)
        finally:
            await server.stop()


JSON = {"Content-Type": "application/json"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem details answer with this status and stable code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail", "code", "error"}, body
    assert (body["status"], body["code"], body["error"]) == (status, code, code), body
    assert body["type"] == f"urn:clado-supervisor:problem:{code}", body
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert "Traceback" not in response.text
    return dict(body)


async def listed_jobs(admin: Admin, **params: Any) -> list[dict[str, Any]]:
    """Every job `GET /v1/jobs` lists, following its cursor to the last page."""
    jobs: list[dict[str, Any]] = []
    query = dict(params)
    while True:
        response = await admin.v1("GET", "/v1/jobs", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        jobs += page["jobs"]
        if page["next_cursor"] is None:
            return jobs
        query["cursor"] = page["next_cursor"]


def metric_samples(text: str) -> dict[str, list[Any]]:
    """Family name → samples, through prometheus-client's own parser (which raises on bad text)."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


async def scrape(admin: Admin) -> tuple[str, dict[str, list[Any]]]:
    response = await admin.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text, metric_samples(response.text)


def total(families: dict[str, list[Any]], family: str, name: str, **labels: str) -> float:
    """The sum of a family's samples called `name` whose labels include `labels` (0 if none)."""
    return sum(
        float(sample.value)
        for sample in families.get(family, [])
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def sample_value(samples: list[Any], name: str, **labels: str) -> float | None:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return None


async def job_state(admin: Admin, job_id: str) -> str:
    response = await admin.v1("GET", f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


@pytest.fixture
def config(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> Config:
    return write_config(tmp_path, fake_server.base_url, sqlite_url)


# ---- without a token -------------------------------------------------------------------


async def test_without_a_token_v1_is_refused_and_the_public_pages_still_work(config: Config) -> None:
    async with admin_api(config, token=None) as admin:
        for method, path, body in V1_ROUTES:
            for headers in ({}, AUTH, {"Authorization": "Bearer"}):
                response = await admin.http.request(method, path, json=body, headers=headers)
                assert_error(response, 403, "admin_api_disabled")
        for path in ("/healthz", "/metrics", "/openapi.json"):
            assert (await admin.http.get(path)).status_code == 200, path
        await eventually(lambda: _status_is(admin, "/readyz", 200), what="/readyz ready after the first tick")
        # Nothing reached the store.
        assert await admin.daemon.store.list_jobs() == []


async def _status_is(admin: Admin, path: str, status: int) -> bool:
    return (await admin.http.get(path)).status_code == status


# ---- authentication --------------------------------------------------------------------


async def test_a_missing_or_wrong_token_gets_401_and_the_right_one_works(
    config: Config, fake_server: FakeServer
) -> None:
    wrong_headers = [
        {},
        {"Authorization": ""},
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN} {TOKEN}"},
        {"Authorization": "Bearer adm-wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN.upper()}"},
    ]
    async with admin_api(config, TOKEN) as admin:
        for method, path, body in V1_ROUTES:
            for headers in wrong_headers:
                response = await admin.http.request(method, path, json=body, headers=headers)
                body_json = assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == 'Bearer realm="clado-supervisor"'
                assert TOKEN not in response.text, body_json
        # None of the refused requests did anything.
        assert await admin.daemon.store.list_jobs() == []
        assert fake_server.fake.stats()["initiate"] == 0
        assert fake_server.fake.stats()["cancel"] == 0

        # The scheme is case-insensitive; the token itself is not.
        for scheme in ("Bearer", "bearer", "BEARER"):
            response = await admin.http.get("/v1/jobs", headers={"Authorization": f"{scheme} {TOKEN}"})
            assert response.status_code == 200, response.text
            assert response.json() == {"jobs": [], "next_cursor": None}

        # The token shows up nowhere: not in answers, not in metrics, not in the schema.
        responses = [
            await admin.v1("GET", "/v1/jobs"),
            await admin.v1("GET", "/v1/jobs/nope-1"),
            await admin.v1("POST", "/v1/jobs", json={"job_ids": ["bad id"]}),
            await admin.http.get("/metrics"),
            await admin.http.get("/openapi.json"),
            await admin.http.get("/healthz"),
            await admin.http.get("/readyz"),
            await admin.http.get("/no/such/route"),
        ]
        for response in responses:
            assert TOKEN not in response.text, response.request.url
            assert TOKEN not in str(response.headers)


# ---- tracking ---------------------------------------------------------------------------


async def test_track_is_idempotent_and_validates_everything_before_writing(
    config: Config, fake_server: FakeServer
) -> None:
    fake = fake_server.fake
    first, second = fake.create_job(rate=1, limit=100), fake.create_job(rate=1, limit=100)
    async with admin_api(config, TOKEN) as admin:
        response = await admin.v1(
            "POST", "/v1/jobs", json={"job_ids": [first, second], "labels": {"team": "growth", "env": "prod"}}
        )
        assert response.status_code == 201, response.text
        assert response.json() == {"added": [first, second], "already_tracked": []}
        assert response.headers["location"] == f"/v1/jobs/{first}"  # the first, for a batch
        assert (await admin.v1("GET", response.headers["location"])).json()["job_id"] == first

        response = await admin.v1("POST", "/v1/jobs", json={"job_ids": [first]})
        assert response.status_code == 200, response.text
        assert response.json() == {"added": [], "already_tracked": [first]}
        assert "location" not in response.headers  # nothing was created

        # A mix of new and known ids is a 201 naming both.
        third = fake.create_job(rate=1, limit=100)
        response = await admin.v1(
            "POST",
            "/v1/jobs",
            json={"job_ids": [second, third], "policy": "default", "max_runtime": "20m", "max_credits": 150},
        )
        assert response.status_code == 201, response.text
        assert response.json() == {"added": [third], "already_tracked": [second]}
        shown = (await admin.v1("GET", f"/v1/jobs/{third}")).json()
        assert shown["limits"]["max_runtime_s"] == 1200
        assert shown["limits"]["max_credits"] == 150
        # max_runtime in seconds works too
        fourth = fake.create_job(rate=1, limit=100)
        response = await admin.v1("POST", "/v1/jobs", json={"job_ids": [fourth], "max_runtime": 90})
        assert response.status_code == 201, response.text
        assert (await admin.v1("GET", f"/v1/jobs/{fourth}")).json()["limits"]["max_runtime_s"] == 90

        before = {job.job_id for job in await admin.daemon.store.list_jobs()}
        rejected = [
            # one bad id rejects the whole request: nothing is written
            ({"job_ids": ["fresh-ok-1", "bad id!"]}, "invalid_request", "invalid job id"),
            ({"job_ids": ["fresh-ok-2", "../../etc/passwd"]}, "invalid_request", "invalid job id"),
            ({"job_ids": ["x" * 129]}, "invalid_request", "invalid job id"),
            ({"job_ids": []}, "invalid_request", "job_ids"),
            ({}, "invalid_request", "job_ids"),
            ({"job_ids": ["fresh-ok-3"], "colour": "blue"}, "invalid_request", "colour: unknown field"),
            (
                {"job_ids": ["fresh-ok-4"], "labels": {"team": "a"}, "lables": {}},
                "invalid_request",
                "lables: unknown field",
            ),
            ({"job_ids": "fresh-ok-5"}, "invalid_request", "job_ids"),
            ({"job_ids": [5]}, "invalid_request", "job_ids"),
            ({"job_ids": ["fresh-ok-6"], "max_credits": "10"}, "invalid_request", "max_credits"),
            ({"job_ids": ["fresh-ok-7"], "max_credits": 0}, "invalid_request", "max_credits"),
            ({"job_ids": ["fresh-ok-8"], "max_credits": True}, "invalid_request", "max_credits"),
            # more than an INTEGER column holds (SQLite overflowed with a 500 before)
            ({"job_ids": ["fresh-ok-16"], "max_credits": 2**63}, "invalid_request", "max_credits"),
            ({"job_ids": ["fresh-ok-17"], "max_credits": 2**31}, "invalid_request", "max_credits"),
            ({"job_ids": ["fresh-ok-9"], "labels": {"team": 3}}, "invalid_request", "labels"),
            ({"job_ids": ["fresh-ok-10"], "labels": {"bad key!": "x"}}, "invalid_request", "label key"),
            ({"job_ids": ["fresh-ok-11"], "labels": ["team=growth"]}, "invalid_request", "labels"),
            ({"job_ids": ["fresh-ok-12"], "max_runtime": "soon"}, "invalid_request", "max_runtime"),
            ({"job_ids": ["fresh-ok-13"], "policy": "no-such-policy"}, "invalid_request", "unknown policy"),
            (["fresh-ok-14"], "invalid_request", "body"),
            ("fresh-ok-15", "invalid_request", "body"),
            (None, "invalid_request", "body"),
        ]
        for body, code, words in rejected:
            response = await admin.v1(
                "POST", "/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            error = assert_error(response, 422, code)
            assert words in error["detail"], (body, error)

        for content in (
            b"",
            b"{",
            b"{'job_ids': []}",
            b"\xff\xfe",
            b"job_ids=a",
            b"[1,",
            b"[" * 1000,  # nested deeper than the parser recurses (a RecursionError before)
            b'{"job_ids": ["fresh-ok-1"], "labels": {"k": "\\ud800"}}',  # a lone surrogate
        ):
            response = await admin.v1("POST", "/v1/jobs", content=content, headers={"Content-Type": "application/json"})
            assert_error(response, 400, "invalid_json")

        after = {job.job_id for job in await admin.daemon.store.list_jobs()}
        assert after == before
        for n in range(1, 18):
            assert_error(await admin.v1("GET", f"/v1/jobs/fresh-ok-{n}"), 404, "job_not_found")


async def test_bodies_over_the_limit_get_413_however_they_are_sent(config: Config) -> None:
    ids = [f"job-{n:04d}" for n in range(200)]
    big = json.dumps({"job_ids": ids}).encode()
    assert len(big) > MAX_BODY

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 256):
            yield big[start : start + 256]

    async with admin_api(config, TOKEN) as admin:
        # With a truthful Content-Length.
        response = await admin.v1("POST", "/v1/jobs", content=big, headers={"Content-Type": "application/json"})
        assert_error(response, 413, "payload_too_large")
        assert "1024" in response.json()["detail"]

        # Streamed (chunked, no Content-Length): the limit is enforced while reading.
        request = admin.http.build_request(
            "POST", "/v1/jobs", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        response = await admin.http.send(request)
        assert_error(response, 413, "payload_too_large")

        for path in ("/v1/submit", "/v1/jobs/job-0001/cancel"):
            response = await admin.v1("POST", path, content=big, headers={"Content-Type": "application/json"})
            assert_error(response, 413, "payload_too_large")

        # Nothing was written, and the server still serves a body right at the limit.
        assert await admin.daemon.store.list_jobs() == []
        fits = json.dumps({"job_ids": ["job-0001"], "labels": {"pad": "x" * 100}}).encode()
        fits += b" " * (MAX_BODY - len(fits))
        assert len(fits) == MAX_BODY
        response = await admin.v1("POST", "/v1/jobs", content=fits, headers={"Content-Type": "application/json"})
        assert response.status_code == 201, response.text


async def test_bodies_must_say_they_are_json(config: Config, fake_server: FakeServer) -> None:
    async with admin_api(config, TOKEN) as admin:
        body = json.dumps({"job_ids": ["typed-1"]}).encode()
        for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
            for path in ("/v1/jobs", "/v1/submit", "/v1/jobs/typed-1/cancel"):
                error = assert_error(
                    await admin.v1("POST", path, content=body, headers=headers), 415, "unsupported_media_type"
                )
                assert "application/json" in error["detail"]
        assert await admin.daemon.store.list_jobs() == []  # nothing was read as JSON
        assert fake_server.fake.stats()["initiate"] == 0
        # A JSON type with parameters, or a +json type, is JSON.
        for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
            response = await admin.v1("POST", "/v1/jobs", content=body, headers={"Content-Type": content_type})
            assert response.status_code in (200, 201), response.text
        # A cancel without a body needs no type (its reason is optional).
        response = await admin.v1("POST", "/v1/jobs/typed-1/cancel")
        assert response.status_code == 200, response.text


async def test_the_jobs_list_pages_by_cursor_without_skipping_or_repeating(config: Config) -> None:
    async with admin_api(config, TOKEN) as admin:
        first = [f"page-{n:02d}" for n in range(7)]
        assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": first, "labels": {"team": "a"}})).status_code == 201
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            response = await admin.v1("GET", "/v1/jobs", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert set(page) == {"jobs", "next_cursor"}
            assert len(page["jobs"]) <= 3
            seen += [job["job_id"] for job in page["jobs"]]
            pages += 1
            if pages == 1:
                # Jobs tracked while a client pages through are on a later page, not lost.
                assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": ["page-late"]})).status_code == 201
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [*first, "page-late"]  # oldest first, each once
        assert pages == 3
        # The default page holds them all; filters and the cursor combine.
        assert (await admin.v1("GET", "/v1/jobs")).json()["next_cursor"] is None
        by_label = await listed_jobs(admin, label="team=a", limit="2")
        assert [job["job_id"] for job in by_label] == first

        for params in (
            {"limit": "0"},
            {"limit": "1001"},
            {"limit": "x"},
            {"cursor": "not-a-cursor"},
            {"cursor": "W10"},
        ):  # "W10" is base64 of [], a JSON array that is no key
            error = assert_error(await admin.v1("GET", "/v1/jobs", params=params), 422, "invalid_request")
            assert next(iter(params)) in error["detail"]


async def test_list_filters_by_state_and_label_and_show_has_events(config: Config, fake_server: FakeServer) -> None:
    fake = fake_server.fake
    growth = fake.create_job(rate=1, limit=100)
    other = fake.create_job(rate=1, limit=100)
    done = fake.create_job(rate=50, limit=2)  # completes on its own within a poll or two
    async with admin_api(config, TOKEN) as admin:
        daemon = admin.daemon
        assert (
            await admin.v1("POST", "/v1/jobs", json={"job_ids": [growth], "labels": {"team": "growth"}})
        ).status_code == 201
        assert (
            await admin.v1("POST", "/v1/jobs", json={"job_ids": [other], "labels": {"team": "search"}})
        ).status_code == 201
        assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": [done]})).status_code == 201

        async def done_completed() -> bool:
            job = await daemon.store.get_job(done)
            return job is not None and job.state == State.COMPLETED.value

        await wait_until(daemon, done_completed, what="the short job completed")

        listed = await listed_jobs(admin)
        assert {job["job_id"] for job in listed} == {growth, other, done}
        for job in listed:
            for key in (
                "job_id",
                "state",
                "remote_status",
                "labels",
                "policy",
                "credits_used",
                "cancel_reason",
                "final_status",
                "submitted_at",
                "cancel_requested_at",
                "confirmed_at",
            ):
                assert key in job
            assert job["source"] == "track"

        by_growth = await listed_jobs(admin, label="team=growth")
        assert [job["job_id"] for job in by_growth] == [growth]
        assert by_growth[0]["policy"] == "growth"  # chosen by the policy's match
        assert by_growth[0]["labels"] == {"team": "growth"}
        none = (await admin.v1("GET", "/v1/jobs", params=[("label", "team=growth"), ("label", "env=prod")])).json()
        assert none == {"jobs": [], "next_cursor": None}

        watching = await listed_jobs(admin, state="watching")
        assert {job["job_id"] for job in watching} == {growth, other}
        completed = await listed_jobs(admin, state="completed")
        assert [job["job_id"] for job in completed] == [done]
        assert completed[0]["final_status"] == "completed"
        assert completed[0]["credits_used"] == 2
        both = await listed_jobs(admin, state="watching", label="team=search")
        assert [job["job_id"] for job in both] == [other]

        assert_error(await admin.v1("GET", "/v1/jobs", params={"state": "running"}), 422, "invalid_request")
        assert_error(await admin.v1("GET", "/v1/jobs", params={"label": "team"}), 422, "invalid_request")

        shown = (await admin.v1("GET", f"/v1/jobs/{done}")).json()
        assert shown["state"] == "completed"
        kinds = [(event["kind"], event["from_state"], event["to_state"]) for event in shown["events"]]
        assert ("transition", "watching", "completed") in kinds
        for event in shown["events"]:
            assert set(event) == {"at", "kind", "from_state", "to_state", "reason", "detail"}
            assert event["at"].endswith("Z")

        assert_error(await admin.v1("GET", "/v1/jobs/never-tracked"), 404, "job_not_found")
        assert_error(await admin.v1("GET", "/v1/jobs/bad%20id"), 422, "invalid_request")
        assert_error(await admin.v1("GET", "/v1/nothing"), 404, "not_found")
        not_allowed = await admin.v1("DELETE", "/v1/jobs")
        assert_error(not_allowed, 405, "method_not_allowed")
        assert {method.strip() for method in not_allowed.headers["allow"].split(",")} >= {"GET", "POST"}
        assert_error(await admin.v1("PUT", f"/v1/jobs/{done}"), 405, "method_not_allowed")


async def test_text_other_writers_stored_does_not_break_the_answers(config: Config) -> None:
    """`track --label k=<non-UTF-8 bytes>` stores a lone surrogate (Python's surrogateescape);
    the API still answers, with the character escaped."""
    async with admin_api(config, TOKEN) as admin:
        await admin.daemon.store.add_jobs([NewJob("from-cli", "default", {"k": "\udcff", "n": "é"})], utcnow())
        for path in ("/v1/jobs", "/v1/jobs/from-cli"):
            response = await admin.v1("GET", path)
            assert response.status_code == 200, response.text
            assert "\\udcff" in response.text
        shown = (await admin.v1("GET", "/v1/jobs/from-cli")).json()
        assert shown["labels"] == {"k": "\udcff", "n": "é"}


# ---- submit and cancel -------------------------------------------------------------------


async def test_submit_starts_a_job_at_the_api_and_tracks_it(config: Config, fake_server: FakeServer) -> None:
    fake = fake_server.fake
    async with admin_api(config, TOKEN) as admin:
        response = await admin.v1(
            "POST",
            "/v1/submit",
            json={"query": "staff engineers in Berlin", "limit": 40, "labels": {"team": "growth"}},
        )
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
        assert response.json() == {"job_id": job_id, "requested_limit": 40, "limit": 40, "clamped_by": []}
        assert response.headers["location"] == f"/v1/jobs/{job_id}"

        info = fake.job_info(job_id)  # KeyError if the fake never saw it
        assert (info["query"], info["limit"]) == ("staff engineers in Berlin", 40)
        assert fake.stats()["initiate"] == 1

        shown = (await admin.v1("GET", f"/v1/jobs/{job_id}")).json()
        assert shown["source"] == "submit"
        assert shown["query"] == "staff engineers in Berlin"
        assert shown["labels"] == {"team": "growth"}
        assert shown["policy"] == "growth"
        listed = await listed_jobs(admin, label="team=growth")
        assert [job["job_id"] for job in listed] == [job_id]

        # The daemon picks it up like any other job.
        async def polled() -> bool:
            job = await admin.daemon.store.get_job(job_id)
            return job is not None and job.last_polled_at is not None

        await wait_until(admin.daemon, polled, what="the submitted job polled")

        for body, words in (
            ({"query": ""}, "query"),
            ({"query": "q", "limit": 0}, "limit"),
            ({"query": "q", "limit": 1001}, "limit"),
            ({"query": "q", "limit": "30"}, "limit"),
            ({"query": "q", "policy": "nope"}, "unknown policy"),
            ({"query": "q", "labels": {"bad key!": "v"}}, "label key"),
            ({"query": "q", "hard_filter_company_urls": []}, "unknown field"),
            ({}, "query"),
            ({"query": "   "}, "blank"),
            ({"query": "a\x00b"}, "control characters"),  # PostgreSQL cannot store NUL
            ({"query": "tab\tand\x1c"}, "control characters"),
        ):
            assert (
                words in assert_error(await admin.v1("POST", "/v1/submit", json=body), 422, "invalid_request")["detail"]
            )
        assert_error(await admin.v1("POST", "/v1/submit", content=b"nope", headers=JSON), 400, "invalid_json")
        assert fake.stats()["initiate"] == 1  # nothing invalid was sent upstream

        # The API refuses a query it finds invalid (here a malformed simulator knob): that is
        # the caller's problem, a 422, not a gateway failure; nothing is tracked.
        error = assert_error(
            await admin.v1("POST", "/v1/submit", json={"query": "x fake:rate=abc"}), 422, "request_rejected"
        )
        assert "HTTP 400" in error["detail"]
        assert len(await admin.daemon.store.list_jobs()) == 1

        # Upstream failures are reported, not crashed on.
        fake.set_account_credits(0)
        assert_error(await admin.v1("POST", "/v1/submit", json={"query": "more"}), 402, "out_of_credits")
        assert len(await admin.daemon.store.list_jobs()) == 1


async def test_manual_cancel_goes_through_the_state_machine_once(config: Config, fake_server: FakeServer) -> None:
    fake = fake_server.fake
    plain, noted = fake.create_job(rate=1, limit=100), fake.create_job(rate=1, limit=100)
    async with admin_api(config, TOKEN) as admin:
        daemon = admin.daemon
        assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": [plain, noted]})).status_code == 201

        async def both_polled() -> bool:
            jobs = await daemon.store.list_jobs()
            return all(job.last_polled_at is not None for job in jobs)

        await wait_until(daemon, both_polled, what="both jobs polled once")
        _, samples = await scrape(admin)
        manual_before = (
            sample_value(samples.get("clado_supervisor_cancels", []), "clado_supervisor_cancels_total", reason="manual")
            or 0.0
        )

        # An empty body, and an explicit reason.
        response = await admin.http.post(f"/v1/jobs/{plain}/cancel", headers=AUTH)
        assert response.status_code == 200, response.text
        first = response.json()
        response = await admin.v1("POST", f"/v1/jobs/{noted}/cancel", json={"reason": "wrong query"})
        assert response.status_code == 200, response.text
        second = response.json()
        for job, job_id in ((first, plain), (second, noted)):
            assert job["job_id"] == job_id
            assert job["cancel_reason"] == "manual"
            assert job["state"] in {"cancelling", "confirming", "cancelled"}
            assert job["cancel_requested_at"] is not None

        async def both_cancelled() -> bool:
            states = [await job_state(admin, job_id) for job_id in (plain, noted)]
            return states == [State.CANCELLED.value] * 2

        await wait_until(daemon, both_cancelled, what="both cancels confirmed")
        for job_id in (plain, noted):
            info = fake.job_info(job_id)
            assert info["cancel_calls"] == 1, info
            assert info["status"] == "cancelled"
            shown = (await admin.v1("GET", f"/v1/jobs/{job_id}")).json()
            assert shown["state"] == "cancelled"
            assert shown["final_status"] == "cancelled"
            assert shown["cancel_reason"] == "manual"
            assert shown["confirmed_at"] is not None
            moves = [(e["from_state"], e["to_state"]) for e in shown["events"] if e["kind"] == "transition"]
            assert moves[0] == ("watching", "cancelling")
            assert moves[-1][1] == "cancelled"
            decision = shown["events"][[e["to_state"] for e in shown["events"]].index("cancelling")]
            assert decision["reason"] == "manual"
            # The same shape as a policy's or a budget's decision: rule, credits, config hash.
            assert decision["detail"]["rule"] == "manual"
            assert decision["detail"]["config_hash"] == admin.daemon.config.config_hash
            assert isinstance(decision["detail"]["credits"], int)
            if job_id == noted:
                assert decision["detail"]["note"] == "wrong query"

        # Cancelling again changes nothing and calls nothing.
        response = await admin.v1("POST", f"/v1/jobs/{plain}/cancel", json={"reason": "again"})
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "cancelled"
        assert fake.job_info(plain)["cancel_calls"] == 1

        assert_error(await admin.v1("POST", "/v1/jobs/never-tracked/cancel"), 404, "job_not_found")
        assert_error(await admin.v1("POST", "/v1/jobs/bad%20id/cancel"), 422, "invalid_request")
        assert_error(
            await admin.v1("POST", f"/v1/jobs/{plain}/cancel", json={"reason": "x", "force": True}),
            422,
            "invalid_request",
        )
        assert_error(await admin.v1("POST", f"/v1/jobs/{plain}/cancel", json={"reason": 5}), 422, "invalid_request")
        assert_error(
            await admin.v1("POST", f"/v1/jobs/{plain}/cancel", json={"reason": "x" * 501}), 422, "invalid_request"
        )
        assert_error(
            await admin.v1("POST", f"/v1/jobs/{plain}/cancel", content=b"{", headers=JSON), 400, "invalid_json"
        )
        assert_error(
            await admin.v1("POST", f"/v1/jobs/{plain}/cancel", json={"reason": "a\x00"}), 422, "invalid_request"
        )

        # Counted by the daemon from the committed events (service/tally.py), within a tick;
        # the refused and repeated cancels above add none.
        async def manual_cancels() -> float | None:
            _, samples = await scrape(admin)
            return sample_value(samples["clado_supervisor_cancels"], "clado_supervisor_cancels_total", reason="manual")

        await eventually(lambda: _is(manual_cancels(), manual_before + 2), what="both manual cancels counted")
        for _ in range(3):  # and no more, a few scrapes later
            assert await manual_cancels() == manual_before + 2


async def _is(value: Any, expected: object) -> bool:
    return bool(await value == expected)


# ---- health, readiness, metrics ------------------------------------------------------------


async def test_metrics_parse_and_carry_the_daemon_s_numbers(config: Config, fake_server: FakeServer) -> None:
    fake = fake_server.fake
    watched = [fake.create_job(rate=1, limit=100) for _ in range(3)]
    runaway = fake.create_job(rate=20, limit=500)
    async with admin_api(config, TOKEN) as admin:
        daemon = admin.daemon
        _, before = await scrape(admin)
        tight_before = (
            sample_value(
                before.get("clado_supervisor_cancels", []), "clado_supervisor_cancels_total", reason="max_credits"
            )
            or 0.0
        )

        assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": watched})).status_code == 201
        assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": [runaway], "policy": "tight"})).status_code == 201

        async def runaway_cancelled() -> bool:
            job = await daemon.store.get_job(runaway)
            return job is not None and job.state == State.CANCELLED.value

        await wait_until(daemon, runaway_cancelled, what="the runaway cancelled for max_credits")

        # The jobs gauge is refreshed every few seconds: wait for a refresh that has seen them.
        async def gauge_caught_up() -> dict[str, list[Any]] | None:
            _, samples = await scrape(admin)
            jobs = samples.get("clado_supervisor_jobs", [])
            ok = (
                sample_value(jobs, "clado_supervisor_jobs", state="watching") == 3
                and sample_value(jobs, "clado_supervisor_jobs", state="cancelled") == 1
            )
            return samples if ok else None

        samples = await eventually(gauge_caught_up, timeout=20, what="the jobs gauge refreshed")
        text, _ = await scrape(admin)
        assert TOKEN not in text
        for job_id in (*watched, runaway):
            assert job_id not in text  # no job ids as labels

        jobs = samples["clado_supervisor_jobs"]
        assert {sample.labels["state"] for sample in jobs} == {state.value for state in State}
        assert all(sample.value >= 0 for sample in jobs)

        tick = samples["clado_supervisor_tick_duration_seconds"]
        tick_count = sample_value(tick, "clado_supervisor_tick_duration_seconds_count")
        tick_sum = sample_value(tick, "clado_supervisor_tick_duration_seconds_sum")
        assert tick_count is not None
        assert tick_count >= 1
        assert tick_sum is not None
        assert 0 <= tick_sum < tick_count * 5
        assert sample_value(tick, "clado_supervisor_tick_duration_seconds_bucket", le="+Inf") == tick_count

        # The registry is process-wide: what this test did is the difference with `before`.
        def delta(family: str, name: str, **labels: str) -> float:
            return total(samples, family, name, **labels) - total(before, family, name, **labels)

        lag = "clado_supervisor_poll_lag_seconds"
        assert delta(lag, lag + "_count") >= 4  # each job polled at least once
        assert delta(lag, lag + "_sum") >= 0

        cancels = samples["clado_supervisor_cancels"]
        assert sample_value(cancels, "clado_supervisor_cancels_total", reason="max_credits") == tight_before + 1
        assert fake.job_info(runaway)["cancel_calls"] == 1

        last_tick = sample_value(
            samples["clado_supervisor_last_tick_timestamp_seconds"], "clado_supervisor_last_tick_timestamp_seconds"
        )
        assert last_tick is not None
        assert abs(last_tick - daemon.clock().timestamp()) < 60

        # Clado API calls by endpoint and status, and their latency: a poll of each job, a cancel.
        requests = "clado_supervisor_api_requests"
        assert delta(requests, requests + "_total", status="200") >= 5, samples[requests]
        assert delta(requests, requests + "_total", endpoint="cancel", status="200") == 1, samples[requests]
        latency = "clado_supervisor_api_request_duration_seconds"
        assert delta(latency, latency + "_count") >= 5, samples[latency]


async def test_healthz_is_ok_while_the_daemon_runs(config: Config) -> None:
    async with admin_api(config, TOKEN) as admin:
        response = await admin.http.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        assert (await admin.http.post("/healthz")).status_code == 405

        admin.daemon.request_stop()  # the scheduler is on its way down: no longer healthy
        assert_error(await admin.http.get("/healthz"), 503, "scheduler_stopped")


async def test_readyz_waits_for_a_tick_then_reports_ready(config: Config) -> None:
    async with admin_api(config, TOKEN) as admin:

        async def ready() -> dict[str, Any] | None:
            response = await admin.http.get("/readyz")
            return dict(response.json()) if response.status_code == 200 else None

        assert await eventually(ready, what="/readyz ready") == {"status": "ready"}


@pytest.mark.postgres
async def test_readyz_turns_unready_when_the_database_is_gone(
    tmp_path: Path, fake_server: FakeServer, pg_url: str
) -> None:
    """The database really goes away: connections are refused and the open ones are killed."""
    import psycopg
    from sqlalchemy.engine import make_url

    config = write_config(tmp_path, fake_server.base_url, pg_url)
    url = make_url(pg_url)
    name = url.database
    admin_dsn = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)

    def database_reachable(reachable: bool) -> None:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
            if not reachable:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )

    job_id = fake_server.fake.create_job(rate=1, limit=100)
    async with admin_api(config, TOKEN) as admin:
        assert (await admin.v1("POST", "/v1/jobs", json={"job_ids": [job_id]})).status_code == 201

        async def readiness(status: int) -> dict[str, Any] | None:
            response = await admin.http.get("/readyz")
            return dict(response.json()) if response.status_code == status else None

        assert await eventually(lambda: readiness(200), what="/readyz ready") == {"status": "ready"}

        await asyncio.to_thread(database_reachable, False)
        try:
            unready = await eventually(lambda: readiness(503), what="/readyz unready")
            assert unready["status"] == "unready"
            assert any(problem.startswith("database:") for problem in unready["problems"]), unready
            assert "Traceback" not in json.dumps(unready)
            assert (await admin.http.get("/healthz")).status_code == 200  # alive, just not ready
            # The API's own reads fail cleanly too: a JSON 503, never a stack trace.
            assert_error(await admin.v1("GET", "/v1/jobs"), 503, "database_unavailable")
            assert_error(await admin.v1("GET", f"/v1/jobs/{job_id}"), 503, "database_unavailable")
            assert_error(
                await admin.v1("POST", "/v1/jobs", json={"job_ids": ["during-outage"]}), 503, "database_unavailable"
            )
        finally:
            await asyncio.to_thread(database_reachable, True)

        assert await eventually(lambda: readiness(200), what="/readyz ready again") == {"status": "ready"}
        listed = await listed_jobs(admin)
        assert [job["job_id"] for job in listed] == [job_id]  # nothing half-written during the outage
