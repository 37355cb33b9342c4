"""What the demo shows while it runs and in its final table: the jobs as the supervisor sees
them, and each event the daemon records, in words."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from supervisor.app.top import STATE_STYLE
from supervisor.core.job import Job
from supervisor.core.policy import job_policy
from supervisor.core.states import TERMINAL, Reason, State

if TYPE_CHECKING:
    from supervisor.app.demo.scenes import DemoJob
    from supervisor.app.demo.tour import Tour

LIVE_COLUMNS = ("job", "kind", "policy", "state", "remote", "credits/max", "elapsed", "reason")
FINAL_COLUMNS = ("job", "kind", "policy", "state", "reason", "credits/max", "elapsed",
                 "confirmed", "left alone")  # fmt: skip
NUMERIC_COLUMNS = frozenset({"credits/max", "elapsed", "left alone"})
# Left out below WIDE_TERMINAL columns, so that each job stays on one line of an 80-column terminal.
NARROW_OMITS = frozenset({"job", "policy", "remote"})
WIDE_TERMINAL = 100
POLICY_REASONS = frozenset({Reason.MAX_CREDITS, Reason.MAX_RUNTIME, Reason.MAX_QUEUED, Reason.STALL_TIMEOUT})


def stopped_by_rule(reason: str | None) -> bool:
    """A reason the supervisor itself cancels for: a policy limit or a budget."""
    return reason in POLICY_REASONS or (reason or "").startswith("budget:")


def is_runaway(row: Job) -> bool:
    """Stopped by the supervisor for breaking a limit (a lost race is not a stop)."""
    return row.state == State.CANCELLED and stopped_by_rule(row.cancel_reason)


def left_alone_cost(sim_job: Mapping[str, Any]) -> int:
    """What the simulator would have billed had nobody cancelled: its result limit, or where it
    stalls for good (a stalled job costs nothing more; stopping it frees the slot)."""
    stall_after = sim_job["scenario"]["stall_after"]
    limit: int = sim_job["limit"]
    return limit if stall_after is None else min(limit, stall_after)


def jobs_table(tour: Tour, *, live: bool) -> Table:
    """The jobs as the supervisor sees them; the final table adds the simulator's view."""
    columns: tuple[str, ...] = LIVE_COLUMNS if live else FINAL_COLUMNS
    if tour.console.width < WIDE_TERMINAL:
        columns = tuple(column for column in columns if column not in NARROW_OMITS)
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
    for column in columns:
        table.add_column(column, justify="right" if column in NUMERIC_COLUMNS else "left")
    by_id = {row.job_id: row for row in tour.rows}
    for job_id, kind in tour.kinds.items():
        if job_id in by_id:
            cells = _cells(tour, by_id[job_id], kind, live=live)
            table.add_row(*(cells[column] for column in columns))
    return table


def _cells(tour: Tour, row: Job, kind: DemoJob, *, live: bool) -> dict[str, Text | str]:
    state = State(row.state)
    limit = job_policy(tour.config, row).max_credits
    credits = Text(f"{row.credits_used}/{limit}")
    if limit is not None and row.credits_used >= limit:
        credits.stylize("bold red")
    end = row.confirmed_at or row.updated_at if state in TERMINAL else tour.clock.now()
    reason = row.cancel_reason or ""
    if not reason and row.would_cancel_reason:
        reason = f"(would cancel) {row.would_cancel_reason}"
    elif live and not reason and row.warned:
        reason = "warned: " + ", ".join(_warning_name(key) for key in row.warned)
    cells: dict[str, Text | str] = {
        "job": row.job_id[:8],
        "kind": kind.kind,
        "policy": row.policy,
        "state": Text(state.value, style=STATE_STYLE[state]),
        "remote": row.remote_status or "-",
        "credits/max": credits,
        "elapsed": f"{(end - row.submitted_at).total_seconds():.1f}s",
        "reason": reason,
    }
    if not live:
        cells["confirmed"] = "yes" if row.confirmed_at else Text("no", style="bold red")
        # What a runaway would have billed had nobody stopped it (a column of the summary).
        cells["left alone"] = str(left_alone_cost(tour.sim[row.job_id])) if is_runaway(row) else ""
    return cells


def progress_line(started: datetime, at: datetime, ident: str, kind: str) -> Text:
    """The start of a progress line: when (since the demo began), which job, what it is."""
    return Text(f"{(at - started).total_seconds():+6.1f}s  {ident[:8]}  {kind:<20}")


def event_line(tour: Tour, event: Mapping[str, Any]) -> Text:
    line = progress_line(tour.started, event["at"], event["job_id"], tour.kinds[event["job_id"]].kind)
    if event["kind"] == "transition":
        target = State(event["to_state"])
        line.append(f"{event['from_state'] or 'new'} → ")
        line.append(target.value, style=STATE_STYLE[target])
        line.append("  ")
    line.append(describe_event(event), style="dim" if event["kind"] == "tracked" else "")
    return line


def _warning_name(key: str) -> str:
    """ "max_runtime@0.8" → "80% of max_runtime"."""
    limit, _, fraction = key.partition("@")
    return f"{float(fraction):.0%} of {limit}" if fraction else key


def describe_event(event: Mapping[str, Any]) -> str:
    """One event row in words, for the progress lines."""
    kind: str = event["kind"]
    detail = event["detail"] or {}
    if kind == "tracked":
        if detail.get("source") == "track":
            return f"tracked (started elsewhere), policy {detail.get('policy')}"
        if "requested_limit" in detail:
            return (f"submitted, policy {detail.get('policy')}: asked the API for {detail['limit']} of "
                    f"{detail['requested_limit']} results, all its max_credits allows")  # fmt: skip
        return f"submitted, policy {detail.get('policy')}"
    if kind == "reopened":
        return (f"reopened: running again after it was {detail.get('was')} (someone continued it); "
                f"its limits apply to its whole total, {detail.get('credits')} credits so far")  # fmt: skip
    if kind == "warning":
        return f"warning: {detail['fraction']:.0%} of {event['reason']} ({_measure(detail)})"
    if kind in ("poll_error", "cancel_error"):
        return f"{kind.replace('_', ' ')}: {detail.get('error')}"
    if kind == "would_cancel":
        return f"would cancel for {event['reason']} ({_measure(detail)}): observe mode, recorded only"
    if kind != "transition":
        return kind
    target = State(event["to_state"])
    if target is State.CANCELLING:
        return f"{event['reason']}: {_measure(detail)}; decision recorded"
    if target is State.CONFIRMING:
        return f"cancel sent: {detail.get('cancel')}; polling until final"
    if "remote_status" in detail:
        after = detail.get("credits_after_decision")
        billed = f", {after} of them after the decision" if after else ""
        who = " by someone else" if event["reason"] == Reason.EXTERNAL else ""
        return f"status poll confirms {detail['remote_status']}{who} at {detail['credits']} credits{billed}"
    return json.dumps(detail)


def _measure(detail: Mapping[str, Any]) -> str:
    if "spent" in detail:  # a budget's decision
        return f"the team has spent {detail['spent']} of {detail['budget_credits']} credits today"
    value, threshold = detail["value"], detail["threshold"]
    if detail["limit"] == Reason.MAX_CREDITS:
        return f"{value:g} credits, limit {threshold:g}"
    if detail["limit"] == Reason.STALL_TIMEOUT:
        return f"no new results for {value:.2f}s, limit {threshold:.2f}s"
    return f"running for {value:.2f}s, limit {threshold:.2f}s"
