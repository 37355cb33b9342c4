"""Several replicas on one database: exclusive claims, fencing, database-clock leases,
leadership of the singleton chores, retention — on SQLite and on PostgreSQL.

The PostgreSQL cases need CLADO_SUPERVISOR_TEST_PG_URL (a server where the test may create
databases, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres); without it they
are skipped with that reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, insert, pool, select, text, update
from structlog.testing import capture_logs

from conftest import config_text, eventually, load, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters import migrate
from supervisor.adapters.store import JobWrite, NewJob, Store, sync_url, utcnow
from supervisor.adapters.store.budgets import serialize_admissions
from supervisor.adapters.tables import job_events, jobs, metadata
from supervisor.core import transitions
from supervisor.core.budgets import period_start
from supervisor.core.job import CHECK_ENFORCE, CHECK_PROBE, CHECK_ROUTINE
from supervisor.core.transitions import Change, Event


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'supervisor.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate.upgrade(url)
    return url


@pytest.fixture
def pg_db(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


async def _stores(url: str, count: int) -> list[Store]:
    return [Store(url, owner=f"replica-{i}:{1000 + i}:test") for i in range(count)]


async def _close(stores: list[Store]) -> None:
    await asyncio.gather(*(store.close() for store in stores))


# -- the schema ---------------------------------------------------------------------------


def test_migrations_match_the_models(db_url: str) -> None:
    """Alembic's head is exactly models.py, on both backends (no drift to fix by hand)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(sync_url(db_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


# -- claims -------------------------------------------------------------------------------


async def test_racing_claimers_claim_each_job_exactly_once(db_url: str) -> None:
    """8 replicas race claim_due over 1000 due jobs: every job goes to exactly one."""
    stores = await _stores(db_url, 8)
    try:
        now = utcnow()
        await stores[0].add_jobs([NewJob(f"job-{i:04d}", "default") for i in range(1000)], now)
        claims: list[tuple[str, str, str]] = []  # (job_id, owner, token)
        rounds = Counter[str]()

        async def claimer(store: Store) -> None:
            while True:
                got = await store.claim_due(
                    utcnow(), horizon=timedelta(seconds=1), limit=37, lease_ttl=timedelta(minutes=5)
                )
                if not got:
                    return
                rounds[store.owner] += 1
                claims.extend((job.job_id, job.lease_owner, job.lease_token) for job in got)
                await asyncio.sleep(0)

        await asyncio.gather(*(claimer(store) for store in stores))

        ids = [job_id for job_id, _, _ in claims]
        assert len(ids) == 1000
        assert len(set(ids)) == 1000, "a job was claimed twice"
        if not stores[0].is_sqlite:
            # Real concurrency, not one claimer taking everything in turn.
            assert len(rounds) >= 4, rounds
        # The database agrees with what each claimer believes it holds.
        rows = {job.job_id: job for job in await stores[0].list_jobs()}
        for job_id, owner, token in claims:
            assert (rows[job_id].lease_owner, rows[job_id].lease_token) == (owner, token)
        # And nobody can claim them again while the leases hold.
        assert (
            await stores[1].claim_due(
                utcnow(), horizon=timedelta(seconds=1), limit=1000, lease_ttl=timedelta(minutes=5)
            )
            == []
        )
    finally:
        await _close(stores)


async def test_a_backlog_is_claimed_deadlines_first_then_routine_polls_then_probes(db_url: str) -> None:
    """With more due than the claim takes, the enforcing checks go first (whatever their due
    time), then the routine polls, then the probes: a deadline is never queued behind them."""
    [store] = await _stores(db_url, 1)
    try:
        now = utcnow()
        kinds = {"probe": CHECK_PROBE, "routine": CHECK_ROUTINE, "deadline": CHECK_ENFORCE}
        await store.add_jobs([NewJob(f"{kind}-{i}", "default") for kind in kinds for i in range(3)], now)
        async with store.engine.begin() as conn:
            # The probes are the most overdue, the deadlines the least.
            for rank, (kind, priority) in enumerate(kinds.items()):
                for i in range(3):
                    await conn.execute(
                        update(jobs)
                        .where(jobs.c.job_id == f"{kind}-{i}")
                        .values(check_priority=priority, next_check_at=now - timedelta(seconds=30 - 10 * rank + i))
                    )
        lease = timedelta(minutes=5)
        # A replica at its limit still takes the enforcing checks, and only those.
        urgent = await store.claim_due(
            now, horizon=timedelta(0), limit=2, lease_ttl=lease, priority_at_most=CHECK_ENFORCE
        )
        assert [job.job_id for job in urgent] == ["deadline-2", "deadline-1"]
        first = await store.claim_due(now, horizon=timedelta(0), limit=3, lease_ttl=lease)
        rest = await store.claim_due(now, horizon=timedelta(0), limit=10, lease_ttl=lease)
        # Within a kind, the most overdue first.
        assert [job.job_id for job in first] == ["deadline-0", "routine-2", "routine-1"]
        assert [job.job_id for job in rest] == ["routine-0", "probe-2", "probe-1", "probe-0"]
    finally:
        await _close([store])


async def test_a_stale_replica_cannot_write_after_its_lease_was_taken(db_url: str) -> None:
    old, new = await _stores(db_url, 2)
    try:
        now = utcnow()
        await old.add_jobs([NewJob("job-1", "default")], now)
        [mine] = await old.claim_due(now, horizon=timedelta(0), limit=10, lease_ttl=timedelta(seconds=30))
        # The old replica stalls past its lease (here: its lease is made to have expired).
        async with old.engine.begin() as conn:
            await conn.execute(
                update(jobs).where(jobs.c.job_id == "job-1").values(lease_expires_at=now - timedelta(hours=1))
            )
        [theirs] = await new.claim_due(utcnow(), horizon=timedelta(0), limit=10, lease_ttl=timedelta(seconds=30))
        assert theirs.lease_token != mine.lease_token
        before = await old.get_job("job-1")
        events_before = await old.events("job-1")

        decided = transitions.decide_cancel(
            Change.of(mine).set({"credits_used": 999}),
            "max_credits",
            {"rule": "policies.default.max_credits"},
            utcnow(),
        )
        stale = JobWrite(decided, mine.lease_token)
        with capture_logs() as logs:
            applied = await old.apply([stale])
        assert applied == set()
        assert await old.get_job("job-1") == before  # the row is unchanged, lease and all
        assert await old.events("job-1") == events_before  # and no event was added
        assert any(entry["event"] == "lease lost; write dropped" and entry["job_id"] == "job-1" for entry in logs)

        # The holder's write goes through, and a mixed batch applies only the valid part.
        await new.add_jobs([NewJob("job-2", "default")], now)
        [other] = await new.claim_due(utcnow(), horizon=timedelta(0), limit=10, lease_ttl=timedelta(seconds=30))
        fresh = JobWrite(Change.of(theirs).set({"credits_used": 5, "updated_at": utcnow()}), theirs.lease_token)
        also = JobWrite(Change.of(other).set({"credits_used": 7, "updated_at": utcnow()}), other.lease_token)
        assert await new.apply_each([stale, fresh, also]) == [False, True, True]
        after = await new.get_job("job-1")
        assert (after.state, after.credits_used, after.lease_token) == ("watching", 5, None)
    finally:
        await _close([old, new])


async def test_leases_are_reckoned_in_the_database_clock(pg_db: str) -> None:
    """A replica whose clock runs an hour fast must not take leases that still hold, and
    the leases it takes expire by the database's clock, not its own."""
    honest, fast = await _stores(pg_db, 2)
    try:
        now = utcnow()
        await honest.add_jobs([NewJob(f"job-{i}", "default") for i in range(4)], now)
        held = await honest.claim_due(now, horizon=timedelta(0), limit=2, lease_ttl=timedelta(seconds=30))
        assert len(held) == 2
        skewed = now + timedelta(hours=1)
        taken = await fast.claim_due(skewed, horizon=timedelta(0), limit=10, lease_ttl=timedelta(seconds=30))
        # Only the two free jobs: with its own clock it would have taken all four.
        assert sorted(job.job_id for job in taken) == sorted({f"job-{i}" for i in range(4)} - {j.job_id for j in held})
        async with honest.engine.connect() as conn:
            db_now = (await conn.execute(select(func.now()))).scalar_one()
        for job in taken:
            expires = (await fast.get_job(job.job_id)).lease_expires_at
            assert expires == job.lease_expires_at
            assert abs((expires - db_now) - timedelta(seconds=30)) < timedelta(seconds=5)
    finally:
        await _close([honest, fast])


# -- leadership ---------------------------------------------------------------------------


async def test_leadership_is_exclusive_renewable_expires_and_is_given_up(db_url: str) -> None:
    a, b = await _stores(db_url, 2)
    ttl = timedelta(seconds=30)
    try:
        assert await a.acquire_leader("chores", ttl, utcnow()) is not None
        assert await b.acquire_leader("chores", ttl, utcnow()) is None  # held by a
        first = await a.leader("chores")
        assert await a.acquire_leader("chores", ttl, utcnow()) is not None  # renewal
        renewed = await a.leader("chores")
        assert renewed["owner"] == a.owner
        assert renewed["acquired_at"] == first["acquired_at"]
        assert renewed["expires_at"] >= first["expires_at"]

        # a dies: its row expires, b takes over; a, back, cannot renew b's row.
        async with a.engine.begin() as conn:
            from supervisor.adapters.tables import leaders

            await conn.execute(update(leaders).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert await b.acquire_leader("chores", ttl, utcnow()) is not None
        assert (await b.leader("chores"))["owner"] == b.owner
        assert await a.acquire_leader("chores", ttl, utcnow()) is None
        assert await a.release_leader("chores") is False  # not a's to give up

        # b shuts down: the row goes, a takes over at once.
        assert await b.release_leader("chores") is True
        assert await b.leader("chores") is None
        assert await a.acquire_leader("chores", ttl, utcnow()) is not None
    finally:
        await _close([a, b])


async def test_concurrent_elections_elect_one_leader(db_url: str) -> None:
    stores = await _stores(db_url, 6)
    try:
        results = await asyncio.gather(
            *(store.acquire_leader("chores", timedelta(seconds=30), utcnow()) for store in stores)
        )
        winners = [store.owner for store, expires in zip(stores, results, strict=True) if expires is not None]
        assert len(winners) == 1
        assert (await stores[0].leader("chores"))["owner"] == winners[0]
    finally:
        await _close(stores)


async def test_only_one_daemon_runs_the_chores_and_another_takes_over(
    tmp_path: Path, fake_server: FakeServer, pg_db: str
) -> None:
    """Two daemons on one database: one leader; when it stops, the other becomes leader
    within leader_ttl / 3 (the row is given up on shutdown), and both say so in the log."""
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, pg_db, supervisor={"leader_ttl": '"3s"'}))
    config = load(path)
    with capture_logs() as logs:
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(running_daemon(config))
            second = await stack.enter_async_context(running_daemon(config))
            await eventually(lambda: first.is_leader or second.is_leader, timeout=10, what="a leader", every=0.05)
            await asyncio.sleep(2.5)  # a few renewals later: still exactly one
            assert first.is_leader != second.is_leader
            leader, standby = (first, second) if first.is_leader else (second, first)
            assert (await standby.store.leader("chores"))["owner"] == leader.store.owner
            await leader.stop()  # running_daemon's own stop at the end is then a no-op
            await eventually(lambda: standby.is_leader, timeout=3, what="the standby to lead", every=0.05)
            assert (await standby.store.leader("chores"))["owner"] == standby.store.owner
    events = [(entry["event"], entry.get("owner")) for entry in logs]
    assert events.count(("became leader", leader.store.owner)) == 1
    assert events.count(("became leader", standby.store.owner)) == 1
    assert ("gave up leadership", leader.store.owner) in events


# -- retention ----------------------------------------------------------------------------


async def test_retention_prunes_old_terminal_jobs_and_their_events_in_batches(db_url: str) -> None:
    store = Store(db_url)
    try:
        now = utcnow()
        old, recent = now - timedelta(days=40), now - timedelta(days=1)
        specs = (
            [(f"old-done-{i}", "completed", old) for i in range(12)]
            + [("old-cancelled", "cancelled", old), ("old-lost", "lost", old)]
            + [("old-but-active", "watching", old), ("old-confirming", "confirming", old)]
            + [("recent-done", "completed", recent)]
        )
        await store.add_jobs([NewJob(job_id, "default") for job_id, _, _ in specs], old)
        async with store.engine.begin() as conn:
            for job_id, state, updated in specs:
                await conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(state=state, updated_at=updated))
                await conn.execute(insert(job_events).values(job_id=job_id, **Event("poll_error", updated).row()))

        cutoff = now - timedelta(days=30)
        # Bounded: 5 per batch, 2 batches per call → 10 now, the other 4 on the next call.
        assert await store.prune(cutoff, batch=5, max_batches=2) == 10
        assert await store.prune(cutoff, batch=5, max_batches=2) == 4
        assert await store.prune(cutoff, batch=5, max_batches=2) == 0

        left = {job.job_id for job in await store.list_jobs()}
        assert left == {"old-but-active", "old-confirming", "recent-done"}
        async with store.engine.connect() as conn:
            orphans = (
                await conn.execute(
                    select(func.count()).select_from(job_events).where(job_events.c.job_id.not_in(sorted(left)))
                )
            ).scalar_one()
        assert orphans == 0
        for job_id in left:
            assert len(await store.events(job_id)) == 2  # tracked + the one added above
    finally:
        await store.close()


async def test_the_leader_runs_retention_keeping_budget_periods_whole(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    """Retention deletes terminal jobs older than [supervisor] retention, but never one in
    a budget's current period (it still counts against the budget); a `total` budget
    turns retention off."""
    now = utcnow()
    month_start = period_start("month", "UTC", now)
    assert month_start is not None
    specs = {
        "before-this-month": month_start - timedelta(days=1),
        "this-month-but-old": month_start + (now - month_start) / 4,
        "young": now,
    }
    migrate.upgrade(sqlite_url)
    store = Store(sqlite_url)
    try:
        await store.add_jobs([NewJob(job_id, "default") for job_id in specs], now)
        async with store.engine.begin() as conn:
            for job_id, updated in specs.items():
                await conn.execute(
                    update(jobs).where(jobs.c.job_id == job_id).values(state="completed", updated_at=updated)
                )
    finally:
        await store.close()
    retention = max(timedelta(minutes=1), (now - month_start) / 8)  # shorter than the old one's age
    budget = '[budgets.monthly]\nperiod = "{period}"\ncredits = 100000\n'
    path = tmp_path / "supervisor.toml"
    for period, expected in (("total", set(specs)), ("month", {"this-month-but-old", "young"})):
        path.write_text(
            config_text(
                fake_server.base_url,
                sqlite_url,
                supervisor={"retention": str(int(retention.total_seconds()))},
                extra=budget.format(period=period),
            )
        )
        async with running_daemon(load(path)) as daemon:
            await eventually(lambda: daemon.is_leader, timeout=10, what="leadership", every=0.05)
            await daemon.housekeeping.retention()
            assert {job.job_id for job in await daemon.store.list_jobs()} == expected, period

    # Without budgets, only retention counts.
    path.write_text(
        config_text(fake_server.base_url, sqlite_url, supervisor={"retention": str(int(retention.total_seconds()))})
    )
    async with running_daemon(load(path)) as daemon:
        await eventually(lambda: daemon.is_leader, timeout=10, what="leadership", every=0.05)
        await daemon.housekeeping.retention()
        assert {job.job_id for job in await daemon.store.list_jobs()} == {"young"}


# -- long handling keeps its lease -----------------------------------------------------------


async def test_extend_leases_keeps_only_leases_still_held(db_url: str) -> None:
    a, b = await _stores(db_url, 2)
    try:
        now = utcnow()
        await a.add_jobs([NewJob("kept", "default"), NewJob("lost", "default")], now)
        held = {
            job.job_id: job
            for job in await a.claim_due(now, horizon=timedelta(0), limit=10, lease_ttl=timedelta(seconds=30))
        }
        async with a.engine.begin() as conn:  # "lost" expires and b takes it
            await conn.execute(update(jobs).where(jobs.c.job_id == "lost").values(lease_expires_at=now - timedelta(1)))
        [taken] = await b.claim_due(utcnow(), horizon=timedelta(0), limit=10, lease_ttl=timedelta(seconds=30))
        assert taken.job_id == "lost"

        kept = await a.extend_leases(
            {job_id: job.lease_token for job_id, job in held.items()}, timedelta(minutes=10), utcnow()
        )
        assert kept == {"kept": held["kept"].lease_token}
        assert (await a.get_job("kept")).lease_expires_at > utcnow() + timedelta(minutes=9)
        lost = await a.get_job("lost")
        assert (lost.lease_token, lost.lease_expires_at) == (taken.lease_token, taken.lease_expires_at)
    finally:
        await _close([a, b])


async def test_slow_api_calls_keep_their_lease_and_cancel_once(
    tmp_path: Path, fake_server: FakeServer, db_url: str
) -> None:
    """Every API call takes 1.5 s, longer than the 1 s lease: the lease keeper extends the
    leases of jobs being handled, so nothing times out and each runaway is cancelled once."""
    fake = fake_server.fake
    fake.set_faults(slow_rate=1.0, slow_seconds=1.5)
    runaways = fake.create_jobs(3, limit=300, rate=20)
    good = fake.create_jobs(3, limit=10, rate=20)
    path = tmp_path / "supervisor.toml"
    path.write_text(
        config_text(
            fake_server.base_url,
            db_url,
            policies="[policies.default]\nmax_credits = 20",
            supervisor={"lease_ttl": '"1s"', "tick_interval": '"100ms"'},
        )
    )
    with capture_logs() as logs:
        async with running_daemon(load(path)) as daemon:
            await daemon.store.add_jobs([NewJob(j, "default") for j in runaways + good], utcnow())

            async def settled() -> bool:
                return all(job.state in ("cancelled", "completed") for job in await daemon.store.list_jobs())

            await wait_until(daemon, settled, timeout=30, what="every job settled")
            states = {job.job_id: job.state for job in await daemon.store.list_jobs()}
            # Handling is slow against the lease: the claim limit came down to its floor.
            assert daemon.dispatcher.claim_limit == load(path).api.max_concurrency
    assert {states[j] for j in runaways} == {"cancelled"}
    assert {states[j] for j in good} == {"completed"}
    assert [fake.job_info(j)["cancel_calls"] for j in runaways] == [1, 1, 1]
    assert not [e for e in logs if e["event"].startswith("job handling timed out")]


async def test_a_reservation_passes_to_its_job_only_under_the_admission_lock(pg_db: str) -> None:
    """An admitter reads jobs, then admissions, in two statements; on PostgreSQL (READ
    COMMITTED) a submit recording its job in between would be in neither, and the admitter
    would let the budget overfill (seen: 7 queued submissions started where 6 fit). So the
    move from admission to job waits for any admission in progress."""
    store = Store(pg_db)
    try:
        now = utcnow()
        growth = {"team": "growth"}
        admission = await store.admit(growth, now, lambda usage: 20, [None], timedelta(minutes=10))
        async with store.engine.connect() as admitter:
            await admitter.begin()
            await serialize_admissions(admitter)  # an admission in progress, between its reads
            move = asyncio.create_task(
                store.add_jobs([NewJob("g1", "default", growth, reserved_credits=20)], now, admission_id=admission)
            )

            async def blocked_or_done() -> bool:
                async with store.engine.connect() as probe:
                    waiting = await probe.scalar(
                        text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                    )
                return move.done() or bool(waiting)

            await eventually(blocked_or_done, what="the job's insert to wait for the lock (or finish)")
            assert not move.done(), "the reservation moved while an admission was reading usage"
            await admitter.rollback()
        await move
        usage = (await store.usage([None], now))[None]
        assert sum(u.spent + u.reserved for _, u in usage) == 20  # counted once: as the job's
    finally:
        await store.close()


# -- every store statement runs on both backends --------------------------------------------


async def test_budget_and_admission_statements_on_both_backends(db_url: str) -> None:
    """JSON label grouping (CAST(labels AS TEXT)), the advisory-locked admission, the
    aggregate cancel decisions and the budget bookkeeping, on SQLite and PostgreSQL."""
    store = Store(db_url)
    try:
        now = utcnow()
        start = now - timedelta(hours=1)
        growth, ads = {"team": "growth"}, {"team": "ads", "env": "prod"}
        await store.add_jobs(
            [
                NewJob("g1", "default", growth),
                NewJob("g2", "default", growth, reserved_credits=50),
                NewJob("a1", "default", ads),
            ],
            now,
        )
        async with store.engine.begin() as conn:
            await conn.execute(update(jobs).where(jobs.c.job_id == "g1").values(credits_used=30))
            await conn.execute(update(jobs).where(jobs.c.job_id == "g2").values(credits_used=10))
            await conn.execute(update(jobs).where(jobs.c.job_id == "a1").values(credits_used=7))

        def totals(rows: list[tuple[dict[str, str], object]]) -> dict[str, tuple[int, int]]:
            out: dict[str, tuple[int, int]] = {}
            for labels, usage in rows:
                spent, reserved = out.get(labels["team"], (0, 0))
                out[labels["team"]] = (spent + usage.spent, reserved + usage.reserved)  # type: ignore[attr-defined]
            return out

        assert totals((await store.usage([start], now))[start]) == {"growth": (40, 40), "ads": (7, 0)}

        seen: list[object] = []

        def reserve_25(usage: object) -> int:
            seen.append(usage)
            return 25

        admission = await store.admit(growth, now, reserve_25, [start], timedelta(minutes=10))
        assert admission is not None and len(seen) == 1
        assert totals((await store.usage([start], now))[start]) == {"growth": (40, 65), "ads": (7, 0)}
        await store.add_jobs([NewJob("g3", "default", growth, reserved_credits=25)], now, admission_id=admission)
        assert totals((await store.usage([start], now))[start]) == {"growth": (40, 65), "ads": (7, 0)}
        # Concurrent admissions are serialized (the advisory lock on PostgreSQL).
        results = await asyncio.gather(
            *(store.admit(growth, now, lambda usage: 1, [start], timedelta(minutes=10)) for _ in range(5))
        )
        assert len(set(results)) == 5

        watching = await store.watching_since(start)
        assert {job.job_id for job in watching} == {"g1", "g2", "g3", "a1"}
        by_id = {job.job_id: job for job in watching}

        def would(job_id: str) -> JobWrite:
            change = transitions.would_cancel(Change.of(by_id[job_id]), "budget:ads", {"spent": 7}, now)
            return JobWrite(change, lease_token=None, release=False)

        def decide(job_id: str) -> JobWrite:
            change = transitions.decide_cancel(Change.of(by_id[job_id]), "budget:growth", {"spent": 40}, now)
            return JobWrite(change, lease_token=None)

        assert await store.apply_each([would("a1")]) == [True]
        # Lease-less writes are fenced by the state their writer read: a decision made on a
        # job that has moved on meanwhile is dropped, so a job is never decided twice.
        assert await store.apply_each([decide("g1"), decide("g2")]) == [True, True]
        assert await store.apply_each([decide("g1")]) == [False]
        assert (await store.count_by_state()) == {"cancelling": 2, "watching": 2}
        assert await store.event_counts("transition", start) == {"budget:growth": 2}
        assert (await store.next_due_at()) is not None

        await store.save_budget_period("growth", "2026-01-01T00:00:00+00:00", ["0.8"], None, now)
        await store.save_budget_period("growth", "2026-01-01T00:00:00+00:00", ["0.8", "0.95"], now, now)
        period = await store.budget_period("growth", "2026-01-01T00:00:00+00:00")
        assert (period["warned"], period["exhausted_at"]) == (["0.8", "0.95"], now)
        assert [p["budget"] for p in await store.budget_periods_since(start)] == ["growth"]
    finally:
        await store.close()


async def test_the_claim_limit_grows_while_handling_is_fast(
    tmp_path: Path, fake_server: FakeServer, db_url: str
) -> None:
    """It starts at 4 x api.max_concurrency and doubles while claims come back full and
    handling is fast, so one replica is not held to 128 jobs a tick (a burst of 1,500 jobs
    that complete at their first poll)."""
    fake = fake_server.fake
    # Complete at the first poll: a burst big enough to outlast a few ticks of full claims
    # (450 was, before the client got three times faster).
    ids = fake.create_jobs(1500, limit=1, rate=100)
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, db_url, supervisor={"tick_interval": '"200ms"'}))
    config = load(path)
    async with running_daemon(config) as daemon:
        start = daemon.dispatcher.claim_limit
        assert start == 4 * config.api.max_concurrency
        limits = [start]

        async def watch_the_limit() -> None:
            # Apart from the completion check below: on SQLite a read waits behind the
            # writes of up to 1,000 handlers, and the limit can go up and come down again
            # (a busy machine slows the handling) within one such wait.
            while True:
                limits.append(daemon.dispatcher.claim_limit)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch_the_limit())
        try:
            await daemon.store.add_jobs([NewJob(j, "default") for j in ids], utcnow())

            async def all_completed() -> bool:
                return all(job.state == "completed" for job in await daemon.store.list_jobs())

            await wait_until(daemon, all_completed, timeout=30, what="every job completed")
        finally:
            watcher.cancel()
        assert max(limits) >= 4 * start, sorted(set(limits))
