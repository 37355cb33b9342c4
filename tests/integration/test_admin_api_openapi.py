"""The published OpenAPI document says what the endpoints really answer.

Real requests over loopback (successes and errors of every route); each answer is validated
against the response schema the document gives for its operation and status, and the job
schema's properties are exactly the keys a job comes back with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs  # schemathesis's own validator, so no new test dependency
import pytest
from test_admin_api import TOKEN, admin_api, write_config

from conftest import eventually, load
from fakeserver import FakeServer
from supervisor.config import Config


@pytest.fixture
def config(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> Config:
    return write_config(tmp_path, fake_server.base_url, sqlite_url)


def response_schema(document: dict[str, Any], method: str, path: str, status: int) -> tuple[str, dict[str, Any]]:
    """The media type and schema of one documented answer (with the document's components
    for its $refs)."""
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, which the document does not list"
    ((media_type, content),) = responses[str(status)]["content"].items()
    return media_type, {**content["schema"], "components": document["components"]}


def assert_documented(document: dict[str, Any], method: str, path: str, response: httpx.Response) -> Any:
    body = response.json()
    media_type, schema = response_schema(document, method, path, response.status_code)
    assert response.headers["content-type"].startswith(media_type), response.headers
    validator = jsonschema_rs.Draft202012Validator(schema)
    errors = [error.message for error in validator.iter_errors(body)]
    assert not errors, (method, path, response.status_code, errors, body)
    return body


async def test_every_answer_matches_the_document(config: Config, fake_server: FakeServer) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(rate=1, limit=100)
    async with admin_api(config, TOKEN) as admin:
        document = (await admin.http.get("/openapi.json")).json()
        schemas = document["components"]["schemas"]
        seen: set[tuple[str, str, int]] = set()

        async def check(method: str, template: str, path: str | None = None, **kwargs: Any) -> Any:
            response = await admin.v1(method, path or template, **kwargs)
            seen.add((method, template, response.status_code))
            return assert_documented(document, method, template, response)

        tracked = await check("POST", "/v1/jobs", json={"job_ids": [job_id], "labels": {"team": "growth"}})
        assert tracked == {"added": [job_id], "already_tracked": []}
        await check("POST", "/v1/jobs", json={"job_ids": [job_id]})  # 200: already tracked
        await check("POST", "/v1/jobs", json={"job_ids": ["bad id"]})  # 422
        await check("POST", "/v1/jobs", content=b"{", headers={"Content-Type": "application/json"})  # 400
        await check("POST", "/v1/jobs", content=b" " * 2048)  # 413

        # A job before its first poll (nulls) and after it (timestamps), as a list and alone.
        listed = (await check("GET", "/v1/jobs"))["jobs"]
        assert set(listed[0]) == set(schemas["JobView"]["properties"])
        assert set(schemas["JobView"]["required"]) == set(listed[0])

        async def polled() -> bool:
            jobs = await admin.daemon.store.list_jobs()
            return bool(jobs) and jobs[0].last_polled_at is not None

        await eventually(polled, what="the job polled")
        await check("GET", "/v1/jobs", params={"state": "watching", "label": "team=growth"})
        await check("GET", "/v1/jobs", params={"state": "running"})  # 422

        detail_path = f"/v1/jobs/{job_id}"
        shown = await check("GET", "/v1/jobs/{job_id}", detail_path)
        assert set(shown) == set(schemas["JobDetailView"]["properties"]) == set(listed[0]) | {"events"}
        assert set(shown["events"][0]) == set(schemas["EventView"]["properties"])
        await check("GET", "/v1/jobs/{job_id}", "/v1/jobs/never-tracked")  # 404
        await check("GET", "/v1/jobs/{job_id}", "/v1/jobs/bad%20id")  # 422

        submitted = await check("POST", "/v1/submit", json={"query": "engineers in Lyon", "limit": 5})
        assert set(submitted) == set(schemas["SubmitResult"]["properties"])
        await check("POST", "/v1/submit", json={"query": "   "})  # 422
        await check("POST", "/v1/submit", json={"query": "x fake:rate=abc"})  # 422 request_rejected

        cancel = "/v1/jobs/{job_id}/cancel"
        cancelled = await check("POST", cancel, f"/v1/jobs/{job_id}/cancel", json={"reason": "wrong query"})
        assert cancelled["cancel_reason"] == "manual"
        await check("POST", cancel, "/v1/jobs/never-tracked/cancel")  # 404
        fake.set_account_credits(0)
        await check("POST", "/v1/submit", json={"query": "more"})  # 402

        for method, path in (("GET", "/healthz"), ("GET", "/readyz")):
            response = await admin.http.get(path)
            seen.add((method, path, response.status_code))
            assert_documented(document, method, path, response)
        response = await admin.http.get("/v1/jobs")  # no token
        assert_documented(document, "GET", "/v1/jobs", response)
        seen.add(("GET", "/v1/jobs", response.status_code))

    # The answers above covered every operation and these statuses of it.
    assert {
        ("POST", "/v1/jobs", 201), ("POST", "/v1/jobs", 200), ("POST", "/v1/jobs", 422), ("POST", "/v1/jobs", 400),
        ("POST", "/v1/jobs", 413), ("GET", "/v1/jobs", 200), ("GET", "/v1/jobs", 401), ("GET", "/v1/jobs", 422),
        ("GET", "/v1/jobs/{job_id}", 200), ("GET", "/v1/jobs/{job_id}", 404), ("POST", "/v1/submit", 201),
        ("POST", "/v1/submit", 402), ("POST", "/v1/submit", 422), ("POST", "/v1/jobs/{job_id}/cancel", 200),
        ("POST", "/v1/jobs/{job_id}/cancel", 404), ("GET", "/healthz", 200), ("GET", "/readyz", 200),
    } <= seen, seen  # fmt: skip


async def test_the_document_describes_every_route_with_shared_schemas(config: Config) -> None:
    async with admin_api(config, TOKEN) as admin:
        document = (await admin.http.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    schemas = document["components"]["schemas"]
    # Every $ref points into components/schemas and resolves.
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(document)
    assert refs
    for ref in refs:
        prefix, _, name = ref.rpartition("/")
        assert prefix == "#/components/schemas", ref
        assert name in schemas, ref
    assert "$defs" not in str(document)
    # The request bodies state the bounds the use cases enforce.
    submit = schemas["SubmitRequest"]["properties"]
    assert (submit["limit"]["minimum"], submit["limit"]["maximum"]) == (1, 1000)
    assert schemas["TrackRequest"]["properties"]["max_credits"]["anyOf"][0]["maximum"] == 2**31 - 1
    assert set(schemas["JobView"]["properties"]["state"]) == {"$ref"}
    assert set(schemas["State"]["enum"]) >= {"watching", "cancelled", "unconfirmed"}


async def test_deliveries_answer_as_documented(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> None:
    """/v1/deliveries: the delivery log of the outbox, one delivery with its attempts, and
    a redelivery; a hook nobody listens on (a closed loopback port) keeps its row pending."""
    config = write_config(tmp_path, fake_server.base_url, sqlite_url)
    path = tmp_path / "supervisor.toml"
    path.write_text(
        path.read_text(encoding="utf-8")
        + '\n[[notify.webhooks]]\nurl = "http://127.0.0.1:9/hook"\nevents = ["cancel_requested"]\ntimeout = "1s"\n',
        encoding="utf-8",
    )
    config = load(path)
    job_id = fake_server.fake.create_job(rate=1, limit=100)
    async with admin_api(config, TOKEN) as admin:
        document = (await admin.http.get("/openapi.json")).json()

        async def check(method: str, template: str, path: str | None = None, **kwargs: Any) -> Any:
            return assert_documented(document, method, template, await admin.v1(method, path or template, **kwargs))

        await check("POST", "/v1/jobs", json={"job_ids": [job_id]})
        await check("POST", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{job_id}/cancel", json={"reason": "test"})

        async def attempted() -> Any:
            items = (await check("GET", "/v1/deliveries"))["items"]
            return items if items and items[0]["attempts"] >= 1 else None

        (item,) = await eventually(attempted, what="the delivery attempted")
        assert (item["event"], item["state"], item["payload"]["job_id"]) == ("cancel_requested", "pending", job_id)
        assert item["last_error"] == "ConnectError"
        one = f"/v1/deliveries/{item['id']}"
        shown = await check("GET", "/v1/deliveries/{delivery_id}", one)
        assert shown["attempt_log"][0]["error"] == "ConnectError"
        assert (await check("GET", "/v1/deliveries", params={"state": "delivered"}))["items"] == []
        await check("GET", "/v1/deliveries", params={"state": "lost"})  # 422
        redone = await check("POST", "/v1/deliveries/{delivery_id}/redeliver", one + "/redeliver")
        assert redone == {"redelivered": [item["id"]]}
        missing = "/v1/deliveries/msg_" + "0" * 32
        assert (await admin.v1("GET", missing)).status_code == 404
        await check("GET", "/v1/deliveries/{delivery_id}", missing)
        await check("POST", "/v1/deliveries/{delivery_id}/redeliver", missing + "/redeliver")
        await check("GET", "/v1/deliveries/{delivery_id}", "/v1/deliveries/not-an-id")  # 422
