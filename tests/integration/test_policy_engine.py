"""The policy engine end to end: the daemon in-process against the fake API over loopback
HTTP, on a real SQLite file. Per-job limits, warnings, observe mode, budgets, reservations,
the account floor and webhooks. Tests wait on the daemon's writes (`wait_until`) or poll an
observable condition with a bound (`eventually`); none sleeps a fixed time to let things happen.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
import structlog.testing

from conftest import API_KEY, config_text, eventually, load, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters import metrics, migrate
from supervisor.adapters.clado import CladoClient
from supervisor.adapters.store import NewJob, Store, utcnow
from supervisor.app.operations import Operations
from supervisor.app.report import build_report
from supervisor.app.views import SubmitResult
from supervisor.config import Config
from supervisor.core.budgets import AdmissionRefused, period_start
from supervisor.core.states import TERMINAL
from supervisor.service.runtime import Daemon
from virtualtime import VirtualClock, run, serve_fake

# -- helpers -------------------------------------------------------------------------------------


def make_config(
    tmp_path: Path,
    server: FakeServer,
    db_url: str,
    *,
    policies: str,
    supervisor: dict[str, str] | None = None,
    extra: str = "",
) -> Config:
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(server.base_url, db_url, supervisor=supervisor, policies=policies, extra=extra))
    return load(path)


async def track(daemon: Daemon, *job_ids: str, labels: dict[str, str] | None = None) -> None:
    await daemon.store.add_jobs([NewJob(job_id, "default", labels or {}) for job_id in job_ids], daemon.clock())


async def wait_terminal(daemon: Daemon, *job_ids: str, timeout: float = 20) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        rows = {job_id: await daemon.store.get_job(job_id) for job_id in job_ids}
        if all(row is not None and row.state in TERMINAL for row in rows.values()):
            return rows
        return None

    return await wait_until(daemon, done, timeout=timeout, what=f"{len(job_ids)} job(s) terminal")


def wait_for_results(server: FakeServer, job_id: str, at_least: int, timeout: float = 10) -> None:
    """Block until the fake job has produced `at_least` results (polls the fake's state)."""
    deadline = time.monotonic() + timeout
    while server.fake.job_info(job_id)["results"] < at_least:
        assert time.monotonic() < deadline, f"fake job never reached {at_least} results"
        time.sleep(0.01)


def events_of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["kind"] == kind]


@asynccontextmanager
async def operations_on(config: Config) -> AsyncIterator[Operations]:
    """Operations (what `submit` runs) on the test database, with its own store and client."""
    await asyncio.to_thread(migrate.upgrade, config.database.url)
    store = Store(config.database.url)
    client = CladoClient(config.api.base_url, API_KEY, timeout=2.0, max_retries=0, transport=config.api.transport)
    try:
        yield Operations(config, store, client)
    finally:
        await client.aclose()
        await store.close()


def webhook_metric(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value("clado_supervisor_webhook_deliveries_total", {"outcome": outcome})
    return value or 0.0


class HookReceiver:
    """A real HTTP server on 127.0.0.1:0 in a thread, recording every request.
    Paths under /fail answer 500 after `fail_delay` seconds; others answer 204."""

    def __init__(self, fail_delay: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers.items()), "body": body,
                         "json": json.loads(body), "at": time.time()}
                    )  # fmt: skip
                if self.path.startswith("/fail"):
                    time.sleep(fail_delay)
                    self.send_response(500)
                else:
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [request for request in self.requests if request["path"] == path]

    def events(self, path: str) -> list[str]:
        return [request["json"].get("event", "") for request in self.at(path)]


@pytest.fixture
def receiver() -> Iterator[HookReceiver]:
    hooks = HookReceiver(fail_delay=0.5)
    hooks.thread.start()
    try:
        yield hooks
    finally:
        hooks.server.shutdown()
        hooks.server.server_close()


# -- per-job time limits ----------------------------------------------------------------------------


async def test_max_queued_cancels_a_job_stuck_in_the_queue(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(limit=30, queue_for=30)
    config = make_config(tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_queued = "2s"')
    async with running_daemon(config) as daemon:
        await track(daemon, job_id)
        job = (await wait_terminal(daemon, job_id, timeout=15))[job_id]
        events = await daemon.store.events(job_id)

    info = fake.job_info(job_id)
    assert (job.state, job.cancel_reason, job.final_status) == ("cancelled", "max_queued", "cancelled")
    assert info["cancel_calls"] == 1
    assert info["cancel_call_times"][0] - info["created_at_ts"] >= 2 - 0.002  # ms-precision created_at
    decision = [e for e in events if e["to_state"] == "cancelling"]
    assert len(decision) == 1
    assert decision[0]["detail"]["rule"] == "policies.default.max_queued"
    assert decision[0]["detail"]["threshold"] == 2.0


async def test_stall_timeout_cancels_a_job_whose_results_stop_growing(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(limit=100, rate=10, stall_after=3)
    config = make_config(tmp_path, fake_server, sqlite_url, policies='[policies.default]\nstall_timeout = "2s"')
    async with running_daemon(config) as daemon:
        await track(daemon, job_id)
        job = (await wait_terminal(daemon, job_id, timeout=15))[job_id]

    info = fake.job_info(job_id)
    assert (job.state, job.cancel_reason) == ("cancelled", "stall_timeout")
    assert (job.credits_used, info["results"], info["cancel_calls"]) == (3, 3, 1)
    # The 3rd result lands 0.3 s after creation; the job is idle for 2 s after that.
    assert info["cancel_call_times"][0] - info["created_at_ts"] >= 2.3 - 0.002


def test_max_runtime_is_enforced_at_its_deadline_not_at_the_next_poll(tmp_path: Path, sqlite_url: str) -> None:
    # On the virtual clock (virtualtime.py): the lateness is the rule's, not the machine's.
    async def scenario(clock: VirtualClock) -> tuple[Any, dict[str, Any]]:
        async with serve_fake(clock) as api:
            job_id = api.fake.create_job(limit=500, rate=1)
            config = make_config(
                tmp_path, api, sqlite_url,
                policies='[policies.default]\nmax_runtime = "3s"', supervisor={"poll_interval": '"15s"'},
            )  # fmt: skip
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, job_id)
                job = (await wait_terminal(daemon, job_id, timeout=15))[job_id]
            return job, api.fake.job_info(job_id)

    job, info = run(scenario)
    assert (job.state, job.cancel_reason, info["cancel_calls"]) == ("cancelled", "max_runtime", 1)
    deadline = info["created_at_ts"] + 3
    lateness = info["cancel_call_times"][0] - deadline
    # Not before the deadline (the API's created_at has millisecond precision)...
    assert lateness >= -0.002
    # ...and long before the next regular poll: the job was first polled when tracked, so a
    # poll-driven supervisor would only look again ~15 s later (lateness ≈ 12 s).
    assert lateness < 5


# -- warnings -------------------------------------------------------------------------------------

WARN_POLICY = """
[policies.default]
max_credits = 20
warn_at = [0.5]
"""


def test_a_warning_fires_once_before_the_limit(tmp_path: Path, sqlite_url: str) -> None:
    # On the virtual clock: where the warning lands between 10 and 20 is the polling rule's.
    async def scenario(clock: VirtualClock) -> tuple[Any, list[dict[str, Any]]]:
        async with serve_fake(clock) as api:
            job_id = api.fake.create_job(limit=100, rate=10)
            config = make_config(tmp_path, api, sqlite_url, policies=WARN_POLICY)
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, job_id)
                job = (await wait_terminal(daemon, job_id, timeout=15))[job_id]
                return job, await daemon.store.events(job_id)

    job, events = run(scenario)

    assert (job.state, job.cancel_reason) == ("cancelled", "max_credits")
    warnings = events_of(events, "warning")
    assert len(warnings) == 1, warnings
    (warning,) = warnings
    assert warning["reason"] == "max_credits"
    assert warning["detail"]["limit"] == "max_credits"
    assert warning["detail"]["fraction"] == 0.5
    assert warning["detail"]["threshold"] == 20
    assert 10 <= warning["detail"]["value"] < 20  # fired before the limit, not with the cancel
    assert list(job.warned) == ["max_credits@0.5"]
    # the warning came before the decision
    decision = next(e for e in events if e["to_state"] == "cancelling")
    assert warning["id"] < decision["id"]


async def test_a_warning_is_not_repeated_after_a_restart(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(limit=500, rate=5)
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies="[policies.default]\nmax_credits = 100\nwarn_at = [0.1]"
    )

    async with running_daemon(config) as daemon:
        await track(daemon, job_id)

        async def warned() -> bool:
            return bool(events_of(await daemon.store.events(job_id), "warning"))

        await wait_until(daemon, warned, timeout=15, what="the warning at 10 credits")
        at_warning = (await daemon.store.get_job(job_id)).credits_used

    # Same database, a new daemon: it must know the warning already fired.
    async with running_daemon(config) as daemon:

        async def polled_twice_more() -> bool:
            job = await daemon.store.get_job(job_id)
            return job is not None and job.credits_used >= at_warning + 10

        await wait_until(daemon, polled_twice_more, timeout=15, what="more polls after the restart")
        job = await daemon.store.get_job(job_id)
        events = await daemon.store.events(job_id)

    assert job is not None and job.state == "watching"
    assert len(events_of(events, "warning")) == 1
    assert list(job.warned) == ["max_credits@0.1"]


# -- observe mode ---------------------------------------------------------------------------------

OBSERVE_CASES = {
    # name: (policies, supervisor overrides, extra, labels, expected would-cancel reason)
    "policy_action_observe": (
        '[policies.default]\nmax_credits = 10\naction = "observe"',
        {},
        "",
        {},
        "max_credits",
    ),
    "dry_run": ("[policies.default]\nmax_credits = 10", {"dry_run": "true"}, "", {}, "max_credits"),
    "budget_action_observe": (
        '[policies.default]\nmax_runtime = "30m"',
        {},
        '[budgets.watch]\nmatch = { team = "growth" }\ncredits = 10\naction = "observe"\n',
        {"team": "growth"},
        "budget:watch",
    ),
}


@pytest.mark.parametrize("case", list(OBSERVE_CASES))
def test_observe_mode_records_but_never_cancels(case: str, tmp_path: Path, sqlite_url: str) -> None:
    policies, supervisor, extra, labels, reason = OBSERVE_CASES[case]

    # On the virtual clock: that the decision comes before the job's 40th result is the
    # polling rule's, not the machine's speed.
    async def scenario(clock: VirtualClock) -> tuple[Any, list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        async with serve_fake(clock) as api:
            job_id = api.fake.create_job(limit=40, rate=10)
            config = make_config(tmp_path, api, sqlite_url, policies=policies, supervisor=supervisor, extra=extra)
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, job_id, labels=labels)
                job = (await wait_terminal(daemon, job_id, timeout=20))[job_id]
                events = await daemon.store.events(job_id)
                report = await build_report(daemon.store, config, "day", daemon.clock())
            return job, events, report, api.fake.job_info(job_id)

    job, events, report, info = run(scenario)
    assert info["cancel_calls"] == 0
    assert (job.state, job.final_status, job.credits_used) == ("completed", "completed", 40)
    assert job.cancel_reason is None
    would = events_of(events, "would_cancel")
    assert len(would) == 1, would
    assert would[0]["reason"] == reason
    assert job.would_cancel_reason == reason
    at_decision = job.would_cancel_credits
    assert at_decision is not None and 10 <= at_decision < 40
    assert report["observe_would_have_saved"] == 40 - at_decision > 0
    assert report["would_cancel_by_reason"] == {reason: 1}
    assert report["cancels_by_reason"] == {}
    assert report["saved_by_cancels"] == 0
    if case == "budget_action_observe":
        (budget,) = report["budgets"]
        assert (budget["name"], budget["action"], budget["exhausted"], budget["spent"]) == (
            "watch",
            "observe",
            True,
            40,
        )


# -- budgets ----------------------------------------------------------------------------------------

DAILY_BUDGET = """
[budgets.growth-daily]
match = { team = "growth" }
period = "day"
credits = 30
action = "cancel"
"""


async def test_a_daily_budget_cancels_the_matching_running_jobs_and_only_those(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    growth = [fake.create_job(limit=200, rate=10) for _ in range(2)]
    queued = fake.create_job(limit=200, queue_for=60)  # growth too, not yet running
    other = fake.create_job(limit=25, rate=5)  # another team's job: completes in 5 s
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "30m"', extra=DAILY_BUDGET
    )
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(config) as daemon:
            await track(daemon, *growth, queued, labels={"team": "growth"})
            await track(daemon, other, labels={"team": "search"})
            jobs = await wait_terminal(daemon, *growth, queued, other, timeout=20)
            key = period_start("day", "UTC", utcnow()).isoformat()  # type: ignore[union-attr]
            record = await daemon.store.budget_period("growth-daily", key)
            report = await build_report(daemon.store, config, "day", utcnow())

    for job_id in (*growth, queued):
        job, info = jobs[job_id], fake.job_info(job_id)
        assert (job.state, job.cancel_reason, info["cancel_calls"]) == ("cancelled", "budget:growth-daily", 1)
        assert job.cancel_detail["rule"] == "budgets.growth-daily"
        assert job.cancel_detail["spent"] >= 30
    other_job, other_info = jobs[other], fake.job_info(other)
    assert (other_job.state, other_job.cancel_reason, other_info["cancel_calls"]) == ("completed", None, 0)
    assert other_job.credits_used == 25

    exhausted = [entry for entry in logs if entry["event"] == "budget exhausted"]
    assert len(exhausted) == 1, exhausted  # several sweeps ran while the other job finished
    assert exhausted[0]["budget"] == "growth-daily"
    assert record["exhausted_at"] is not None  # persisted: a restart does not log it again
    (budget,) = report["budgets"]
    assert budget["exhausted"] is True
    assert budget["spent"] == sum(jobs[j].credits_used for j in (*growth, queued))
    assert report["cancels_by_reason"] == {"budget:growth-daily": 3}


# -- reservations and admission --------------------------------------------------------------------

RESERVE_BUDGET = """
[budgets.pool]
credits = 100
reserve = true
action = "block"
"""


async def test_reservations_hold_the_worst_case_until_the_job_ends(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "30m"', extra=RESERVE_BUDGET
    )
    # Each job fails after 1 s with 10 results: far less than its limit of 40.
    query = "engineers fake:rate=10,fail_after=1"
    async with operations_on(config) as ops:
        first = (await ops.submit(query, limit=40, labels={})).job_id
        second = (await ops.submit(query, limit=40, labels={})).job_id
        usage = (await ops.store.usage([None], utcnow()))[None]
        assert sum(u.spent for _, u in usage) == 0
        assert sum(u.reserved for _, u in usage) == 80
        # A third asks for 40 with 20 left: the API is asked for 20 (prevention first).
        clamped = await ops.submit(query, limit=40, labels={})
        assert (clamped.requested_limit, clamped.limit, clamped.clamped_by) == (40, 20, ["budgets.pool"])
        assert fake.job_info(clamped.job_id)["limit"] == 20
        assert (await ops.store.get_job(clamped.job_id)).reserved_credits == 20
        with pytest.raises(AdmissionRefused) as refused:
            await ops.submit(query, limit=40, labels={})
        message = str(refused.value)
        for number in ("'pool'", "spent 0", "reserved 100", "of 100"):
            assert number in message, message
        assert fake.stats()["initiate"] == 3  # the refused job was never started
        assert len(await ops.store.list_jobs()) == 3

    async with running_daemon(config) as daemon:
        jobs = await wait_terminal(daemon, first, second, clamped.job_id, timeout=15)
        usage = (await daemon.store.usage([None], utcnow()))[None]

    assert [jobs[j].state for j in (first, second, clamped.job_id)] == ["failed", "failed", "failed"]
    actual = sum(fake.job_info(j)["results"] for j in (first, second, clamped.job_id))
    assert actual == 30
    assert sum(u.reserved for _, u in usage) == 0  # released when the jobs ended
    assert sum(u.spent for _, u in usage) == actual

    async with operations_on(config) as ops:
        fourth = await ops.submit(query, limit=40, labels={})  # 30 spent + 40 fits in 100
        assert (await ops.store.get_job(fourth.job_id)).reserved_credits == 40
        assert fourth.clamped_by == []


async def test_spend_through_the_supervisor_never_exceeds_a_reserving_budget(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "30m"', extra=RESERVE_BUDGET
    )
    query = "engineers fake:rate=30"
    submitted: list[str] = []

    async def run_all() -> None:
        async with running_daemon(config) as daemon:
            await wait_terminal(daemon, *submitted, timeout=15)

    async with operations_on(config) as ops:
        # Five concurrent submissions of 30 against 100: three fit whole, the fourth is
        # asked of the API for the 10 left, the fifth is refused.
        results = await asyncio.gather(
            *(ops.submit(query, limit=30, labels={}) for _ in range(5)), return_exceptions=True
        )
        admitted = [r for r in results if isinstance(r, SubmitResult)]
        refused = [r for r in results if isinstance(r, AdmissionRefused)]
        assert sorted(r.limit for r in admitted) == [10, 30, 30, 30], results
        assert len(refused) == 1, results
        submitted += [r.job_id for r in admitted]
    await run_all()

    async with operations_on(config) as ops:
        with pytest.raises(AdmissionRefused, match="exhausted"):
            await ops.submit(query, limit=1, labels={})
        jobs = await ops.store.list_jobs()

    charged = fake.stats()["credits_charged"]
    assert charged == sum(job.credits_used for job in jobs) == 100
    assert charged <= config.budgets["pool"].credits
    assert fake.stats()["initiate"] == 4


async def test_an_unconfirmed_job_keeps_its_reservation(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "1s"',
        supervisor={"confirm_timeout": '"1s"'}, extra=RESERVE_BUDGET,
    )  # fmt: skip
    async with operations_on(config) as ops:
        # The cancel is accepted but never takes effect within the confirm timeout.
        job_id = (await ops.submit("engineers fake:rate=10,cancel_delay=60", limit=60, labels={})).job_id
    async with running_daemon(config) as daemon:
        job = (await wait_terminal(daemon, job_id, timeout=15))[job_id]
        usage = (await daemon.store.usage([None], utcnow()))[None]
    assert job.state == "unconfirmed"
    assert fake.job_info(job_id)["status"] == "searching"  # still spending, towards 60
    # "submit holds limit × price until the job ends": this one has not ended.
    assert sum(u.committed for _, u in usage) == 60


async def test_account_floor_blocks_a_submission_that_would_cross_it(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    fake.set_account_credits(100)
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "30m"',
        extra='[account]\nmin_credits = 80\naction = "block"\n',
    )  # fmt: skip
    async with operations_on(config) as ops:
        with pytest.raises(AdmissionRefused) as refused:
            await ops.submit("engineers fake:rate=1", limit=30, labels={})
        for number in ("100", "30", "80", "min_credits"):
            assert number in str(refused.value), refused.value
        assert fake.stats()["initiate"] == 0
        assert await ops.store.list_jobs() == []
        # 100 − 20 = 80: exactly at the floor is allowed
        job_id = (await ops.submit("engineers fake:rate=1", limit=20, labels={})).job_id
        assert (await ops.store.get_job(job_id)) is not None


async def test_account_floor_cancels_running_jobs(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> None:
    fake = fake_server.fake
    job_ids = [fake.create_job(limit=500, rate=1) for _ in range(2)]
    fake.set_account_credits(50)
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "30m"',
        extra='[account]\nmin_credits = 80\ncheck_interval = "1s"\naction = "cancel"\n',
    )  # fmt: skip
    async with running_daemon(config) as daemon:
        await track(daemon, *job_ids)
        jobs = await wait_terminal(daemon, *job_ids, timeout=15)
        events = {job_id: await daemon.store.events(job_id) for job_id in job_ids}

    for job_id in job_ids:
        job, info = jobs[job_id], fake.job_info(job_id)
        assert (job.state, job.cancel_reason, info["cancel_calls"]) == ("cancelled", "account_floor", 1)
        decision = next(e for e in events[job_id] if e["to_state"] == "cancelling")
        assert decision["detail"]["rule"] == "account.min_credits"
        assert decision["detail"]["min_credits"] == 80
        assert decision["detail"]["account_credits"] < 80
        assert decision["detail"]["credits"] == job.credits_at_decision  # the job's, as every decision records


# -- webhooks -------------------------------------------------------------------------------------

SECRET = "s3cret-for-tests"


def hooks_config(receiver: HookReceiver, *hooks: str) -> str:
    base = receiver.url("")
    return "".join(f"\n[[notify.webhooks]]\n{hook.format(url=base)}\n" for hook in hooks)


async def test_webhooks_are_signed_and_each_event_is_delivered_once(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, receiver: HookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", SECRET)
    fake = fake_server.fake
    job_id = fake.create_job(limit=100, rate=10)
    extra = hooks_config(
        receiver,
        'url = "{url}/hook"\nevents = ["warning", "cancel_requested", "cancelled"]\nsecret_env = "TEST_HOOK_SECRET"',
        'url = "{url}/slack"\nevents = ["cancel_requested"]\nformat = "slack"',
    )
    config = make_config(tmp_path, fake_server, sqlite_url, policies=WARN_POLICY, extra=extra)
    async with running_daemon(config) as daemon:
        await track(daemon, job_id)
        await wait_terminal(daemon, job_id, timeout=15)
        await eventually(lambda: "cancelled" in receiver.events("/hook"), what="the cancelled webhook")
        await eventually(lambda: receiver.at("/slack"), what="the slack webhook")

    # Each event once, in commit order (a job's deliveries follow one another).
    assert receiver.events("/hook") == ["warning", "cancel_requested", "cancelled"]
    for request in receiver.at("/hook"):
        # As a receiver verifies it: Standard Webhooks, with the package of that name.
        payload = standardwebhooks.Webhook(SECRET.encode()).verify(request["body"], request["headers"])
        assert payload["job_id"] == job_id
        assert payload["config_hash"] == config.config_hash
    warning = receiver.at("/hook")[0]["json"]
    assert (warning["reason"], warning["policy"]) == ("max_credits", "default")
    cancel = receiver.at("/hook")[1]["json"]
    assert (cancel["reason"], cancel["state"]) == ("max_credits", "cancelling")
    # Its credits and their money twin, at the default price.
    assert cancel["money"] == {"currency": "USD", "credits": round(cancel["credits"] * 0.01, 4)}

    (slack,) = receiver.at("/slack")
    assert list(slack["json"]) == ["text"]
    assert job_id in slack["json"]["text"] and "max_credits" in slack["json"]["text"]
    slack_headers = {key.lower() for key in slack["headers"]}
    assert "webhook-signature" not in slack_headers  # no secret configured
    assert "webhook-id" in slack_headers


async def test_a_failing_webhook_does_not_hold_up_the_cancel(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, receiver: HookReceiver
) -> None:
    fake = fake_server.fake
    # Already past its limit when first polled: warning and cancel are decided in one poll.
    job_id = fake.create_job(limit=1000, rate=100)
    wait_for_results(fake_server, job_id, 30)
    # retry_for shorter than the first backoff step: one attempt (answered 500 after 0.5 s),
    # then the delivery is failed.
    extra = '\n[notify]\nretry_for = "2s"\n' + hooks_config(
        receiver, 'url = "{url}/fail"\nevents = ["cancel_requested"]\ntimeout = "2s"'
    )
    config = make_config(tmp_path, fake_server, sqlite_url, policies=WARN_POLICY, extra=extra)
    failed_before = webhook_metric("failed")
    async with running_daemon(config) as daemon:
        await track(daemon, job_id)
        job = (await wait_terminal(daemon, job_id, timeout=15))[job_id]
        failed = await eventually(
            lambda: daemon.store.list_deliveries("failed"), timeout=15, what="the hook given up on"
        )
        assert webhook_metric("failed") == failed_before + 1

    assert (job.state, job.cancel_reason) == ("cancelled", "max_credits")
    assert fake.job_info(job_id)["cancel_calls"] == 1
    (row,) = failed
    assert (row["event"], row["last_error"], row["attempts"]) == ("cancel_requested", "HTTP 500", 1)
    attempts = receiver.at("/fail")
    assert len(attempts) == 1
    assert attempts[0]["headers"]["webhook-id"] == row["delivery_id"]


async def test_a_failing_webhook_does_not_hold_up_the_other_hooks(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, receiver: HookReceiver
) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(limit=1000, rate=100)
    wait_for_results(fake_server, job_id, 30)
    extra = hooks_config(
        receiver,
        'url = "{url}/fail"\nevents = ["cancel_requested"]\ntimeout = "2s"',
        'url = "{url}/hook"\nevents = ["cancel_requested", "cancelled"]',
    )
    config = make_config(tmp_path, fake_server, sqlite_url, policies=WARN_POLICY, extra=extra)
    failed_before = webhook_metric("failed")
    async with running_daemon(config) as daemon:
        await track(daemon, job_id)
        await wait_terminal(daemon, job_id, timeout=15)
        await eventually(lambda: "cancelled" in receiver.events("/hook"), timeout=15, what="the healthy hook")
        # The healthy hook heard of the confirmed cancel while the other still retries.
        assert webhook_metric("failed") == failed_before
        pending = await daemon.store.list_deliveries("pending")
        assert [row["event"] for row in pending] == ["cancel_requested"]  # the failing hook's, in flight or retried


# -- one path for every decision ---------------------------------------------------------------------


def cancel_metric(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(f"clado_supervisor_{name}", labels) or 0.0


async def test_policy_budget_and_manual_cancels_are_recorded_counted_and_announced_alike(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, receiver: HookReceiver
) -> None:
    fake = fake_server.fake
    by_policy = fake.create_job(limit=200, rate=10)
    by_budget = fake.create_job(limit=200, rate=10)
    by_person = fake.create_job(limit=200, queue_for=60)
    extra = DAILY_BUDGET + hooks_config(receiver, 'url = "{url}/hook"\nevents = ["cancel_requested"]')
    config = make_config(
        tmp_path, fake_server, sqlite_url, policies='[policies.default]\nmax_runtime = "30m"', extra=extra
    )
    reasons = {by_policy: "max_credits", by_budget: "budget:growth-daily", by_person: "manual"}
    before = {reason: cancel_metric("cancels_total", {"reason": reason}) for reason in reasons.values()}
    cancelling_before = cancel_metric("transitions_total", {"state": "cancelling"})
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs(
            [
                NewJob(by_policy, "default", {"team": "search"}, max_credits=20),
                NewJob(by_budget, "default", {"team": "growth"}),
                NewJob(by_person, "default", {"team": "search"}),
            ],
            utcnow(),
        )
        # What the admin API's POST /v1/jobs/{id}/cancel runs, with the daemon's own effects.
        ops = Operations(daemon.config, daemon.store, daemon.client, daemon.effects)
        await ops.cancel(by_person, note="wrong query")
        jobs = await wait_terminal(daemon, *reasons, timeout=20)
        events = {job_id: await daemon.store.events(job_id) for job_id in reasons}
        await eventually(lambda: len(receiver.at("/hook")) >= 3, what="three cancel_requested webhooks")
        # Counted from the committed events, within a tick, whoever decided.
        await eventually(
            lambda: cancel_metric("transitions_total", {"state": "cancelling"}) == cancelling_before + 3,
            what="the cancels counted",
        )

    for job_id, reason in reasons.items():
        assert (jobs[job_id].state, jobs[job_id].cancel_reason) == ("cancelled", reason)
        (decision,) = [e for e in events[job_id] if e["to_state"] == "cancelling"]
        assert decision["reason"] == reason
        assert decision["detail"]["config_hash"] == config.config_hash
        assert decision["detail"]["credits"] == jobs[job_id].credits_at_decision
        assert decision["detail"]["rule"] == {
            "max_credits": "policies.default.max_credits", "budget:growth-daily": "budgets.growth-daily",
            "manual": "manual",
        }[reason]  # fmt: skip
        assert cancel_metric("cancels_total", {"reason": reason}) == before[reason] + 1
    assert cancel_metric("transitions_total", {"state": "cancelling"}) == cancelling_before + 3
    hooks = {hook["json"]["job_id"]: hook["json"] for hook in receiver.at("/hook")}
    assert set(hooks) == set(reasons)  # each decision announced once, whoever made it
    for job_id, reason in reasons.items():
        assert (hooks[job_id]["event"], hooks[job_id]["reason"], hooks[job_id]["state"]) == (
            "cancel_requested", reason, "cancelling",
        )  # fmt: skip
        assert hooks[job_id]["policy"] == "default"
        assert hooks[job_id]["detail"]["rule"] == events[job_id][1]["detail"]["rule"]
