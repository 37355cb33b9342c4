"""`clado-supervisor`: parse, call the app, print. Exit codes: 0 ok, 1 runtime failure,
2 bad usage, bad config or bad input — always one line on stderr, never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from supervisor.config import Config, ConfigError, config_path, load_config, parse_duration, parse_label
from supervisor.core.states import State

if TYPE_CHECKING:
    from supervisor.core.job import Job

# Heavy modules (SQLAlchemy, Alembic, APScheduler, rich) are imported by the commands that
# need them, so `check-config` and `--help` answer at once.

T = TypeVar("T")
PROG = "clado-supervisor"


class ExitError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int) -> None:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning known failures into one line and an exit code."""
    from sqlalchemy.exc import SQLAlchemyError

    from supervisor.adapters.clado import CladoError, InvalidJobId
    from supervisor.core.budgets import AdmissionRefused
    from supervisor.service.wiring import RuntimeFailure, run_loop

    try:
        return run_loop(coro)
    except (ConfigError, InvalidJobId) as exc:
        _fail(str(exc), 2)
    except AdmissionRefused as exc:
        _fail(f"submission refused: {exc}", 2)
    except ExitError as exc:
        _fail(str(exc), exc.code)
    except RuntimeFailure as exc:
        _fail(str(exc), 1)
    except CladoError as exc:
        _fail(f"Clado API: {exc}", 1)
    except SQLAlchemyError as exc:
        _fail(f"database: {str(getattr(exc, 'orig', None) or exc).splitlines()[0][:300]}", 1)
    raise AssertionError("unreachable")  # pragma: no cover


def _app() -> Any:
    from supervisor.app import operations as app

    return app


def _console() -> Any:
    from rich.console import Console

    return Console()


def with_config(func: Callable[..., T]) -> Callable[..., T]:
    """Load and validate the config before the command body (bad config: exit 2)."""

    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> T:
        try:
            config = load_config(ctx.obj["config_path"])
        except ConfigError as exc:
            _fail(str(exc), 2)
        return func(config, *args, **kwargs)

    return wrapper


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        try:
            key, item = parse_label(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--label") from None
        labels[key] = item
    return labels


def _duration(_ctx: Any, _param: Any, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(int(value) if value.isdigit() else value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class _OneLineErrors(click.Group):
    """Usage errors as one line on stderr (exit 2), like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(f"{PROG}: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) else ""
            _fail(exc.format_message().replace("\n", " ") + hint, exc.exit_code)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: $CLADO_SUPERVISOR_CONFIG, else ./supervisor.toml).",
)
@click.version_option(package_name="clado-supervisor")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Keeps Clado deep research jobs from burning money."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path(config_file)


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it, SIGHUP reloads the config)."""
    run_async(_app().run_daemon(ctx.obj["config_path"]))


@main.command("migrate")
@with_config
def migrate_command(config: Config) -> None:
    """Upgrade the database schema to the newest version."""
    from supervisor.adapters import migrate

    try:
        migrate.upgrade(config.database.url)
    except Exception as exc:  # SQLAlchemy's errors: the database is unreachable or refused
        _fail(f"database: {str(getattr(exc, 'orig', None) or exc).splitlines()[0][:300]}", 1)
    click.echo("database schema is up to date")


@main.command("check-config")
@with_config
def check_config(config: Config) -> None:
    """Validate the config file."""
    click.echo(f"{config.source}: OK (policies: {', '.join(config.policies)}; hash {config.config_hash})")


@main.command()
@click.argument("job_ids", nargs=-1)
@click.option("--from-file", type=click.File("r"), help="Read job ids from a file (- for stdin), one a line.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label the jobs (repeatable).")
@click.option("--policy", help="Use this policy instead of matching labels.")
@click.option("--max-runtime", callback=_duration, metavar="DUR", help="Override the policy's max_runtime.")
@click.option("--max-credits", type=click.IntRange(1, 1_000_000_000), help="Override the policy's max_credits.")
@with_config
def track(
    config: Config,
    job_ids: tuple[str, ...],
    from_file: Any,
    labels: tuple[str, ...],
    policy: str | None,
    max_runtime: timedelta | None,
    max_credits: int | None,
) -> None:
    """Supervise jobs started elsewhere (idempotent)."""
    ids = list(job_ids)
    if from_file is not None:
        lines = (line.strip() for line in from_file.read().splitlines())
        ids += [line for line in lines if line and not line.startswith("#")]
    if not ids:
        raise click.UsageError("give at least one JOB_ID (or --from-file)")

    parsed_labels = _labels(labels)

    async def go() -> tuple[list[str], list[str]]:
        _app().parse_ids(ids)  # all ids valid before the database is even opened
        async with _app().operations(config) as ops:
            return await ops.track(
                ids, labels=parsed_labels, policy=policy, max_runtime=max_runtime, max_credits=max_credits
            )

    added, existing = run_async(go())
    click.echo(f"tracking {len(added)} new job(s); {len(existing)} already tracked")


@main.command()
@click.argument("query")
@click.option("--limit", type=click.IntRange(1, 1000), default=30, show_default=True, help="Results to ask for.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label the job (repeatable).")
@click.option("--policy", help="Use this policy instead of matching labels.")
@with_config
def submit(config: Config, query: str, limit: int, labels: tuple[str, ...], policy: str | None) -> None:
    """Start a deep research job and supervise it; prints its job id."""
    if not query.strip():
        raise click.BadParameter("the query is empty", param_hint="QUERY")
    parsed = _labels(labels)

    async def go() -> str:
        async with _app().operations(config) as ops:
            return await ops.submit(query, limit=limit, labels=parsed, policy=policy)

    click.echo(run_async(go()))


@main.group()
def jobs() -> None:
    """Inspect supervised jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@with_config
def jobs_list(config: Config, state: str | None, as_json: bool) -> None:
    """List jobs with their state, credits and cancel reason."""
    async def go() -> list[Job]:
        async with _app().operations(config) as ops:
            return await ops.jobs(state)

    rows = [_app().job_json(config, job) for job in run_async(go())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} job(s)")
    for column in ("job id", "state", "remote", "policy", "credits", "limit", "reason", "submitted"):
        table.add_column(column, justify="right" if column in ("credits", "limit") else "left")
    for row in rows:
        table.add_row(
            row["job_id"], row["state"], row["remote_status"] or "-", row["policy"],
            str(row["credits_used"]), str(row["limits"]["max_credits"] or "-"),
            row["cancel_reason"] or row["would_cancel_reason"] and f"(would) {row['would_cancel_reason']}" or "-",
            (row["submitted_at"] or "")[:19].replace("T", " "),
        )
    _console().print(table)


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
@with_config
def jobs_show(config: Config, job_id: str, as_json: bool) -> None:
    """One job with its events."""
    async def go() -> tuple[Job | None, list[dict[str, Any]]]:
        _app().parse_ids([job_id])  # before the database is even opened
        async with _app().operations(config) as ops:
            return await ops.job(job_id)

    job, events = run_async(go())
    if job is None:
        _fail(f"job {job_id} is not tracked", 2)
    data = {**_app().job_json(config, job), "events": [_app().event_json(e) for e in events]}
    if as_json:
        click.echo(json.dumps(data, indent=2))
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
            event["at"][:23], event["kind"], event["from_state"] or "", event["to_state"] or "",
            event["reason"] or "", json.dumps(event["detail"]) if event["detail"] else "",
        )
    console.print(table)


@main.command()
@click.argument("job_id")
@click.option("--reason", "note", help="Why (recorded with the manual cancel).")
@with_config
def cancel(config: Config, job_id: str, note: str | None) -> None:
    """Cancel a job now, through the same state machine as the daemon."""
    async def go() -> Job | None:
        _app().parse_ids([job_id])  # before the database is even opened
        async with _app().operations(config) as ops:
            return await ops.cancel(job_id, note)

    job = run_async(go())
    if job is None:
        _fail(f"job {job_id} is not tracked", 2)
    if job.cancel_reason == "manual" or job.state in ("cancelling", "confirming"):
        click.echo(f"{job_id}: {job.state} (reason {job.cancel_reason})")
    else:
        click.echo(f"{job_id}: already {job.state}; nothing to cancel")


@main.command()
@click.option("--period", type=click.Choice(["day", "week", "month"]), default="day", show_default=True,
              help="The calendar period (UTC) whose submitted jobs are reported.")
@click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
@with_config
def report(config: Config, period: str, as_json: bool) -> None:
    """Spend, budgets, cancels, warnings and credits saved, for a period."""
    from supervisor.app.report import build_report

    async def go() -> dict[str, Any]:
        async with _app().operations(config) as ops:
            return await build_report(ops.store, config, period, datetime.now(UTC))

    data = run_async(go())
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.table import Table

    console = _console()
    console.print(f"[bold]Report for this {period}[/bold] (jobs submitted since {data['period_start']})")
    console.print(
        f"jobs {data['jobs']}, spend {data['spend']} credits; saved by cancels {data['saved_by_cancels']}; "
        f"observe rules would have saved {data['observe_would_have_saved']}; "
        f"leaked after kill decisions {data['leaked_after_decision']}"
    )
    if data["budgets"]:
        table = Table(title="budgets")
        for column in ("budget", "period", "credits", "spent", "reserved", "remaining", "action", "state"):
            table.add_column(column)
        for b in data["budgets"]:
            state = "exhausted" if b["exhausted"] else ("warned " + ",".join(b["warnings_fired"]) if b["warnings_fired"] else "ok")
            table.add_row(b["name"], b["period"], str(b["credits"]), str(b["spent"]), str(b["reserved"]),
                          str(b["remaining"]), b["action"], state)
        console.print(table)
    for title, key in (("cancels by reason", "cancels_by_reason"), ("would cancel (observe)", "would_cancel_by_reason"),
                       ("warnings by limit", "warnings_by_limit"), ("spend by label", "spend_by_label"),
                       ("spend by policy", "spend_by_policy")):
        if data[key]:
            table = Table(title=title)
            table.add_column("key")
            table.add_column("value", justify="right")
            for key_, value in data[key].items():
                table.add_row(key_, str(value))
            console.print(table)


@main.command()
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--limit", type=click.IntRange(1, 1000), default=40, show_default=True, help="Active jobs to show.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (also when stdout is not a terminal).")
@with_config
def top(config: Config, interval: float, limit: int, once: bool) -> None:
    """Watch a running daemon: jobs by state and the active jobs, live, from the database."""
    from supervisor.app.top import run_top

    async def go() -> None:
        async with _app().operations(config) as ops:
            await run_top(config, ops.store, interval=interval, limit=limit, once=once)

    try:
        run_async(go())
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@with_config
def healthcheck(config: Config, timeout: float) -> None:
    """Exit 0 if the running daemon answers /healthz (for Docker HEALTHCHECK)."""
    import urllib.error
    import urllib.request

    from supervisor.config import split_address

    host, port = split_address(config.http.listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            click.echo(f"healthy ({response.status})")
    except urllib.error.HTTPError as exc:
        _fail(f"unhealthy: {url} answered {exc.code}", 1)
    except OSError as exc:
        _fail(f"unhealthy: cannot reach {url}: {getattr(exc, 'reason', exc)}", 1)


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
