"""The transactional outbox: webhook events as rows, written with their cause, delivered later.

`insert_notices` is a function of a connection: the transaction that records a cause (a
job's Change, a budget's crossing, a submission's announcement) inserts its notices' rows
itself, one per (event, hook) that wants it, so a committed cause always has its rows and a
rolled-back one has none. `Store.routes` says which hooks want which events (set from the
config by whoever opens the store, and again on a reload).

The daemon's delivery worker claims a hook's due rows under a lease (owner and expiry; on
PostgreSQL with FOR UPDATE SKIP LOCKED, so replicas share the rows and each row has one
owner at a time; an expired lease is taken over), and only the oldest pending row of each
subject (a job, a submission, a budget), so deliveries keep commit order per hook and
subject. Leases are reckoned in the caller's clock (a few seconds of skew between replicas
only delays a takeover).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update

from supervisor.adapters.store.database import Database, aware, chunks
from supervisor.adapters.store.routes import DELIVERED, FAILED, PENDING, insert_notices
from supervisor.adapters.tables import job_events, outbox, outbox_attempts
from supervisor.core.notify import Notice

HOOK_REMOVED = "hook removed"


class Outbox(Database):
    async def record_notices(self, notices: Sequence[Notice], now: datetime) -> int:
        """Notices whose cause is recorded nowhere else (the API key rejected, the account
        below its floor): their rows in a transaction of their own."""
        async with self.engine.begin() as conn:
            return await insert_notices(conn, notices, self.routes, now)

    async def claim_deliveries(self, hook: str, now: datetime, *, limit: int, lease: timedelta) -> list[dict[str, Any]]:
        """Lease up to `limit` due rows of `hook`, oldest first, at most one per subject
        (the oldest pending one: an earlier row still waiting for its retry holds the later
        ones of its subject back)."""
        earlier = outbox.alias("earlier")
        query = (
            select(outbox.c.id, outbox.c.delivery_id, outbox.c.payload, outbox.c.attempts, outbox.c.created_at)
            .where(outbox.c.hook == hook)
            .where(outbox.c.state == PENDING)
            .where(outbox.c.next_attempt_at <= now)
            .where(or_(outbox.c.lease_expires_at.is_(None), outbox.c.lease_expires_at < now))
            # The head of its subject: a correlated scalar subquery is a parameterized
            # lookup on (hook, subject, state) per candidate, however stale the table's
            # statistics (a NOT EXISTS anti-join planned on a freshly filled table scanned
            # every pending row of the hook per candidate).
            .where(
                outbox.c.id
                == select(func.min(earlier.c.id))
                .where(
                    and_(
                        earlier.c.hook == outbox.c.hook,
                        earlier.c.subject == outbox.c.subject,
                        earlier.c.state == PENDING,
                    )
                )
                .scalar_subquery()
            )
            .order_by(outbox.c.id)
            .limit(limit)
        )
        if not self.is_sqlite:
            query = query.with_for_update(skip_locked=True, of=outbox)
        async with self.engine.begin() as conn:
            rows = [dict(row._mapping) for row in await conn.execute(query)]
            if rows:
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([row["id"] for row in rows]))
                    .values(lease_owner=self.owner, lease_expires_at=now + lease)
                )
        return rows

    async def finish_deliveries(self, outcomes: Sequence[dict[str, Any]]) -> int:
        """Record attempts: each outcome has delivery_id, at, status, error, duration_ms and
        the row's new state, next_attempt_at and attempts. Fenced by this owner's lease (a
        row taken over meanwhile keeps its new owner's record). Returns how many applied."""
        if not outcomes:
            return 0
        # One statement for the batch (executemany), fenced per row by this owner's lease.
        statement = (
            update(outbox)
            .where(outbox.c.delivery_id == bindparam("b_delivery_id"))
            .where(outbox.c.lease_owner == self.owner)
            .where(outbox.c.state == PENDING)
            .values(
                state=bindparam("b_state"),
                attempts=bindparam("b_attempts"),
                next_attempt_at=bindparam("b_next_attempt_at"),
                last_error=bindparam("b_error"),
                delivered_at=bindparam("b_delivered_at"),
                lease_owner=None,
                lease_expires_at=None,
                updated_at=bindparam("b_at"),
            )
        )
        params = [
            {
                "b_delivery_id": o["delivery_id"], "b_state": o["state"], "b_attempts": o["attempts"],
                "b_next_attempt_at": o["next_attempt_at"], "b_error": o["error"],
                "b_delivered_at": o["at"] if o["state"] == DELIVERED else None, "b_at": o["at"],
            }
            for o in outcomes
        ]  # fmt: skip
        async with self.engine.begin() as conn:
            applied = (await conn.execute(statement, params)).rowcount
            await conn.execute(
                insert(outbox_attempts),
                [
                    {key: outcome[key] for key in ("delivery_id", "at", "status", "error", "duration_ms")}
                    | {"owner": self.owner}
                    for outcome in outcomes
                ],
            )
        return applied

    async def release_deliveries(self, hook: str) -> None:
        """Give back this owner's leases on `hook`'s rows (its loop stopped)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(outbox)
                .where(outbox.c.hook == hook)
                .where(outbox.c.lease_owner == self.owner)
                .where(outbox.c.state == PENDING)
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def list_deliveries(self, state: str | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Failed first, then pending, then delivered; newest first within each."""
        order = {FAILED: 0, PENDING: 1, DELIVERED: 2}
        query = select(outbox).order_by(outbox.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(outbox.c.state == state)
        rows = await self._rows(query)
        return sorted(rows, key=lambda row: order.get(row["state"], 3))

    async def get_delivery(self, delivery_id: str) -> dict[str, Any] | None:
        row = await self._row(select(outbox).where(outbox.c.delivery_id == delivery_id))
        if row is None:
            return None
        row["attempt_log"] = await self._rows(
            select(outbox_attempts).where(outbox_attempts.c.delivery_id == delivery_id).order_by(outbox_attempts.c.id)
        )
        return row

    async def redeliver(self, delivery_ids: Sequence[str], now: datetime) -> list[str]:
        """Queue these deliveries again, due now, with a fresh retry window (their id stays:
        a receiver that already has one drops the copy); all of them or, if one is not
        found, none. Returns the ids found."""
        found: list[str] = []
        async with self.engine.begin() as conn:
            for chunk in chunks(list(dict.fromkeys(delivery_ids))):
                rows = await conn.execute(select(outbox.c.delivery_id).where(outbox.c.delivery_id.in_(chunk)))
                found.extend(row.delivery_id for row in rows)
            if found and len(found) == len(set(delivery_ids)):
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.delivery_id.in_(found))
                    .values(
                        state=PENDING,
                        attempts=0,
                        created_at=now,
                        next_attempt_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        delivered_at=None,
                        updated_at=now,
                    )
                )
        return found

    async def fail_removed_hooks(self, keep: set[str], now: datetime) -> int:
        """Pending rows of hooks no longer configured become failed ("hook removed"): they
        are not delivered to nowhere, and stay listed. Returns how many."""
        query = update(outbox).where(outbox.c.state == PENDING)
        if keep:
            query = query.where(outbox.c.hook.not_in(sorted(keep)))
        async with self.engine.begin() as conn:
            result = await conn.execute(
                query.values(
                    state=FAILED, last_error=HOOK_REMOVED, lease_owner=None, lease_expires_at=None, updated_at=now
                )
            )
        return int(result.rowcount)

    async def outbox_backlog(self) -> dict[str, tuple[int, datetime | None]]:
        """Per hook: pending rows and the oldest one's creation."""
        query = (
            select(outbox.c.hook, func.count(), func.min(outbox.c.created_at))
            .where(outbox.c.state == PENDING)
            .group_by(outbox.c.hook)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {row[0]: (int(row[1]), aware(row[2]) if row[2] is not None else None) for row in rows}

    async def prune_deliveries(self, cutoff: datetime, *, batch: int = 2000, max_batches: int = 4) -> int:
        """Delete delivered rows (and their attempts) last updated before `cutoff`."""
        deleted = 0
        for _ in range(max_batches):
            async with self.engine.begin() as conn:
                ids = [
                    row.delivery_id
                    for row in await conn.execute(
                        select(outbox.c.delivery_id)
                        .where(outbox.c.state == DELIVERED)
                        .where(outbox.c.updated_at < cutoff)
                        .limit(batch)
                    )
                ]
                if not ids:
                    break
                await conn.execute(outbox_attempts.delete().where(outbox_attempts.c.delivery_id.in_(ids)))
                result = await conn.execute(outbox.delete().where(outbox.c.delivery_id.in_(ids)))
                deleted += result.rowcount
            if len(ids) < batch:
                break
        return deleted

    # -- the counters' stream -------------------------------------------------------------

    async def last_event_id(self, *, before: datetime) -> int:
        """The highest id of the job events that happened before `before` (0: none)."""
        query = select(func.max(job_events.c.id)).where(job_events.c.at < before)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar() or 0)

    async def events_from(self, after: int, also: Sequence[int], *, limit: int = 5000) -> list[dict[str, Any]]:
        """Committed job events with an id above `after` (at most `limit`, oldest first),
        and those of the ids in `also` (gaps seen earlier: on PostgreSQL a lower id may
        commit after a higher one)."""
        columns = (
            job_events.c.id,
            job_events.c.kind,
            job_events.c.from_state,
            job_events.c.to_state,
            job_events.c.reason,
        )
        rows = await self._rows(select(*columns).where(job_events.c.id > after).order_by(job_events.c.id).limit(limit))
        if also:
            rows += await self._rows(select(*columns).where(job_events.c.id.in_(list(also))))
        return rows
