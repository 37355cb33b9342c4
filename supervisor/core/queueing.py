"""The scheduler's pure rules: which queued submission may start now, and why the others wait.

A queued submission is never clamped by a budget: it waits until its whole reservation
fits every reserving budget it matches, the account floor allows it, and the initiate rate
(`api.initiate_per_minute`, over any sliding minute, later while a 429 holds the client
off) has a slot. Within a budget it is first come, first served after priority: the queue
order the candidates arrive in. What could never fit (its worst case exceeds a reserving
budget's whole period, or its policy allows no result) is refused with the numbers.
No I/O and no clock: `now` is an argument; service/queue.py does the reading and writing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from supervisor.config import Config
from supervisor.core.budgets import (
    AdmissionRefused,
    BudgetStatus,
    Usage,
    grant,
    next_period_start,
    period_start,
    statuses,
)
from supervisor.core.forecast import BudgetForecast, History, expected_cost, forecast_refusal

# Each budget's forecast and the history it was learned from, where admission reads them.
Forecasts = Mapping[str, tuple[BudgetForecast, History]]

QUEUED, INITIATING, STARTED, ORPHANED = "queued", "initiating", "started", "orphaned"
EXPIRED, CANCELLED, FAILED = "expired", "cancelled", "failed"
STATES = (QUEUED, INITIATING, STARTED, ORPHANED, EXPIRED, CANCELLED, FAILED)

RATE_WINDOW = timedelta(minutes=1)  # initiate_per_minute is reckoned over any sliding minute


@dataclass(frozen=True)
class Waiting:
    """Why a queued submission waits, and when it may start (None: not known)."""

    reason: str
    expected_at: datetime | None


@dataclass(frozen=True)
class SubmissionPlan:
    """A scheduling decision: the submission to initiate now (or None), the results to ask
    for, the credits to reserve (None: no reserving budget), and why the others wait."""

    chosen: str | None = None
    results: int = 0
    reserve: int | None = None
    clamped_by: tuple[str, ...] = ()
    waiting: Mapping[str, Waiting] = field(default_factory=dict)


def new_submission(
    config: Config,
    query: str,
    *,
    labels: Mapping[str, str],
    policy: str,
    limit: int,
    priority: int,
    expires_after: timedelta | None,
    now: datetime,
) -> dict[str, Any]:
    """A submission's row before it is decided on (its state is set by the store)."""
    return {
        "id": str(uuid.uuid4()), "state": QUEUED, "query": query, "labels": dict(labels), "policy": policy,
        "requested_limit": limit, "granted_limit": None, "clamped_by": None, "priority": priority,
        "reason": None, "expected_at": None, "created_at": now, "updated_at": now,
        "expires_at": now + (expires_after or config.scheduler.expires_after), "initiating_at": None,
        "owner": None, "admission_id": None, "job_id": None, "error": None, "announced": None,
    }  # fmt: skip


def period_starts(config: Config, now: datetime) -> set[datetime | None]:
    """The start of every budget's current period: the usage a decision at `now` reads."""
    return {period_start(b.period, b.timezone, now) for b in config.budgets.values()}


def wanted(config: Config, row: Mapping[str, Any]) -> tuple[int, int | None]:
    """(results a submission asks for, its policy's max_credits if enforced). The policy caps
    it at the source; a budget never clamps a queued submission: it waits until it fits."""
    policy = config.resolve_policy(row["policy"])
    # An observe-mode policy or a dry run only records what it would do: no clamp either.
    enforced = policy.action == "cancel" and not config.supervisor.dry_run
    max_credits = policy.max_credits if enforced else None
    results = int(row["requested_limit"])
    if max_credits is not None:
        results = min(results, max_credits // config.api.credits_per_result)
    return results, max_credits


def _holding(config: Config, labels: Mapping[str, str], budget_statuses: Sequence[BudgetStatus]) -> list[BudgetStatus]:
    """The budgets that can hold a submission back: those it matches that do not only observe."""
    return [
        status
        for status in budget_statuses
        if status.name in config.budgets_for(dict(labels)) and config.budgets[status.name].action != "observe"
    ]


def never_fits(config: Config, row: Mapping[str, Any], budget_statuses: Sequence[BudgetStatus]) -> str | None:
    """Why waiting cannot help (the job's own worst case exceeds a reserving budget's whole
    period, or its policy allows no result), else None."""
    results, max_credits = wanted(config, row)
    if results < 1:
        per = config.api.credits_per_result
        return f"the job's max_credits ({max_credits}) allows no result at {per} credits each"
    need = results * config.api.credits_per_result
    for status in _holding(config, row["labels"], budget_statuses):
        if config.budgets[status.name].reserve and need > status.credits:
            return (
                f"budget {status.name!r} holds {status.credits} credits a {status.period}; this job may use "
                f"{need} (limit {results}): it would never fit, however long it waited"
            )
    return None


def _wait_for_budgets(
    config: Config, row: Mapping[str, Any], budget_statuses: Sequence[BudgetStatus], now: datetime
) -> Waiting | None:
    """Why the submission's whole reservation does not fit now (None: it does)."""
    results, _ = wanted(config, row)
    need = results * config.api.credits_per_result
    for status in _holding(config, row["labels"], budget_statuses):
        budget = config.budgets[status.name]
        blocked = budget.action == "block" and status.full
        if status.exhausted or blocked or (budget.reserve and status.remaining < need):
            return Waiting(f"budget:{status.name}", next_period_start(budget.period, budget.timezone, now))
    return None


def forecast_block(
    config: Config, labels: Mapping[str, str], credits: int, forecasts: Forecasts | None
) -> tuple[str, str] | None:
    """(budget, why) for the first matching budget with forecast_action = "block" whose
    forecast this submission (granted `credits`, expected to cost a typical job of the budget)
    would push past its credits this period; None if every forecast has room."""
    if not forecasts:
        return None
    for name in config.budgets_for(dict(labels)):
        budget = config.budgets[name]
        if budget.forecast_action != "block" or name not in forecasts:
            continue
        forecast, history = forecasts[name]
        refusal = forecast_refusal(name, forecast, budget.credits, expected_cost(credits, history))
        if refusal:
            return name, refusal
    return None


def _floor_refusal(config: Config, account_credits: int | None, need: int) -> str | None:
    account = config.account
    if account is None or account.action == "observe" or account_credits is None:
        return None
    if account_credits - need < account.min_credits:
        return (
            f"the account has {account_credits} credits; this job may use {need}, which would take it "
            f"below its floor of {account.min_credits} (account.min_credits)"
        )
    return None


def rate_slot(
    config: Config, initiates: Sequence[datetime], now: datetime, held_until: datetime | None
) -> datetime | None:
    """When the next initiate may be sent, if not now: a minute after the oldest of the last
    `initiate_per_minute` initiates, or later while the API holds the client off."""
    per_minute = config.api.initiate_per_minute
    recent = sorted(at for at in initiates if at > now - RATE_WINDOW)
    slot = recent[-per_minute] + RATE_WINDOW if len(recent) >= per_minute else None
    if held_until is not None and held_until > now:
        slot = max(slot or held_until, held_until)
    return slot


def plan(
    config: Config,
    candidates: Sequence[Mapping[str, Any]],
    usage: Mapping[datetime | None, Sequence[tuple[Mapping[str, str], Usage]]],
    initiates: Sequence[datetime],
    now: datetime,
    *,
    account_credits: int | None = None,
    held_until: datetime | None = None,
    only: str | None = None,
    queue: bool = True,
    forecasts: Forecasts | None = None,
) -> SubmissionPlan:
    """Which submission to initiate now, and why the others wait.

    `candidates` are in queue order. `only` restricts the choice to one submission (a new
    one, submitted now): it still waits behind earlier submissions of its budgets. Without
    `queue` (a submission that is refused rather than queued) the old admission rule holds:
    the limit is clamped to what the budgets have left (core.budgets.grant), and whatever
    does not fit raises AdmissionRefused. With `queue`, a submission is never clamped by a
    budget: it waits until its whole reservation fits, the account floor allows it, and the
    initiate rate has a slot; one that never could fit is refused at once (AdmissionRefused).
    A budget with forecast_action = "block" also holds back (refuses, or queues until its next
    period) a submission its `forecasts` say would take it past its credits."""
    budget_statuses = statuses(config, now, usage)
    if not queue:
        row = next(row for row in candidates if row["id"] == only)
        results, max_credits = wanted(config, row)
        granted = grant(config, row["labels"], int(row["requested_limit"]), budget_statuses, max_credits=max_credits)
        refusal = _floor_refusal(config, account_credits, granted.credits)
        if refusal:
            raise AdmissionRefused(refusal)
        blocked_by = forecast_block(config, row["labels"], granted.credits, forecasts)
        if blocked_by:
            raise AdmissionRefused(blocked_by[1])
        return SubmissionPlan(
            row["id"], granted.results, granted.credits if granted.reserving else None, granted.clamped_by
        )
    if only is not None:
        fresh = next(row for row in candidates if row["id"] == only)
        problem = never_fits(config, fresh, budget_statuses)
        if problem:
            raise AdmissionRefused(problem)
    waiting: dict[str, Waiting] = {}
    slot = rate_slot(config, initiates, now, held_until)
    if slot is not None:
        return SubmissionPlan(waiting={row["id"]: Waiting("initiate_rate", slot) for row in candidates})
    blocked: dict[str, Waiting] = {}  # budget → why its queue is held (first come, first served)
    for row in candidates:
        names = {status.name for status in _holding(config, row["labels"], budget_statuses)}
        ahead = next((blocked[name] for name in sorted(names) if name in blocked), None)
        if ahead is not None:
            waiting[row["id"]] = ahead
            continue
        problem = never_fits(config, row, budget_statuses)
        wait = Waiting("never_fits", None) if problem else _wait_for_budgets(config, row, budget_statuses, now)
        results, max_credits = wanted(config, row)
        need = results * config.api.credits_per_result
        if wait is None and _floor_refusal(config, account_credits, need):
            wait = Waiting("account_floor", None)
        if wait is None and (blocked_by := forecast_block(config, row["labels"], need, forecasts)):
            budget = config.budgets[blocked_by[0]]
            wait = Waiting(f"forecast:{blocked_by[0]}", next_period_start(budget.period, budget.timezone, now))
        if wait is None and only is not None and row["id"] != only:
            # An earlier submission that fits now is the drain's to start, first.
            blocked.update(dict.fromkeys(names, Waiting("behind_earlier", now)))
            continue
        if wait is not None:
            waiting[row["id"]] = wait
            if not problem:
                blocked.update(dict.fromkeys(names, wait))
            continue
        granted = grant(config, row["labels"], results, budget_statuses, max_credits=max_credits)
        return SubmissionPlan(
            row["id"], granted.results, granted.credits if granted.reserving else None, granted.clamped_by, waiting
        )
    return SubmissionPlan(waiting=waiting)
