"""Which hooks want which events, and the outbox rows of a transaction's notices.

A function of a connection (`insert_notices`), so every part's transaction that records a
cause inserts its notices' rows itself (jobs.apply_each, budgets.save_budget_period,
submissions.mark_announced, outbox.record_notices).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from supervisor.adapters.tables import outbox
from supervisor.config import BillingConfig, Config
from supervisor.core.forecast import money
from supervisor.core.notify import Notice

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
DELIVERY_STATES = (PENDING, DELIVERED, FAILED)


@dataclass(frozen=True)
class Routes:
    """Which hook (by key) wants which events, the config hash events carry, and the price
    their credits are shown in money at."""

    hooks: tuple[tuple[str, frozenset[str]], ...] = ()
    config_hash: str = ""
    billing: BillingConfig = field(default_factory=BillingConfig)

    @classmethod
    def of(cls, config: Config) -> Routes:
        return cls(
            tuple((hook.key, frozenset(hook.events)) for hook in config.notify.webhooks),
            config.config_hash,
            config.billing,
        )

    @property
    def keys(self) -> set[str]:
        return {key for key, _ in self.hooks}


def new_delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def outbox_rows(notices: Iterable[Notice], routes: Routes, now: datetime) -> list[dict[str, Any]]:
    rows = []
    for notice in notices:
        payload = {
            "event": notice.event,
            "at": notice.at.isoformat().replace("+00:00", "Z"),
            "config_hash": routes.config_hash,
            **notice.fields,
        }
        if "money" not in payload and isinstance(payload.get("credits"), int | float):
            # A job's or a submission's credits, in money (budget events bring their own twin).
            payload["money"] = money(routes.billing, {"credits": payload["credits"]})
        for key, events in routes.hooks:
            if notice.event not in events:
                continue
            rows.append(
                {
                    "delivery_id": new_delivery_id(),
                    "hook": key,
                    "event": notice.event,
                    "subject": notice.subject,
                    "payload": payload,
                    "state": PENDING,
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                    "updated_at": now,
                }
            )
    return rows


async def insert_notices(conn: AsyncConnection, notices: Iterable[Notice], routes: Routes, now: datetime) -> int:
    """Insert the outbox rows of `notices` in the caller's transaction; how many."""
    rows = outbox_rows(notices, routes, now)
    if rows:
        await conn.execute(insert(outbox), rows)
    return len(rows)
