"""`clado-supervisor top`: a live view of a running daemon, read from its database.

It only reads, so it is safe beside any number of replicas: the jobs by state, then the
active jobs with their credits against their limits, soonest check first.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from supervisor.adapters.store import Store, utcnow
from supervisor.config import Config
from supervisor.core.job import Job
from supervisor.core.policy import job_policy
from supervisor.core.states import ACTIVE, State

STATE_STYLE = {
    State.WATCHING: "cyan",
    State.CANCELLING: "bold magenta",
    State.CONFIRMING: "magenta",
    State.COMPLETED: "green",
    State.FAILED: "red",
    State.CANCELLED: "yellow",
    State.LOST: "bold red",
    State.UNCONFIRMED: "bold red",
}
# Cancels in flight first: they are what an operator watches.
_ORDER = (State.CANCELLING, State.CONFIRMING, State.WATCHING)


def _age(since: datetime, now: datetime) -> str:
    seconds = int((now - since).total_seconds())
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def render(config: Config, counts: dict[str, int], jobs: list[Job], now: datetime, limit: int) -> Group:
    summary = Text("  ".join(f"{state.value} {counts.get(state.value, 0)}" for state in State))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("job id", "state", "remote", "policy", "credits/max", "age", "reason / last error"):
        table.add_column(column, justify="right" if column in ("credits/max", "age") else "left")
    for job in jobs[:limit]:
        state = State(job.state)
        limit_credits = job_policy(config, job).max_credits
        credits = Text(f"{job.credits_used}/{limit_credits if limit_credits is not None else '-'}")
        if limit_credits is not None and job.credits_used >= limit_credits:
            credits.stylize("bold red")
        table.add_row(
            job.job_id,
            Text(state.value, style=STATE_STYLE[state]),
            job.remote_status or "-",
            job.policy,
            credits,
            _age(job.submitted_at, now),
            job.cancel_reason
            or (job.would_cancel_reason and f"(would) {job.would_cancel_reason}")
            or job.last_error
            or "",
        )
    active = sum(counts.get(state.value, 0) for state in ACTIVE)
    footer = Text(
        f"{active} active job(s); showing {min(limit, len(jobs))} · {now:%H:%M:%S} UTC · Ctrl-C to quit",
        style="dim",
    )
    return Group(summary, table, footer)


async def snapshot(store: Store, limit: int) -> tuple[dict[str, int], list[Job]]:
    """Jobs by state, and up to `limit` active jobs, cancels in flight first."""
    counts = await store.count_by_state()
    jobs: list[Job] = []
    for state in _ORDER:
        if len(jobs) < limit and counts.get(state.value):
            jobs += await store.list_jobs(state.value, limit=limit - len(jobs))
    return counts, jobs


async def run_top(config: Config, store: Store, *, interval: float, limit: int, once: bool) -> None:
    console = Console()
    counts, jobs = await snapshot(store, limit)
    if once or not console.is_terminal:
        console.print(render(config, counts, jobs, utcnow(), limit))
        return
    with Live(render(config, counts, jobs, utcnow(), limit), console=console, screen=False, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval)
            counts, jobs = await snapshot(store, limit)
            live.update(render(config, counts, jobs, utcnow(), limit), refresh=True)
