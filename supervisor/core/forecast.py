"""Forecasts, the pure part: where each running job and each budget period is heading, and
the money convention every credit figure is shown with.

A job's forecast: its observed rate carried on (from its last poll) until whatever stops it
first — its credit limit, its runtime limit, the results its API `limit` asked for — so it is
never above what the supervisor will let it spend. When it reaches its credit limit is the
crossing the poll timing predicts (core.policy.credits_crossing), not a second copy of it.

A budget period's forecast: spent so far + the running jobs' predicted remaining spend + the
queued submissions' expected cost + what jobs not yet submitted are expected to spend, learned
from the budget's own recent periods (what was submitted after this point of those periods),
never a straight line through spent so far. A budget without such history forecasts from its
running jobs only and says so (`basis`).

No I/O and no clock: `now` is an argument.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from supervisor.config import BillingConfig, Config, Policy
from supervisor.core.budgets import BudgetStatus, next_period_start, period_start
from supervisor.core.job import Job, start_of
from supervisor.core.policy import credits_crossing, job_policy

# A budget learns from at most this many of its past periods (hours for an hourly budget).
HISTORY_PERIODS = 4
# Each past period's spend is kept by when in the period its jobs were submitted, in this
# many equal slices (a day: 15-minute slices).
SLICES = 96

BASIS_HISTORY = "running jobs, queued submissions and this budget's recent periods"
BASIS_RUNNING = "running jobs only"
BASIS_TOTAL = "running jobs and queued submissions (a total budget has no period end)"

_CENT = Decimal("0.0001")


# -- money -------------------------------------------------------------------------------------


def money(billing: BillingConfig, figures: Mapping[str, Any]) -> dict[str, Any]:
    """The `money` twin of an object's credit figures: {"currency": …, key: amount, …}, each
    amount credits × credit_price in Decimal, rounded to 4 places (null stays null). The one
    place a price is applied."""
    price = Decimal(str(billing.credit_price))
    twin: dict[str, Any] = {"currency": billing.currency}
    for key, credits in figures.items():
        twin[key] = _amount(credits, price)
    return twin


def _amount(credits: float | Mapping[str, float] | None, price: Decimal) -> Any:
    if credits is None:
        return None
    if isinstance(credits, Mapping):  # a breakdown (spend by label): its amounts by the same keys
        return {key: _amount(value, price) for key, value in credits.items()}
    return float((Decimal(str(credits)) * price).quantize(_CENT, rounding=ROUND_HALF_EVEN))


# -- one job -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """What a forecast needs of a running job, as its last poll saw it."""

    credits: int
    rate: float | None  # credits per second, None until measured
    polled_at: datetime | None
    pending: bool  # still queued at the API: not spending yet
    cap: int | None  # the most the supervisor lets it spend (credit limit, API limit)
    deadline: datetime | None  # its runtime limit, where enforced
    credit_limit: int | None  # the enforced max_credits (for `reaches_limit_at`)


def running_of(
    *,
    credits: int,
    rate: float | None,
    polled_at: datetime | None,
    remote_status: str | None,
    started_at: datetime,
    result_limit: int | None,
    policy: Policy,
    credits_per_result: int,
    enforcing: bool,
) -> Running:
    """A job's forecast inputs from its row's facts and its limits. Limits only bound the
    forecast where they are enforced (an observe-mode policy or a dry run lets a job go on);
    the API's `limit` always does (the API stops there)."""
    caps = []
    if result_limit is not None:
        caps.append(result_limit * credits_per_result)
    credit_limit = policy.max_credits if enforcing else None
    if credit_limit is not None:
        caps.append(credit_limit)
    deadline = started_at + policy.max_runtime if enforcing and policy.max_runtime is not None else None
    return Running(
        credits=credits,
        rate=rate,
        polled_at=polled_at,
        pending=remote_status == "pending",
        cap=min(caps) if caps else None,
        deadline=deadline,
        credit_limit=credit_limit,
    )


@dataclass(frozen=True, slots=True)
class Watched:
    """The columns of a running job a forecast reads (a narrow read of many jobs)."""

    labels: Mapping[str, str]
    policy: str
    max_runtime_s: float | None
    max_credits: int | None
    credits_used: int
    credits_per_s: float | None
    last_polled_at: datetime | None
    remote_status: str | None
    submitted_at: datetime
    remote_created_at: datetime | None
    reopened_at: datetime | None
    result_limit: int | None

    @property
    def started_at(self) -> datetime:
        return start_of(self.reopened_at, self.remote_created_at, self.submitted_at)


WATCHED_FIELDS: tuple[str, ...] = tuple(Watched.__slots__)


def running_job(config: Config, job: Job | Watched, policy: Policy | None = None) -> Running:
    """A supervised job's forecast inputs: its last poll, its limits as they are enforced
    (`policy`: the job's resolved policy, when the caller has it already)."""
    policy = policy or job_policy(config, job)
    return running_of(
        credits=job.credits_used,
        rate=job.credits_per_s,
        polled_at=job.last_polled_at,
        remote_status=job.remote_status,
        started_at=job.started_at,
        result_limit=job.result_limit,
        policy=policy,
        credits_per_result=config.api.credits_per_result,
        enforcing=policy.action == "cancel" and not config.supervisor.dry_run,
    )


@dataclass(frozen=True)
class JobForecast:
    credits: int  # predicted final credits
    reaches_limit_at: datetime | None  # when it reaches its credit limit, or None
    basis: str  # "rate" | "history (no rate yet)" | "limits (no rate yet)" | "spent so far (no rate yet)"
    rate: float  # credits per second it spends now (0 while not measured)
    done_in_s: float  # seconds from now until its predicted spend is all spent (0 without a rate)


def forecast_job(job: Running, now: datetime, *, typical: float | None = None) -> JobForecast:
    """Where a running job is heading. Without a rate (pending, or one poll of it running)
    the forecast is what is known: a typical job of its budget (`typical`, capped), else its
    cap, else what it has spent."""
    if not job.rate or job.rate <= 0 or job.pending or job.polled_at is None:
        if typical is not None:
            expected = max(job.credits, round(min(typical, job.cap) if job.cap is not None else typical))
            return JobForecast(expected, None, "history (no rate yet)", 0.0, 0.0)
        if job.cap is not None:
            return JobForecast(max(job.credits, job.cap), None, "limits (no rate yet)", 0.0, 0.0)
        return JobForecast(job.credits, None, "spent so far (no rate yet)", 0.0, 0.0)
    end = job.deadline
    if end is None and job.cap is None:
        # Nothing bounds it: what it will have spent by now is all that can be said.
        end = now
    by_rate = job.credits + job.rate * max(0.0, (end - job.polled_at).total_seconds()) if end else float("inf")
    predicted: float = min(by_rate, float(job.cap)) if job.cap is not None else by_rate
    predicted_credits = max(job.credits, int(predicted))
    reaches = None
    if job.credit_limit is not None and predicted_credits >= job.credit_limit:
        reaches = job.polled_at + timedelta(seconds=max(0.0, credits_crossing(job.credits, job.rate, job.credit_limit)))
    # What it has left to spend from now, at its rate.
    spent_now = min(predicted, job.credits + job.rate * max(0.0, (now - job.polled_at).total_seconds()))
    done_in = max(0.0, (predicted - spent_now) / job.rate)
    return JobForecast(predicted_credits, reaches, "rate", job.rate, done_in)


# -- a budget's history ------------------------------------------------------------------------


@dataclass(frozen=True)
class PastJob:
    """A job of a past period, as a forecast learns from it."""

    labels: Mapping[str, str]
    submitted_at: datetime
    credits: int
    spent_for_s: float | None  # from its start to its last progress (None: never progressed)


@dataclass(frozen=True)
class History:
    """A budget's recent periods: each one's spend by the slice of the period its jobs were
    submitted in, oldest first; and a typical job's cost and spending time."""

    periods: tuple[tuple[float, ...], ...]  # per period, credits submitted in each slice
    typical_credits: float | None
    typical_spend_s: float | None

    def after(self, fraction: float) -> list[float]:
        """Per period, the credits of jobs submitted after `fraction` of it."""
        return [_after(slices, fraction) for slices in self.periods]

    def between(self, start: float, end: float) -> float:
        """The mean, over the periods, of the credits submitted between two fractions."""
        if not self.periods:
            return 0.0
        return sum(_after(s, start) - _after(s, end) for s in self.periods) / len(self.periods)


def _after(slices: Sequence[float], fraction: float) -> float:
    fraction = min(1.0, max(0.0, fraction))
    position = fraction * len(slices)
    whole = int(position)
    rest = sum(slices[whole + 1 :]) if whole + 1 <= len(slices) else 0.0
    if whole < len(slices):
        rest += slices[whole] * (1 - (position - whole))
    return rest


def history_bounds(period: str, timezone: str, start: datetime) -> list[datetime]:
    """The starts of the HISTORY_PERIODS periods before the one starting at `start`, and it."""
    bounds = [start]
    for _ in range(HISTORY_PERIODS):
        earlier = period_start(period, timezone, bounds[0] - timedelta(microseconds=1))
        bounds.insert(0, earlier or bounds[0])  # a periodic budget's periods always have starts
    return bounds


def history_of(period: str, timezone: str, start: datetime | None, jobs: Iterable[PastJob]) -> History:
    """What a budget's jobs of its last HISTORY_PERIODS periods (before the one starting at
    `start`) spent, and when in each period they were submitted. Periods before the budget's
    first job are not history (an empty one after it is: a quiet period)."""
    if start is None:
        return History((), None, None)
    bounds = history_bounds(period, timezone, start)
    periods = [[0.0] * SLICES for _ in range(HISTORY_PERIODS)]
    seen = [False] * HISTORY_PERIODS
    costs: list[int] = []
    durations: list[float] = []
    for job in jobs:
        index = bisect.bisect_right(bounds, job.submitted_at) - 1
        if not 0 <= index < HISTORY_PERIODS:
            continue
        length = (bounds[index + 1] - bounds[index]).total_seconds()
        offset = (job.submitted_at - bounds[index]).total_seconds() / length
        periods[index][min(SLICES - 1, int(offset * SLICES))] += job.credits
        seen[index] = True
        costs.append(job.credits)
        if job.spent_for_s is not None and job.credits > 0:
            durations.append(job.spent_for_s)
    first = next((i for i, any_job in enumerate(seen) if any_job), None)
    if first is None:
        return History((), None, None)
    typical = sum(costs) / len(costs) if costs else None
    spend_s = sum(durations) / len(durations) if durations else None
    return History(tuple(tuple(p) for p in periods[first:]), typical, spend_s)


# -- a budget period ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetForecast:
    name: str
    period_end: datetime | None
    spent: int
    running: float  # the running jobs' predicted remaining spend
    queued: float  # queued submissions' expected cost
    arrivals: float  # expected spend of jobs not yet submitted
    central: float
    low: float
    high: float
    spend_rate: float  # credits per second the running jobs spend now
    exhausts_at: datetime | None
    basis: str

    @property
    def without_queued(self) -> float:
        """The central forecast before the queued submissions (what admitting one adds to)."""
        return self.central - self.queued


def forecast_budget(
    status: BudgetStatus,
    timezone: str,
    jobs: Sequence[tuple[Running, JobForecast]],
    queued: Sequence[int],
    history: History,
    now: datetime,
) -> BudgetForecast:
    """A budget period's forecast from its running jobs (each with its own forecast), its
    queued submissions (their granted worst case in credits) and its history.

    central = spent + running remaining + queued expected + arrivals (the mean, over the
    recent periods, of what was submitted after this point of the period); low takes the
    quietest recent period's arrivals; high every running job at its cap, each queued one at
    its worst case and the busiest period's arrivals. `exhausts_at`: when spend, carried on at
    each job's rate, with the queued and future jobs spending over a typical job's time after
    their submission, reaches `credits` (`now` if it already has; None if it is not predicted to)."""
    end = next_period_start(status.period, timezone, now)
    start = status.period_start
    spent = status.usage.spent
    running = sum(max(0.0, f.credits - r.credits) for r, f in jobs)
    high_running = sum(max(0.0, (r.cap if r.cap is not None else f.credits) - r.credits) for r, f in jobs)
    typical = history.typical_credits
    queued_expected = sum(min(q, typical) if typical is not None else q for q in queued)
    queued_high = float(sum(queued))
    if start is None or end is None:
        basis, arrivals, low_arrivals, high_arrivals, fraction = BASIS_TOTAL, 0.0, 0.0, 0.0, 1.0
    elif not history.periods:
        basis, arrivals, low_arrivals, high_arrivals, fraction = BASIS_RUNNING, 0.0, 0.0, 0.0, 0.0
    else:
        fraction = (now - start).total_seconds() / (end - start).total_seconds()
        after = history.after(fraction)
        basis = BASIS_HISTORY
        arrivals, low_arrivals, high_arrivals = sum(after) / len(after), min(after), max(after)
    central = spent + running + queued_expected + arrivals
    low = spent + running + queued_expected + low_arrivals
    high = spent + high_running + queued_high + high_arrivals
    rate = sum(f.rate for _, f in jobs)
    exhausts = _exhausts_at(status.credits, spent, jobs, queued_expected, history, central, start, end, fraction, now)
    return BudgetForecast(
        name=status.name, period_end=end, spent=spent, running=running, queued=queued_expected, arrivals=arrivals,
        central=central, low=low, high=max(high, central), spend_rate=rate, exhausts_at=exhausts, basis=basis,
    )  # fmt: skip


def _exhausts_at(
    credits: int,
    spent: int,
    jobs: Sequence[tuple[Running, JobForecast]],
    queued: float,
    history: History,
    central: float,
    start: datetime | None,
    end: datetime | None,
    fraction: float,
    now: datetime,
) -> datetime | None:
    if spent >= credits:
        return now
    if central < credits:
        return None
    # The running jobs' spend from now: each at its rate until its predicted total (sorted by
    # when each is done, so the sum at any moment is two prefix sums and a bisection).
    done = sorted((f.done_in_s, f.rate) for _, f in jobs if f.rate > 0)
    times = [t for t, _ in done]
    finished = [0.0]
    for t, r in done:
        finished.append(finished[-1] + t * r)
    still = [0.0]
    for _, r in reversed(done):
        still.append(still[-1] + r)
    still.reverse()
    carried = sum(min(f.credits, r.credits + f.rate * max(0.0, (now - r.polled_at).total_seconds())) - r.credits
                  for r, f in jobs if f.rate > 0 and r.polled_at is not None)  # fmt: skip
    # Not yet spending: no-rate jobs, queued and future submissions, each spread over a typical
    # job's spending time after its submission (the rest of the period if none is known).
    spread = history.typical_spend_s
    if spread is None:
        spread = max(1.0, (end - now).total_seconds()) if end else 1.0
    spread = max(spread, 1.0)
    waiting = sum(max(0.0, f.credits - r.credits) for r, f in jobs if f.rate <= 0) + queued
    length = (end - start).total_seconds() if start and end else 0.0

    def arrived(seconds: float) -> float:
        """Spend of future submissions by `seconds` from now (made `spread` after submission)."""
        if length <= 0 or not history.periods:
            return 0.0
        # The submissions between now and `seconds` ago from then, spent linearly over `spread`:
        # approximated by those submitted by `seconds - spread / 2`.
        until = max(0.0, seconds - spread / 2)
        return history.between(fraction, fraction + until / length)

    def spend(seconds: float) -> float:
        index = bisect.bisect_right(times, seconds)
        from_running = finished[index] + seconds * still[index]
        return spent + carried + from_running + waiting * min(1.0, seconds / spread) + arrived(seconds)

    horizon = max([spread, *times, (end - now).total_seconds() + spread if end else 0.0])
    if spend(horizon) < credits:
        return None
    low, high = 0.0, horizon
    for _ in range(48):
        middle = (low + high) / 2
        if spend(middle) >= credits:
            high = middle
        else:
            low = middle
    return now + timedelta(seconds=high)


# -- forecast warnings -------------------------------------------------------------------------


def forecast_key(fraction: float) -> str:
    """How a forecast warning is remembered among a budget period's fired warnings."""
    return f"forecast@{fraction:g}"


def cleared_key(fraction: float) -> str:
    return f"forecast@{fraction:g}:cleared"


def forecast_warnings(
    central: float, credits: int, warn_at: Iterable[float], fired: Iterable[str]
) -> tuple[list[float], list[float]]:
    """(thresholds the central forecast newly crossed, thresholds it fell back under) — each
    fires once per period: a warning once crossed, its clearing once after it."""
    already = set(fired)
    crossed, cleared = [], []
    for fraction in warn_at:
        over = central >= fraction * credits
        if over and forecast_key(fraction) not in already:
            crossed.append(fraction)
        elif not over and forecast_key(fraction) in already and cleared_key(fraction) not in already:
            cleared.append(fraction)
    return crossed, cleared


def forecast_refusal(name: str, forecast: BudgetForecast, credits: int, cost: float) -> str | None:
    """Why a submission expected to cost `cost` would push a budget past its credits by the
    forecast (None: it fits). The message carries the numbers."""
    after = forecast.without_queued + cost
    if after <= credits:
        return None
    return (
        f"budget {name!r} is forecast to spend {forecast.without_queued:.0f} of {credits} credits this period "
        f"({forecast.basis}); this job's expected {cost:.0f} would take it to {after:.0f} "
        f'(budgets.{name}.forecast_action = "block")'
    )


def expected_cost(granted_credits: int, history: History) -> float:
    """A new job's expected cost: a typical job of the budget, at most what it is granted."""
    typical = history.typical_credits
    return float(granted_credits) if typical is None else min(float(granted_credits), typical)
