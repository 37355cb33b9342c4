"""Reads of jobs and their events, for the CLI, the HTTP API, the console, reports and the
budget chores: none of them writes or takes a lease."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select

from supervisor.adapters.store.database import Database, aware
from supervisor.adapters.tables import job_events, jobs
from supervisor.core.job import Job
from supervisor.core.states import ACTIVE, State


class JobReads(Database):
    async def get_job(self, job_id: str) -> Job | None:
        row = await self._row(select(jobs).where(jobs.c.job_id == job_id))
        return None if row is None else Job.from_row(row)

    async def list_jobs(self, state: str | None = None, limit: int | None = None) -> list[Job]:
        query = select(jobs).order_by(jobs.c.submitted_at, jobs.c.job_id)
        if state is not None:
            query = query.where(jobs.c.state == state)
        if limit is not None:
            query = query.limit(limit)
        return await self._jobs(query)

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
        return await self._rows(select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id))

    async def count_by_state(self) -> dict[str, int]:
        query = select(jobs.c.state, func.count()).group_by(jobs.c.state)
        async with self.engine.connect() as conn:
            return {state: count for state, count in await conn.execute(query)}  # noqa: C416 - rows, not pairs

    async def count_blind(self) -> dict[str, int]:
        """Blind jobs still supervised (active, or terminal and still looked at), by reason."""
        still = or_(jobs.c.state.in_([s.value for s in ACTIVE]), jobs.c.recheck_until.is_not(None))
        query = (
            select(jobs.c.blind_reason, func.count())
            .where(jobs.c.blind_reason.is_not(None), still)
            .group_by(jobs.c.blind_reason)
        )
        async with self.engine.connect() as conn:
            return {reason: count for reason, count in await conn.execute(query)}  # noqa: C416 - rows, not pairs

    async def next_due_at(self) -> datetime | None:
        query = select(func.min(jobs.c.next_check_at)).where(jobs.c.state.in_([s.value for s in ACTIVE]))
        async with self.engine.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar()
        return None if value is None else aware(value)  # aggregates bypass the column type

    async def watching_since(self, start: datetime | None) -> list[Job]:
        """Running jobs submitted since `start` (budget enforcement picks from these)."""
        query = select(jobs).where(jobs.c.state == State.WATCHING.value)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        return await self._jobs(query)

    async def jobs_submitted_since(self, start: datetime | None) -> list[Job]:
        """What the report needs of every job submitted in a period."""
        query = select(jobs)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        return await self._jobs(query)

    async def watching_columns(self, start: datetime | None, columns: tuple[str, ...]) -> list[dict[str, Any]]:
        """`watching_since`, only these columns (a forecast reads every running job often)."""
        query = select(*(jobs.c[name] for name in columns)).where(jobs.c.state == State.WATCHING.value)
        if start is not None:
            query = query.where(jobs.c.submitted_at >= start)
        return await self._rows(query)

    async def past_jobs(self, since: datetime, until: datetime) -> list[dict[str, Any]]:
        """What a forecast learns from each job submitted in [since, until): its labels, when
        it was submitted, started and last progressed, and its credits (few columns: it is
        every job of a budget's recent periods)."""
        columns = (jobs.c.labels, jobs.c.submitted_at, jobs.c.remote_created_at, jobs.c.last_progress_at,
                   jobs.c.credits_used)  # fmt: skip
        query = select(*columns).where(jobs.c.submitted_at >= since, jobs.c.submitted_at < until)
        return await self._rows(query)

    async def event_counts(self, kind: str, since: datetime | None) -> dict[str, int]:
        query = select(job_events.c.reason, func.count()).where(job_events.c.kind == kind).group_by(job_events.c.reason)
        if since is not None:
            query = query.where(job_events.c.at >= since)
        async with self.engine.connect() as conn:
            return {reason or "": count for reason, count in await conn.execute(query)}
