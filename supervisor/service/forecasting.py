"""Every budget's forecast, read from the store: the one place the forecast's inputs are
gathered, for the daemon's sweep (metrics, warnings), the `budgets` and `report` commands,
the admin API and console, and admission (forecast_action = "block").

The pure rules are core.forecast's; here are the reads: budget usage, the running jobs (one
read for every budget), queued submissions, and the jobs of each budget's recent periods
(cached per period for HISTORY_TTL in a long-lived Forecaster: they change little).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from supervisor.adapters.store import Store
from supervisor.config import Config, Policy, labels_match
from supervisor.core.budgets import BudgetStatus, period_start, statuses
from supervisor.core.forecast import (
    WATCHED_FIELDS,
    BudgetForecast,
    History,
    JobForecast,
    PastJob,
    Running,
    Watched,
    forecast_budget,
    forecast_job,
    history_bounds,
    history_of,
    running_job,
)
from supervisor.core.policy import job_policy
from supervisor.core.queueing import INITIATING, QUEUED, Forecasts, wanted

# A budget's history is read again after this long (its past periods' late spend shows).
HISTORY_TTL = timedelta(minutes=5)


@dataclass(frozen=True)
class Outlook:
    """A budget now: its status, its forecast, the history it was learned from."""

    status: BudgetStatus
    forecast: BudgetForecast
    history: History


class Forecaster:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._history: dict[tuple[str, str], tuple[datetime, History]] = {}

    async def outlooks(self, config: Config, now: datetime) -> list[Outlook]:
        """Every budget's status and forecast at `now`."""
        if not config.budgets:
            return []
        starts = {period_start(b.period, b.timezone, now) for b in config.budgets.values()}
        budget_statuses = statuses(config, now, await self.store.usage(starts, now))
        earliest = None if None in starts else min(s for s in starts if s is not None)
        rows = await self.store.watching_columns(earliest, WATCHED_FIELDS)
        # Queued, and being initiated (not a job yet): both are spend to come.
        queued = await self.store.list_submissions([QUEUED, INITIATING])
        histories = await self._histories(config, now)
        per_result = config.api.credits_per_result
        # Each job's inputs once (whatever budgets it counts in), its policy resolved once per
        # policy and overrides; the jobs grouped by label set, each budget's match decided once a set.
        policies: dict[tuple[str, float | None, int | None], Policy] = {}
        by_labels: dict[tuple[tuple[str, str], ...], list[tuple[datetime, Running]]] = {}
        for row in rows:
            job = Watched(**row)
            key = (job.policy, job.max_runtime_s, job.max_credits)
            if key not in policies:
                policies[key] = job_policy(config, job)
            entry = (job.submitted_at, running_job(config, job, policies[key]))
            by_labels.setdefault(tuple(sorted((job.labels or {}).items())), []).append(entry)
        result = []
        for status in budget_statuses:
            budget = config.budgets[status.name]
            history = histories[status.name]
            jobs: list[tuple[Running, JobForecast]] = []
            for labels, group in by_labels.items():
                if not labels_match(budget.match, dict(labels)):
                    continue
                for submitted_at, running in group:
                    if status.period_start is not None and submitted_at < status.period_start:
                        continue
                    jobs.append((running, forecast_job(running, now, typical=history.typical_credits)))
            waiting = [
                wanted(config, row)[0] * per_result for row in queued if labels_match(budget.match, row["labels"] or {})
            ]
            forecast = forecast_budget(status, budget.timezone, jobs, waiting, history, now)
            result.append(Outlook(status, forecast, history))
        return result

    async def _histories(self, config: Config, now: datetime) -> dict[str, History]:
        """Each budget's history, from the cache while fresh and of the same period."""
        keys = {}
        for name, budget in config.budgets.items():
            start = period_start(budget.period, budget.timezone, now)
            keys[name] = (start, start.isoformat() if start else "total")
        stale = {
            name
            for name, (_, key) in keys.items()
            if (cached := self._history.get((name, key))) is None or now - cached[0] > HISTORY_TTL
        }
        if stale:
            windows = {name: _window(config, name, keys[name][0]) for name in stale}
            known = [w for w in windows.values() if w is not None]
            rows: list[dict[str, Any]] = []
            if known:
                rows = await self.store.past_jobs(min(w[0] for w in known), max(w[1] for w in known))
            past: dict[tuple[tuple[str, str], ...], list[PastJob]] = {}
            for row in rows:
                job = _past(row)
                past.setdefault(tuple(sorted(job.labels.items())), []).append(job)
            for name in stale:
                budget = config.budgets[name]
                start = keys[name][0]
                mine = (
                    job for labels, group in past.items() if labels_match(budget.match, dict(labels)) for job in group
                )
                self._history[(name, keys[name][1])] = (now, history_of(budget.period, budget.timezone, start, mine))
        self._history = {k: v for k, v in self._history.items() if k[0] in keys and keys[k[0]][1] == k[1]}
        return {name: self._history[(name, key)][1] for name, (_, key) in keys.items()}


def _window(config: Config, name: str, start: datetime | None) -> tuple[datetime, datetime] | None:
    """The span of a budget's recent periods (None: a total budget learns no arrivals)."""
    if start is None:
        return None
    budget = config.budgets[name]
    return history_bounds(budget.period, budget.timezone, start)[0], start


def _past(row: Mapping[str, Any]) -> PastJob:
    started = row["remote_created_at"] or row["submitted_at"]
    progress = row["last_progress_at"]
    spent_for = (progress - started).total_seconds() if progress is not None else None
    return PastJob(row["labels"] or {}, row["submitted_at"], int(row["credits_used"] or 0), spent_for)


async def admission_forecasts(forecaster: Forecaster, config: Config, now: datetime) -> Forecasts | None:
    """The forecasts admission needs: only read when a budget blocks on its forecast."""
    if not any(budget.forecast_action == "block" for budget in config.budgets.values()):
        return None
    return {o.status.name: (o.forecast, o.history) for o in await forecaster.outlooks(config, now)}
