"""Aggregate rules the daemon checks on a schedule: team budgets and the account floor.

Per-job limits are decided in the handler at each poll; these rules look across jobs.
A cancel they decide is a Change like any other (core.transitions.decide_cancel, reason
`budget:<name>` or `account_floor`), committed here without a lease — fenced by the job
still watching — and sent by the regular tick, through the same state machine; its
effects (metrics, webhook, log line) are the ones a policy cancel has.

A budget is also predicted as a whole: its crossing time from its spend carried on at the
sum of its running jobs' rates (core.budgets.predict_crossing). When it falls before the next
sweep, those jobs' polls are brought forward to just after it (a lease-less write of
`next_check_at` only, never later than the job's own), and the sweep looks again as soon as
those polls' answers are recorded (told by the effects step; at most _SETTLE after them, for
polls another replica makes), so the budget is seen crossed a few milliseconds after those
polls, and the cancels are sent at once (`on_due`: the runtime starts a tick) rather than at
the next tick.

Which jobs a crossed budget cancels: every matching job still watching, newest first. Once
the spend has reached the budget every further result is past it, so none may go on; the
cancels are decided on the spend polls saw, never on the prediction, so a budget that was not
reached cancels nothing (the prediction only moves polls); the order makes the decision rows,
logs and webhooks the same on every run, and a job already being cancelled or finished is not
decided again (each decision is fenced by the job still watching).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.clado import CladoClient, CladoError
from supervisor.adapters.store import JobWrite, Store
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config
from supervisor.core import transitions
from supervisor.core.budgets import (
    BudgetStatus,
    Spender,
    matches,
    period_start,
    predict_crossing,
    statuses,
    thresholds_crossed,
)
from supervisor.core.forecast import cleared_key, forecast_key, forecast_warnings, money
from supervisor.core.job import Job
from supervisor.core.notify import Notice
from supervisor.core.states import Reason
from supervisor.core.transitions import Change
from supervisor.service.effects import Effects
from supervisor.service.forecasting import Forecaster, Outlook

log = structlog.get_logger("supervisor.enforcement")

# A budget predicted to cross within _LOOKAHEAD has its running jobs polled at once if their
# last poll is older than _STALE (a fresh rate, measured over the seconds since), and within
# _PULL, polled just after the crossing. The dispatcher claims a tick ahead, so polls brought
# forward a second or more ahead are made on time.
_LOOKAHEAD = timedelta(seconds=4)
_PULL = timedelta(seconds=2)
_STALE = timedelta(seconds=1)
# Those polls are made this long after the predicted crossing (so that they see it), and the
# budget is looked at again once their answers are recorded, or this long after them if this
# replica does not see them all recorded by then.
_POLL_AFTER = timedelta(milliseconds=30)
_SETTLE = timedelta(milliseconds=100)
# One sweep looks again for at most this long, well within its one-second interval.
_SWEEP_SPAN = timedelta(milliseconds=800)
# Budgets are forecast this often, in a chore of their own (each forecast reads every running
# job and costs CPU in proportion: bench/forecast.py measures it); a forecast warning is at
# most this late.
FORECAST_EVERY = timedelta(seconds=5)


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
        # Told when jobs became due before the next tick (cancels decided, polls brought
        # forward), so that a tick claims them now rather than up to a tick late.
        self.on_due: Callable[[], None] = lambda: None
        # The jobs whose polls, brought forward to a crossing, the sweep waits for (see recorded).
        self._awaited: set[str] = set()
        self._all_recorded = asyncio.Event()
        self.forecaster = Forecaster(store)
        self._period_lock = asyncio.Lock()

    def recorded(self, change: Change) -> None:
        """A job's change was committed (the effects step tells of every one): once the polls
        brought forward to a crossing are all in, the sweep looks again at once."""
        if change.job.job_id in self._awaited:
            self._awaited.discard(change.job.job_id)
            if not self._awaited:
                self._all_recorded.set()

    # -- budgets ----------------------------------------------------------------------------

    async def sweep_budgets(self, config: Config) -> list[BudgetStatus]:
        # A reload may have removed budgets: their series go with them.
        metrics.forget_budgets(set(config.budgets))
        metrics.budget_reasons(set(config.budgets))
        if not config.budgets:
            return []
        started = self.clock()
        result, polls_at = await self._sweep(config)
        # A budget due to cross before the next sweep: looked at again once the polls brought
        # forward to its crossing are recorded.
        while polls_at is not None and polls_at + _SETTLE <= started + _SWEEP_SPAN:
            await self._until_recorded(polls_at + _SETTLE)
            result, polls_at = await self._sweep(config)
        return result

    # -- forecasts ------------------------------------------------------------------------------

    async def forecast_budgets(self, config: Config) -> list[Outlook]:
        """Every budget's forecast: its metrics, and its forecast warnings (budget_forecast once
        per period per threshold when the central forecast reaches it, budget_forecast_cleared
        once after it when it falls back under). Fired warnings are remembered with the spend
        warnings of the period (budget_periods.warned), so a reload or a restart keeps them.
        A chore of its own (every FORECAST_EVERY), so that its reads never delay a sweep."""
        if not config.budgets:
            return []
        now = self.clock()
        outlooks = await self.forecaster.outlooks(config, now)
        for outlook in outlooks:
            forecast, status = outlook.forecast, outlook.status
            exhausts_in = None
            if forecast.exhausts_at is not None:
                exhausts_in = max(0.0, (forecast.exhausts_at - now).total_seconds())
            metrics.budget_forecast(status.name, forecast.central, exhausts_in)
            await self._forecast_events(config, outlook, now)
        return outlooks

    async def _forecast_events(self, config: Config, outlook: Outlook, now: datetime) -> None:
        if not config.budgets[outlook.status.name].forecast_warn_at:
            return
        async with self._period_lock:
            await self._forecast_warnings(config, outlook, now)

    async def _forecast_warnings(self, config: Config, outlook: Outlook, now: datetime) -> None:
        status, forecast = outlook.status, outlook.forecast
        budget = config.budgets[status.name]
        key, record = await self._period_record(status)
        crossed, cleared = forecast_warnings(
            forecast.central, status.credits, budget.forecast_warn_at, record["warned"]
        )
        if not crossed and not cleared:
            return
        record["warned"] = [*record["warned"], *map(forecast_key, crossed), *map(cleared_key, cleared)]
        figures = {
            "spent": status.usage.spent, "credits": status.credits, "forecast_credits": round(forecast.central, 1),
            "forecast_low": round(forecast.low, 1), "forecast_high": round(forecast.high, 1),
        }  # fmt: skip
        facts = {
            "budget": status.name, **figures,
            "exhausts_at": forecast.exhausts_at.isoformat() if forecast.exhausts_at else None,
            "forecast_basis": forecast.basis, "money": money(config.billing, figures),
        }  # fmt: skip
        subject = f"budget:{status.name}"
        notices = [Notice("budget_forecast", now, subject, {**facts, "fraction": f}) for f in crossed]
        notices += [Notice("budget_forecast_cleared", now, subject, {**facts, "fraction": f}) for f in cleared]
        # The warnings fired and their webhook events (outbox rows) in one transaction.
        await self.store.save_budget_period(status.name, key, record["warned"], record["exhausted_at"], now, notices)
        self.webhooks.wake()
        for fraction in crossed:
            log.warning("budget forecast warning", budget=status.name, fraction=fraction, **figures)
        for fraction in cleared:
            log.info("budget forecast back under its warning", budget=status.name, fraction=fraction, **figures)

    async def _period_record(self, status: BudgetStatus) -> tuple[str, dict[str, Any]]:
        """The budget period's row (its fired warnings), cached: this process writes it."""
        key = status.period_start.isoformat() if status.period_start else "total"
        record = self._periods.get((status.name, key))
        if record is None:
            record = await self.store.budget_period(status.name, key)
            self._periods = {k: v for k, v in self._periods.items() if k[0] != status.name}
            self._periods[(status.name, key)] = record
        return key, record

    async def _until_recorded(self, deadline: datetime) -> None:
        """Until the polls the last sweep waits for are recorded, or the deadline."""
        timeout = max(0.0, (deadline - self.clock()).total_seconds())
        if not self._awaited:
            await asyncio.sleep(timeout)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_recorded.wait(), timeout)

    async def _sweep(self, config: Config) -> tuple[list[BudgetStatus], datetime | None]:
        """Every budget's status, its events and cancels; and, if one is predicted to cross
        before the next sweep, when the polls brought forward to its crossing are made."""
        self._awaited = set()
        self._all_recorded.clear()
        now = self.clock()
        starts = {period_start(b.period, b.timezone, now) for b in config.budgets.values()}
        result = statuses(config, now, await self.store.usage(starts, now))
        again: list[datetime] = []
        for status in result:
            metrics.budget_figures(status.name, status.usage.spent, status.usage.reserved, status.credits)
            await self._budget_events(config, status, now)
            if config.budgets[status.name].action not in ("cancel", "observe"):
                continue
            running = self._matching(config, status, await self.store.watching_since(status.period_start))
            if status.exhausted:
                await self._stop_matching(config, status, running, now)
            else:
                polls_at = await self._poll_before_crossing(status, running, now)
                if polls_at is not None:
                    again.append(polls_at)
        return result, min(again, default=None)

    @staticmethod
    def _matching(config: Config, status: BudgetStatus, watching: list[Job]) -> list[Job]:
        """The budget's running jobs, newest first (the order its cancels are decided in)."""
        budget = config.budgets[status.name]
        jobs = [job for job in watching if matches(budget, job.labels or {})]
        return sorted(jobs, key=lambda job: (job.submitted_at, job.job_id), reverse=True)

    async def _poll_before_crossing(self, status: BudgetStatus, running: list[Job], now: datetime) -> datetime | None:
        """If the budget's predicted crossing is near, its spending jobs are polled just after
        it (returned: when), or first, if their last poll is older than a refresh, at once (a
        rate measured over the seconds since then is what the crossing is predicted from).
        Their next_check_at is brought forward, never put back; the polls due by then are
        the ones the sweep waits for."""
        spenders = [Spender(job.credits_used, job.credits_per_s, job.last_polled_at) for job in running]
        crossing = predict_crossing(status, spenders, now)
        if crossing is None or crossing - now > _LOOKAHEAD:
            return None
        after = max(crossing, now) + _POLL_AFTER
        refresh = crossing - now > _PULL

        def when(job: Job) -> datetime:
            if not refresh:
                return after
            stale = job.last_polled_at is None or now - job.last_polled_at > _STALE
            return now if stale else job.next_check_at

        writes = [
            # Lease-less, fenced by the job still watching, and the lease of a poll in flight
            # kept: that poll writes its own next check, and the next sweep brings it forward again.
            JobWrite(Change.of(job).set({"next_check_at": when(job)}), lease_token=None, release=False)
            for job in running
            if job.credits_per_s and job.next_check_at > when(job)
        ]
        done = await self.store.apply_each(writes)
        if refresh:
            return None  # the crossing is seconds away: the next sweeps predict it again
        moved = {write.change.job.job_id for write, ok in zip(writes, done, strict=True) if ok}
        awaited = {
            job.job_id for job in running if job.credits_per_s and (job.job_id in moved or job.next_check_at <= after)
        }
        if awaited - self._awaited:
            self._awaited |= awaited
            self._all_recorded.clear()
        if moved:
            self.on_due()
        return after

    async def _budget_events(self, config: Config, status: BudgetStatus, now: datetime) -> None:
        # One writer of a period's fired warnings at a time: the sweep and the forecast chore.
        async with self._period_lock:
            await self._spend_warnings(config, status, now)

    async def _spend_warnings(self, config: Config, status: BudgetStatus, now: datetime) -> None:
        budget = config.budgets[status.name]
        key, record = await self._period_record(status)
        crossed = thresholds_crossed(status, budget.warn_at, record["warned"])
        newly_exhausted = status.exhausted and record["exhausted_at"] is None
        if not crossed and not newly_exhausted:
            return
        record["warned"] = [*record["warned"], *crossed]
        if newly_exhausted:
            record["exhausted_at"] = now
        figures = {"spent": status.usage.spent, "reserved": status.usage.reserved, "credits": status.credits}
        subject = f"budget:{status.name}"
        cash = money(config.billing, figures)
        notices = [
            Notice(
                "budget_warning",
                now,
                subject,
                {"budget": status.name, "fraction": float(fraction), **figures, "money": cash},
            )
            for fraction in crossed
        ]
        if newly_exhausted:
            notices.append(
                Notice(
                    "budget_exhausted",
                    now,
                    subject,
                    {"budget": status.name, "action": budget.action, **figures, "money": cash},
                )
            )
        # The crossings and their webhook events (outbox rows) in one transaction.
        await self.store.save_budget_period(status.name, key, record["warned"], record["exhausted_at"], now, notices)
        self.webhooks.wake()
        for fraction in crossed:
            log.warning("budget warning", budget=status.name, fraction=float(fraction), **figures)
        if newly_exhausted:
            log.error("budget exhausted", budget=status.name, action=budget.action, **figures)

    async def _stop_matching(self, config: Config, status: BudgetStatus, candidates: list[Job], now: datetime) -> None:
        budget = config.budgets[status.name]
        if not candidates:
            return
        facts = {
            "spent": status.usage.spent, "budget_credits": status.credits,
            "period_start": status.period_start.isoformat() if status.period_start else None,
        }  # fmt: skip
        await self._act(
            config, budget.action, candidates, f"budget:{status.name}", f"budgets.{status.name}", facts, now
        )

    # -- the account floor --------------------------------------------------------------------

    async def check_account(self, config: Config) -> None:
        account = config.account
        if account is None:  # removed by a reload: no floor, so no figure either
            metrics.ACCOUNT_CREDITS.clear()
            self.account_credits, self.account_below_floor = None, False
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
            log.error(
                "account below its credit floor",
                credits=credits,
                min_credits=account.min_credits,
                action=account.action,
            )
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
        if action == "cancel" and any(done):
            self.on_due()

    @staticmethod
    def _detail(rule: str, job: Job, config: Config, facts: dict[str, Any]) -> dict[str, Any]:
        return transitions.decision_detail(rule, job.credits_used, config.config_hash, **facts)
