"""Every SQL statement the supervisor runs.

Jobs are claimed in batches under a lease (owner, token, expiry); every later write of a
claimed job is conditioned on its token, so a write from a claimer that lost its lease is
dropped and logged, never applied (fencing). Writes are applied in batches: one
transaction, one statement per shape of update, one insert for all events.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import String, bindparam, case, cast, delete, event, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .lifecycle import ACTIVE, State
from .budgets import Usage
from .models import admissions, budget_periods, job_events, jobs

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
    reserved_credits: int | None = None


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

    async def add_jobs(
        self, new_jobs: Sequence[NewJob], now: datetime, *, admission_id: str | None = None
    ) -> tuple[list[str], list[str]]:
        """Insert jobs not tracked yet. Returns (added ids, ids that were already tracked).

        With `admission_id`, the admission's reservation passes to the job in the same
        transaction, so the budget never counts it twice or not at all."""
        ids = [job.job_id for job in new_jobs]
        async with self.engine.begin() as conn:
            if admission_id is not None:
                await conn.execute(delete(admissions).where(admissions.c.id == admission_id))
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
                            "reserved_credits": job.reserved_credits,
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

    # -- budgets and admission ------------------------------------------------------------

    async def usage(
        self, starts: Iterable[datetime | None], now: datetime, conn: AsyncConnection | None = None
    ) -> dict[datetime | None, list[tuple[dict[str, str], Usage]]]:
        """Usage grouped by label set, for jobs submitted since each period start."""
        if conn is None:
            async with self.engine.connect() as own:
                return await self.usage(starts, now, own)
        outstanding = case(
            (jobs.c.reserved_credits > jobs.c.credits_used, jobs.c.reserved_credits - jobs.c.credits_used),
            else_=0,
        )
        label_text = cast(jobs.c.labels, String)
        admission_labels = cast(admissions.c.labels, String)
        result: dict[datetime | None, list[tuple[dict[str, str], Usage]]] = {}
        for start in set(starts):
            spent = select(label_text, func.sum(jobs.c.credits_used), func.sum(outstanding)).group_by(label_text)
            pending = (
                select(admission_labels, func.sum(admissions.c.credits))
                .where(admissions.c.expires_at > now)
                .group_by(admission_labels)
            )
            if start is not None:
                spent = spent.where(jobs.c.submitted_at >= start)
                pending = pending.where(admissions.c.created_at >= start)
            rows = [(_labels(text_), Usage(int(s or 0), int(r or 0))) for text_, s, r in await conn.execute(spent)]
            rows += [(_labels(text_), Usage(0, int(c or 0))) for text_, c in await conn.execute(pending)]
            result[start] = rows
        return result

    async def admit(
        self,
        labels: dict[str, str],
        credits: int,
        now: datetime,
        check: Any,
        starts: Iterable[datetime | None],
        ttl: timedelta,
    ) -> str | None:
        """Serialized admission: compute usage, run `check(usage)` (which raises to refuse
        and returns whether to reserve), and record the admission — all in one transaction,
        so two submitters cannot both take the last of a budget."""
        async with self.engine.begin() as conn:
            if not self.is_sqlite:  # SQLite's BEGIN IMMEDIATE already serializes writers
                await conn.execute(text("SELECT pg_advisory_xact_lock(7346001)"))
            reserve = check(await self.usage(starts, now, conn))
            if not reserve:
                return None
            admission_id = str(uuid.uuid4())
            await conn.execute(
                insert(admissions).values(
                    id=admission_id, labels=labels, credits=credits, created_at=now, expires_at=now + ttl
                )
            )
            return admission_id

    async def drop_admission(self, admission_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(admissions).where(admissions.c.id == admission_id))

    async def watching_since(self, start: datetime | None) -> list[Job]:
        """Running jobs submitted since `start` (budget enforcement picks from these)."""
        query = select(
            jobs.c.job_id, jobs.c.labels, jobs.c.credits_used, jobs.c.would_cancel_reason, jobs.c.policy
        ).where(jobs.c.state == State.WATCHING.value)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def decide_cancel(
        self, job_ids: Sequence[str], reason: str, detail: dict[str, Any], now: datetime
    ) -> list[str]:
        """Commit cancel decisions for those of `job_ids` still watching; the tick sends
        them. Clearing their leases fences off polls in flight. Returns the ids decided."""
        decided: list[str] = []
        async with self.engine.begin() as conn:
            for chunk in _chunks(list(job_ids), 500):
                rows = await conn.execute(
                    select(jobs.c.job_id, jobs.c.credits_used)
                    .where(jobs.c.job_id.in_(chunk))
                    .where(jobs.c.state == State.WATCHING.value)
                )
                found = [(row.job_id, row.credits_used) for row in rows]
                if not found:
                    continue
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == bindparam("b_job_id"))
                    .where(jobs.c.state == State.WATCHING.value)
                    .values(
                        state=State.CANCELLING.value, cancel_reason=reason, cancel_detail=detail,
                        cancel_requested_at=now, credits_at_decision=bindparam("b_credits"),
                        next_check_at=now, lease_owner=None, lease_token=None, lease_expires_at=None,
                        updated_at=now,
                    ),
                    [{"b_job_id": job_id, "b_credits": credits} for job_id, credits in found],
                )
                await conn.execute(
                    insert(job_events),
                    [
                        {"job_id": job_id, **event_row(
                            "transition", now, from_state=State.WATCHING.value,
                            to_state=State.CANCELLING.value, reason=reason, detail=detail,
                        )}
                        for job_id, _ in found
                    ],
                )
                decided += [job_id for job_id, _ in found]
        return decided

    async def record_would_cancel(
        self, job_ids: Sequence[str], reason: str, detail: dict[str, Any], now: datetime
    ) -> list[str]:
        """Observe mode for aggregate rules: note "would cancel" once per job."""
        recorded: list[str] = []
        async with self.engine.begin() as conn:
            for chunk in _chunks(list(job_ids), 500):
                rows = await conn.execute(
                    select(jobs.c.job_id, jobs.c.credits_used)
                    .where(jobs.c.job_id.in_(chunk))
                    .where(jobs.c.would_cancel_reason.is_(None))
                )
                found = [(row.job_id, row.credits_used) for row in rows]
                if not found:
                    continue
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == bindparam("b_job_id"))
                    .values(
                        would_cancel_reason=reason, would_cancel_at=now,
                        would_cancel_credits=bindparam("b_credits"), updated_at=now,
                    ),
                    [{"b_job_id": job_id, "b_credits": credits} for job_id, credits in found],
                )
                await conn.execute(
                    insert(job_events),
                    [{"job_id": job_id, **event_row("would_cancel", now, reason=reason, detail=detail)}
                     for job_id, _ in found],
                )
                recorded += [job_id for job_id, _ in found]
        return recorded

    async def budget_period(self, budget: str, period_key: str) -> dict[str, Any]:
        query = select(budget_periods).where(
            (budget_periods.c.budget == budget) & (budget_periods.c.period_start == period_key)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return dict(row._mapping) if row else {"warned": [], "exhausted_at": None}

    async def save_budget_period(
        self, budget: str, period_key: str, warned: list[str], exhausted_at: datetime | None, now: datetime
    ) -> None:
        key = (budget_periods.c.budget == budget) & (budget_periods.c.period_start == period_key)
        values = {"warned": warned, "exhausted_at": exhausted_at, "updated_at": now}
        async with self.engine.begin() as conn:
            result = await conn.execute(update(budget_periods).where(key).values(**values))
            if result.rowcount == 0:
                await conn.execute(insert(budget_periods).values(budget=budget, period_start=period_key, **values))

    async def budget_periods_since(self, since: datetime) -> list[dict[str, Any]]:
        query = select(budget_periods).where(budget_periods.c.updated_at >= since)
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def jobs_submitted_since(self, start: datetime | None) -> list[Job]:
        """What the report needs of every job submitted in a period."""
        columns = [
            jobs.c.job_id, jobs.c.state, jobs.c.labels, jobs.c.policy, jobs.c.credits_used,
            jobs.c.cancel_reason, jobs.c.credits_at_decision, jobs.c.result_limit,
            jobs.c.reserved_credits, jobs.c.would_cancel_reason, jobs.c.would_cancel_credits,
        ]  # fmt: skip
        query = select(*columns)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def event_counts(self, kind: str, since: datetime | None) -> dict[str, int]:
        query = select(job_events.c.reason, func.count()).where(job_events.c.kind == kind).group_by(job_events.c.reason)
        if since is not None:
            query = query.where(job_events.c.at >= since)
        async with self.engine.connect() as conn:
            return {reason or "": count for reason, count in await conn.execute(query)}

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


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return value
    parsed = json.loads(value) if value else {}
    return parsed if isinstance(parsed, dict) else {}


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _unique(new_jobs: Sequence[NewJob]) -> list[NewJob]:
    seen: dict[str, NewJob] = {}
    for job in new_jobs:
        seen.setdefault(job.job_id, job)
    return list(seen.values())

