"""Every SQL statement the supervisor runs.

Jobs are claimed in batches under a lease (owner, token, expiry); every later write of a
claimed job is conditioned on its token, so a write from a claimer that lost its lease is
dropped and logged, never applied (fencing). Writes are applied in batches: one
transaction, one statement per shape of update, one insert for all events.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import bindparam, event, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .lifecycle import ACTIVE, State
from .models import job_events, jobs

log = structlog.get_logger("supervisor.store")

Job = Mapping[str, Any]


def utcnow() -> datetime:
    return datetime.now(UTC)


def async_url(url: str) -> str:
    """The async driver for a configured URL: aiosqlite for SQLite, psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """The blocking driver for the same database, for Alembic."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def configure_sqlite(engine: Any) -> None:
    """WAL (readers never block the writer), a busy timeout for the CLI writing beside the
    daemon, and BEGIN IMMEDIATE so a write transaction takes the lock up front instead
    of failing halfway with SQLITE_BUSY."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@dataclass
class NewJob:
    job_id: str
    policy: str
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "track"
    max_runtime_s: float | None = None
    max_credits: int | None = None
    query: str | None = None
    result_limit: int | None = None


@dataclass
class JobWrite:
    """One job's update and the events that explain it, applied only under its lease."""

    job_id: str
    lease_token: str | None  # None: the writer holds no lease (CLI on an idle job)
    values: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    release: bool = True  # give the lease up with this write


def event_row(
    kind: str,
    at: datetime,
    *,
    from_state: str | None = None,
    to_state: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "at": at,
        "from_state": from_state,
        "to_state": to_state,
        "reason": reason,
        "detail": detail,
    }


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Store:
    def __init__(self, url: str, *, owner: str | None = None, pool_size: int = 5) -> None:
        self.url = url
        self.owner = owner or default_owner()
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        options: dict[str, Any] = {}
        if not self.is_sqlite:
            options = {"pool_size": pool_size, "max_overflow": pool_size, "pool_pre_ping": True}
        self.engine: AsyncEngine = create_async_engine(async_url(url), **options)
        if self.is_sqlite:
            configure_sqlite(self.engine.sync_engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # -- jobs in ------------------------------------------------------------------------

    async def add_jobs(self, new_jobs: Sequence[NewJob], now: datetime) -> tuple[list[str], list[str]]:
        """Insert jobs not tracked yet. Returns (added ids, ids that were already tracked)."""
        ids = [job.job_id for job in new_jobs]
        async with self.engine.begin() as conn:
            existing: set[str] = set()
            for chunk in _chunks(ids, 500):
                rows = await conn.execute(select(jobs.c.job_id).where(jobs.c.job_id.in_(chunk)))
                existing.update(row.job_id for row in rows)
            fresh = [job for job in _unique(new_jobs) if job.job_id not in existing]
            if fresh:
                await conn.execute(
                    insert(jobs),
                    [
                        {
                            "job_id": job.job_id,
                            "state": State.WATCHING.value,
                            "labels": job.labels,
                            "policy": job.policy,
                            "source": job.source,
                            "max_runtime_s": job.max_runtime_s,
                            "max_credits": job.max_credits,
                            "query": job.query,
                            "result_limit": job.result_limit,
                            "credits_used": 0,
                            "submitted_at": now,
                            "next_check_at": now,
                            "poll_errors": 0,
                            "warned": [],
                            "cancel_attempts": 0,
                            "updated_at": now,
                        }
                        for job in fresh
                    ],
                )
                await conn.execute(
                    insert(job_events),
                    [
                        {"job_id": job.job_id, **event_row(
                            "tracked", now, to_state=State.WATCHING.value,
                            detail={"source": job.source, "policy": job.policy, "labels": job.labels},
                        )}
                        for job in fresh
                    ],
                )
        added = [job.job_id for job in fresh]
        return added, [job_id for job_id in dict.fromkeys(ids) if job_id in existing]

    # -- claims and fenced writes --------------------------------------------------------

    async def claim_due(
        self,
        now: datetime,
        *,
        horizon: timedelta,
        limit: int,
        lease_ttl: timedelta,
        job_id: str | None = None,
    ) -> list[Job]:
        """Lease up to `limit` active jobs due before now + horizon, soonest first."""
        query = (
            select(jobs)
            .where(jobs.c.state.in_([s.value for s in ACTIVE]))
            .where(jobs.c.next_check_at <= now + horizon)
            .where((jobs.c.lease_token.is_(None)) | (jobs.c.lease_expires_at <= now))
            .order_by(jobs.c.next_check_at)
            .limit(limit)
        )
        if job_id is not None:
            query = query.where(jobs.c.job_id == job_id)
        if not self.is_sqlite:
            # Several replicas: each row goes to exactly one claimer.
            query = query.with_for_update(skip_locked=True)
        token = str(uuid.uuid4())
        lease = {"lease_owner": self.owner, "lease_token": token, "lease_expires_at": now + lease_ttl}
        async with self.engine.begin() as conn:
            rows = [dict(row._mapping) for row in await conn.execute(query)]
            if rows:
                await conn.execute(
                    update(jobs).where(jobs.c.job_id.in_([row["job_id"] for row in rows])).values(**lease)
                )
        for row in rows:
            row.update(lease)
        return rows

    async def apply(self, writes: Sequence[JobWrite]) -> set[str]:
        """Apply the writes whose lease still holds; return the ids that were applied."""
        if not writes:
            return set()
        async with self.engine.begin() as conn:
            valid = await self._holding_lease(conn, writes)
            applied = [write for write in writes if write.job_id in valid]
            for write in writes:
                if write.job_id not in valid:
                    log.warning("lease lost; write dropped", job_id=write.job_id)
            await self._update_many(conn, applied)
            events = [
                {"job_id": write.job_id, **row} for write in applied for row in write.events
            ]
            if events:
                await conn.execute(insert(job_events), events)
        return {write.job_id for write in applied}

    async def _holding_lease(self, conn: AsyncConnection, writes: Sequence[JobWrite]) -> set[str]:
        leased = {write.job_id: write.lease_token for write in writes if write.lease_token}
        valid = {write.job_id for write in writes if not write.lease_token}
        for chunk in _chunks(list(leased), 500):
            query = select(jobs.c.job_id, jobs.c.lease_token).where(jobs.c.job_id.in_(chunk))
            if not self.is_sqlite:
                query = query.with_for_update()
            for row in await conn.execute(query):
                if row.lease_token == leased[row.job_id]:
                    valid.add(row.job_id)
        return valid

    async def _update_many(self, conn: AsyncConnection, writes: Iterable[JobWrite]) -> None:
        # executemany needs one parameter shape, so group the writes by the columns they set.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for write in writes:
            values = dict(write.values)
            if write.release:
                values.update(lease_owner=None, lease_token=None, lease_expires_at=None)
            groups[tuple(sorted(values))].append({"b_job_id": write.job_id, **values})
        for columns, params in groups.items():
            statement = (
                update(jobs)
                .where(jobs.c.job_id == bindparam("b_job_id"))
                .values({column: bindparam(column) for column in columns})
            )
            await conn.execute(statement, params)

    async def release(self, leases: Mapping[str, str]) -> None:
        """Give leases back without changing the jobs (shutdown before handling them)."""
        if not leases:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                update(jobs)
                .where(jobs.c.job_id == bindparam("b_job_id"))
                .where(jobs.c.lease_token == bindparam("b_token"))
                .values(lease_owner=None, lease_token=None, lease_expires_at=None),
                [{"b_job_id": job_id, "b_token": token} for job_id, token in leases.items()],
            )

    # -- manual actions ------------------------------------------------------------------

    async def request_cancel(self, job_id: str, reason: str, detail: dict[str, Any], now: datetime) -> Job | None:
        """Commit a manual cancel decision for a watching job.

        Clearing the lease fences off a poll the daemon may have in flight, so its stale
        "still watching" write is dropped instead of undoing the decision.
        Returns the job as it is after the attempt, or None if it is not tracked.
        """
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.job_id == job_id))).first()
            if row is None:
                return None
            job = dict(row._mapping)
            if job["state"] != State.WATCHING.value:
                return job
            values = {
                "state": State.CANCELLING.value,
                "cancel_reason": reason,
                "cancel_detail": detail,
                "cancel_requested_at": now,
                "credits_at_decision": job["credits_used"],
                "next_check_at": now,
                "lease_owner": None,
                "lease_token": None,
                "lease_expires_at": None,
                "updated_at": now,
            }
            await conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(**values))
            await conn.execute(
                insert(job_events),
                {"job_id": job_id, **event_row(
                    "transition", now, from_state=State.WATCHING.value,
                    to_state=State.CANCELLING.value, reason=reason, detail=detail,
                )},
            )
            job.update(values)
            return job

    # -- reads ---------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.job_id == job_id))).first()
            return None if row is None else dict(row._mapping)

    async def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.submitted_at, jobs.c.job_id)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        query = select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def count_by_state(self) -> dict[str, int]:
        query = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        async with self.engine.connect() as conn:
            return {state: count for state, count in await conn.execute(query)}

    async def next_due_at(self) -> datetime | None:
        query = select(func.min(jobs.c.next_check_at)).where(jobs.c.state.in_([s.value for s in ACTIVE]))
        async with self.engine.connect() as conn:
            value = (await conn.execute(query)).scalar()
        if value is not None and value.tzinfo is None:  # aggregates bypass the column type
            value = value.replace(tzinfo=UTC)
        return value


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unique(new_jobs: Sequence[NewJob]) -> list[NewJob]:
    seen: dict[str, NewJob] = {}
    for job in new_jobs:
        seen.setdefault(job.job_id, job)
    return list(seen.values())

