"""Budgets and admission, the pure part: period windows, usage, warnings, refusals.

A budget's usage in a period = credits already charged by the jobs it matches that were
submitted in the period ("spent") + the unused part of their reservations and of
admissions still in flight ("reserved"). No I/O and no clock: `now` is an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from supervisor.config import BudgetConfig, Config, labels_match


def period_start(period: str, timezone: str, now: datetime) -> datetime | None:
    """The start (UTC) of the period containing `now`, aligned in `timezone`; None for total."""
    if period == "total":
        return None
    local = now.astimezone(ZoneInfo(timezone))
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "week":  # ISO weeks start on Monday
        start = (local - timedelta(days=local.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise ValueError(f"unknown period {period!r}")
    # Re-attach the zone so a DST change inside the day does not shift midnight.
    return start.replace(tzinfo=ZoneInfo(timezone)).astimezone(UTC)


def next_period_start(period: str, timezone: str, now: datetime) -> datetime | None:
    """When the period after the one containing `now` starts (None: a total budget never resets)."""
    start = period_start(period, timezone, now)
    if start is None:
        return None
    # Past the end of any period of this kind, then aligned back (DST-safe, months of any length).
    step = {"hour": timedelta(minutes=90), "day": timedelta(hours=36), "week": timedelta(days=8)}
    return period_start(period, timezone, start + step.get(period, timedelta(days=32)))


@dataclass(frozen=True)
class Usage:
    spent: int = 0
    reserved: int = 0

    @property
    def committed(self) -> int:
        return self.spent + self.reserved

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.spent + other.spent, self.reserved + other.reserved)


@dataclass(frozen=True)
class BudgetStatus:
    name: str
    credits: int
    period: str
    period_start: datetime | None
    usage: Usage
    action: str

    @property
    def remaining(self) -> int:
        return max(0, self.credits - self.usage.committed)

    @property
    def exhausted(self) -> bool:
        """Actual spend reached the budget: what cancel/observe act on."""
        return self.usage.spent >= self.credits

    @property
    def full(self) -> bool:
        """Spend plus reservations reached the budget: no room for another submission."""
        return self.usage.committed >= self.credits

    def summary(self) -> str:
        return f"spent {self.usage.spent} + reserved {self.usage.reserved} of {self.credits} credits ({self.period})"


def matches(budget: BudgetConfig, labels: Mapping[str, str]) -> bool:
    return labels_match(budget.match, labels)


def statuses(
    config: Config,
    now: datetime,
    usage_since: Mapping[datetime | None, Iterable[tuple[Mapping[str, str], Usage]]],
) -> list[BudgetStatus]:
    """Every budget's status, from usage grouped by label set for each period start."""
    result = []
    for name, budget in config.budgets.items():
        start = period_start(budget.period, budget.timezone, now)
        total = Usage()
        for labels, usage in usage_since.get(start, ()):
            if matches(budget, labels):
                total = total + usage
        if not budget.reserve:
            # Reservations are held for the budgets that asked for them; the others count
            # actual spend only.
            total = Usage(total.spent, 0)
        result.append(BudgetStatus(name, budget.credits, budget.period, start, total, budget.action))
    return result


def thresholds_crossed(status: BudgetStatus, warn_at: Iterable[float], already: Iterable[str]) -> list[str]:
    """Warning keys ("0.8") newly reached by actual spend; each fires once per period."""
    fired = set(already)
    return [
        f"{fraction:g}"
        for fraction in warn_at
        if status.usage.spent >= fraction * status.credits and f"{fraction:g}" not in fired
    ]


class AdmissionRefused(Exception):
    """A submission would break a budget or the account floor. The message has the numbers."""


@dataclass(frozen=True)
class Grant:
    """What a submission may ask the API for: `results` (≤ what was requested), why fewer
    (`clamped_by`: the rules that lowered it, e.g. "policies.default.max_credits" or
    "budgets.pool"), and the budgets that hold its reservation."""

    requested: int
    results: int
    credits: int  # results × credits_per_result: the worst case reserved
    clamped_by: tuple[str, ...]
    reserving: tuple[str, ...]

    @property
    def clamped(self) -> bool:
        return self.results < self.requested


def grant(
    config: Config,
    labels: Mapping[str, str],
    requested: int,
    budget_statuses: Iterable[BudgetStatus],
    *,
    max_credits: int | None,
) -> Grant:
    """How many results a submission may ask for: at most `requested`, what the job's
    `max_credits` allows, and what each reserving budget it matches has left — so a job the
    API itself caps never needs a cancel. Raise AdmissionRefused (with the numbers) when a
    matching budget is exhausted or blocked, or when nothing at all is left."""
    per_result = config.api.credits_per_result
    results, clamped_by, reserving = requested, [], []
    if max_credits is not None and max_credits // per_result < results:
        results = max_credits // per_result
        clamped_by.append("max_credits")
    for status in budget_statuses:
        budget = config.budgets[status.name]
        if not matches(budget, labels) or budget.action == "observe":
            continue  # an observe-mode budget records, it never refuses
        if status.exhausted:
            # block: that is the rule; cancel: the job would be cancelled at once anyway.
            raise AdmissionRefused(
                f"budget {status.name!r} is exhausted: {status.summary()}; new submissions are refused"
            )
        if budget.action == "block" and status.full:
            raise AdmissionRefused(f"budget {status.name!r} is full: {status.summary()}; new submissions are blocked")
        if budget.reserve:
            reserving.append(status.name)
            room = status.remaining // per_result
            if room < results:
                results = room
                clamped_by.append(f"budgets.{status.name}")
                if room < 1:
                    raise AdmissionRefused(
                        f"budget {status.name!r} cannot hold this job: {status.summary()}; "
                        f"one result costs {per_result}"
                    )
    if results < 1:
        raise AdmissionRefused(f"the job's max_credits ({max_credits}) allows no result at {per_result} credits each")
    return Grant(requested, results, results * per_result, tuple(clamped_by), tuple(reserving))


@dataclass(frozen=True)
class Spender:
    """A running job a budget matches, as its last poll saw it."""

    credits: int
    credits_per_s: float | None
    polled_at: datetime | None


def predict_crossing(status: BudgetStatus, spenders: Iterable[Spender], now: datetime) -> datetime | None:
    """When the budget's spend is predicted to reach its credits, taken as a whole: its spend
    (as of each job's last poll) carried on to `now` at each running job's rate, then the sum
    of their rates. A count is whole results: at a poll a job is on average half a result
    further on than it showed, which is counted too (so the crossing is not predicted late).
    `now` if that already reaches it; None if no job is measured spending."""
    spenders = [s for s in spenders if s.credits_per_s and s.credits_per_s > 0]
    if not spenders:
        return now if status.exhausted else None
    rate = sum(s.credits_per_s or 0.0 for s in spenders)
    since_polls = sum(
        (s.credits_per_s or 0.0) * max(0.0, (now - s.polled_at).total_seconds()) + 0.5 for s in spenders if s.polled_at
    )
    left = status.credits - status.usage.spent - since_polls
    if left <= 0:
        return now
    return now + timedelta(seconds=left / rate)
