"""The leases of the jobs this replica is handling: each handling's deadline, and the keeper
that extends the leases of handlings that run long (a slow API, a queue behind a burst).

A handling stops before its lease can expire: its deadline is a fraction of the lease from
the claim, pushed on each time the keeper extends the lease. A lease that could not be
extended (database down, lease lost) keeps its deadline, so that handling stops in time and
another claimer can take the job once the lease has expired.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from supervisor.adapters.store import Store
from supervisor.config import Config
from supervisor.service.guards import Backoff, db_timeout

log = structlog.get_logger("supervisor.daemon")

# A job whose handling outlives this is let time out even if its lease could be extended.
MAX_HANDLING = 120.0
# Handling stops this fraction of a lease after the lease was taken or last extended,
# leaving the rest for the final commit and the clocks' differences.
LEASE_USE = 0.8
# The keeper runs this many times per lease_ttl (the daemon schedules it).
LEASE_RENEWALS = 4


@dataclass
class InFlight:
    """One claimed job being handled (or waiting for its due time) on this replica."""

    task: asyncio.Task[None]
    lease_token: str
    claimed_at: float  # loop time just before the claim (the lease started after it)
    deadline: float  # loop time by which handling stops: before the lease can expire
    phase: str = "wait"  # wait → poll → cancel (a started cancel is let finish on shutdown)
    scope: asyncio.Timeout | None = None  # the handling's timeout, moved on when the lease is


class LeaseKeeper:
    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        clock: Callable[[], datetime],
        inflight: dict[str, InFlight],
        stopping: asyncio.Event,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._inflight = inflight
        self._stopping = stopping
        self._backoff = Backoff.renewing("lease extension", config().supervisor.lease_ttl, LEASE_RENEWALS)

    async def keep(self) -> None:
        """Extend the leases of jobs still being handled once a fifth of their lease is
        used, and move their deadlines on."""
        if self._stopping.is_set() or not self._inflight:
            return
        now = asyncio.get_running_loop().time()
        ttl = self._config().supervisor.lease_ttl
        # Due once a fifth of the lease is used: a few rounds of this keeper (every quarter
        # lease) before the deadline, should one be slow.
        due = {
            job_id: item.lease_token
            for job_id, item in self._inflight.items()
            if item.deadline - now < ttl.total_seconds() * (LEASE_USE - 0.2) and now - item.claimed_at < MAX_HANDLING
        }
        if not due or not self._backoff.ready():
            return
        try:
            # The new deadlines count from before this call, so a slow answer is still safe.
            async with db_timeout(self._store, max(1.0, ttl.total_seconds() / 2)):
                kept = await self._store.extend_leases(due, ttl, self._clock())
        except Exception as exc:  # noqa: BLE001 - a failed extension backs off; leases then expire
            self._backoff.failed(exc)
            return
        self._backoff.succeeded()
        deadline = now + ttl.total_seconds() * LEASE_USE
        for job_id, token in kept.items():
            item = self._inflight.get(job_id)
            if item is not None and item.lease_token == token and deadline > item.deadline:
                item.deadline = deadline
                if item.scope is not None:
                    item.scope.reschedule(deadline)
        if len(kept) < len(due):
            # Mostly handlers that released their lease with their last write meanwhile; a
            # lease taken by another replica instead shows as "lease lost; write dropped".
            log.debug("leases not extended", jobs=len(due) - len(kept))
