"""The scheduler end to end: submissions that wait their turn and are started by the daemon,
paced under the API's initiate limit, behind budgets until their next period, by several
replicas at once; and initiates whose outcome is unknown, recorded as orphans.

The daemon, its API client and the simulator share one manual clock: the rate window and
the budget periods move only when a test moves it, so "none faster than the limit" is read
off the simulator's own request log, not off wall time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_policy_engine import HookReceiver

from conftest import API_KEY, config_text, eventually, load
from fakeserver import FakeServer, ManualClock
from supervisor.adapters import migrate
from supervisor.adapters.clado import ApiUnavailable, CladoClient
from supervisor.adapters.store import Store
from supervisor.app.operations import Operations
from supervisor.app.report import build_report
from supervisor.app.views import QueueItemView, SubmitResult
from supervisor.config import Config
from supervisor.core.budgets import AdmissionRefused
from supervisor.service.runtime import Daemon
from supervisor.sim.fake import FakeClado

MINUTE = 60.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp())


@pytest.fixture
def sim(clock: ManualClock) -> Iterator[FakeServer]:
    with FakeServer(FakeClado(clock=clock)) as server:
        yield server


def make_config(tmp_path: Path, server: FakeServer, db_url: str, *, api: str = "", extra: str = "") -> Config:
    text = config_text(server.base_url, db_url, extra=extra)
    # The test's [api] keys go into config_text's own [api] table.
    text = text.replace("max_retries = 2\n", f"max_retries = 2\n{api}\n", 1)
    path = tmp_path / f"supervisor-{len(list(tmp_path.iterdir()))}.toml"
    path.write_text(text)
    return load(path)


def datetime_of(clock: ManualClock) -> datetime:
    return datetime.fromtimestamp(clock.now, UTC)


def clocked_client(config: Config, clock: ManualClock) -> CladoClient:
    """A client whose hold-offs pass on the manual clock: waiting out a 429 moves time on."""

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    return CladoClient(
        config.api.base_url, API_KEY, timeout=2.0, max_retries=0,
        initiate_wait=config.api.initiate_wait.total_seconds(), transport=config.api.transport,
        clock=clock, sleep=sleep,
    )  # fmt: skip


@asynccontextmanager
async def clocked_daemon(config: Config, clock: ManualClock) -> AsyncIterator[Daemon]:
    await asyncio.to_thread(migrate.upgrade, config.database.url)
    store = Store(config.database.url)
    client = clocked_client(config, clock)
    daemon = Daemon(config, store, client, clock=lambda: datetime_of(clock))
    daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
        await client.aclose()
        await store.close()


@asynccontextmanager
async def operations_on(config: Config, clock: ManualClock) -> AsyncIterator[Operations]:
    """What `submit` runs (a CLI process of its own: its own store and client)."""
    await asyncio.to_thread(migrate.upgrade, config.database.url)
    store = Store(config.database.url)
    client = clocked_client(config, clock)
    try:
        yield Operations(config, store, client, clock=lambda: datetime_of(clock))
    finally:
        await client.aclose()
        await store.close()


async def states(store: Store) -> dict[str, str]:
    return {row["id"]: row["state"] for row in await store.list_submissions()}


def initiates(server: FakeServer) -> list[dict[str, Any]]:
    return server.fake.requests("initiate")


def assert_paced(calls: list[dict[str, Any]], per_minute: int) -> None:
    """No sliding minute of the simulator's clock holds more than `per_minute` initiates."""
    times = sorted(call["at"] for call in calls)
    for index, at in enumerate(times):
        assert sum(1 for other in times[index:] if other < at + MINUTE) <= per_minute, times


# -- pacing ------------------------------------------------------------------------------------


async def test_twelve_queued_submissions_start_paced_under_five_a_minute(
    tmp_path: Path, sim: FakeServer, clock: ManualClock, sqlite_url: str
) -> None:
    sim.fake.set_limits(initiate_per_minute=5)
    config = make_config(tmp_path, sim, sqlite_url, api="initiate_per_minute = 5")
    async with operations_on(config, clock) as ops:
        results = [await ops.submit(f"engineers {n}", limit=10, labels={}, queue=True) for n in range(12)]
    # The first five fit the minute and started at once; the rest wait for a rate slot.
    assert [isinstance(r, SubmitResult) for r in results] == [True] * 5 + [False] * 7
    waiting = [r for r in results if isinstance(r, QueueItemView)]
    assert {(r.state, r.reason) for r in waiting} == {("queued", "initiate_rate")}
    assert all(r.expected_start == datetime_of(clock) + timedelta(minutes=1) for r in waiting)

    async with clocked_daemon(config, clock) as daemon:
        for started in (5, 10, 12):
            await eventually(lambda n=started: len(initiates(sim)) == n, what=f"{started} initiates", timeout=30)
            # Frozen time: not one more starts until the window moves on.
            await asyncio.sleep(0.5)
            assert len(initiates(sim)) == started
            clock.advance(MINUTE)
        final = await states(daemon.store)
        assert set(final.values()) == {"started"}
        jobs = await daemon.store.list_jobs()

    calls = initiates(sim)
    assert len(calls) == 12
    assert all(call["status"] == 200 for call in calls)
    assert_paced(calls, 5)
    assert len({call["job_id"] for call in calls}) == 12  # none twice
    assert sorted(job.job_id for job in jobs) == sorted(call["job_id"] for call in calls)
    assert sim.fake.stats()["rate_limited"] == 0


async def test_three_submits_through_an_initiate_limit_of_two_all_start(
    tmp_path: Path, sim: FakeServer, clock: ManualClock, sqlite_url: str
) -> None:
    """Without the queue: the third submit waits out the API's 429 (its retry_after, on
    the shared clock) and starts; exactly three jobs exist."""
    sim.fake.set_limits(initiate_per_minute=2)
    config = make_config(tmp_path, sim, sqlite_url)
    async with operations_on(config, clock) as ops:
        results = [await ops.submit("engineers", limit=5, labels={}) for _ in range(3)]
        jobs = await ops.store.list_jobs()
    assert all(isinstance(r, SubmitResult) for r in results)
    assert sim.fake.stats()["jobs"] == 3
    assert len(jobs) == 3
    assert [call["status"] for call in initiates(sim)] == [200, 200, 429, 200]


# -- budgets -----------------------------------------------------------------------------------

BUDGET = """
[budgets.growth-daily]
match = {{ team = "growth" }}
period = "day"
credits = {credits}
action = "block"
reserve = true
"""


async def test_a_team_over_its_budget_queues_and_starts_at_the_next_period(
    tmp_path: Path, sim: FakeServer, clock: ManualClock, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sim, sqlite_url, api="initiate_per_minute = 100", extra=BUDGET.format(credits=50))
    team = {"team": "growth"}
    async with operations_on(config, clock) as ops:
        first = await ops.submit("engineers", limit=40, labels=team, queue=True)
        assert isinstance(first, SubmitResult)
        assert first.limit == 40
        second = await ops.submit("engineers", limit=40, labels=team, queue=True)
        # Not clamped to the 10 left: it waits for its whole reservation.
        assert isinstance(second, QueueItemView)
        assert (second.state, second.reason) == ("queued", "budget:growth-daily")
        tomorrow = datetime(2026, 3, 3, tzinfo=UTC)
        assert second.expected_start == tomorrow
        # What could never fit is refused at once, with the numbers.
        with pytest.raises(AdmissionRefused, match="holds 50 credits a day"):
            await ops.submit("engineers", limit=60, labels=team, queue=True)

    async with clocked_daemon(config, clock) as daemon:
        await asyncio.sleep(1.5)  # a few drains in the same day: it keeps waiting
        assert (await daemon.store.get_submission(second.id) or {})["state"] == "queued"
        assert len(initiates(sim)) == 1
        clock.now = tomorrow.timestamp() + 1
        row = await eventually(
            lambda: _started(daemon.store, second.id), what="the queued submission to start", timeout=30
        )
        job = await daemon.store.get_job(row["job_id"])
    assert job is not None
    assert job.result_limit == 40
    assert job.submitted_at >= tomorrow
    assert len(initiates(sim)) == 2


async def _started(store: Store, submission_id: str) -> dict[str, Any] | None:
    row = await store.get_submission(submission_id)
    return row if row is not None and row["state"] == "started" else None


# -- orphans -----------------------------------------------------------------------------------


async def test_an_initiate_that_fails_after_sending_is_orphaned_at_once_and_announced_once(
    tmp_path: Path, sim: FakeServer, clock: ManualClock, sqlite_url: str
) -> None:
    hooks = HookReceiver()
    hooks.thread.start()
    hook = f'\n[[notify.webhooks]]\nurl = "{hooks.url("/hook")}"\nevents = ["orphaned", "queued", "expired"]\n'
    config = make_config(tmp_path, sim, sqlite_url, extra=BUDGET.format(credits=100) + hook)
    try:
        sim.fake.set_faults(drop_rate=1.0)  # the job is created, the answer never arrives
        async with operations_on(config, clock) as ops:
            with pytest.raises(ApiUnavailable):
                await ops.submit("engineers", limit=30, labels={"team": "growth"})
            [orphan] = await ops.queue(["orphaned"])
            sim.fake.set_faults(drop_rate=0.0)
            report = await build_report(ops.store, config, "day", datetime_of(clock))
            # Its reservation is kept: the budget counts the job it may have started.
            assert report["budgets"][0]["reserved"] == 30
        assert orphan.reason == "initiate_outcome_unknown"
        assert orphan.job_id is None
        assert [item["id"] for item in report["orphaned_submissions"]] == [orphan.id]
        assert sim.fake.stats()["jobs"] == 1
        assert len(initiates(sim)) == 1

        async with clocked_daemon(config, clock):
            await eventually(lambda: hooks.events("/hook") == ["orphaned"], what="the orphaned webhook")
            await asyncio.sleep(2.5)  # further sweeps announce nothing more
        assert hooks.events("/hook") == ["orphaned"]
        assert hooks.at("/hook")[0]["json"]["submission_id"] == orphan.id
        assert len(initiates(sim)) == 1  # never sent again
    finally:
        hooks.server.shutdown()


async def test_queue_cancel_and_expiry(tmp_path: Path, sim: FakeServer, clock: ManualClock, sqlite_url: str) -> None:
    config = make_config(tmp_path, sim, sqlite_url, extra=BUDGET.format(credits=50))
    team = {"team": "growth"}
    async with operations_on(config, clock) as ops:
        await ops.submit("engineers", limit=50, labels=team)
        kept = await ops.submit("engineers", limit=10, labels=team, queue=True, expires_after="1h")
        dropped = await ops.submit("engineers", limit=10, labels=team, queue=True, priority=5)
        assert isinstance(kept, QueueItemView)
        assert isinstance(dropped, QueueItemView)
        assert [item.id for item in await ops.queue(["queued"])] == [dropped.id, kept.id]  # priority first
        assert (await ops.cancel_queued(dropped.id)).state == "cancelled"
    async with clocked_daemon(config, clock) as daemon:
        clock.advance(3601)
        await eventually(lambda: _in_state(daemon.store, kept.id, "expired"), what="the expiry")
    assert len(initiates(sim)) == 1


async def _in_state(store: Store, submission_id: str, state: str) -> bool:
    row = await store.get_submission(submission_id)
    return row is not None and row["state"] == state


# -- replicas ------------------------------------------------------------------------------------


async def test_two_replicas_on_postgresql_start_each_submission_once_within_the_budget(
    tmp_path: Path, sim: FakeServer, clock: ManualClock, pg_url: str
) -> None:
    config = make_config(tmp_path, sim, pg_url, api="initiate_per_minute = 1000", extra=BUDGET.format(credits=100))
    team = {"team": "growth"}
    async with operations_on(config, clock) as ops:
        # Hold the budget whole while the queue fills, then let it go.
        blocker = await ops.submit("engineers", limit=100, labels=team)
        assert isinstance(blocker, SubmitResult)
        queued = [
            await ops.submit(f"engineers {n}", limit=20, labels=team, queue=True, expires_after="2d") for n in range(8)
        ]
        assert all(isinstance(item, QueueItemView) for item in queued)
    async with clocked_daemon(config, clock) as one, clocked_daemon(config, clock) as two:
        assert one.store.owner != two.store.owner
        clock.advance(86400)  # the next day: the blocker's reservation counts in yesterday
        await eventually(
            lambda: _count(one.store, "started", 6), what="five submissions started (and the blocker)", timeout=30
        )
        await asyncio.sleep(2)  # more drains on both replicas: nothing else fits
        final = await states(one.store)
        report = await build_report(one.store, config, "day", datetime_of(clock))
    assert sorted(final.values()).count("started") == 6
    assert sorted(final.values()).count("queued") == 3
    calls = initiates(sim)
    assert len(calls) == 6
    assert len({call["job_id"] for call in calls}) == 6
    assert report["budgets"][0]["spent"] + report["budgets"][0]["reserved"] <= 100


async def _count(store: Store, state: str, n: int) -> bool:
    return list((await states(store)).values()).count(state) == n
