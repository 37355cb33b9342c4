"""Every SQL statement the supervisor runs.

Jobs are claimed in batches under a lease (owner, token, expiry); every later write of a
claimed job is conditioned on its token, so a write from a claimer that lost its lease is
dropped and logged, never applied (fencing). Writes are applied in batches: one
transaction, one statement per shape of update, one insert for all events.

Several replicas may share one PostgreSQL database. Claims use FOR UPDATE SKIP LOCKED, so
each due job goes to exactly one of them, and lease expiry is reckoned in the database's
clock (`now()`), so replicas whose clocks disagree still agree on who holds what. The same
goes for the leader row of the singleton chores. On SQLite (one host) the local clock is
the database clock.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from supervisor.adapters.tables import admissions, budget_periods, job_events, jobs, leaders, submissions
from supervisor.core.budgets import Usage
from supervisor.core.job import Job
from supervisor.core.states import ACTIVE, RECHECKED, TERMINAL, State
from supervisor.core.transitions import Change, Event

log = structlog.get_logger("supervisor.store")


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


def private_sqlite_file(url: str) -> None:
    """Create a SQLite database file readable by its owner only (0600), before SQLite would
    create it 0644: it holds job queries and labels. SQLite gives its -wal and -shm files
    the database file's mode. An existing file is left as it is."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database.startswith((":memory:", "file:")):
        return
    os.close(os.open(database, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))


SQLITE_CACHED_STATEMENTS = 32


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
    result_limit: int | None = None  # what the API was asked for
    requested_limit: int | None = None  # what the submitter asked for, when it was clamped lower
    reserved_credits: int | None = None


@dataclass(frozen=True)
class JobWrite:
    """A Change to apply, and how it is fenced.

    With a lease token (a claimer), the write applies only while the job still holds that
    token. Without one (a person's cancel, a budget's decision: writers that hold no
    lease), it applies only while the job is still in the state its writer read, and it
    clears any lease, so a poll in flight for the job is dropped instead of undoing it."""

    change: Change
    lease_token: str | None
    release: bool = True  # give the lease up with this write

    @property
    def job_id(self) -> str:
        return self.change.job_id


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or the connection broke (as
    opposed to a bug or a constraint): the caller logs it briefly and retries later."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OSError)


def db_error_text(exc: BaseException) -> str:
    """One short line for a log: the driver's message without SQLAlchemy's SQL and links."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0][:300] if message else type(exc).__name__


class Store:
    def __init__(self, url: str, *, owner: str | None = None, pool_size: int = 5) -> None:
        self.url = url
        self.owner = owner or default_owner()
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        options: dict[str, Any] = {}
        if not self.is_sqlite:
            options = {
                "pool_size": pool_size,
                "max_overflow": pool_size,
                # A connection the server dropped (restart, failover) is replaced at checkout.
                "pool_pre_ping": True,
                "pool_timeout": 10,
                "connect_args": {
                    # Fail fast while the server is down instead of hanging a tick.
                    "connect_timeout": 5,
                    # Notice a peer that vanished without a FIN (network partition).
                    "keepalives": 1,
                    "keepalives_idle": 10,
                    "keepalives_interval": 5,
                    "keepalives_count": 3,
                    # Which replica a session belongs to, in pg_stat_activity.
                    "application_name": f"clado-supervisor {self.owner}"[:63],
                },
            }
        if self.is_sqlite:
            private_sqlite_file(url)
            # sqlite3 keeps each connection's last 128 prepared statements (C memory that
            # tracemalloc does not see), and every length of an IN list is a statement of
            # its own: at 5,000 jobs, tens of KB each, they grew the daemon by ~7 MB/min.
            # The fixed statements of a tick fit in a smaller cache; the IN variants churn.
            options = {"connect_args": {"cached_statements": SQLITE_CACHED_STATEMENTS}}
        self.engine: AsyncEngine = create_async_engine(async_url(url), **options)
        if self.is_sqlite:
            configure_sqlite(self.engine.sync_engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                # Outside any transaction: every SQLite transaction here starts with BEGIN
                # IMMEDIATE (the write lock), and one cancelled mid-statement (a health check
                # timing out) would keep that lock for good.
                raw = await conn.get_raw_connection()
                cursor = await raw.driver_connection.execute("SELECT 1")  # type: ignore[union-attr]
                await cursor.close()
            else:
                await conn.execute(text("SELECT 1"))

    async def _db_now(self, conn: AsyncConnection, local_now: datetime) -> datetime:
        """The clock leases and leadership are reckoned in: the database's on PostgreSQL
        (the start of the current transaction), the caller's on SQLite (one host)."""
        if self.is_sqlite:
            return local_now
        value = (await conn.execute(select(func.now()))).scalar_one()
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    # -- jobs in ------------------------------------------------------------------------

    async def add_jobs(
        self,
        new_jobs: Sequence[NewJob],
        now: datetime,
        *,
        admission_id: str | None = None,
        submission_id: str | None = None,
    ) -> tuple[list[str], list[str]]:
        """Insert jobs not tracked yet. Returns (added ids, ids that were already tracked).

        With `admission_id`, the admission's reservation passes to the job in the same
        transaction, so the budget never counts it twice or not at all. With
        `submission_id`, that submission is `started` with the (one) job's id, in the same
        transaction too: a submission and its job are never both counted or both missing."""
        ids = [job.job_id for job in new_jobs]
        async with self.engine.begin() as conn:
            if admission_id is not None:
                await conn.execute(delete(admissions).where(admissions.c.id == admission_id))
            if submission_id is not None:
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id == submission_id)
                    .where(submissions.c.state.in_(["initiating", "orphaned"]))  # an orphan found its job
                    .values(state="started", job_id=ids[0], reason=None, updated_at=now)
                )
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
                        {
                            "job_id": job.job_id,
                            **Event(
                                "tracked",
                                now,
                                to_state=State.WATCHING,
                                detail=_tracked_detail(job),
                            ).row(),
                        }
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
        """Lease up to `limit` jobs due before now + horizon, soonest first: active jobs, then
        terminal jobs still re-checked (`recheck_until` set) with what room is left.

        Two queries, each on its own index: the active jobs' claim is what it always was,
        and the re-checked ones are found through a partial index that holds only them, so
        neither gets slower as finished jobs pile up.

        Due-ness uses `now` (the replica's clock, which also computed `next_check_at`); the
        lease (whether an old one has expired, when the new one does) uses the database's
        clock, so a replica whose clock runs ahead cannot take leases that still hold."""
        token = str(uuid.uuid4())
        async with self.engine.begin() as conn:
            lease_now = await self._db_now(conn, now)
            due = (
                (jobs.c.next_check_at <= now + horizon),
                (jobs.c.lease_token.is_(None)) | (jobs.c.lease_expires_at <= lease_now),
            )
            active = select(jobs).where(jobs.c.state.in_([s.value for s in ACTIVE]), *due)
            rechecked = select(jobs).where(
                jobs.c.recheck_until.is_not(None), jobs.c.state.in_([s.value for s in RECHECKED]), *due
            )
            claimed: list[Job] = []
            for query in (active, rechecked):
                room = limit - len(claimed)
                if room <= 0:
                    break
                query = query.order_by(jobs.c.next_check_at).limit(room)
                if job_id is not None:
                    query = query.where(jobs.c.job_id == job_id)
                if not self.is_sqlite:
                    # Several replicas: each row goes to exactly one claimer. A row another
                    # claimer leased meanwhile is re-checked against the WHERE after its lock
                    # (READ COMMITTED), so it is skipped rather than claimed twice.
                    query = query.with_for_update(skip_locked=True)
                claimed += [Job.from_row(row._mapping) for row in await conn.execute(query)]
            lease = {
                "lease_owner": self.owner,
                "lease_token": token,
                "lease_expires_at": lease_now + lease_ttl,
            }
            if claimed:
                await conn.execute(
                    update(jobs).where(jobs.c.job_id.in_([job.job_id for job in claimed])).values(**lease)
                )
        return [job.with_values(lease) for job in claimed]

    async def apply(self, writes: Sequence[JobWrite]) -> set[str]:
        """Apply the writes whose lease still holds; return the ids that were applied."""
        done = await self.apply_each(writes)
        return {write.job_id for write, ok in zip(writes, done, strict=True) if ok}

    async def apply_each(self, writes: Sequence[JobWrite]) -> list[bool]:
        """Apply, in one transaction, the writes whose fence still holds; for each write,
        whether it was applied. A leased write whose job holds another token now (its lease
        expired and another claimer took the job), or a lease-less write whose job has
        moved on from the state its writer read, is dropped and logged: fencing."""
        if not writes:
            return []
        async with self.engine.begin() as conn:
            current = await self._current(conn, writes)
            # Valid per write, not per job: a batch may hold a stale write (a handler that
            # outlived its lease) beside the new holder's write of the same job.
            done = [_fence_holds(write, current.get(write.job_id)) for write in writes]
            applied = [write for write, ok in zip(writes, done, strict=True) if ok]
            for write, ok in zip(writes, done, strict=True):
                if not ok and write.lease_token:
                    log.warning("lease lost; write dropped", job_id=write.job_id, owner=self.owner)
            await self._update_many(conn, applied)
            events = [{"job_id": write.job_id, **event.row()} for write in applied for event in write.change.events]
            if events:
                await conn.execute(insert(job_events), events)
        return done

    async def _current(self, conn: AsyncConnection, writes: Sequence[JobWrite]) -> dict[str, tuple[str | None, str]]:
        """(lease token, state) of each written job now, its row locked until commit (on
        PostgreSQL: a claimer skips it meanwhile, SKIP LOCKED)."""
        current: dict[str, tuple[str | None, str]] = {}
        for chunk in _chunks(sorted({write.job_id for write in writes}), 500):
            query = select(jobs.c.job_id, jobs.c.lease_token, jobs.c.state).where(jobs.c.job_id.in_(chunk))
            if not self.is_sqlite:
                query = query.with_for_update()
            for row in await conn.execute(query):
                current[row.job_id] = (row.lease_token, row.state)
        return current

    async def _update_many(self, conn: AsyncConnection, writes: Iterable[JobWrite]) -> None:
        # executemany needs one parameter shape, so group the writes by the columns they set.
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for write in writes:
            values = dict(write.change.values)
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

    async def extend_leases(self, leases: Mapping[str, str], ttl: timedelta, now: datetime) -> dict[str, str]:
        """Push on the expiry of leases still held (job id → token) to now + ttl, in the
        database's clock; returns those extended (a lease lost meanwhile is not)."""
        if not leases:
            return {}
        kept: dict[str, str] = {}
        async with self.engine.begin() as conn:
            lease_now = await self._db_now(conn, now)
            for chunk in _chunks(sorted(leases), 500):
                held = (
                    jobs.c.job_id.in_(chunk),
                    jobs.c.lease_token.in_(sorted({leases[job_id] for job_id in chunk})),
                )
                which: Any = and_(*held)
                if not self.is_sqlite:
                    # Rows the batch writer has locked are being written right now (their
                    # lease released, or kept for a cancel): skip them rather than wait; the
                    # next round extends those still held.
                    which = jobs.c.job_id.in_(select(jobs.c.job_id).where(*held).with_for_update(skip_locked=True))
                result = await conn.execute(
                    update(jobs)
                    .where(which)
                    .values(lease_expires_at=lease_now + ttl)
                    .returning(jobs.c.job_id, jobs.c.lease_token)
                )
                kept.update(
                    {row.job_id: row.lease_token for row in result if leases.get(row.job_id) == row.lease_token}
                )
        return kept

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

    # -- leadership for singleton chores --------------------------------------------------

    async def acquire_leader(self, name: str, ttl: timedelta, now: datetime) -> datetime | None:
        """Take or renew the leader row `name` for `ttl`. Returns its new expiry (database
        time) if this store's owner holds it now, None if another owner's row still holds.

        One statement: INSERT … ON CONFLICT DO UPDATE … WHERE expired OR mine, RETURNING.
        On PostgreSQL the expiry is computed from the database's clock."""
        async with self.engine.begin() as conn:
            db_now = await self._db_now(conn, now)
            dialect_insert = sqlite_insert if self.is_sqlite else pg_insert
            insert_row = dialect_insert(leaders).values(
                name=name, owner=self.owner, acquired_at=db_now, expires_at=db_now + ttl
            )
            statement = insert_row.on_conflict_do_update(
                index_elements=[leaders.c.name],
                set_={
                    "owner": insert_row.excluded.owner,
                    "expires_at": insert_row.excluded.expires_at,
                    # A renewal keeps the original acquisition time.
                    "acquired_at": case(
                        (leaders.c.owner == insert_row.excluded.owner, leaders.c.acquired_at),
                        else_=insert_row.excluded.acquired_at,
                    ),
                },
                where=(leaders.c.expires_at <= db_now) | (leaders.c.owner == self.owner),
            ).returning(leaders.c.owner, leaders.c.expires_at)
            row = (await conn.execute(statement)).first()
        if row is None or row.owner != self.owner:
            return None
        expires: datetime = row.expires_at
        return expires if expires.tzinfo is not None else expires.replace(tzinfo=UTC)

    async def release_leader(self, name: str) -> bool:
        """Give the leader row up (shutdown), so another replica takes over at once."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(leaders).where(leaders.c.name == name).where(leaders.c.owner == self.owner)
            )
        return bool(result.rowcount)

    async def leader(self, name: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(leaders).where(leaders.c.name == name))).first()
        return None if row is None else dict(row._mapping)

    # -- retention -----------------------------------------------------------------------

    async def prune(self, cutoff: datetime, *, batch: int = 500, max_batches: int = 4) -> int:
        """Delete terminal jobs last updated before `cutoff`, with their events, at most
        `batch` per transaction and `max_batches` transactions per call (short locks; the
        next run carries on). Returns the number of jobs deleted."""
        terminal = [state.value for state in TERMINAL]
        deleted = 0
        for _ in range(max_batches):
            async with self.engine.begin() as conn:
                query = (
                    select(jobs.c.job_id)
                    .where(jobs.c.state.in_(terminal))
                    .where(jobs.c.updated_at < cutoff)
                    .order_by(jobs.c.updated_at)
                    .limit(batch)
                )
                if not self.is_sqlite:
                    query = query.with_for_update(skip_locked=True)
                ids = [row.job_id for row in await conn.execute(query)]
                if not ids:
                    break
                # Events go explicitly (ON DELETE CASCADE would take them too, but SQLite
                # only honours it on connections with foreign_keys=ON).
                await conn.execute(delete(job_events).where(job_events.c.job_id.in_(ids)))
                result = await conn.execute(
                    delete(jobs).where(jobs.c.job_id.in_(ids)).where(jobs.c.state.in_(terminal))
                )
                deleted += result.rowcount
            if len(ids) < batch:
                break
        return deleted

    async def prune_admissions(self, cutoff: datetime) -> int:
        """Forget admissions that expired before `cutoff` (their submitter died)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(admissions).where(admissions.c.expires_at < cutoff))
        return result.rowcount

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
        now: datetime,
        decide: Callable[[dict[datetime | None, list[tuple[dict[str, str], Usage]]]], int | None],
        starts: Iterable[datetime | None],
        ttl: timedelta,
    ) -> str | None:
        """Serialized admission: compute usage, run `decide(usage)` (which raises to refuse
        and returns the credits to reserve, or None), and record the admission — all in one
        transaction, so two submitters cannot both take the last of a budget."""
        async with self.engine.begin() as conn:
            if not self.is_sqlite:  # SQLite's BEGIN IMMEDIATE already serializes writers
                await conn.execute(text("SELECT pg_advisory_xact_lock(7346001)"))
            credits = decide(await self.usage(starts, now, conn))
            if credits is None:
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
        query = select(jobs).where(jobs.c.state == State.WATCHING.value)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        async with self.engine.connect() as conn:
            return [Job.from_row(row._mapping) for row in await conn.execute(query)]

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
        query = select(jobs)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        async with self.engine.connect() as conn:
            return [Job.from_row(row._mapping) for row in await conn.execute(query)]

    async def event_counts(self, kind: str, since: datetime | None) -> dict[str, int]:
        query = select(job_events.c.reason, func.count()).where(job_events.c.kind == kind).group_by(job_events.c.reason)
        if since is not None:
            query = query.where(job_events.c.at >= since)
        async with self.engine.connect() as conn:
            return {reason or "": count for reason, count in await conn.execute(query)}

    # -- submissions (the scheduler's queue) ----------------------------------------------

    async def take_submission(
        self,
        now: datetime,
        starts: Iterable[datetime | None],
        window_start: datetime,
        decide: Callable[
            [list[dict[str, Any]], dict[datetime | None, list[tuple[dict[str, str], Usage]]], list[datetime]],
            SubmissionPlan,
        ],
        *,
        ttl: timedelta,
        fresh: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Serialized like `admit` (one submitter at a time, on every replica): read the
        queued submissions in order (priority, then age) with `fresh` among them, budget
        usage and the initiates sent since `window_start`; `decide(candidates, usage,
        initiates)` (which may raise to refuse) picks at most one. The chosen submission
        becomes `initiating` with its reservation taken (an admission row) and this store's
        owner, all in this transaction, before any call is made: no two processes ever
        initiate the same submission, and together they never overfill a budget. The others
        keep why they wait. `fresh` (a new submission) is inserted chosen or queued.
        Returns the chosen submission, or None."""
        async with self.engine.begin() as conn:
            if not self.is_sqlite:  # SQLite's BEGIN IMMEDIATE already serializes writers
                await conn.execute(text("SELECT pg_advisory_xact_lock(7346001)"))
            query = (
                select(submissions)
                .where(submissions.c.state == "queued")
                .order_by(submissions.c.priority.desc(), submissions.c.created_at, submissions.c.id)
                .limit(QUEUE_SCAN)
            )
            candidates = [dict(row._mapping) for row in await conn.execute(query)]
            if fresh is not None:
                candidates.append(fresh)
                candidates.sort(key=lambda row: (-row["priority"], row["created_at"]))
            sent = select(submissions.c.initiating_at).where(submissions.c.initiating_at > window_start)
            initiates = [at for row in await conn.execute(sent) if (at := _aware(row.initiating_at)) is not None]
            plan = decide(candidates, await self.usage(starts, now, conn), initiates)
            waiting = [
                {"b_id": row["id"], "reason": wait.reason, "expected_at": wait.expected_at}
                for row in candidates
                if (wait := plan.waiting.get(row["id"])) is not None
                and row is not fresh
                and (row["reason"], row["expected_at"]) != (wait.reason, wait.expected_at)
            ]
            if waiting:
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id == bindparam("b_id"))
                    .where(submissions.c.state == "queued")
                    .values(reason=bindparam("reason"), expected_at=bindparam("expected_at")),
                    waiting,
                )
            chosen = next((row for row in candidates if row["id"] == plan.chosen), None)
            if fresh is not None and chosen is not fresh:
                wait = plan.waiting.get(fresh["id"])
                queued = {**fresh, "state": "queued", "reason": wait.reason if wait else None,
                          "expected_at": wait.expected_at if wait else None}  # fmt: skip
                await conn.execute(insert(submissions).values(**queued))
                fresh.update(queued)
            if chosen is None:
                return None
            admission_id = None
            if plan.reserve is not None:
                admission_id = str(uuid.uuid4())
                await conn.execute(
                    insert(admissions).values(
                        id=admission_id, labels=chosen["labels"], credits=plan.reserve,
                        created_at=now, expires_at=now + ttl,
                    )
                )  # fmt: skip
            values = {
                "state": "initiating", "granted_limit": plan.results, "clamped_by": list(plan.clamped_by),
                "admission_id": admission_id, "initiating_at": now, "owner": self.owner,
                "reason": None, "expected_at": None, "updated_at": now,
            }  # fmt: skip
            if chosen is fresh:
                await conn.execute(insert(submissions).values(**{**fresh, **values}))
            else:
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id == chosen["id"])
                    .where(submissions.c.state == "queued")
                    .values(**values)
                )
            chosen.update(values)
            return chosen

    async def submission_failed(
        self, submission_id: str, state: str, now: datetime, *, reason: str, error: str,
        hold_until: datetime | None = None,
    ) -> bool:  # fmt: skip
        """An initiate that did not end in a job row. `queued` (it surely started nothing:
        try again later) and `failed` give the reservation back; `orphaned` (it may have
        started a job) keeps it until `hold_until`. Fenced: only an `initiating` submission."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(submissions.c.admission_id)
                    .where(submissions.c.id == submission_id)
                    .where(submissions.c.state == "initiating")
                )
            ).first()
            if row is None:
                return False
            await self._settle_admission(conn, row.admission_id, hold_until if state == "orphaned" else None)
            await conn.execute(
                update(submissions)
                .where(submissions.c.id == submission_id)
                .values(state=state, reason=reason, error=error[:2000], updated_at=now)
            )
        return True

    async def _settle_admission(self, conn: AsyncConnection, admission_id: str | None, hold: datetime | None) -> None:
        """Keep a reservation until `hold`, or give it back (None)."""
        if admission_id is None:
            return
        which = admissions.c.id == admission_id
        if hold is None:
            await conn.execute(delete(admissions).where(which))
        else:
            await conn.execute(update(admissions).where(which).values(expires_at=hold))

    async def orphan_submissions(
        self, now: datetime, cutoff: datetime, died: Callable[[str | None], bool], hold_until: datetime
    ) -> list[dict[str, Any]]:
        """`initiating` submissions whose process died (`died(owner)`) or that began before
        `cutoff` (longer than any initiate can take) become `orphaned`: the call may have
        started a job whose id was never recorded. Their reservations are kept until
        `hold_until`. Returns them."""
        found: list[dict[str, Any]] = []
        async with self.engine.begin() as conn:
            query = select(submissions).where(submissions.c.state == "initiating")
            if not self.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            for row in await conn.execute(query):
                started = _aware(row.initiating_at)
                if started is not None and started >= cutoff and not died(row.owner):
                    continue
                why = "process_died" if started is None or started >= cutoff else "initiate_timed_out"
                await self._settle_admission(conn, row.admission_id, hold_until)
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id == row.id)
                    .values(state="orphaned", reason=why, updated_at=now)
                )
                found.append({**row._mapping, "state": "orphaned", "reason": why})
        return found

    async def expire_submissions(self, now: datetime) -> int:
        """Queued submissions past their `expires_at` become `expired`."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(submissions)
                .where(submissions.c.state == "queued")
                .where(submissions.c.expires_at <= now)
                .values(state="expired", reason="expires_after", updated_at=now)
            )
        return result.rowcount

    async def unannounced_submissions(self, states: Sequence[str]) -> list[dict[str, Any]]:
        """Submissions in one of `states` whose webhook for that state was not sent yet."""
        query = (
            select(submissions)
            .where(submissions.c.state.in_(states))
            .where(submissions.c.announced.is_(None) | (submissions.c.announced != submissions.c.state))
            .order_by(submissions.c.updated_at)
            .limit(QUEUE_SCAN)
        )
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def mark_announced(self, submission_id: str, state: str) -> bool:
        """Claim the announcement of `state` (True once, for one caller)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(submissions)
                .where(submissions.c.id == submission_id)
                .where(submissions.c.state == state)
                .where(submissions.c.announced.is_(None) | (submissions.c.announced != state))
                .values(announced=state)
            )
        return bool(result.rowcount)

    async def cancel_submission(self, submission_id: str, now: datetime) -> dict[str, Any] | None:
        """`queue cancel`: a queued submission will not start; an orphaned one is settled by a
        person (its reservation is given back). Other states are left as they are. Returns the
        submission afterwards, None if unknown."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(submissions).where(submissions.c.id == submission_id))).first()
            if row is None:
                return None
            if row.state in ("queued", "orphaned"):
                await self._settle_admission(conn, row.admission_id, None)
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id == submission_id)
                    .where(submissions.c.state == row.state)
                    .values(state="cancelled", reason="queue_cancel", updated_at=now)
                )
            found = (await conn.execute(select(submissions).where(submissions.c.id == submission_id))).first()
        return None if found is None else dict(found._mapping)

    async def list_submissions(self, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Submissions (in `states`, else all) in the queue's order: priority, then age."""
        query = select(submissions).order_by(submissions.c.priority.desc(), submissions.c.created_at, submissions.c.id)
        if states is not None:
            query = query.where(submissions.c.state.in_(states))
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def get_submission(self, submission_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(submissions).where(submissions.c.id == submission_id))).first()
        return None if row is None else dict(row._mapping)

    # -- reads ---------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.job_id == job_id))).first()
            return None if row is None else Job.from_row(row._mapping)

    async def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.submitted_at, jobs.c.job_id)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            return [Job.from_row(row._mapping) for row in await conn.execute(query)]

    async def jobs_page(
        self,
        *,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        policy: str | None = None,
        reason: str | None = None,
        search: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[Job], int]:
        """One page of the jobs that match every filter given, newest first, and how many
        match in all: two statements whatever the table's size (the web console's table).
        `search` is a case-insensitive substring of the job id or of its query."""
        conditions: list[Any] = []
        if state is not None:
            conditions.append(jobs.c.state == state)
        for key, value in (labels or {}).items():
            conditions.append(jobs.c.labels[key].as_string() == value)
        if policy is not None:
            conditions.append(jobs.c.policy == policy)
        if reason is not None:
            conditions.append(jobs.c.cancel_reason == reason)
        if search:
            conditions.append(
                jobs.c.job_id.icontains(search, autoescape=True) | jobs.c.query.icontains(search, autoescape=True)
            )
        page = (
            select(jobs)
            .where(*conditions)
            .order_by(jobs.c.submitted_at.desc(), jobs.c.job_id.desc())
            .offset(offset)
            .limit(limit)
        )
        total = select(func.count()).select_from(jobs).where(*conditions)
        async with self.engine.connect() as conn:
            found = [Job.from_row(row._mapping) for row in await conn.execute(page)]
            matching = (await conn.execute(total)).scalar_one()
        return found, int(matching)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        query = select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def count_by_state(self) -> dict[str, int]:
        query = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        async with self.engine.connect() as conn:
            return {state: count for state, count in await conn.execute(query)}  # noqa: C416 - rows, not pairs

    async def next_due_at(self) -> datetime | None:
        query = select(func.min(jobs.c.next_check_at)).where(jobs.c.state.in_([s.value for s in ACTIVE]))
        async with self.engine.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar()
        if value is not None and value.tzinfo is None:  # aggregates bypass the column type
            value = value.replace(tzinfo=UTC)
        return value


# The queued submissions one scheduling decision looks at (the head of the queue).
QUEUE_SCAN = 500


@dataclass(frozen=True)
class Waiting:
    """Why a queued submission waits, and when it may start (None: not known)."""

    reason: str
    expected_at: datetime | None


@dataclass(frozen=True)
class SubmissionPlan:
    """A scheduling decision: the submission to initiate now (or None), the results to ask
    for, the credits to reserve (None: no reserving budget), and why the others wait."""

    chosen: str | None = None
    results: int = 0
    reserve: int | None = None
    clamped_by: tuple[str, ...] = ()
    waiting: Mapping[str, Waiting] = field(default_factory=dict)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # a plain column read outside the table type
        return value.replace(tzinfo=UTC)
    return value


def _tracked_detail(job: NewJob) -> dict[str, Any]:
    detail: dict[str, Any] = {"source": job.source, "policy": job.policy, "labels": job.labels}
    if job.result_limit is not None:
        detail["limit"] = job.result_limit
    if job.requested_limit is not None and job.requested_limit != job.result_limit:
        detail["requested_limit"] = job.requested_limit  # the submission was clamped
    return detail


def _fence_holds(write: JobWrite, current: tuple[str | None, str] | None) -> bool:
    if current is None:  # the job is gone (pruned)
        return False
    token, state = current
    if write.lease_token:
        return token == write.lease_token
    return state == write.change.job.state


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
