"""Running and watching: `run`, `top`, `report`, `budgets`, `healthcheck`, and the simulator's `fake-api`
and `demo`."""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn

import click

from supervisor.app.cli.common import (
    JSON_HELP,
    call_app,
    config_option,
    console,
    fail,
    piped,
    print_json,
    print_pairs,
    print_tsv,
    run_async,
    with_config,
)
from supervisor.app.cli.jobs import JOB_COLUMNS, job_row
from supervisor.config import Config
from supervisor.core.states import State

if TYPE_CHECKING:
    from supervisor.app.operations import Operations
    from supervisor.app.views import BudgetsView, ReportView, TopView


@click.command()
@config_option
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it, SIGHUP reloads the config)."""
    from supervisor.service.held_signals import hold_reloads

    hold_reloads()  # before the slow imports: a SIGHUP during start-up must not end the process
    from supervisor.app.operations import run_daemon

    run_async(run_daemon(ctx.obj["config_path"]))


@click.command()
@click.option(
    "--period",
    type=click.Choice(["day", "week", "month"]),
    default="day",
    show_default=True,
    help="The calendar period (UTC) whose submitted jobs are reported.",
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def report(config: Config, period: str, as_json: bool) -> None:
    """Spend, budgets, cancels, warnings and credits saved, for a period (piped: key<TAB>value)."""
    from supervisor.app.report import render, report_view

    data: ReportView = call_app(config, lambda ops: report_view(ops.store, config, period, datetime.now(UTC)))
    if as_json:
        print_json(data)
        return
    if piped():
        figures = data.to_json()
        figures["budgets"] = {budget.pop("name"): budget for budget in figures["budgets"]}
        print_pairs(figures)
        return
    render(console(), data)


@click.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def budgets(config: Config, as_json: bool) -> None:
    """Every budget's period: spent, reserved, the forecast to the period's end (central figure,
    low-high band, when it runs out) and the same in money (piped: key<TAB>value)."""
    from supervisor.app.report import budgets_table

    data: BudgetsView = call_app(config, lambda ops: ops.budgets())
    if as_json:
        print_json(data)
        return
    if piped():
        print_pairs({budget.name: budget.to_json() for budget in data.budgets})
        return
    if not data.budgets:
        console().print("no budgets are configured")
        return
    console().print(budgets_table(data.budgets))


@click.command()
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

    if as_json or piped():
        snapshot = call_app(config, lambda ops: _top_snapshot(ops, config, limit))
        if as_json:
            print_json(snapshot)
            return
        for state, count in snapshot.counts.items():
            click.echo(f"{state}\t{count}")
        click.echo()
        print_tsv([name for _, name in JOB_COLUMNS], (job_row(view) for view in snapshot.active))
        return
    with contextlib.suppress(KeyboardInterrupt):
        call_app(config, lambda ops: run_top(config, ops.store, interval=interval, limit=limit, once=once))


async def _top_snapshot(ops: Operations, config: Config, limit: int) -> TopView:
    from supervisor.adapters.store import utcnow
    from supervisor.app.top import snapshot
    from supervisor.app.views import JobView, TopView

    counts, active = await snapshot(ops.store, limit)
    return TopView(
        generated_at=utcnow(),
        counts={state.value: counts.get(state.value, 0) for state in State},
        active=[JobView.of(config, job) for job in active],
    )


@click.command()
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
            print_json(HealthcheckView(healthy=False, url=url, status=status, error=message))
        fail(f"unhealthy: {message}", 1)

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
        print_json(HealthcheckView(healthy=True, url=url, status=status, error=None))
    else:
        click.echo(f"healthy ({status})")


@click.command("fake-api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=click.IntRange(0, 65535))
def fake_api_command(host: str, port: int) -> None:
    """Run the local Clado API simulator."""
    from supervisor.sim.server import serve

    serve(host, port)


@click.command()
@click.option("--speed", type=click.FloatRange(min=0.1), default=1.0, hidden=True)
def demo(speed: float) -> None:
    """A one-command tour: the simulator, the daemon and a handful of jobs."""
    from supervisor.app.demo import run_demo

    sys.exit(run_demo(speed=speed))
