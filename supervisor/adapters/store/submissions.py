"""Submissions: the scheduler's queue, one row per submission from the moment its intent
is committed (before the initiate call) to its job row or to an end without one.

Taking a submission is serialized like an admission (it is one, with a waiting line): the
chosen submission becomes `initiating` with its reservation and this store's owner in one
transaction, before any call is made, so no two processes initiate the same submission.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from supervisor.adapters.store.budgets import UsageByStart, reserve, serialize_admissions, settle_admission, usage_in
from supervisor.adapters.store.database import Database, aware, utcnow
from supervisor.adapters.store.routes import insert_notices
from supervisor.adapters.tables import submissions
from supervisor.core.notify import Notice
from supervisor.core.queueing import SubmissionPlan

# The queued submissions one scheduling decision looks at (the head of the queue).
QUEUE_SCAN = 500

# The queue's order: priority, then age (the id breaks ties).
QUEUE_ORDER = (submissions.c.priority.desc(), submissions.c.created_at, submissions.c.id)


class Submissions(Database):
    async def take_submission(
        self,
        now: datetime,
        starts: Iterable[datetime | None],
        window_start: datetime,
        decide: Callable[[list[dict[str, Any]], UsageByStart, list[datetime]], SubmissionPlan],
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
            await serialize_admissions(conn)
            query = select(submissions).where(submissions.c.state == "queued").order_by(*QUEUE_ORDER).limit(QUEUE_SCAN)
            candidates = [dict(row._mapping) for row in await conn.execute(query)]
            if fresh is not None:
                candidates.append(fresh)
                candidates.sort(key=lambda row: (-row["priority"], row["created_at"]))
            sent = select(submissions.c.initiating_at).where(submissions.c.initiating_at > window_start)
            initiates = [aware(at) for row in await conn.execute(sent) if (at := row.initiating_at) is not None]
            plan = decide(candidates, await usage_in(conn, starts, now), initiates)
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
                admission_id = await reserve(conn, chosen["labels"], plan.reserve, now, ttl)
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
            await settle_admission(conn, row.admission_id, hold_until if state == "orphaned" else None)
            await conn.execute(
                update(submissions)
                .where(submissions.c.id == submission_id)
                .values(state=state, reason=reason, error=error[:2000], updated_at=now)
            )
        return True

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
                started = None if row.initiating_at is None else aware(row.initiating_at)
                if started is not None and started >= cutoff and not died(row.owner):
                    continue
                why = "process_died" if started is None or started >= cutoff else "initiate_timed_out"
                await settle_admission(conn, row.admission_id, hold_until)
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
        return await self._rows(
            select(submissions)
            .where(submissions.c.state.in_(states))
            .where(submissions.c.announced.is_(None) | (submissions.c.announced != submissions.c.state))
            .order_by(submissions.c.updated_at)
            .limit(QUEUE_SCAN)
        )

    async def mark_announced(
        self, submission_id: str, state: str, notices: Sequence[Notice] = (), now: datetime | None = None
    ) -> bool:
        """Claim the announcement of `state` (True once, for one caller), its webhook events'
        outbox rows inserted in the same transaction."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(submissions)
                .where(submissions.c.id == submission_id)
                .where(submissions.c.state == state)
                .where(submissions.c.announced.is_(None) | (submissions.c.announced != state))
                .values(announced=state)
            )
            if result.rowcount:
                await insert_notices(conn, notices, self.routes, now or utcnow())
        return bool(result.rowcount)

    async def cancel_submission(self, submission_id: str, now: datetime) -> dict[str, Any] | None:
        """`queue cancel`: a queued submission will not start; an orphaned one is settled by a
        person (its reservation is given back). Other states are left as they are. Returns the
        submission afterwards, None if unknown."""
        by_id = select(submissions).where(submissions.c.id == submission_id)
        async with self.engine.begin() as conn:
            row = (await conn.execute(by_id)).first()
            if row is None:
                return None
            if row.state in ("queued", "orphaned"):
                await settle_admission(conn, row.admission_id, None)
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id == submission_id)
                    .where(submissions.c.state == row.state)
                    .values(state="cancelled", reason="queue_cancel", updated_at=now)
                )
            found = (await conn.execute(by_id)).first()
        return None if found is None else dict(found._mapping)

    async def list_submissions(self, states: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Submissions (in `states`, else all) in the queue's order: priority, then age."""
        query = select(submissions).order_by(*QUEUE_ORDER)
        if states is not None:
            query = query.where(submissions.c.state.in_(states))
        return await self._rows(query)

    async def get_submission(self, submission_id: str) -> dict[str, Any] | None:
        return await self._row(select(submissions).where(submissions.c.id == submission_id))


async def start_submission(conn: AsyncConnection, submission_id: str, job_id: str, now: datetime) -> None:
    """The submission's job row is being inserted on `conn`: it is `started` with that job."""
    await conn.execute(
        update(submissions)
        .where(submissions.c.id == submission_id)
        .where(submissions.c.state.in_(["initiating", "orphaned"]))  # an orphan found its job
        .values(state="started", job_id=job_id, reason=None, updated_at=now)
    )
