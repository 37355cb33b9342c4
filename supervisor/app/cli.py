"""`clado-supervisor`: parse, call the app, print. Exit codes: 0 ok, 1 runtime failure,
2 bad usage, bad config or bad input — always one line on stderr, never a traceback.

Output for scripts: every command that prints takes `--json` (the views of app/views.py, the
admin API's shapes); tables are rich tables on a terminal and tab-separated lines with full
values (header first) when stdout is not one. Colour follows rich, so NO_COLOR turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from supervisor.app import errors, inputs
from supervisor.config import Config, config_path, load_config
from supervisor.core.states import State

if TYPE_CHECKING:
    from supervisor.app.operations import Operations
    from supervisor.app.views import (
        ContinueResult,
        JobDetailView,
        QueueItemView,
        ReportView,
        SubmitResult,
        TopView,
        TrackResult,
        View,
    )
    from supervisor.core.job import Job

# Heavy modules (SQLAlchemy, Alembic, APScheduler, rich) are imported by the commands that
# need them, so `check-config` and `--help` answer at once.

T = TypeVar("T")
PROG = "clado-supervisor"


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Known failures (app/errors.py) as one line on stderr and their exit code; a bug propagates."""
    try:
        yield
    except Exception as exc:
        error = errors.translate(exc)
        if error is None:
            raise
        _fail(str(error), error.exit_code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning known failures into one line and an exit code."""
    from supervisor.adapters.eventloop import run_loop

    with _reported():
        return run_loop(coro)
    raise AssertionError("unreachable")  # pragma: no cover - _reported exits on what it catches


def _app() -> Any:
    from supervisor.app import operations as app

    return app


def _operations(config: Config) -> AbstractAsyncContextManager[Operations]:
    from supervisor.app.operations import operations

    return operations(config)


def _parse_ids(ids: list[str]) -> list[str]:
    from supervisor.app.operations import parse_ids

    return parse_ids(ids)


def _console() -> Any:
    from rich.console import Console

    return Console()


# -- output for people and for scripts -----------------------------------------------------------


def _piped() -> bool:
    """stdout is a file or a pipe: print tab-separated lines, never a table cut to 80 columns."""
    return not sys.stdout.isatty()


def _say_clamped(asked: str, requested: int, clamped_by: Sequence[str]) -> None:
    """One stderr line when the API was asked for less than requested (submit, continue)."""
    if clamped_by:
        rules = " and ".join(clamped_by)
        click.echo(f"asked the API for {asked}, not {requested}: that is what {rules} allow(s)", err=True)


def _print_json(data: View | list[Any] | Mapping[str, Any]) -> None:
    click.echo(json.dumps(data if isinstance(data, list | Mapping) else data.to_json(), indent=2))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    # JSON's spelling for what is not plain text: true/false, objects, arrays.
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, bool | dict | list) else str(value)
    # One record a line, one field a tab: a tab or newline inside a value would split it.
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _print_tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    click.echo("\t".join(header))
    for row in rows:
        click.echo("\t".join(_cell(value) for value in row))


def _flat(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested objects as dotted keys (`limits.max_credits`), for key<TAB>value lines."""
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# -- the config, before or after the subcommand ---------------------------------------------------

_CONFIG_HELP = "Config file (default: $CLADO_SUPERVISOR_CONFIG, else ./supervisor.toml)."


def _remember_config(ctx: click.Context, _param: Any, value: Path | None) -> None:
    if value is not None:  # after the subcommand, it wins over one before it
        ctx.ensure_object(dict)["config_path"] = config_path(value)


def config_option(func: Callable[..., T]) -> Callable[..., T]:
    """`--config PATH` on a subcommand too (`clado-supervisor run --config …`)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember_config,
        help=_CONFIG_HELP,
    )(func)


def with_config(func: Callable[..., T]) -> Callable[..., T]:
    """Load and validate the config before the command body (bad config: exit 2)."""

    @config_option
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> T:
        from supervisor.adapters.logs import configure_logging

        with _reported():
            config = load_config(ctx.obj["config_path"])
        # What a command logs (a manual cancel's decision line) goes to stderr, never into
        # the stdout a script parses.
        configure_logging(config.logging.format, config.logging.level)
        return func(config, *args, **kwargs)

    return wrapper


def _checked(hint: str | None, rule: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """An input rule of app/inputs.py, its complaint shown as a usage error of `hint` (in an
    option's callback None: click names the option itself)."""
    try:
        return rule(*args, **kwargs)
    except errors.BadInput as exc:
        raise click.BadParameter(exc.problem, param_hint=hint) from None


def _duration(_ctx: Any, _param: Any, value: str | None) -> timedelta | None:
    return _checked(None, inputs.duration, "max_runtime", value)


class _OneLineErrors(click.Group):
    """Usage errors as one line on stderr (exit 2), like every other error; a bare group
    (`clado-supervisor`, `clado-supervisor jobs`) prints its help instead."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.Abort:
            click.echo(f"{PROG}: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)  # usage errors have one, others do not
            hint = f" (see {ctx.command_path} --help)" if ctx else ""
            _fail(exc.format_message().replace("\n", " ") + hint, exc.exit_code)


@click.group(cls=_OneLineErrors, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help=_CONFIG_HELP)
@click.version_option(package_name="clado-supervisor", prog_name=PROG)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Keeps Clado deep research jobs from burning money.

    Shell completion (bash, zsh, fish): eval "$(_CLADO_SUPERVISOR_COMPLETE=bash_source clado-supervisor)"
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path(config_file)


_JSON_HELP = "JSON, for scripts."


@main.command()
@config_option
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it, SIGHUP reloads the config)."""
    from supervisor.service.held_signals import hold_reloads

    hold_reloads()  # before the slow imports: a SIGHUP during start-up must not end the process
    run_async(_app().run_daemon(ctx.obj["config_path"]))


@main.command("migrate")
@with_config
def migrate_command(config: Config) -> None:
    """Upgrade the database schema to the newest version."""
    from supervisor.adapters import migrate

    with _reported():
        migrate.upgrade(config.database.url)
    click.echo("database schema is up to date")


@main.command("check-config")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@with_config
def check_config(config: Config, as_json: bool) -> None:
    """Validate the config file."""
    if as_json:
        from supervisor.app.views import ConfigCheckView

        _print_json(ConfigCheckView.of(config))
        return
    click.echo(f"{config.source}: OK (policies: {', '.join(config.policies)}; hash {config.config_hash})")


@main.command()
@click.argument("job_ids", nargs=-1)
@click.option("--from-file", type=click.File("r"), help="Read job ids from a file (- for stdin), one a line.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label the jobs (repeatable).")
@click.option("--policy", help="Use this policy instead of matching labels.")
@click.option("--max-runtime", callback=_duration, metavar="DUR", help="Override the policy's max_runtime.")
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

    parsed_labels = _checked("--label", inputs.label_args, labels)

    async def go() -> TrackResult:
        _parse_ids(ids)  # all ids valid before the database is even opened
        async with _operations(config) as ops:
            return await ops.track(
                ids, labels=parsed_labels, policy=policy, max_runtime=max_runtime, max_credits=max_credits
            )

    result = run_async(go())
    if as_json:
        _print_json(result)
        return
    click.echo(f"tracking {len(result.added)} new job(s); {len(result.already_tracked)} already tracked")


@main.command()
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
) -> None:
    """Start a deep research job and supervise it; prints its job id (or, queued, its queue id)."""
    _checked("QUERY", inputs.text, "query", query, max_length=inputs.MAX_QUERY, required=True)
    parsed = _checked("--label", inputs.label_args, labels)
    _checked("--expires-after", inputs.duration, "expires_after", expires_after)

    async def go() -> SubmitResult | QueueItemView:
        async with _operations(config) as ops:
            return await ops.submit(
                query, limit=limit, labels=parsed, policy=policy, queue=queue, priority=priority,
                expires_after=expires_after,
            )  # fmt: skip

    result = run_async(go())
    if as_json:
        _print_json(result)
        return
    from supervisor.app.views import QueueItemView

    if isinstance(result, QueueItemView):
        when = f"; expected to start at {_when(result.expected_start)}" if result.expected_start else ""
        click.echo(f"queued ({result.reason or 'waiting'}){when}: `{PROG} queue show {result.id}`", err=True)
        click.echo(result.id)
        return
    _say_clamped(f"{result.limit} results", result.requested_limit, result.clamped_by)
    click.echo(result.job_id)


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}Z"


@main.group(no_args_is_help=True)
def queue() -> None:
    """Submissions waiting their turn (submit --queue), and orphaned ones."""


_QUEUE_COLUMNS = (
    ("queue id", "id"),
    ("state", "state"),
    ("priority", "priority"),
    ("limit", "requested_limit"),
    ("reason", "reason"),
    ("expected start", "expected_start"),
    ("created", "created_at"),
    ("job id", "job_id"),
)


def _print_queue(items: Sequence[QueueItemView], title: str) -> None:
    rows = [[item.to_json()[name] for _, name in _QUEUE_COLUMNS] for item in items]
    if _piped():
        _print_tsv([name for _, name in _QUEUE_COLUMNS], rows)
        return
    from rich.table import Table

    table = Table(title=title)
    for column, _ in _QUEUE_COLUMNS:
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(
            item.id, item.state, str(item.priority), str(item.limit or item.requested_limit), item.reason or "-",
            _when(item.expected_start), _when(item.created_at), item.job_id or "-",
        )  # fmt: skip
    _console().print(table)


@queue.command("list")
@click.option("--state", "states", multiple=True, help="Only submissions in this state (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@with_config
def queue_list(config: Config, states: tuple[str, ...], as_json: bool) -> None:
    """Submissions in the queue's order (priority, then age), with why each waits."""

    async def go() -> list[QueueItemView]:
        async with _operations(config) as ops:
            return await ops.queue(states or None)

    items = run_async(go())
    if as_json:
        _print_json([item.to_json() for item in items])
        return
    _print_queue(items, f"{len(items)} submission(s)")


@queue.command("show")
@click.argument("submission_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@with_config
def queue_show(config: Config, submission_id: str, as_json: bool) -> None:
    """One submission (piped: key<TAB>value lines)."""

    async def go() -> QueueItemView:
        async with _operations(config) as ops:
            return await ops.queue_item(submission_id)

    _print_item(run_async(go()), as_json)


@queue.command("cancel")
@click.argument("submission_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@with_config
def queue_cancel(config: Config, submission_id: str, as_json: bool) -> None:
    """Take a queued submission off the queue, or settle an orphaned one (its reservation is
    given back: do it once its job, if any, has been found or ruled out)."""

    async def go() -> QueueItemView:
        async with _operations(config) as ops:
            return await ops.cancel_queued(submission_id)

    _print_item(run_async(go()), as_json)


def _print_item(item: QueueItemView, as_json: bool) -> None:
    data = item.to_json()
    if as_json:
        _print_json(data)
        return
    for key, value in _flat(data):
        click.echo(f"{key}\t{_cell(value)}" if _piped() else f"{key}: {'-' if value is None else _cell(value)}")


@main.group(no_args_is_help=True)
def jobs() -> None:
    """Inspect supervised jobs."""


# The columns of `jobs list` and `top` (JSON field names when piped), and their values.
_JOB_COLUMNS = (
    ("job id", "job_id"),
    ("state", "state"),
    ("remote", "remote_status"),
    ("policy", "policy"),
    ("credits", "credits_used"),
    ("limit", "max_credits"),
    ("reason", "reason"),
    ("submitted", "submitted_at"),
)


def _job_row(view: Any) -> list[Any]:
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
    ]


@jobs.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@with_config
def jobs_list(config: Config, state: str | None, as_json: bool) -> None:
    """List jobs with their state, credits and cancel reason (tab-separated when piped)."""

    async def go() -> tuple[list[Job], list[QueueItemView]]:
        async with _operations(config) as ops:
            return await ops.jobs(state), await ops.orphaned_submissions()

    from supervisor.app.views import JobView

    found, orphans = run_async(go())
    views = [JobView.of(config, job) for job in found]
    if as_json:
        _print_json([view.to_json() for view in views])
        return
    if _piped():
        _print_tsv([name for _, name in _JOB_COLUMNS], (_job_row(view) for view in views))
        if orphans:  # for the person at the end of the pipe; the lines stay jobs only
            ids = ", ".join(item.id for item in orphans)
            click.echo(f"{len(orphans)} orphaned submission(s), initiated but job id unknown, not supervised: {ids} "
                       f"(`{PROG} queue list --state orphaned`)", err=True)  # fmt: skip
        return
    from rich.table import Table

    table = Table(title=f"{len(views)} job(s)")
    for column, _ in _JOB_COLUMNS:
        table.add_column(column, justify="right" if column in ("credits", "limit") else "left", overflow="fold")
    for view in views:
        row = _job_row(view)
        row[-1] = f"{view.submitted_at:%Y-%m-%d %H:%M:%S}"
        table.add_row(*("-" if value is None else str(value) for value in row))
    _console().print(table)
    if orphans:
        # Not jobs the supervisor knows, but maybe billed jobs nobody supervises: said here,
        # where a person looks for what is running.
        _print_queue(orphans, f"{len(orphans)} orphaned submission(s): initiated, job id unknown, not supervised")


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@with_config
def jobs_show(config: Config, job_id: str, as_json: bool) -> None:
    """One job with its events (piped: key<TAB>value lines, a blank line, the events)."""

    async def go() -> JobDetailView:
        from supervisor.app.views import JobDetailView

        _parse_ids([job_id])  # before the database is even opened
        async with _operations(config) as ops:
            return JobDetailView.of(config, *await ops.job(job_id))

    data = run_async(go()).to_json()
    if as_json:
        _print_json(data)
        return
    event_columns = ("at", "kind", "from_state", "to_state", "reason", "detail")
    if _piped():
        for key, value in _flat({k: v for k, v in data.items() if k != "events"}):
            click.echo(f"{key}\t{_cell(value)}")
        click.echo()
        _print_tsv(event_columns, ([event[name] for name in event_columns] for event in data["events"]))
        return
    from rich.table import Table

    console = _console()
    for key, value in data.items():
        if key != "events" and value not in (None, {}, ""):
            console.print(f"[bold]{key}[/bold]: {value}")
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
    console.print(table)


@main.command()
@click.argument("job_id")
@click.option("--reason", "note", help="Why (recorded with the manual cancel).")
@click.option("--json", "as_json", is_flag=True, help="The job afterwards (the jobs list shape), for scripts.")
@with_config
def cancel(config: Config, job_id: str, note: str | None, as_json: bool) -> None:
    """Cancel a job now, through the same state machine as the daemon."""
    _checked("--reason", inputs.text, "reason", note, max_length=inputs.MAX_REASON)

    async def go() -> Job:
        _parse_ids([job_id])  # before the database is even opened
        async with _operations(config) as ops:
            return await ops.manual_cancel(job_id, note)

    job = run_async(go())
    if as_json:
        from supervisor.app.views import JobView

        _print_json(JobView.of(config, job))
        return
    if job.cancel_reason == "manual" or job.state in ("cancelling", "confirming"):
        click.echo(f"{job_id}: {job.state} (reason {job.cancel_reason})")
    else:
        click.echo(f"{job_id}: already {job.state}; nothing to cancel")


@main.command("continue")
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

    async def go() -> ContinueResult:
        _parse_ids([job_id])  # before the database is even opened
        async with _operations(config) as ops:
            return await ops.continue_job(job_id, additional)

    result = run_async(go())
    if as_json:
        _print_json(result)
        return
    _say_clamped(f"{result.additional} more results", result.requested, result.clamped_by)
    click.echo(f"{job_id}: {result.state} (asked for {result.additional} more results)")


@main.command()
@click.option(
    "--period",
    type=click.Choice(["day", "week", "month"]),
    default="day",
    show_default=True,
    help="The calendar period (UTC) whose submitted jobs are reported.",
)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@with_config
def report(config: Config, period: str, as_json: bool) -> None:
    """Spend, budgets, cancels, warnings and credits saved, for a period (piped: key<TAB>value)."""
    from supervisor.app.report import render, report_view

    async def go() -> ReportView:
        async with _operations(config) as ops:
            return await report_view(ops.store, config, period, datetime.now(UTC))

    data = run_async(go())
    if as_json:
        _print_json(data)
        return
    if _piped():
        figures = data.to_json()
        figures["budgets"] = {budget.pop("name"): budget for budget in figures["budgets"]}
        for key, value in _flat(figures):
            click.echo(f"{key}\t{_cell(value)}")
        return
    render(_console(), data)


@main.command()
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True, help="Seconds between refreshes."
)
@click.option("--limit", type=click.IntRange(1, 1000), default=40, show_default=True, help="Active jobs to show.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (also when stdout is not a terminal).")
@click.option("--json", "as_json", is_flag=True, help="One snapshot as JSON, for scripts (implies --once).")
@with_config
def top(config: Config, interval: float, limit: int, once: bool, as_json: bool) -> None:
    """Watch a running daemon: jobs by state and the active jobs, live, from the database."""
    from supervisor.app.top import run_top

    if as_json or _piped():
        snapshot = run_async(_top_snapshot(config, limit))
        if as_json:
            _print_json(snapshot)
            return
        for state, count in snapshot.counts.items():
            click.echo(f"{state}\t{count}")
        click.echo()
        _print_tsv([name for _, name in _JOB_COLUMNS], (_job_row(view) for view in snapshot.active))
        return

    async def go() -> None:
        async with _operations(config) as ops:
            await run_top(config, ops.store, interval=interval, limit=limit, once=once)

    with contextlib.suppress(KeyboardInterrupt):
        run_async(go())


async def _top_snapshot(config: Config, limit: int) -> TopView:
    from supervisor.adapters.store import utcnow
    from supervisor.app.top import snapshot
    from supervisor.app.views import JobView, TopView

    async with _operations(config) as ops:
        counts, active = await snapshot(ops.store, limit)
    return TopView(
        generated_at=utcnow(),
        counts={state.value: counts.get(state.value, 0) for state in State},
        active=[JobView.of(config, job) for job in active],
    )


@main.command()
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The answer as JSON on stdout (the exit code is the same).")
@with_config
def healthcheck(config: Config, timeout: float, as_json: bool) -> None:
    """Exit 0 if the running daemon answers /healthz (for Docker HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    from supervisor.app.views import HealthcheckView
    from supervisor.config import split_address

    def unhealthy(message: str, status: int | None) -> NoReturn:
        if as_json:
            _print_json(HealthcheckView(healthy=False, url=url, status=status, error=message))
        _fail(f"unhealthy: {message}", 1)

    host, port = split_address(config.http.listen)
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a comparison: a daemon on every interface answers on loopback
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        unhealthy(f"{url} answered {exc.code}", exc.code)
    except OSError as exc:
        unhealthy(f"cannot reach {url}: {getattr(exc, 'reason', exc)}", None)
    if as_json:
        _print_json(HealthcheckView(healthy=True, url=url, status=status, error=None))
    else:
        click.echo(f"healthy ({status})")


@main.command("fake-api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=click.IntRange(0, 65535))
def fake_api_command(host: str, port: int) -> None:
    """Run the local Clado API simulator."""
    from supervisor.sim.server import serve

    serve(host, port)


@main.command()
@click.option("--speed", type=click.FloatRange(min=0.1), default=1.0, hidden=True)
def demo(speed: float) -> None:
    """A one-command tour: the simulator, the daemon and a handful of jobs."""
    from supervisor.app.demo import run_demo

    sys.exit(run_demo(speed=speed))
