"""The demo's ending: the final table, the run in a few sentences, and every way it differs
from what the jobs were built to show, checked against the simulator's own records."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from supervisor.app.demo.scenes import SHADOW_MAX_CREDITS
from supervisor.app.demo.tour import TIMEOUT_S, Tour
from supervisor.app.demo.view import is_runaway, jobs_table, left_alone_cost, stopped_by_rule
from supervisor.core.job import Job
from supervisor.core.states import TERMINAL, Reason, State

USD_PER_CREDIT = 0.01  # the public price: 1 credit per result, $0.01 a credit


def print_summary(console: Console, tour: Tour, log_path: Path) -> int:
    seconds = (tour.finished - tour.started).total_seconds()
    console.print(Rule(f"summary after {seconds:.1f}s"))
    console.print(jobs_table(tour, live=False))
    console.print()
    for line in outcome_lines(tour):
        console.print(line)
    problems = find_problems(tour)
    for problem in problems:
        console.print(Text(f"✗ {problem}", style="bold red"))
    if not problems:
        console.print(Text("✓ Every job ended as it was built to, as the simulator's records confirm.", style="green"))
    console.print(
        f"The daemon's log (JSON lines) is kept at {log_path}; the temporary database and config were deleted."
    )
    return 1 if problems else 0


def outcome_lines(tour: Tour) -> list[str]:
    """The run in a few sentences, every number taken from the jobs table or the simulator."""
    rows = [row for row in tour.rows if row.job_id in tour.kinds]
    runaways = [row for row in rows if is_runaway(row)]
    reasons = Counter(row.cancel_reason for row in runaways)
    calls = Counter(tour.sim[row.job_id]["cancel_calls"] for row in runaways)
    others = Counter(_plain_outcome(row) for row in rows if not is_runaway(row))
    spent = sum(row.credits_used for row in runaways)
    alone = sum(left_alone_cost(tour.sim[row.job_id]) for row in runaways)
    saved = alone - spent
    confirmed = sum(row.confirmed_at is not None for row in rows)
    matching = sum(row.credits_used == tour.sim[row.job_id]["results"] for row in rows)
    by_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
    by_calls = "one cancel call each" if set(calls) == {1} else f"cancel calls per job: {dict(calls)}"
    every = "Every final state" if confirmed == len(tour.kinds) else "Final states"
    return [
        f"{len(runaways)} runaways cancelled ({by_reason}), {by_calls}.",
        f"The others: {', '.join(f'{n} {what}' for what, n in others.items())}.",
        (
            f"{every} confirmed by a status poll: {confirmed} of {len(tour.kinds)} jobs; the supervisor's "
            f"credit count matches the simulator's bill for {matching} of {len(tour.kinds)}."
        ),
        (
            f"The runaways spent {spent:,} credits; left alone they would have billed {alone:,}: "
            f"saved {saved:,} credits (${saved * USD_PER_CREDIT:,.2f} at ${USD_PER_CREDIT}/credit)."
        ),
        *_capped_lines(tour, rows),
        *_observe_lines(rows),
        *tour.queue_scene.summary(),
    ]


def _capped_lines(tour: Tour, rows: list[Job]) -> list[str]:
    """Submissions the API was asked for less than requested: capped at the source."""
    capped = [row for row in rows if row.result_limit is not None and row.result_limit < tour.kinds[row.job_id].limit]
    if not capped:
        return []
    asked = sum(row.result_limit or 0 for row in capped)
    requested = sum(tour.kinds[row.job_id].limit for row in capped)
    line = (
        f"{len(capped)} submission(s) capped at the source: the API was asked for {asked:,} of the "
        f"{requested:,} results requested (what max_credits allows), so no cancel was needed."
    )
    return [line]


def _observe_lines(rows: list[Job]) -> list[str]:
    """What the observe-mode rule would have done, had it been switched on."""
    observed = [row for row in rows if row.would_cancel_credits is not None and row.state in TERMINAL]
    if not observed:
        return []
    would_save = sum(row.credits_used - (row.would_cancel_credits or 0) for row in observed)
    return [
        (
            f"The observe-mode rule (policies.shadow, max_credits {SHADOW_MAX_CREDITS}) would have cancelled "
            f"{len(observed)} job(s); it only recorded that, and switched on it would have saved "
            f"{would_save:,} more credits."
        )
    ]


def _plain_outcome(row: Job) -> str:
    state, reason = row.state, row.cancel_reason
    if state == State.COMPLETED and reason:
        # The simulator answers a cancel that lost the race as the API does: 200, success: false.
        return f"completed before the {reason} cancel landed (the API answered success: false; the breach is recorded)"
    if state == State.COMPLETED:
        return "completed within the limits"
    if state == State.CANCELLED and reason == Reason.EXTERNAL:
        return "cancelled by someone else (external)"
    if state == State.FAILED:
        return "failed (remote error)"
    return state + (f" ({reason})" if reason else "")


def find_problems(tour: Tour) -> list[str]:
    """Every way the run differs from what the jobs were built to show, checked against the
    simulator's records: its bill and its count of cancel calls."""
    problems = list(tour.queue_scene.problems())
    rows = {row.job_id: row for row in tour.rows}
    for job_id, kind in tour.kinds.items():
        row, sim = rows.get(job_id), tour.sim[job_id]
        name = f"{job_id[:8]} ({kind.kind})"
        if row is None:
            problems.append(f"{name}: not in the jobs table")
            continue
        if row.state not in TERMINAL:
            problems.append(f"{name}: still {row.state} after {TIMEOUT_S / tour.speed:.0f}s")
            continue
        if (row.state, row.cancel_reason) != (kind.expect_state, kind.expect_reason):
            problems.append(
                f"{name}: ended {row.state} (reason {row.cancel_reason}), "
                f"expected {kind.expect_state} (reason {kind.expect_reason})"
            )
        if row.confirmed_at is None or row.final_status != sim["status"]:
            problems.append(f"{name}: final state not confirmed (remote status {sim['status']})")
        if row.credits_used != sim["results"]:
            problems.append(
                f"{name}: the supervisor counted {row.credits_used} credits, the simulator billed {sim['results']}"
            )
        expected_calls = 1 if stopped_by_rule(row.cancel_reason) else 0
        if sim["cancel_calls"] != expected_calls:
            problems.append(f"{name}: {sim['cancel_calls']} cancel calls, expected {expected_calls}")
    return problems
