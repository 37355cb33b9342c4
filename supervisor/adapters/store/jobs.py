"""Jobs in, changed and out: tracking new jobs, applying Changes fenced, and retention.

Every later write of a job is a JobWrite, fenced: a claimer's write is conditioned on its
lease token, so a write from a claimer that lost its lease is dropped and logged, never
applied; a writer without a lease is conditioned on the state it read. Writes are applied
in batches: one transaction, one statement per shape of update, one insert for all events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from supervisor.adapters.store.budgets import serialize_admissions, settle_admission
from supervisor.adapters.store.database import Database, chunks, utcnow
from supervisor.adapters.store.leases import NO_LEASE
from supervisor.adapters.store.routes import insert_notices
from supervisor.adapters.store.submissions import start_submission
from supervisor.adapters.tables import job_events, jobs, kept_results
from supervisor.core.job import CHECK_ROUTINE
from supervisor.core.notify import notices
from supervisor.core.states import TERMINAL, State
from supervisor.core.transitions import Change, Event

log = structlog.get_logger("supervisor.store")


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


class Jobs(Database):
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
                # The reservation moves from admissions to jobs: under the admission lock, or an
                # admitter reading the two tables in two statements (PostgreSQL's READ COMMITTED)
                # could see it in neither and let a budget overfill.
                await serialize_admissions(conn)
            await settle_admission(conn, admission_id, None)
            if submission_id is not None:
                await start_submission(conn, submission_id, ids[0], now)
            existing: set[str] = set()
            for chunk in chunks(ids):
                rows = await conn.execute(select(jobs.c.job_id).where(jobs.c.job_id.in_(chunk)))
                existing.update(row.job_id for row in rows)
            fresh = [job for job in _unique(new_jobs) if job.job_id not in existing]
            if fresh:
                await conn.execute(insert(jobs), [_job_row(job, now) for job in fresh])
                await conn.execute(
                    insert(job_events),
                    [
                        {
                            "job_id": job.job_id,
                            **Event("tracked", now, to_state=State.WATCHING, detail=_tracked_detail(job)).row(),
                        }
                        for job in fresh
                    ],
                )
        added = [job.job_id for job in fresh]
        return added, [job_id for job_id in dict.fromkeys(ids) if job_id in existing]

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
            await _update_many(conn, applied)
            events = [{"job_id": write.job_id, **event.row()} for write in applied for event in write.change.events]
            if events:
                await conn.execute(insert(job_events), events)
            # The webhook events of these Changes, committed with them (the outbox).
            await insert_notices(
                conn, [n for write in applied for n in notices(write.change)], self.routes, _now(applied)
            )
        return done

    async def _current(self, conn: AsyncConnection, writes: Sequence[JobWrite]) -> dict[str, tuple[str | None, str]]:
        """(lease token, state) of each written job now, its row locked until commit (on
        PostgreSQL: a claimer skips it meanwhile, SKIP LOCKED)."""
        current: dict[str, tuple[str | None, str]] = {}
        for chunk in chunks(sorted({write.job_id for write in writes})):
            query = select(jobs.c.job_id, jobs.c.lease_token, jobs.c.state).where(jobs.c.job_id.in_(chunk))
            if not self.is_sqlite:
                query = query.with_for_update()
            for row in await conn.execute(query):
                current[row.job_id] = (row.lease_token, row.state)
        return current

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
                await conn.execute(delete(kept_results).where(kept_results.c.job_id.in_(ids)))
                result = await conn.execute(
                    delete(jobs).where(jobs.c.job_id.in_(ids)).where(jobs.c.state.in_(terminal))
                )
                deleted += result.rowcount
            if len(ids) < batch:
                break
        return deleted


async def _update_many(conn: AsyncConnection, writes: Iterable[JobWrite]) -> None:
    # executemany needs one parameter shape, so group the writes by the columns they set.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for write in writes:
        # Only what changed from the row its writer read: a poll that saw nothing new sets
        # its poll time and next check (and gives its lease back), not twenty columns.
        read = write.change.job
        values = {column: value for column, value in write.change.values.items() if getattr(read, column) != value}
        if write.release:
            values.update(NO_LEASE)
        if values:
            groups[tuple(sorted(values))].append({"b_job_id": write.job_id, **values})
    for columns, params in groups.items():
        statement = (
            update(jobs)
            .where(jobs.c.job_id == bindparam("b_job_id"))
            .values({column: bindparam(column) for column in columns})
        )
        await conn.execute(statement, params)


def _job_row(job: NewJob, now: datetime) -> dict[str, Any]:
    """A new job's row: watching, due at once (a first look: routine, so a mass track waits
    behind the deadlines of jobs already known)."""
    return {
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
        "check_priority": CHECK_ROUTINE,
        "poll_errors": 0,
        "warned": [],
        "cancel_attempts": 0,
        "updated_at": now,
    }


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


def _now(writes: Sequence[JobWrite]) -> datetime:
    """When these writes' outbox rows were created: their latest event (each Change is timed
    by its writer's clock; the store has none of its own)."""
    times = [event.at for write in writes for event in write.change.events]
    return max(times) if times else utcnow()


def _unique(new_jobs: Sequence[NewJob]) -> list[NewJob]:
    seen: dict[str, NewJob] = {}
    for job in new_jobs:
        seen.setdefault(job.job_id, job)
    return list(seen.values())
