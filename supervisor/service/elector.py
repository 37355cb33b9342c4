"""Leadership of the singleton chores: the `leaders` row, taken or renewed every
leader_ttl / 3 by whichever replica holds it (or finds it expired), with its expiry in
database time. The holder runs the chores (housekeeping.py); the others only tick."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.store import Store, db_error_text
from supervisor.config import Config
from supervisor.service.guards import Backoff, db_timeout

log = structlog.get_logger("supervisor.daemon")

# The leader row's name: one leader for all singleton chores.
LEADER_ROLE = "chores"
# Leadership is taken or renewed this many times per leader_ttl (the daemon schedules it).
LEADER_RENEWALS = 3


def _monotonic() -> float:
    """The event loop's clock (in production the monotonic clock), which also times the
    renewals: on a test's virtual-time loop both move together."""
    return asyncio.get_running_loop().time()


class Elector:
    def __init__(
        self, config: Callable[[], Config], store: Store, clock: Callable[[], datetime], stopping: asyncio.Event
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._stopping = stopping
        self._backoff = Backoff.renewing("leader renewal", config().supervisor.leader_ttl, LEADER_RENEWALS)
        self._until = 0.0  # monotonic: leadership is ours until then without renewal
        self._was_leader = False
        self._on_change: Callable[[bool], None] = lambda leader: None
        metrics.LEADER.set(0)

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Tell `callback` when this replica becomes leader (True) or stops being it (False)."""
        self._on_change = callback

    @property
    def is_leader(self) -> bool:
        """Whether this replica may run the singleton chores now: it renewed the leader row
        less than leader_ttl ago (measured from before the renewal, on the monotonic clock,
        so the row cannot have expired in the database's clock while this says True)."""
        return _monotonic() < self._until

    def seconds_left(self) -> float:
        """How long leadership lasts without a renewal: no chore may outlive it (a successor
        may start the same chore once the leader row has expired)."""
        return self._until - _monotonic()

    async def elect(self) -> None:
        """Take or renew leadership; notice losing it. Catches its own errors."""
        if self._stopping.is_set():
            return
        ttl = self._config().supervisor.leader_ttl
        started = _monotonic()
        if self._backoff.ready():
            try:
                # Leadership counts from before this call, so a slow answer is still safe.
                async with db_timeout(self._store, max(1.0, ttl.total_seconds() / 2)):
                    expires = await self._store.acquire_leader(LEADER_ROLE, ttl, self._clock())
            except Exception as exc:  # noqa: BLE001 - any failure is a missed renewal, backed off
                self._backoff.failed(exc)
            else:
                self._backoff.succeeded()
                self._until = started + ttl.total_seconds() if expires is not None else 0.0
        self.notice()

    def notice(self) -> bool:
        """Compare leadership now with what it last was (it also lapses between renewals, by
        time alone), and say a change: a log line, the gauge, the callback. Returns it."""
        leader = self.is_leader
        if leader == self._was_leader:
            return leader
        self._was_leader = leader
        metrics.LEADER.set(1 if leader else 0)
        if leader:
            log.info("became leader", owner=self._store.owner, role=LEADER_ROLE)
        else:
            log.warning("lost leadership", owner=self._store.owner, role=LEADER_ROLE)
        self._on_change(leader)
        return leader

    async def resign(self) -> None:
        """Shutdown: give the leader row up (if it is still ours) so that another replica
        takes over at once instead of after leader_ttl."""
        self._until = 0.0
        was_leader, self._was_leader = self._was_leader, False
        metrics.LEADER.set(0)
        if was_leader:
            self._on_change(False)  # what only the leader shows goes with its leadership
        try:
            async with db_timeout(self._store, 5):
                if await self._store.release_leader(LEADER_ROLE):
                    log.info("gave up leadership", owner=self._store.owner, role=LEADER_ROLE)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the row then expires on its own
            log.warning("could not give up leadership", error=db_error_text(exc))
