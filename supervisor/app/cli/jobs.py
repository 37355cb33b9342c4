"""The jobs: `track`, `submit`, `cancel`, `continue`, `jobs list/show`."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import click

from supervisor.app import inputs
from supervisor.app.cli.common import (
    JSON_HELP,
    PROG,
    call_app,
    checked,
    console,
    duration,
    piped,
    print_json,
    print_pairs,
    print_table,
    print_tsv,
    say_clamped,
    when,
    with_config,
)
from supervisor.app.cli.queue import print_queue
from supervisor.config import Config
from supervisor.core.states import State

if TYPE_CHECKING:
    from supervisor.app.operations import Operations
    from supervisor.app.views import ContinueResult, DryRunView, QueueItemView, SubmitResult, TrackResult
    from supervisor.core.job import Job


@click.command()
@click.argument("job_ids", nargs=-1)
@click.option("--from-file", type=click.File("r"), help="Read job ids from a file (- for stdin), one a line.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label the jobs (repeatable).")
@click.option("--policy", help="Use this policy instead of matching labels.")
@click.option("--max-runtime", callback=duration, metavar="DUR", help="Override the policy's max_runtime.")
@click.option("--max-credits", type=click.IntRange(1, inputs.MAX_DB_INT), help="Override the policy's max_credits.")
@click.option("--json", "as_json", is_flag=True, help="JSON ({added, already_tracked}), for scripts.")
@with_config
def track(
    config: Config,
    job_ids: tuple[str, ...],
    from_file: Any,
    labels: tuple[str, ...],
    policy: str | None,
    max_runtime: timedelta | None,
    max_credits: int | None,
    as_json: bool,
) -> None:
    """Supervise jobs started elsewhere (idempotent)."""
    ids = list(job_ids)
    if from_file is not None:
        lines = (line.strip() for line in from_file.read().splitlines())
        ids += [line for line in lines if line and not line.startswith("#")]
    if not ids:
        raise click.UsageError("give at least one JOB_ID (or --from-file)")

    parsed_labels = checked("--label", inputs.label_args, labels)

    result: TrackResult = call_app(
        config,
        lambda ops: ops.track(
            ids, labels=parsed_labels, policy=policy, max_runtime=max_runtime, max_credits=max_credits
        ),
        job_ids=ids,
    )
    if as_json:
        print_json(result)
        return
    click.echo(f"tracking {len(result.added)} new job(s); {len(result.already_tracked)} already tracked")


@click.command()
@click.argument("query")
@click.option(
    "--limit",
    type=click.IntRange(inputs.MIN_LIMIT, inputs.MAX_LIMIT),
    default=30,
    show_default=True,
    help="Results to ask for.",
)
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label the job (repeatable).")
@click.option("--policy", help="Use this policy instead of matching labels.")
@click.option(
    "--queue/--no-queue",
    "queue",
    default=None,
    help="When it does not fit now (budget, account floor, initiate rate), queue it for the daemon "
    "to start, and print its queue id (default: [scheduler] default).",
)
@click.option(
    "--priority",
    type=click.IntRange(-inputs.MAX_PRIORITY, inputs.MAX_PRIORITY),
    default=0,
    show_default=True,
    help="Queued: higher starts first.",
)
@click.option(
    "--expires-after", metavar="DURATION", help='Queued: give up after this long ("2h"; default: [scheduler]).'
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="JSON, for scripts: {job_id, requested_limit, limit, clamped_by}, or the queue item when it waits.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what the job would be granted, its predicted cost and whether it fits every budget's "
    "forecast; call nothing, write nothing (exit 0 if it would be admitted, 1 if not).",
)
@with_config
def submit(
    config: Config,
    query: str,
    limit: int,
    labels: tuple[str, ...],
    policy: str | None,
    queue: bool | None,
    priority: int,
    expires_after: str | None,
    as_json: bool,
    dry_run: bool,
) -> None:
    """Start a deep research job and supervise it; prints its job id (or, queued, its queue id)."""
    checked("QUERY", inputs.text, "query", query, max_length=inputs.MAX_QUERY, required=True)
    parsed = checked("--label", inputs.label_args, labels)
    checked("--expires-after", inputs.duration, "expires_after", expires_after)
    if dry_run:
        _dry_run(config, query, limit, parsed, policy, as_json)
        return

    result: SubmitResult | QueueItemView = call_app(
        config,
        lambda ops: ops.submit(
            query, limit=limit, labels=parsed, policy=policy, queue=queue, priority=priority,
            expires_after=expires_after,
        ),
    )  # fmt: skip
    if as_json:
        print_json(result)
        return
    from supervisor.app.views import QueueItemView

    if isinstance(result, QueueItemView):
        expected = f"; expected to start at {when(result.expected_start)}" if result.expected_start else ""
        click.echo(f"queued ({result.reason or 'waiting'}){expected}: `{PROG} queue show {result.id}`", err=True)
        click.echo(result.id)
        return
    say_clamped(f"{result.limit} results", result.requested_limit, result.clamped_by)
    click.echo(result.job_id)


def _dry_run(config: Config, query: str, limit: int, labels: dict[str, str], policy: str | None, as_json: bool) -> None:
    view: DryRunView = call_app(
        config, lambda ops: ops.submit_dry_run(query, limit=limit, labels=labels, policy=policy)
    )
    if as_json:
        print_json(view)
    else:
        cash = view.money
        click.echo(
            f"would be granted {view.limit} results (at most {view.credits} credits, {cash['credits']} "
            f"{cash['currency']}); predicted cost {view.predicted_credits:g} credits "
            f"({cash['predicted_credits']} {cash['currency']})"
        )
        say_clamped(f"{view.limit} results", view.requested_limit, view.clamped_by)
        for budget in view.budgets:
            verdict = "fits" if budget.fits else "does NOT fit"
            click.echo(
                f"budget {budget.name}: forecast {budget.forecast_credits:g} + this job = "
                f"{budget.forecast_with_job:g} of {budget.credits}: {verdict} "
                f"(forecast_action {budget.forecast_action})"
            )
        click.echo(f"refused: {view.refused}" if view.refused else "it would be admitted")
    if view.refused:
        sys.exit(1)


@click.command()
@click.argument("job_id")
@click.option("--reason", "note", help="Why (recorded with the manual cancel).")
@click.option("--json", "as_json", is_flag=True, help="The job afterwards (the jobs list shape), for scripts.")
@with_config
def cancel(config: Config, job_id: str, note: str | None, as_json: bool) -> None:
    """Cancel a job now, through the same state machine as the daemon."""
    checked("--reason", inputs.text, "reason", note, max_length=inputs.MAX_REASON)

    job: Job = call_app(config, lambda ops: ops.manual_cancel(job_id, note), job_ids=[job_id])
    if as_json:
        from supervisor.app.views import JobView

        print_json(JobView.of(config, job))
        return
    if job.cancel_reason == "manual" or job.state in ("cancelling", "confirming"):
        click.echo(f"{job_id}: {job.state} (reason {job.cancel_reason})")
    else:
        click.echo(f"{job_id}: already {job.state}; nothing to cancel")


@click.command("continue")
@click.argument("job_id")
@click.option(
    "--additional",
    type=int,
    default=30,
    show_default=True,
    help="More results to ask for; clamped to what max_credits and reserving budgets allow.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
@with_config
def continue_command(config: Config, job_id: str, additional: int, as_json: bool) -> None:
    """Ask a completed job for more results, through admission; the job is supervised again."""

    result: ContinueResult = call_app(config, lambda ops: ops.continue_job(job_id, additional), job_ids=[job_id])
    if as_json:
        print_json(result)
        return
    say_clamped(f"{result.additional} more results", result.requested, result.clamped_by)
    click.echo(f"{job_id}: {result.state} (asked for {result.additional} more results)")


@click.group(no_args_is_help=True)
def jobs() -> None:
    """Inspect supervised jobs."""


# The columns of `jobs list` and `top` (JSON field names when piped), and their values.
JOB_COLUMNS = (
    ("job id", "job_id"),
    ("state", "state"),
    ("remote", "remote_status"),
    ("policy", "policy"),
    ("credits", "credits_used"),
    ("limit", "max_credits"),
    ("reason", "reason"),
    ("submitted", "submitted_at"),
    ("blind", "blind"),  # why the job's spend cannot be read, or empty
)


def job_row(view: Any) -> list[Any]:
    would = view.would_cancel_reason and f"(would) {view.would_cancel_reason}"
    return [
        view.job_id,
        view.state.value,
        view.remote_status,
        view.policy,
        view.credits_used,
        view.limits.max_credits,
        view.cancel_reason or would,
        view.to_json()["submitted_at"],
        view.blind,
    ]


@jobs.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@with_config
def jobs_list(config: Config, state: str | None, as_json: bool) -> None:
    """List jobs with their state, credits and cancel reason (tab-separated when piped)."""

    async def jobs_and_orphans(ops: Operations) -> tuple[list[Job], list[QueueItemView]]:
        return await ops.jobs(state), await ops.orphaned_submissions()

    from supervisor.app.views import JobView

    found, orphans = call_app(config, jobs_and_orphans)
    views = [JobView.of(config, job) for job in found]
    if as_json:
        print_json([view.to_json() for view in views])
        return
    rows = [job_row(view) for view in views]
    # On a terminal the submission time is shown to the second, in its own column.
    at = [key for _, key in JOB_COLUMNS].index("submitted_at")
    shown = (
        [*row[:at], f"{view.submitted_at:%Y-%m-%d %H:%M:%S}", *row[at + 1 :]]
        for row, view in zip(rows, views, strict=True)
    )
    print_table(f"{len(views)} job(s)", JOB_COLUMNS, rows, shown, right=("credits", "limit"))
    if not orphans:
        return
    if piped():  # for the person at the end of the pipe; the lines stay jobs only
        ids = ", ".join(item.id for item in orphans)
        click.echo(f"{len(orphans)} orphaned submission(s), initiated but job id unknown, not supervised: {ids} "
                   f"(`{PROG} queue list --state orphaned`)", err=True)  # fmt: skip
        return
    # Not jobs the supervisor knows, but maybe billed jobs nobody supervises: said here,
    # where a person looks for what is running.
    print_queue(orphans, f"{len(orphans)} orphaned submission(s): initiated, job id unknown, not supervised")


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def jobs_show(config: Config, job_id: str, as_json: bool) -> None:
    """One job with its events (piped: key<TAB>value lines, a blank line, the events)."""

    from supervisor.app.views import JobDetailView

    job, events = call_app(config, lambda ops: ops.job(job_id), job_ids=[job_id])
    data = JobDetailView.of(config, job, events).to_json()
    if as_json:
        print_json(data)
        return
    event_columns = ("at", "kind", "from_state", "to_state", "reason", "detail")
    if piped():
        print_pairs({k: v for k, v in data.items() if k != "events"})
        click.echo()
        print_tsv(event_columns, ([event[name] for name in event_columns] for event in data["events"]))
        return
    from rich.table import Table

    out = console()
    for key, value in data.items():
        if key != "events" and value not in (None, {}, ""):
            out.print(f"[bold]{key}[/bold]: {value}")
    table = Table(title="events")
    for column in ("at", "kind", "from", "to", "reason", "detail"):
        table.add_column(column)
    for event in data["events"]:
        table.add_row(
            event["at"][:23],
            event["kind"],
            event["from_state"] or "",
            event["to_state"] or "",
            event["reason"] or "",
            json.dumps(event["detail"]) if event["detail"] else "",
        )
    out.print(table)


@jobs.command("results")
@click.argument("job_id")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
    help="JSON lines (one result a line, as the API gave it) or CSV (a header, then one result a row).",
)  # fmt: skip
@click.option(
    "--output", type=click.Path(dir_okay=False), metavar="PATH",
    help="Write here (created 0600); an existing file is continued where it ends. Default: stdout.",
)  # fmt: skip
@with_config
def jobs_results(config: Config, job_id: str, fmt: str, output: str | None) -> None:
    """Write a job's results (billed, cancelled jobs' partial ones too), read 100 a page."""
    from supervisor.adapters.results import Format, ResultsFile

    chosen = cast(Format, fmt)  # click.Choice gave one of Format's values
    target = ResultsFile(chosen, path=output) if output else ResultsFile(chosen, stream=sys.stdout)
    saved = call_app(config, lambda ops: ops.results(job_id, target), job_ids=[job_id])
    where = output or "stdout"
    kept = f" ({saved.total} in the file)" if output else ""
    click.echo(f"{saved.written} result(s) written to {where}{kept}; job {saved.status or 'unknown'}", err=True)
    if not saved.complete:
        click.echo(f"stopped at the page bound: run it again with --output {output or 'PATH'} to continue", err=True)
    elif not saved.final:
        click.echo("the job is still running: run it again with the same --output later for the rest", err=True)
