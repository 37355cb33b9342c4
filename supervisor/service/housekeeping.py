"""The singleton chores, run by the leader only (elector.py): budget sweeps and the account
floor (their rules are the Enforcer's, chores.py), retention, and the jobs-by-state gauges
with the systemd status line (the lag watch's note after it: lag.py). Each is bounded,
catches its own errors and backs off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.store import Store
from supervisor.adapters.systemd import Notifier
from supervisor.config import Config
from supervisor.core.budgets import period_start
from supervisor.core.states import ACTIVE, State
from supervisor.core.transitions import BLIND_REASONS
from supervisor.service.chores import Enforcer
from supervisor.service.elector import Elector
from supervisor.service.guards import Backoff, db_timeout
from supervisor.service.lag import status_line

log = structlog.get_logger("supervisor.daemon")

# How often the leader prunes terminal jobs older than [supervisor] retention.
RETENTION_EVERY = 300.0
# How often, at most, the jobs-by-state gauges and the status line are refreshed (after a tick).
SUMMARY_EVERY = 5.0
# Cap of a chore's exponential backoff after consecutive database failures.
CHORE_BACKOFF_CAP = 30.0

Spawn = Callable[[Callable[[], Awaitable[None]], str], None]


class Housekeeping:
    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        enforcer: Enforcer,
        elector: Elector,
        notifier: Notifier,
        clock: Callable[[], datetime],
        stopping: asyncio.Event,
        *,
        inflight: Callable[[], int],
        spawn: Spawn,
        lag_note: Callable[[], str | None] = lambda: None,
        api_drift: Callable[[], bool] = lambda: False,
    ) -> None:
        self._config = config
        self._store = store
        self._enforcer = enforcer
        self._elector = elector
        self.notifier = notifier
        self._clock = clock
        self._stopping = stopping
        self._inflight = inflight
        self._spawn = spawn  # the runtime's: shutdown waits for what is started this way
        self._lag_note = lag_note  # the lag watch's, said after the summary on STATUS=
        self._api_drift = api_drift  # this replica's poller's: said on STATUS= too
        # The latest summary (what `systemd-notify READY=1` said until the first refresh).
        self.summary = "supervising"
        self._backoffs = {
            name: Backoff(f"chore {name}", first=first, cap=CHORE_BACKOFF_CAP)
            for name, first in (
                ("sweep_budgets", 1.0),
                ("forecast_budgets", 1.0),
                ("check_account", 1.0),
                ("retention", 1.0),
                ("summary", 5.0),
            )
        }
        self._summary_due = 0.0
        self._warned_total_budget = False
        metrics.clear_leader_gauges()  # not the leader yet: nothing of the leader's to show

    # -- the chores (scheduled by the runtime) --------------------------------------------

    async def sweep_budgets(self) -> None:
        """Budgets: every tick or second (usage moves with every poll)."""
        await self._chore("sweep_budgets", lambda: self._enforcer.sweep_budgets(self._config()))

    async def forecast_budgets(self) -> None:
        """Budget forecasts: their metrics and forecast warnings, every FORECAST_EVERY."""
        await self._chore("forecast_budgets", lambda: self._enforcer.forecast_budgets(self._config()))

    async def check_account(self) -> None:
        """The account floor, every [account] check_interval."""
        await self._chore("check_account", lambda: self._enforcer.check_account(self._config()))

    async def retention(self) -> None:
        """Delete terminal jobs (and their events) not updated for [supervisor] retention,
        in bounded batches; a budget's current period is always kept whole."""
        await self._chore("retention", self._prune)

    def after_tick(self) -> None:
        """Refresh the summary every few seconds, as long as the ticks run (while the claim
        fails, the status line keeps saying why)."""
        now = time.monotonic()
        if now >= self._summary_due:
            self._summary_due = now + SUMMARY_EVERY
            self._spawn(self.refresh_summary, "summary")

    def leadership_changed(self, leader: bool) -> None:
        if leader:
            # Catch up at once rather than at the chores' next interval.
            self._spawn(self.refresh_summary, "summary")
            if self._config().account is not None:
                self._spawn(self.check_account, "account")
        else:
            # The fleet's figures (jobs by state, budgets, the account) are the leader's: gone
            # here, the new leader's series are the only ones, so sums and maxima stay right.
            metrics.clear_leader_gauges()

    async def refresh_summary(self) -> None:
        """The jobs-by-state gauges (leader only: one query for the whole fleet) and the
        systemd status line."""
        if not self._elector.notice():
            self._show(f"supervising; {self._inflight()} job(s) in flight (not the leader)")
            return
        backoff = self._backoffs["summary"]
        if not backoff.ready():
            return
        try:
            async with db_timeout(self._store, 10):
                counts = await self._store.count_by_state()
                blind = await self._store.count_blind()
        except Exception as exc:  # noqa: BLE001 - a chore never dies: it backs off and says why
            backoff.failed(exc)
            return
        backoff.succeeded()
        if not self._elector.is_leader:  # lost while counting: the gauges are no longer ours
            return
        for state in State:
            metrics.JOBS.labels(state.value).set(counts.get(state.value, 0))
        for reason in BLIND_REASONS:
            metrics.JOBS_BLIND.labels(reason).set(blind.get(reason, 0))
        active = sum(counts.get(state.value, 0) for state in ACTIVE)
        summary = f"supervising {active} active job(s); {self._inflight()} in flight (leader)"
        if sum(blind.values()):
            summary += f"; {sum(blind.values())} blind"
        self._show(summary)

    def _show(self, summary: str) -> None:
        """The new summary on systemd's STATUS=, with the lag watch's note (if any) after it."""
        if self._api_drift():
            summary += "; API DRIFT: status answers unreadable, jobs blind"
        self.summary = summary
        self.notifier.status(status_line(summary, self._lag_note()))

    # -- internals ----------------------------------------------------------------------

    async def _chore(self, name: str, body: Callable[[], Awaitable[object]]) -> None:
        """Run `body` if this replica leads and the chore is not backing off."""
        backoff = self._backoffs[name]
        if self._stopping.is_set() or not self._elector.is_leader or not backoff.ready():
            return
        try:
            # Never outlives the leadership it started under.
            async with db_timeout(self._store, min(30.0, self._elector.seconds_left())):
                await body()
        except Exception as exc:  # noqa: BLE001 - a chore never dies: it backs off and says why
            backoff.failed(exc)
        else:
            backoff.succeeded()

    async def _prune(self) -> None:
        config = self._config()
        now = self._clock()
        cutoff = now - config.supervisor.retention
        for name, budget in config.budgets.items():
            start = period_start(budget.period, budget.timezone, now)
            if start is None:  # period = "total": every job ever counts against it
                if not self._warned_total_budget:
                    self._warned_total_budget = True
                    log.warning("retention disabled: a budget counts every job ever", budget=name)
                return
            cutoff = min(cutoff, start)
        deleted = await self._store.prune(cutoff)
        admissions = await self._store.prune_admissions(now - timedelta(days=1))
        # Delivered webhooks go with the jobs; pending and failed ones stay until handled.
        deliveries = await self._store.prune_deliveries(now - config.supervisor.retention)
        if deleted or admissions or deliveries:
            log.info(
                "retention: pruned", jobs=deleted, admissions=admissions, deliveries=deliveries,
                older_than=cutoff.isoformat(),
            )  # fmt: skip
