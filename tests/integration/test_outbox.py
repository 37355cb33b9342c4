"""The outbox in the database, on SQLite and PostgreSQL: a Change's webhook events are
committed with it (and a fenced-off write has none), one row per (event, hook) with its own
delivery id; budget crossings and submission announcements write theirs in their own
transaction; replicas claim disjoint rows; retention prunes delivered rows only."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from conftest import config_text, load
from supervisor.adapters import migrate
from supervisor.adapters.store import JobWrite, NewJob, Routes, Store, utcnow
from supervisor.adapters.tables import outbox
from supervisor.config import Config
from supervisor.core import transitions
from supervisor.core.notify import Notice
from supervisor.core.transitions import Change


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'supervisor.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate.upgrade(url)
    return url


def hooks(tmp_path: Path) -> Config:
    path = tmp_path / "supervisor.toml"
    path.write_text(
        config_text("http://127.0.0.1:9", "sqlite:///s.db")
        + '\n[[notify.webhooks]]\nurl = "https://a.example/h"\nevents = ["cancel_requested", "budget_warning"]\n'
        + '\n[[notify.webhooks]]\nurl = "https://b.example/h"\nevents = ["cancel_requested"]\n',
        encoding="utf-8",
    )
    return load(path)


async def test_a_change_and_its_outbox_rows_commit_together(db_url: str, tmp_path: Path) -> None:
    config = hooks(tmp_path)
    store = Store(db_url)
    store.routes = Routes.of(config)
    try:
        now = utcnow()
        await store.add_jobs([NewJob("j1", "default"), NewJob("j2", "default")], now)
        one, two = await store.get_job("j1"), await store.get_job("j2")
        assert one is not None and two is not None
        detail = transitions.decision_detail("manual", 0, config.config_hash)
        cancel = transitions.decide_cancel(Change.of(one), "manual", detail, now)
        stale = transitions.decide_cancel(Change.of(two), "manual", detail, now)
        await store.apply_each([JobWrite(transitions.decide_cancel(Change.of(two), "manual", detail, now), None)])
        # j2 moved on (cancelling): the second decision on it is fenced off, and sends nothing.
        assert await store.apply_each([JobWrite(cancel, None), JobWrite(stale, None)]) == [True, False]
        rows = await store.list_deliveries()
        mine = [row for row in rows if row["payload"]["job_id"] == "j1"]
        assert sorted(row["hook"] for row in mine) == sorted(hook.key for hook in config.notify.webhooks)
        assert {row["event"] for row in mine} == {"cancel_requested"}
        assert len({row["delivery_id"] for row in rows}) == len(rows) == 4  # j1 and j2, two hooks each
        assert mine[0]["payload"]["reason"] == "manual" and mine[0]["payload"]["config_hash"] == config.config_hash
    finally:
        await store.close()


async def test_budget_crossings_and_announcements_write_their_rows_with_their_record(
    db_url: str, tmp_path: Path
) -> None:
    config = hooks(tmp_path)
    store = Store(db_url)
    store.routes = Routes.of(config)
    try:
        now = utcnow()
        crossing = Notice("budget_warning", now, "budget:growth", {"budget": "growth", "fraction": 0.8})
        await store.save_budget_period("growth", "total", ["0.8"], None, now, [crossing])
        (row,) = await store.list_deliveries()
        assert (row["event"], row["hook"], row["subject"]) == (
            "budget_warning",
            config.notify.webhooks[0].key,
            "budget:growth",
        )
        assert (await store.budget_period("growth", "total"))["warned"] == ["0.8"]
    finally:
        await store.close()


async def test_replicas_claim_disjoint_rows(db_url: str, tmp_path: Path) -> None:
    config = hooks(tmp_path)
    key = config.notify.webhooks[1].key
    stores = [Store(db_url, owner=f"replica-{n}") for n in range(3)]
    try:
        now = utcnow()
        stores[0].routes = Routes.of(config)
        notices = [Notice("cancel_requested", now, f"job:j{n}", {"job_id": f"j{n}"}) for n in range(60)]
        await stores[0].record_notices(notices, now)
        claims = await asyncio.gather(
            *(store.claim_deliveries(key, now, limit=25, lease=timedelta(minutes=1)) for store in stores)
        )
        ids = [row["delivery_id"] for claim in claims for row in claim]
        assert len(ids) == len(set(ids))  # one owner per row at a time
        assert len(ids) <= 60
        rest = await stores[0].claim_deliveries(key, now, limit=100, lease=timedelta(minutes=1))
        assert len(ids) + len(rest) == 60
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_retention_prunes_delivered_rows_only(db_url: str, tmp_path: Path) -> None:
    config = hooks(tmp_path)
    store = Store(db_url)
    store.routes = Routes.of(config)
    try:
        now = utcnow()
        old = now - timedelta(days=40)
        await store.record_notices(
            [Notice("budget_warning", old, f"budget:b{n}", {"budget": f"b{n}"}) for n in range(3)], old
        )
        rows = await store.list_deliveries()
        states = dict(zip((row["delivery_id"] for row in rows), ("delivered", "failed", "pending"), strict=True))
        async with store.engine.begin() as conn:
            for delivery_id, state in states.items():
                await conn.execute(
                    update(outbox).where(outbox.c.delivery_id == delivery_id).values(state=state, updated_at=old)
                )
        assert await store.prune_deliveries(now - timedelta(days=30)) == 1
        assert {row["state"] for row in await store.list_deliveries()} == {"failed", "pending"}
    finally:
        await store.close()


async def test_two_owners_share_the_rows_and_a_stale_lease_is_taken_over(tmp_path: Path, db_url: str) -> None:
    """A replica killed while it holds deliveries: once their lease has run out, another
    takes them over, and the dead one's late record is fenced off."""
    config = hooks(tmp_path)
    key = config.notify.webhooks[0].key
    store = Store(db_url, owner="replica-a")
    other = Store(db_url, owner="replica-b")
    try:
        store.routes = other.routes = Routes.of(config)
        now = utcnow()
        await store.record_notices(
            [Notice("cancel_requested", now, f"job:j{n}", {"job_id": f"j{n}"}) for n in range(10)], now
        )
        lease = timedelta(seconds=60)
        mine = await store.claim_deliveries(key, now, limit=6, lease=lease)
        theirs = await other.claim_deliveries(key, now, limit=6, lease=lease)
        assert len(mine) == 6 and len(theirs) == 4
        assert not {r["delivery_id"] for r in mine} & {r["delivery_id"] for r in theirs}
        assert await other.claim_deliveries(key, now, limit=6, lease=lease) == []
        # Owner one dies holding its six: once the lease has run out, the other takes them.
        now += timedelta(seconds=61)
        taken = await other.claim_deliveries(key, now, limit=10, lease=lease)
        assert {r["delivery_id"] for r in taken} == {r["delivery_id"] for r in mine} | {
            r["delivery_id"] for r in theirs
        }
        # The dead owner's late record is fenced off: the row keeps its new owner's lease.
        outcome = {"delivery_id": mine[0]["delivery_id"], "at": now, "status": 204, "error": None,
                   "duration_ms": 1, "state": "delivered", "attempts": 1, "next_attempt_at": now}  # fmt: skip
        assert await store.finish_deliveries([outcome]) == 0
        assert await other.finish_deliveries([outcome]) == 1
    finally:
        await other.close()
        await store.close()
