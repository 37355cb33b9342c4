"""Aggregate rules the daemon checks on a schedule: team budgets and the account floor.

Per-job limits are decided in the handler at each poll; these rules look across jobs.
A cancel they decide is a Change like any other (core.transitions.decide_cancel, reason
`budget:<name>` or `account_floor`), committed here without a lease — fenced by the job
still watching — and sent by the regular tick, through the same state machine; its
effects (metrics, webhook, log line) are the ones a policy cancel has.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.clado import CladoClient, CladoError
from supervisor.adapters.store import JobWrite, Store
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config
from supervisor.core import transitions
from supervisor.core.budgets import BudgetStatus, matches, period_start, statuses, thresholds_crossed
from supervisor.core.job import Job
from supervisor.core.states import Reason
from supervisor.core.transitions import Change
from supervisor.service.effects import Effects

log = structlog.get_logger("supervisor.enforcement")


class Enforcer:
    def __init__(
        self, store: Store, client: CladoClient, webhooks: Webhooks, effects: Effects, clock: Callable[[], datetime]
    ) -> None:
        self.store = store
        self.client = client
        self.webhooks = webhooks
        self.effects = effects
        self.clock = clock
        self._periods: dict[tuple[str, str], dict[str, Any]] = {}  # cache of budget_periods rows
        self.account_below_floor = False
        self.account_credits: int | None = None

    # -- budgets ----------------------------------------------------------------------------

    async def sweep_budgets(self, config: Config) -> list[BudgetStatus]:
        # A reload may have removed budgets: their series go with them.
        metrics.forget_budgets(set(config.budgets))
        metrics.budget_reasons(set(config.budgets))
        if not config.budgets:
            return []
        now = self.clock()
        starts = {period_start(b.period, b.timezone, now) for b in config.budgets.values()}
        result = statuses(config, now, await self.store.usage(starts, now))
        for status in result:
            metrics.budget_figures(status.name, status.usage.spent, status.usage.reserved, status.credits)
            await self._budget_events(config, status, now)
            if status.exhausted and config.budgets[status.name].action in ("cancel", "observe"):
                await self._stop_matching(config, status, now)
        return result

    async def _budget_events(self, config: Config, status: BudgetStatus, now: datetime) -> None:
        budget = config.budgets[status.name]
        key = status.period_start.isoformat() if status.period_start else "total"
        record = self._periods.get((status.name, key))
        if record is None:
            record = await self.store.budget_period(status.name, key)
            self._periods = {k: v for k, v in self._periods.items() if k[0] != status.name}
            self._periods[(status.name, key)] = record
        crossed = thresholds_crossed(status, budget.warn_at, record["warned"])
        newly_exhausted = status.exhausted and record["exhausted_at"] is None
        if not crossed and not newly_exhausted:
            return
        record["warned"] = [*record["warned"], *crossed]
        if newly_exhausted:
            record["exhausted_at"] = now
        await self.store.save_budget_period(status.name, key, record["warned"], record["exhausted_at"], now)
        figures = {"spent": status.usage.spent, "reserved": status.usage.reserved, "credits": status.credits}
        for fraction in crossed:
            log.warning("budget warning", budget=status.name, fraction=float(fraction), **figures)
            self.webhooks.emit("budget_warning", budget=status.name, fraction=float(fraction), **figures)
        if newly_exhausted:
            log.error("budget exhausted", budget=status.name, action=budget.action, **figures)
            self.webhooks.emit("budget_exhausted", budget=status.name, action=budget.action, **figures)

    async def _stop_matching(self, config: Config, status: BudgetStatus, now: datetime) -> None:
        budget = config.budgets[status.name]
        candidates = [
            job for job in await self.store.watching_since(status.period_start) if matches(budget, job.labels or {})
        ]
        if not candidates:
            return
        facts = {
            "spent": status.usage.spent, "budget_credits": status.credits,
            "period_start": status.period_start.isoformat() if status.period_start else None,
        }  # fmt: skip
        await self._act(config, budget.action, candidates, f"budget:{status.name}", f"budgets.{status.name}", facts, now)

    # -- the account floor --------------------------------------------------------------------

    async def check_account(self, config: Config) -> None:
        account = config.account
        if account is None:  # removed by a reload: no floor, so no figure either
            metrics.ACCOUNT_CREDITS.clear()
            return
        try:
            credits = await self.client.credits()
        except CladoError as exc:
            log.warning("could not read the account's credits", error=str(exc))
            return
        self.account_credits = credits
        metrics.ACCOUNT_CREDITS.set(credits)
        below = credits < account.min_credits
        if below and not self.account_below_floor:
            log.error("account below its credit floor", credits=credits, min_credits=account.min_credits, action=account.action)
            self.webhooks.emit("account_floor", credits=credits, min_credits=account.min_credits, action=account.action)
        elif not below and self.account_below_floor:
            log.info("account back above its credit floor", credits=credits, min_credits=account.min_credits)
        self.account_below_floor = below
        if below and account.action in ("cancel", "observe"):
            now = self.clock()
            running = await self.store.watching_since(None)
            facts = {"account_credits": credits, "min_credits": account.min_credits}
            await self._act(config, account.action, running, Reason.ACCOUNT_FLOOR, "account.min_credits", facts, now)

    async def _act(
        self,
        config: Config,
        action: str,
        jobs: list[Job],
        reason: str,
        rule: str,
        facts: dict[str, Any],
        now: datetime,
    ) -> None:
        """Decide (or, observing, record) a cancel for each job, fenced by its still watching."""
        if action == "cancel" and not config.supervisor.dry_run:
            writes = [
                JobWrite(transitions.decide_cancel(Change.of(job), reason, self._detail(rule, job, config, facts), now),
                         lease_token=None)
                for job in jobs
            ]  # fmt: skip
        else:
            # A record, not a decision: the lease of a poll in flight is left alone.
            writes = [
                JobWrite(transitions.would_cancel(Change.of(job), reason, self._detail(rule, job, config, facts), now),
                         lease_token=None, release=False)
                for job in jobs if job.would_cancel_reason is None
            ]  # fmt: skip
        writes = [write for write in writes if write.change.events]
        done = await self.store.apply_each(writes)
        self.effects.applied(write.change for write, ok in zip(writes, done, strict=True) if ok)

    @staticmethod
    def _detail(rule: str, job: Job, config: Config, facts: dict[str, Any]) -> dict[str, Any]:
        return transitions.decision_detail(rule, job.credits_used, config.config_hash, **facts)
