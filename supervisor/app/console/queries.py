"""What the console reads, as use cases over the same store methods, views and report as the
CLI and the admin API (so the three never disagree), with their input rules.

Every page reads a bounded amount: the jobs table one page at a time (Store.jobs_page), the
overview the counts, the running jobs and today's report, the queue what `queue list` lists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from supervisor.app import inputs
from supervisor.app.console import charts
from supervisor.app.errors import BadInput
from supervisor.app.operations import Operations
from supervisor.app.report import PERIODS, report_view
from supervisor.app.views import BudgetView, JobView, QueueItemView, ReportView
from supervisor.config import Config, labels_match
from supervisor.core.states import State

PAGE_SIZE = 50
MAX_SEARCH = 200


@dataclass(frozen=True)
class JobFilters:
    state: State | None = None
    labels: Mapping[str, str] | None = None
    policy: str | None = None
    reason: str | None = None
    search: str | None = None

    @classmethod
    def of(cls, query: Mapping[str, str], labels: list[str]) -> JobFilters:
        """The filters from a query string: empty fields are no filter."""

        def given(name: str, max_length: int = 128) -> str | None:
            value = (query.get(name) or "").strip()
            return inputs.text(name, value, max_length=max_length) if value else None

        return cls(
            state=inputs.state(given("state")),
            labels=inputs.label_filter([text for text in labels if text.strip()]),
            policy=given("policy"),
            reason=given("reason"),
            search=given("q", MAX_SEARCH),
        )


@dataclass(frozen=True)
class JobsPage:
    jobs: list[JobView]
    total: int
    page: int
    pages: int


def page_number(text: str | None) -> int:
    if not text:
        return 1
    if not text.isdigit() or not 1 <= int(text) <= inputs.MAX_DB_INT:
        raise BadInput(f"page must be a whole number from 1, got {text!r}", field="page")
    return int(text)


async def jobs_page(ops: Operations, filters: JobFilters, page: int) -> JobsPage:
    """One page of the jobs matching `filters`, newest first, as the API's JobView."""
    found, total = await ops.store.jobs_page(
        state=filters.state.value if filters.state else None,
        labels=filters.labels,
        policy=filters.policy,
        reason=filters.reason,
        search=filters.search,
        offset=(page - 1) * PAGE_SIZE,
        limit=PAGE_SIZE,
    )
    return JobsPage([JobView.of(ops.config, job) for job in found], total, page, max(1, math.ceil(total / PAGE_SIZE)))


@dataclass(frozen=True)
class Overview:
    by_state: dict[str, int]
    running: int
    credits_per_s: float  # across the running jobs, as their latest polls observed it
    today: ReportView  # budgets, cancels by reason, saved and leaked
    warn_at: dict[str, tuple[float, ...]]  # budget → its warning thresholds
    account_credits: int | None  # as the daemon last read it (None: not read by this replica)
    account_floor: int | None


async def overview(ops: Operations, account_credits: int | None, now: datetime) -> Overview:
    config: Config = ops.config
    counts = await ops.store.count_by_state()
    running = await ops.store.watching_since(None)
    return Overview(
        by_state={state.value: counts.get(state.value, 0) for state in State},
        running=len(running),
        credits_per_s=sum(job.credits_per_s or 0.0 for job in running),
        today=await report_view(ops.store, config, "day", now),
        warn_at={name: tuple(budget.warn_at) for name, budget in config.budgets.items()},
        account_credits=account_credits,
        account_floor=config.account.min_credits if config.account else None,
    )


async def burns(ops: Operations, budgets: list[BudgetView], now: datetime) -> dict[str, charts.Burn]:
    """Each budget's burn chart: its period's spend so far, rebuilt from its jobs (one read of
    the jobs submitted since the earliest period start), and its forecast."""
    if not budgets:
        return {}
    config = ops.config
    starts = [b.period_start for b in budgets]
    jobs = await ops.store.jobs_submitted_since(None if None in starts else min(s for s in starts if s is not None))
    result = {}
    for view in budgets:
        budget = config.budgets.get(view.name)
        if budget is None:
            continue
        mine = [
            charts.Spend(job.started_at, job.last_progress_at, job.credits_used)
            for job in jobs
            if labels_match(budget.match, job.labels)
            and (view.period_start is None or job.submitted_at >= view.period_start)
        ]
        start = view.period_start or min((j.start for j in mine), default=now - timedelta(hours=1))
        end = view.period_end or now + (now - start) / 4
        thresholds = [(f"warn {f:g}", f * view.credits) for f in budget.warn_at]
        thresholds += [(f"forecast warn {f:g}", f * view.credits) for f in budget.forecast_warn_at]
        result[view.name] = charts.Burn(
            name=view.name, start=start, end=end, now=now, spent=tuple(charts.spent_curve(mine, start, now)),
            credits=view.credits, forecast=view.forecast_credits, low=view.forecast_low, high=view.forecast_high,
            exhausts_at=view.exhausts_at, thresholds=tuple(thresholds),
        )  # fmt: skip
    return result


def period(text: str | None) -> str:
    value = text or "day"
    if value not in PERIODS:
        raise BadInput(f"period must be one of {', '.join(PERIODS)}, got {value!r}", field="period")
    return value


async def report(ops: Operations, which: str, now: datetime) -> ReportView:
    """The `report` figures, from the same function as `report --json`."""
    return await report_view(ops.store, ops.config, which, now)


def report_csv_rows(report: ReportView) -> list[tuple[str, str, str]]:
    """The report as (section, key, value) rows: the headline figures, then each breakdown."""
    rows: list[tuple[str, str, str]] = [("section", "key", "value")]
    headline = ["jobs", "spend", "saved_by_cancels", "cancelled_without_known_limit"]
    headline += ["observe_would_have_saved", "leaked_after_decision"]
    rows += [("total", name, str(getattr(report, name))) for name in headline]
    for budget in report.budgets:
        for name in ("credits", "spent", "reserved", "remaining", "exhausted"):
            rows.append((f"budget:{budget.name}", name, str(getattr(budget, name)).lower()))
    breakdowns = ("spend_by_policy", "spend_by_label", "cancels_by_reason", "would_cancel_by_reason")
    for section in (*breakdowns, "warnings_by_limit"):
        figures: Mapping[str, int] = getattr(report, section)
        rows += [(section, key, str(value)) for key, value in figures.items()]
    return rows


# What a queued submission waits for, in words (core/queueing.py names the reasons).
WAITING_FOR = {
    "initiate_rate": "the initiate rate: its next slot",
    "account_floor": "the account floor: credits to be added",
    "behind_earlier": "an earlier submission of its budget",
    "never_fits": "nothing: it is larger than a budget's whole period",
}


@dataclass(frozen=True)
class QueueRow:
    item: QueueItemView
    why: str  # what a queued one waits for, in words; for the others their reason as recorded
    age_s: float  # since it was submitted


def waiting_for(reason: str | None) -> str:
    if reason is None:
        return "its turn"
    if reason.startswith("budget:"):
        return f"budget {reason.removeprefix('budget:')}: its next period"
    return WAITING_FOR.get(reason, reason)


async def queue_rows(ops: Operations, now: datetime) -> list[QueueRow]:
    """Every submission, in the queue's order, as `queue list` lists them."""
    return [
        QueueRow(item, waiting_for(item.reason) if item.state == "queued" else item.reason or "",
                 max(0.0, (now - item.created_at).total_seconds()))
        for item in await ops.queue()
    ]  # fmt: skip
