"""Forecasts against the simulator over loopback, with a real database: forecast warnings and
their clearing by webhook, forecast_action = "block" at admission, `budgets --json` (the real
CLI) and GET /v1/budgets against the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_admin_api import TOKEN, admin_api
from test_admin_api_openapi import assert_documented
from test_policy_engine import make_config, operations_on, track, wait_for_results
from test_webhooks import Receiver

from conftest import API_KEY, eventually, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters import metrics
from supervisor.adapters.store import utcnow
from supervisor.app.operations import Operations
from supervisor.app.views import QueueItemView, SubmitResult
from supervisor.core.budgets import AdmissionRefused, period_start
from supervisor.core.states import TERMINAL

REPO = Path(__file__).parents[2]
POLICY = '[policies.default]\nmax_runtime = "30m"\nmax_credits = 200'


@pytest.fixture
def receiver() -> Any:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def hook(url: str) -> str:
    events = '["budget_forecast", "budget_forecast_cleared", "budget_warning"]'
    return f'\n[[notify.webhooks]]\nurl = "{url}"\nevents = {events}\ntimeout = "2s"\n'


FORECAST_BUDGET = """
[budgets.growth]
match = { team = "growth" }
credits = 100
forecast_warn_at = [0.8, 1.5]
action = "observe"
"""


def events(receiver: Receiver, name: str) -> list[dict[str, Any]]:
    return [r["json"] for r in receiver.at("/hook") if r["json"]["event"] == name]


async def test_a_budget_forecast_to_run_out_warns_then_clears_when_its_jobs_stop(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, receiver: Receiver
) -> None:
    fake = fake_server.fake
    # Two jobs of 200 results at 2/s: on track for 400 of the budget's 100 credits.
    jobs = [fake.create_job(limit=200, rate=2) for _ in range(2)]
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies=POLICY, extra=FORECAST_BUDGET + hook(receiver.url("/hook"))
    )
    async with running_daemon(config) as daemon:
        await track(daemon, *jobs, labels={"team": "growth"})
        warned = await eventually(lambda: len(events(receiver, "budget_forecast")) >= 2 and receiver, timeout=30,
                                  what="both forecast warnings")  # fmt: skip
        first = {e["fraction"]: e for e in events(warned, "budget_forecast")}
        assert set(first) == {0.8, 1.5}  # 1.5: on track to overspend by half
        sample = first[0.8]
        assert sample["budget"] == "growth" and sample["credits"] == 100
        assert sample["forecast_credits"] >= 150
        assert sample["money"]["currency"] == "USD"
        assert sample["money"]["forecast_credits"] == pytest.approx(sample["forecast_credits"] * 0.01, abs=1e-4)
        assert sample["forecast_basis"]
        gauge = metrics.REGISTRY.get_sample_value("clado_supervisor_budget_forecast_credits", {"budget": "growth"})
        assert gauge is not None and gauge >= 150

        # The jobs stop (cancelled by a person): the forecast falls to what was spent.
        wait_for_results(fake_server, jobs[0], 5)
        ops = Operations(config, daemon.store, daemon.client, daemon.effects)
        for job_id in jobs:
            await ops.manual_cancel(job_id, "enough")
        # The forecast is now what was spent: each warning above it clears, once.
        await wait_until(daemon, lambda: _all_final(daemon, jobs), what="the cancels confirmed")
        spent = sum([(await daemon.store.get_job(j)).credits_used for j in jobs])  # type: ignore[union-attr]
        under = [f for f in (0.8, 1.5) if spent < f * 100]
        assert under, f"the jobs spent {spent} before they were stopped: no warning can clear"
        await eventually(lambda: len(events(receiver, "budget_forecast_cleared")) >= len(under), timeout=30,
                         what="the forecast warnings above the spend cleared")  # fmt: skip
        cleared = events(receiver, "budget_forecast_cleared")
        assert sorted(e["fraction"] for e in cleared) == under
        assert all(e["forecast_credits"] <= spent for e in cleared)  # spent as of then: no job running
        key = period_start("day", "UTC", utcnow()).isoformat()  # type: ignore[union-attr]
        record = await daemon.store.budget_period("growth", key)
        assert "forecast@0.8" in record["warned"] and "forecast@1.5:cleared" in record["warned"]
        assert all(f"forecast@{f:g}:cleared" in record["warned"] for f in under)

    # Once per period per threshold: a restart (or a reload) keeps what already fired.
    before = len(events(receiver, "budget_forecast"))
    again = fake.create_job(limit=200, rate=10)
    async with running_daemon(config) as daemon:
        await track(daemon, again, labels={"team": "growth"})
        await wait_until(daemon, lambda: _polled(daemon, again), what="the new job polled")
        await eventually(
            lambda: (metrics.REGISTRY.get_sample_value(
                "clado_supervisor_budget_forecast_credits", {"budget": "growth"}) or 0) >= 150,
            timeout=30, what="the new forecast",
        )  # fmt: skip
    assert len(events(receiver, "budget_forecast")) == before


async def _all_final(daemon: Any, job_ids: list[str]) -> bool:
    found = [await daemon.store.get_job(job_id) for job_id in job_ids]
    return all(job is not None and job.state in TERMINAL for job in found)


async def _polled(daemon: Any, job_id: str) -> bool:
    job = await daemon.store.get_job(job_id)
    return job is not None and job.last_polled_at is not None


BLOCK_BUDGET = """
[budgets.pool]
match = { team = "growth" }
credits = 100
action = "observe"
forecast_action = "block"
"""


async def test_forecast_block_refuses_or_queues_the_submission_that_would_overspend(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICY, extra=BLOCK_BUDGET)
    async with operations_on(config) as ops:
        # Nothing running: a job of 30 fits the forecast (0 + 30 of 100).
        first = await ops.submit("engineers", limit=30, labels={"team": "growth"})
        # Now one job runs with up to 30 to spend and another 60 would fit: 90 of 100.
        second = await ops.submit("engineers", limit=60, labels={"team": "growth"})
        assert fake.stats()["initiate"] == 2
        # A third of 30: 30 + 60 + 30 = 120 > 100, refused with the numbers, never sent.
        with pytest.raises(AdmissionRefused) as refused:
            await ops.submit("engineers", limit=30, labels={"team": "growth"})
        message = str(refused.value)
        for number in ("'pool'", "forecast to spend 90 of 100", "expected 30", "to 120", "forecast_action"):
            assert number in message, message
        assert fake.stats()["initiate"] == 2
        # Queued instead: it waits for the next period, reason forecast:pool.
        queued = await ops.submit("engineers", limit=30, labels={"team": "growth"}, queue=True)
        assert isinstance(queued, QueueItemView)
        assert (queued.state, queued.reason) == ("queued", "forecast:pool")
        assert queued.expected_start is not None
        # Another team's job is not held by this budget.
        other = await ops.submit("engineers", limit=30, labels={"team": "search"})
        assert fake.stats()["initiate"] == 3
        # The dry run says the same without calling the API.
        dry = await ops.submit_dry_run("engineers", limit=30, labels={"team": "growth"})
        assert (dry.fits, dry.credits, dry.limit) == (False, 30, 30)
        assert dry.refused is not None and "forecast to spend 90 of 100" in dry.refused
        (budget,) = dry.budgets
        assert (budget.name, budget.forecast_credits, budget.forecast_with_job) == ("pool", 90.0, 120.0)
        assert dry.money == {"currency": "USD", "credits": 0.3, "predicted_credits": 0.3}
        assert fake.stats()["initiate"] == 3
    assert all(isinstance(result, SubmitResult) for result in (first, second, other))


BUDGET_FIELDS = [
    "name", "period", "period_start", "period_end", "credits", "spent", "reserved", "remaining", "action",
    "exhausted", "warnings_fired", "spend_rate", "forecast_credits", "forecast_low", "forecast_high", "exhausts_at",
    "forecast_basis", "forecast_warn_at", "forecast_action", "money",
]  # fmt: skip
MONEY_FIELDS = [
    "currency", "credits", "spent", "reserved", "remaining", "spend_rate", "forecast_credits", "forecast_low",
    "forecast_high",
]  # fmt: skip


async def test_budgets_json_carries_every_field_and_the_admin_api_its_documented_shape(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    jobs = [fake.create_job(limit=200, rate=10) for _ in range(2)]
    extra = FORECAST_BUDGET + '\n[billing]\ncredit_price = 0.02\ncurrency = "EUR"\n'
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICY, extra=extra)
    async with running_daemon(config) as daemon:
        await track(daemon, *jobs, labels={"team": "growth"})
        for job_id in jobs:
            await wait_until(daemon, lambda j=job_id: _rated(daemon, j), what="a rate measured")
        env = {**os.environ, "CLADO_API_KEY": API_KEY, "NO_COLOR": "1"}
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "supervisor", "--config", str(tmp_path / "supervisor.toml"), "budgets", "--json"],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    (budget,) = shown["budgets"]
    assert list(budget) == BUDGET_FIELDS
    assert list(budget["money"]) == MONEY_FIELDS
    assert budget["money"]["currency"] == "EUR"
    assert budget["money"]["spent"] == pytest.approx(budget["spent"] * 0.02, abs=1e-4)
    assert budget["period_start"].endswith("T00:00:00Z") and budget["period_end"].endswith("T00:00:00Z")
    assert budget["spend_rate"] > 0
    assert budget["forecast_low"] <= budget["forecast_credits"] <= budget["forecast_high"]
    assert budget["forecast_credits"] > budget["credits"]  # two jobs going to 200 each
    assert budget["exhausts_at"] is not None and budget["exhausts_at"].endswith("Z")
    assert budget["forecast_basis"] == "running jobs only"  # a new budget: no history to learn from

    async with admin_api(config, TOKEN) as admin:
        document = (await admin.http.get("/openapi.json")).json()
        response = await admin.v1("GET", "/v1/budgets")
        assert response.status_code == 200
        body = assert_documented(document, "GET", "/v1/budgets", response)
        assert [b["name"] for b in body["budgets"]] == ["growth"]


async def _rated(daemon: Any, job_id: str) -> bool:
    job = await daemon.store.get_job(job_id)
    return job is not None and bool(job.credits_per_s)
