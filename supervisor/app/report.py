"""`clado-supervisor report`: spend, budgets, cancels, warnings and savings for a period.

Definitions (also in the README):
- spend: credits charged by the jobs submitted in the period (a job's spend counts in the
  period it was submitted in).
- saved_by_cancels: for jobs the supervisor cancelled whose requested limit is known
  (submitted through it): limit × credits_per_result − credits charged. Tracked jobs have
  no known limit; they are counted in `cancelled_without_known_limit`.
- observe_would_have_saved: for jobs an observe-mode rule (or dry run) would have
  cancelled, now finished: credits charged after that would-be decision.
- leaked_after_decision: credits charged between a real cancel decision and the
  confirmed final state.
- orphaned_submissions: every submission whose initiate may have started a job that was
  never recorded (whatever the period: until a person settles it with `queue cancel`).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from supervisor.adapters.store import Store
from supervisor.app.views import BudgetView, QueueItemView, ReportView, iso
from supervisor.config import Config
from supervisor.core.budgets import period_start
from supervisor.core.forecast import money
from supervisor.core.job import Job
from supervisor.core.states import TERMINAL, Reason
from supervisor.service.forecasting import Forecaster

PERIODS = ("day", "week", "month")
# The report's own credit figures, each with its money twin (the budgets carry their own).
MONEY_FIGURES = (
    "spend", "spend_by_policy", "spend_by_label", "saved_by_cancels", "observe_would_have_saved",
    "leaked_after_decision",
)  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    return iso(value) if value else None


def summarize(config: Config, jobs: list[Job]) -> dict[str, Any]:
    """The pure part: aggregate job rows into the report's figures."""
    price = config.api.credits_per_result
    spend_by_label: Counter[str] = Counter()
    cancels: Counter[str] = Counter()
    saved = leaked = would_save = unknown_limit = 0
    for job in jobs:
        credits = job.credits_used
        for key, value in sorted((job.labels or {}).items()):
            spend_by_label[f"{key}={value}"] += credits
        reason = job.cancel_reason
        finished = job.state in TERMINAL
        if reason and reason != Reason.EXTERNAL and job.credits_at_decision is not None:
            cancels[reason] += 1
            if finished:
                leaked += max(0, credits - job.credits_at_decision)
            if job.state == "cancelled":
                if job.result_limit is not None:
                    saved += max(0, job.result_limit * price - credits)
                else:
                    unknown_limit += 1
        if job.would_cancel_credits is not None and finished:
            would_save += max(0, credits - job.would_cancel_credits)
    return {
        "jobs": len(jobs),
        "spend": sum(job.credits_used for job in jobs),
        "spend_by_policy": dict(sorted(_by(jobs, "policy").items())),
        "spend_by_label": dict(sorted(spend_by_label.items())),
        "cancels_by_reason": dict(sorted(cancels.items())),
        "would_cancel_by_reason": dict(
            sorted(Counter(job.would_cancel_reason for job in jobs if job.would_cancel_reason).items())
        ),
        "saved_by_cancels": saved,
        "cancelled_without_known_limit": unknown_limit,
        "observe_would_have_saved": would_save,
        "leaked_after_decision": leaked,
    }


def _by(jobs: list[Job], key: str) -> Counter[str]:
    totals: Counter[str] = Counter()
    for job in jobs:
        totals[getattr(job, key)] += job.credits_used
    return totals


async def budget_views(store: Store, config: Config, now: datetime) -> list[BudgetView]:
    """Every budget's period and forecast, as `budgets`, `report` and the admin API show them."""
    views = []
    for outlook in await Forecaster(store).outlooks(config, now):
        status = outlook.status
        key = status.period_start.isoformat() if status.period_start else "total"
        record = await store.budget_period(status.name, key)
        views.append(BudgetView.of(config, outlook.forecast, status, record["warned"]))
    return views


async def report_view(store: Store, config: Config, period: str, now: datetime) -> ReportView:
    start = period_start(period, "UTC", now)
    jobs = await store.jobs_submitted_since(start)
    budgets = await budget_views(store, config, now)
    figures = summarize(config, jobs)
    return ReportView(
        period=period,
        period_start=start,
        generated_at=now,
        budgets=budgets,
        **figures,
        money=money(config.billing, {key: figures[key] for key in MONEY_FIGURES}),
        warnings_by_limit=await store.event_counts("warning", start),
        orphaned_submissions=[QueueItemView.of(config, row) for row in await store.list_submissions(["orphaned"])],
    )


async def build_report(store: Store, config: Config, period: str, now: datetime) -> dict[str, Any]:
    """The report as `report --json` prints it."""
    return (await report_view(store, config, period, now)).to_json()


def budgets_table(budgets: list[BudgetView]) -> Table:
    """The budgets for a person (`budgets`, `report`): spend, forecast and its money."""
    table = Table(title="budgets")
    columns = ("budget", "period", "credits", "spent", "reserved", "remaining", "forecast (low-high)",
               "exhausts at", "money spent / forecast", "action", "state")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for b in budgets:
        fired = "warned " + ",".join(b.warnings_fired) if b.warnings_fired else "ok"
        state = "exhausted" if b.exhausted else fired
        numbers = (b.credits, b.spent, b.reserved, b.remaining)
        band = f"{b.forecast_credits:.0f} ({b.forecast_low:.0f}-{b.forecast_high:.0f})"
        exhausts = f"{b.exhausts_at:%Y-%m-%d %H:%M:%S}" if b.exhausts_at else "-"
        cash = f"{b.money['spent']:.2f} / {b.money['forecast_credits']:.2f} {b.money['currency']}"
        table.add_row(b.name, b.period, *(str(n) for n in numbers), band, exhausts, cash, b.action, state)
    return table


def render(console: Console, report: ReportView) -> None:
    """The report for a person: the headline figures, then one table per breakdown."""
    console.print(f"[bold]Report for this {report.period}[/bold] (jobs submitted since {_iso(report.period_start)})")
    console.print(
        f"jobs {report.jobs}, spend {report.spend} credits; saved by cancels {report.saved_by_cancels}; "
        f"observe rules would have saved {report.observe_would_have_saved}; "
        f"leaked after kill decisions {report.leaked_after_decision}"
    )
    if report.budgets:
        table = Table(title="budgets")
        console.print(budgets_table(report.budgets))
    breakdowns = (
        ("cancels by reason", report.cancels_by_reason),
        ("would cancel (observe)", report.would_cancel_by_reason),
        ("warnings by limit", report.warnings_by_limit),
        ("spend by label", report.spend_by_label),
        ("spend by policy", report.spend_by_policy),
    )
    if report.orphaned_submissions:
        table = Table(title="orphaned submissions (may be billed jobs nobody supervises)")
        for column in ("queue id", "since", "limit", "reason", "query"):
            table.add_column(column, overflow="fold")
        for item in report.orphaned_submissions:
            since = item.initiated_at or item.created_at
            table.add_row(item.id, f"{since:%Y-%m-%d %H:%M:%S}", str(item.limit), item.reason or "", item.query[:60])
        console.print(table)
    for title, figures in breakdowns:
        if figures:
            table = Table(title=title)
            table.add_column("key")
            table.add_column("value", justify="right")
            for key, value in figures.items():
                table.add_row(key, str(value))
            console.print(table)
