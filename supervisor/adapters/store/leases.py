"""Leases, of jobs and of roles, reckoned in the database's clock.

A claimer leases due jobs in batches (owner, token, expiry) and extends or gives back what
it still holds; a leader row is the lease of a singleton chore (budget sweeps, the account
floor, retention, the totals gauges). On PostgreSQL, several replicas share the rows:
claims use FOR UPDATE SKIP LOCKED, so each due job goes to exactly one of them, and every
expiry is computed from and compared with the database's `now()`, so replicas whose clocks
disagree still agree on who holds what. On SQLite (one host) the local clock is the
database clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from supervisor.adapters.store.database import Database, aware, chunks
from supervisor.adapters.tables import jobs, leaders
from supervisor.core.job import Job
from supervisor.core.states import ACTIVE, RECHECKED

# The lease columns of a job that nobody holds.
NO_LEASE: Mapping[str, None] = {"lease_owner": None, "lease_token": None, "lease_expires_at": None}


class Leases(Database):
    async def _db_now(self, conn: AsyncConnection, local_now: datetime) -> datetime:
        """The clock leases and leadership are reckoned in: the database's on PostgreSQL
        (the start of the current transaction), the caller's on SQLite (one host)."""
        if self.is_sqlite:
            return local_now
        return aware((await conn.execute(select(func.now()))).scalar_one())

    # -- jobs --------------------------------------------------------------------------

    async def claim_due(
        self,
        now: datetime,
        *,
        horizon: timedelta,
        limit: int,
        lease_ttl: timedelta,
        job_id: str | None = None,
        priority_at_most: int | None = None,
    ) -> list[Job]:
        """Lease up to `limit` jobs due before now + horizon: active jobs (enforcing checks
        first, then soonest first), then terminal jobs still re-checked (`recheck_until` set)
        with what room is left.

        Two queries, each on its own index: the active jobs' claim is what it always was,
        and the re-checked ones are found through a partial index that holds only them, so
        neither gets slower as finished jobs pile up.

        Due-ness uses `now` (the replica's clock, which also computed `next_check_at`); the
        lease (whether an old one has expired, when the new one does) uses the database's
        clock, so a replica whose clock runs ahead cannot take leases that still hold.

        `priority_at_most` claims only active jobs whose check is that urgent (core.job
        CHECK_*): a replica at its limit still takes the enforcing ones."""
        token = str(uuid.uuid4())
        async with self.engine.begin() as conn:
            lease_now = await self._db_now(conn, now)
            due = (
                (jobs.c.next_check_at <= now + horizon),
                (jobs.c.lease_token.is_(None)) | (jobs.c.lease_expires_at <= lease_now),
            )
            active = select(jobs).where(jobs.c.state.in_([s.value for s in ACTIVE]), *due)
            if priority_at_most is not None:
                active = active.where(jobs.c.check_priority <= priority_at_most)
            rechecked = select(jobs).where(
                jobs.c.recheck_until.is_not(None), jobs.c.state.in_([s.value for s in RECHECKED]), *due
            )
            # Active jobs by what their check is for, then by due time: with a backlog, a
            # deadline's poll goes before routine re-polls and rate probes (core.job CHECK_*).
            active = active.order_by(jobs.c.check_priority, jobs.c.next_check_at)
            rechecked = rechecked.order_by(jobs.c.next_check_at)
            claimed: list[Job] = []
            for query in (active,) if priority_at_most is not None else (active, rechecked):
                room = limit - len(claimed)
                if room <= 0:
                    break
                query = query.limit(room)
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

    async def extend_leases(self, leases: Mapping[str, str], ttl: timedelta, now: datetime) -> dict[str, str]:
        """Push on the expiry of leases still held (job id → token) to now + ttl, in the
        database's clock; returns those extended (a lease lost meanwhile is not)."""
        if not leases:
            return {}
        kept: dict[str, str] = {}
        async with self.engine.begin() as conn:
            lease_now = await self._db_now(conn, now)
            for chunk in chunks(sorted(leases)):
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
                .values(**NO_LEASE),
                [{"b_job_id": job_id, "b_token": token} for job_id, token in leases.items()],
            )

    # -- roles: leadership for singleton chores --------------------------------------------

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
        return aware(row.expires_at)

    async def release_leader(self, name: str) -> bool:
        """Give the leader row up (shutdown), so another replica takes over at once."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(leaders).where(leaders.c.name == name).where(leaders.c.owner == self.owner)
            )
        return bool(result.rowcount)

    async def leader(self, name: str) -> dict[str, Any] | None:
        return await self._row(select(leaders).where(leaders.c.name == name))
