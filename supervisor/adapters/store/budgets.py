"""Budgets: what each label set spent and holds reserved, admissions (reservations taken
before a job exists), and each budget period's warnings and exhaustion.

A reservation lives in one place, an admission row, from its admission until it passes to
its job (`reserved_credits`) or is given back; usage counts both. Admissions are serialized
(one advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite), so two submitters cannot
both take the last of a budget. The statements the submission queue shares are functions
of a connection, to run inside its transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, case, cast, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from supervisor.adapters.store.database import Database
from supervisor.adapters.store.routes import insert_notices
from supervisor.adapters.tables import admissions, budget_periods, jobs
from supervisor.core.budgets import Usage
from supervisor.core.notify import Notice

# Per period start (None: all time), usage by label set.
UsageByStart = dict[datetime | None, list[tuple[dict[str, str], Usage]]]


class Budgets(Database):
    async def usage(self, starts: Iterable[datetime | None], now: datetime) -> UsageByStart:
        """Usage grouped by label set, for jobs submitted since each period start."""
        async with self.engine.connect() as conn:
            return await usage_in(conn, starts, now)

    async def admit(
        self,
        labels: dict[str, str],
        now: datetime,
        decide: Callable[[UsageByStart], int | None],
        starts: Iterable[datetime | None],
        ttl: timedelta,
    ) -> str | None:
        """Serialized admission: compute usage, run `decide(usage)` (which raises to refuse
        and returns the credits to reserve, or None), and record the admission — all in one
        transaction, so two submitters cannot both take the last of a budget."""
        async with self.engine.begin() as conn:
            await serialize_admissions(conn)
            credits = decide(await usage_in(conn, starts, now))
            if credits is None:
                return None
            return await reserve(conn, labels, credits, now, ttl)

    async def drop_admission(self, admission_id: str) -> None:
        async with self.engine.begin() as conn:
            await settle_admission(conn, admission_id, None)

    async def prune_admissions(self, cutoff: datetime) -> int:
        """Forget admissions that expired before `cutoff` (their submitter died)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(admissions).where(admissions.c.expires_at < cutoff))
        return result.rowcount

    async def budget_period(self, budget: str, period_key: str) -> dict[str, Any]:
        row = await self._row(select(budget_periods).where(_period(budget, period_key)))
        return row or {"warned": [], "exhausted_at": None}

    async def save_budget_period(
        self,
        budget: str,
        period_key: str,
        warned: list[str],
        exhausted_at: datetime | None,
        now: datetime,
        notices: Sequence[Notice] = (),
    ) -> None:
        """Record which warnings fired (and the exhaustion), with the webhook events of
        these crossings in the same transaction."""
        values = {"warned": warned, "exhausted_at": exhausted_at, "updated_at": now}
        async with self.engine.begin() as conn:
            result = await conn.execute(update(budget_periods).where(_period(budget, period_key)).values(**values))
            if result.rowcount == 0:
                await conn.execute(insert(budget_periods).values(budget=budget, period_start=period_key, **values))
            await insert_notices(conn, notices, self.routes, now)

    async def budget_periods_since(self, since: datetime) -> list[dict[str, Any]]:
        return await self._rows(select(budget_periods).where(budget_periods.c.updated_at >= since))


async def usage_in(conn: AsyncConnection, starts: Iterable[datetime | None], now: datetime) -> UsageByStart:
    """`Budgets.usage`, read on `conn` (inside a serialized admission's transaction)."""
    outstanding = case(
        (jobs.c.reserved_credits > jobs.c.credits_used, jobs.c.reserved_credits - jobs.c.credits_used),
        else_=0,
    )
    label_text = cast(jobs.c.labels, String)
    admission_labels = cast(admissions.c.labels, String)
    result: UsageByStart = {}
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


async def serialize_admissions(conn: AsyncConnection) -> None:
    """One admitter at a time, on every replica, until this transaction ends."""
    if conn.dialect.name != "sqlite":  # SQLite's BEGIN IMMEDIATE already serializes writers
        await conn.execute(text("SELECT pg_advisory_xact_lock(7346001)"))


async def reserve(conn: AsyncConnection, labels: dict[str, str], credits: int, now: datetime, ttl: timedelta) -> str:
    """Record an admission holding `credits` for `labels` until now + ttl; returns its id."""
    admission_id = str(uuid.uuid4())
    await conn.execute(
        insert(admissions).values(id=admission_id, labels=labels, credits=credits, created_at=now, expires_at=now + ttl)
    )
    return admission_id


async def settle_admission(conn: AsyncConnection, admission_id: str | None, hold: datetime | None) -> None:
    """Keep a reservation until `hold`, or give it back (None)."""
    if admission_id is None:
        return
    which = admissions.c.id == admission_id
    if hold is None:
        await conn.execute(delete(admissions).where(which))
    else:
        await conn.execute(update(admissions).where(which).values(expires_at=hold))


def _period(budget: str, period_key: str) -> Any:
    return (budget_periods.c.budget == budget) & (budget_periods.c.period_start == period_key)


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return value
    parsed = json.loads(value) if value else {}
    return parsed if isinstance(parsed, dict) else {}
