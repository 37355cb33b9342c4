"""The pure forecast rules, by table: a job's forecast, a budget's history and forecast, the
forecast warnings, the forecast's admission refusal, and the money conversion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from supervisor.config import BillingConfig, Config, Policy
from supervisor.core.budgets import BudgetStatus, Usage
from supervisor.core.forecast import (
    BASIS_HISTORY,
    BASIS_RUNNING,
    BASIS_TOTAL,
    SLICES,
    History,
    PastJob,
    Running,
    cleared_key,
    forecast_budget,
    forecast_job,
    forecast_key,
    forecast_refusal,
    forecast_warnings,
    history_of,
    money,
    running_of,
)
from supervisor.core.policy import Observation, credits_crossing, next_check

NOW = datetime(2026, 5, 14, 12, 0, tzinfo=UTC)  # noon: half of a UTC day gone
DAY = datetime(2026, 5, 14, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def running(
    credits: int = 10,
    rate: float | None = 1.0,
    polled: float = 0.0,
    *,
    pending: bool = False,
    cap: int | None = 200,
    deadline: float | None = None,
    limit: int | None = 200,
) -> Running:
    return Running(
        credits=credits,
        rate=rate,
        polled_at=ago(polled),
        pending=pending,
        cap=cap,
        deadline=NOW + timedelta(seconds=deadline) if deadline is not None else None,
        credit_limit=limit,
    )


# -- money -------------------------------------------------------------------------------------

MONEY_CASES = [
    # Each case: price, credits, amount.
    (0.01, 54, 0.54),
    (0.01, 0, 0.0),
    (0.01, 610, 6.1),
    (0.01, 0.5, 0.005),
    (0.0123, 3, 0.0369),
    (0.00001, 7, 0.0001),  # 0.00007 rounds to 4 places (half-even)
    (0.01, None, None),  # an absent figure stays absent
    (2.5, 1_000_000_000, 2_500_000_000.0),  # Decimal: no float drift at large totals
]


@pytest.mark.parametrize(("price", "credits", "amount"), MONEY_CASES)
def test_money_converts_each_figure_at_the_price(price: float, credits: float | None, amount: float | None) -> None:
    twin = money(BillingConfig(credit_price=price, currency="EUR"), {"spent": credits})
    assert twin == {"currency": "EUR", "spent": amount}


def test_money_converts_a_breakdown_by_the_same_keys() -> None:
    twin = money(BillingConfig(), {"spend_by_label": {"team=a": 12, "team=b": 3}})
    assert twin == {"currency": "USD", "spend_by_label": {"team=a": 0.12, "team=b": 0.03}}


def test_billing_defaults_are_claudes_pricing_page() -> None:
    assert (Config().billing.credit_price, Config().billing.currency) == (0.01, "USD")


# -- one job -----------------------------------------------------------------------------------

JOB_CASES = [
    # Each case: name, job, typical, credits, reaches limit (s from now) or None, basis.
    ("runs to its credit limit", running(10, 1.0, cap=200, limit=200), None, 200, 190, "rate"),
    ("carried from its last poll", running(10, 1.0, polled=5, cap=200, limit=200), None, 200, 185, "rate"),
    ("its API limit stops it first", running(10, 1.0, cap=30, limit=200), None, 30, None, "rate"),
    ("its runtime limit stops it first", running(10, 1.0, deadline=60), None, 70, None, "rate"),
    ("nothing bounds it: spent by now", running(10, 2.0, polled=3, cap=None, limit=None), None, 16, None, "rate"),
    ("already at its cap", running(200, 1.0, cap=200, limit=200), None, 200, 0, "rate"),
    ("pending, no history: its cap", running(0, None, pending=True), None, 200, None, "limits (no rate yet)"),
    ("no rate, history", running(5, None), 42.4, 42, None, "history (no rate yet)"),
    ("no rate, history above its cap", running(5, None, cap=30), 80.0, 30, None, "history (no rate yet)"),
    ("no rate, no limit", running(5, None, cap=None, limit=None), None, 5, None, "spent so far (no rate yet)"),
    (
        "a zero rate is no rate",
        running(5, 0.0, cap=None, limit=None),
        None,
        5,
        None,
        "spent so far (no rate yet)",
    ),
]


@pytest.mark.parametrize(
    ("job", "typical", "credits", "reaches", "basis"),
    [case[1:] for case in JOB_CASES],
    ids=[case[0] for case in JOB_CASES],
)
def test_job_forecast(job: Running, typical: float | None, credits: int, reaches: float | None, basis: str) -> None:
    forecast = forecast_job(job, NOW, typical=typical)
    assert (forecast.credits, forecast.basis) == (credits, basis)
    if reaches is None:
        assert forecast.reaches_limit_at is None
    else:
        assert forecast.reaches_limit_at == NOW + timedelta(seconds=reaches)


def test_reaching_the_limit_is_the_crossing_the_poll_timing_uses() -> None:
    """One rule: the job is polled when its forecast says it reaches its limit."""
    policy = Policy(name="default", max_credits=100, warn_at=())
    obs = Observation("searching", 80, ago(60), NOW, 2.0)
    poll = next_check(obs, policy, NOW, timedelta(minutes=5)).at
    job = running(80, 2.0, cap=100, limit=100)
    assert forecast_job(job, NOW).reaches_limit_at == poll == NOW + timedelta(seconds=credits_crossing(80, 2.0, 100))


LIMIT_CASES = [
    # (policy, enforcing, result_limit, cap, deadline set, credit_limit)
    (Policy(name="p", max_credits=200, max_runtime=timedelta(minutes=30)), True, 30, 30, True, 200),
    (Policy(name="p", max_credits=20), True, 30, 20, False, 20),
    (Policy(name="p", max_credits=20, max_runtime=timedelta(minutes=30)), False, 30, 30, False, None),  # observe
    (Policy(name="p"), True, None, None, False, None),
]


@pytest.mark.parametrize(("policy", "enforcing", "result_limit", "cap", "deadline", "credit_limit"), LIMIT_CASES)
def test_a_job_is_bounded_by_the_limits_that_are_enforced(
    policy: Policy, enforcing: bool, result_limit: int | None, cap: int | None, deadline: bool, credit_limit: int | None
) -> None:
    job = running_of(
        credits=0, rate=None, polled_at=None, remote_status="pending", started_at=NOW, result_limit=result_limit,
        policy=policy, credits_per_result=1, enforcing=enforcing,
    )  # fmt: skip
    assert (job.cap, job.deadline is not None, job.credit_limit, job.pending) == (cap, deadline, credit_limit, True)


# -- a budget's history ------------------------------------------------------------------------


def past(hours_before_today: float, credits: int, spent_for: float | None = 60.0) -> PastJob:
    return PastJob({"team": "a"}, DAY - timedelta(hours=hours_before_today), credits, spent_for)


def test_history_keeps_each_recent_period_by_when_its_jobs_were_submitted() -> None:
    jobs = [past(18, 100), past(6, 50), past(24 + 18, 30), past(24 * 9, 999)]  # the last: too old
    history = history_of("day", "UTC", DAY, jobs)
    assert len(history.periods) == 2  # the periods before the budget's first job are not history
    assert [sum(p) for p in history.periods] == [30, 150]
    assert history.after(0.5) == [0, 50]  # submitted after noon: 18:00 yesterday, nothing the day before
    assert history.typical_credits == pytest.approx(60.0)
    assert history.typical_spend_s == 60.0


def test_no_jobs_before_is_no_history() -> None:
    assert history_of("day", "UTC", DAY, []) == History((), None, None)
    assert history_of("total", "UTC", None, [past(3, 10)]) == History((), None, None)


def test_between_is_the_mean_over_periods() -> None:
    slices_a = [0.0] * SLICES
    slices_b = [0.0] * SLICES
    slices_a[SLICES // 2] = 40.0
    slices_b[SLICES // 2 + 1] = 20.0
    history = History((tuple(slices_a), tuple(slices_b)), 30.0, 10.0)
    assert history.between(0.5, 1.0) == pytest.approx(30.0)
    assert history.between(0.0, 0.5) == pytest.approx(0.0)


# -- a budget period ---------------------------------------------------------------------------


def status(spent: int, credits: int = 400, period: str = "day") -> BudgetStatus:
    start = DAY if period == "day" else None
    return BudgetStatus("team", credits, period, start, Usage(spent, 0), "cancel")


def flat_history(per_slice: float, periods: int = 2, typical: float | None = 20.0, spend_s: float = 60.0) -> History:
    return History(tuple(tuple([per_slice] * SLICES) for _ in range(periods)), typical, spend_s)


def jobs_of(*specs: Running) -> list[tuple[Running, object]]:
    return [(job, forecast_job(job, NOW)) for job in specs]


BUDGET_CASES = [
    # Each case: name, status, jobs, queued, history, central, low, high, basis.
    ("no history: running jobs only", status(54), jobs_of(running(10, 1.0, cap=30)), [], History((), None, None),
     54 + 20, 54 + 20, 54 + 20, BASIS_RUNNING),
    ("queued submissions count at their worst case without history", status(54), [], [30, 10],
     History((), None, None), 94, 94, 94, BASIS_RUNNING),
    ("history: the rest of the period as the recent ones went", status(100), [], [], flat_history(2.0),
     100 + 96, 100 + 96, 100 + 96, BASIS_HISTORY),
    ("low and high: the quietest and busiest recent periods", status(100), [], [],
     History((tuple([1.0] * SLICES), tuple([3.0] * SLICES)), 20.0, 60.0), 100 + 96, 100 + 48, 100 + 144,
     BASIS_HISTORY),
    ("queued at a typical job's cost, high at their worst case", status(100), [], [30, 10], flat_history(0.0),
     100 + 20 + 10, 130, 140, BASIS_HISTORY),
    ("running jobs at their caps in high", status(10), jobs_of(running(10, 1.0, deadline=20, cap=100)), [],
     History((), None, None), 30, 30, 100, BASIS_RUNNING),
    ("a total budget learns no arrivals", status(10, period="total"), [], [], flat_history(5.0), 10, 10, 10,
     BASIS_TOTAL),
]  # fmt: skip


@pytest.mark.parametrize(
    ("budget", "jobs", "queued", "history", "central", "low", "high", "basis"),
    [case[1:] for case in BUDGET_CASES],
    ids=[case[0] for case in BUDGET_CASES],
)
def test_budget_forecast(
    budget: BudgetStatus,
    jobs: list,
    queued: list[int],
    history: History,
    central: float,
    low: float,
    high: float,
    basis: str,
) -> None:
    forecast = forecast_budget(budget, "UTC", jobs, queued, history, NOW)
    assert (forecast.central, forecast.low, forecast.high) == pytest.approx((central, low, high))
    assert forecast.basis == basis


EXHAUST_CASES = [
    # Each case: name, spent, credits, jobs, history, exhausts in (s) or None.
    ("already spent", 400, 400, [], History((), None, None), 0.0),
    ("not predicted to", 10, 400, jobs_of(running(10, 1.0, cap=30)), History((), None, None), None),
    # 300 spent, two jobs at 1/s and 3/s with 200 left to reach: 100 credits at 4/s = 25 s
    ("running jobs' rates summed", 300, 400, jobs_of(running(0, 1.0, cap=200), running(0, 3.0, cap=200)),
     History((), None, None), 25.0),
    # 40 to go: one job stops at its cap after 10 s (20 spent by then), the other goes on at 1/s
    ("a job stops at its cap", 360, 400, jobs_of(running(0, 1.0, cap=10), running(0, 1.0, cap=200)),
     History((), None, None), 30.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spent", "credits", "jobs", "history", "exhausts_in"),
    [case[1:] for case in EXHAUST_CASES],
    ids=[case[0] for case in EXHAUST_CASES],
)
def test_exhausts_at(spent: int, credits: int, jobs: list, history: History, exhausts_in: float | None) -> None:
    forecast = forecast_budget(status(spent, credits), "UTC", jobs, [], history, NOW)
    if exhausts_in is None:
        assert forecast.exhausts_at is None
    else:
        assert forecast.exhausts_at is not None
        assert (forecast.exhausts_at - NOW).total_seconds() == pytest.approx(exhausts_in, abs=0.01)


def test_arrivals_from_history_bring_the_exhaustion_forward_in_the_period() -> None:
    """No job running; recent periods spent 2 credits per 15-minute slice, a job's spend a
    minute after its submission: 100 spent of 150 runs out 25 slices (6 h 15 min) on."""
    forecast = forecast_budget(status(100, 150), "UTC", [], [], flat_history(2.0), NOW)
    assert forecast.exhausts_at is not None
    hours = (forecast.exhausts_at - NOW).total_seconds() / 3600
    assert hours == pytest.approx(6.25, abs=0.05)


# -- forecast warnings -------------------------------------------------------------------------

WARN_CASES = [
    # Each case: central, fired, crossed, cleared.
    (330, [], [0.8], []),
    (500, [], [0.8, 1.2], []),  # above 1: "on track to overspend by this much"
    (500, [forecast_key(0.8)], [1.2], []),  # once per period per threshold
    (300, [forecast_key(0.8)], [], [0.8]),  # fell back under: cleared once
    (300, [forecast_key(0.8), cleared_key(0.8)], [], []),
    (330, [forecast_key(0.8), cleared_key(0.8)], [], []),  # not again this period
    (100, [], [], []),
    (330, ["0.8"], [0.8], []),  # the spend warning of the same fraction is another warning
]


@pytest.mark.parametrize(("central", "fired", "crossed", "cleared"), WARN_CASES)
def test_forecast_warnings(central: float, fired: list[str], crossed: list[float], cleared: list[float]) -> None:
    assert forecast_warnings(central, 400, [0.8, 1.2], fired) == (crossed, cleared)


# -- admission ---------------------------------------------------------------------------------


def test_a_submission_that_would_overspend_by_the_forecast_is_refused_with_the_numbers() -> None:
    forecast = forecast_budget(status(300, 400), "UTC", jobs_of(running(0, 1.0, cap=80)), [], History((), None, None),
                               NOW)  # fmt: skip
    assert forecast_refusal("team", forecast, 400, 20) is None  # 380 + 20 fits
    message = forecast_refusal("team", forecast, 400, 30)
    assert message is not None
    assert "380 of 400" in message and "expected 30" in message and "410" in message
