"""What every command shares: known failures as one line and an exit code, the config
option, the input rules' complaints as usage errors, and the output for people (rich tables)
and for scripts (JSON, tab-separated lines).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from supervisor.app import errors, inputs
from supervisor.config import Config, config_path, load_config

if TYPE_CHECKING:
    from supervisor.app.operations import Operations
    from supervisor.app.views import View

# Heavy modules (SQLAlchemy, Alembic, APScheduler, rich) are imported by the commands that
# need them, so `check-config` and `--help` answer at once.

T = TypeVar("T")
PROG = "clado-supervisor"
JSON_HELP = "JSON, for scripts."


# -- failures: one line on stderr and an exit code ------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"{PROG}: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Known failures (app/errors.py) as one line on stderr and their exit code; a bug propagates."""
    try:
        yield
    except Exception as exc:
        error = errors.translate(exc)
        if error is None:
            raise
        fail(str(error), error.exit_code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning known failures into one line and an exit code."""
    from supervisor.adapters.eventloop import run_loop

    with reported():
        return run_loop(coro)
    raise AssertionError("unreachable")  # pragma: no cover - reported exits on what it catches


def checked(hint: str | None, rule: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """An input rule of app/inputs.py, its complaint shown as a usage error of `hint` (in an
    option's callback None: click names the option itself)."""
    try:
        return rule(*args, **kwargs)
    except errors.BadInput as exc:
        raise click.BadParameter(exc.problem, param_hint=hint) from None


def duration(_ctx: Any, _param: Any, value: str | None) -> timedelta | None:
    """An option's callback: a duration ("90m", "2h") checked by the input rule."""
    return checked(None, inputs.duration, "max_runtime", value)


# -- the app, imported when a command runs --------------------------------------------------------


def call_app(config: Config, use: Callable[[Operations], Awaitable[T]], *, job_ids: Sequence[str] = ()) -> T:
    """One use case on the config's Operations, its known failures as one line and an exit
    code. `job_ids` are checked first: all valid before the database is even opened."""
    from supervisor.app.operations import operations, parse_ids

    async def go() -> T:
        parse_ids(job_ids)
        async with operations(config) as ops:
            return await use(ops)

    return run_async(go())


def console() -> Any:
    from rich.console import Console

    return Console()


# -- the config, before or after the subcommand ---------------------------------------------------

CONFIG_HELP = "Config file (default: $CLADO_SUPERVISOR_CONFIG, else ./supervisor.toml)."


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
        help=CONFIG_HELP,
    )(func)


def with_config(func: Callable[..., T]) -> Callable[..., T]:
    """Load and validate the config before the command body (bad config: exit 2)."""

    @config_option
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, *args: Any, **kwargs: Any) -> T:
        from supervisor.adapters.logs import configure_logging

        with reported():
            config = load_config(ctx.obj["config_path"])
        # What a command logs (a manual cancel's decision line) goes to stderr, never into
        # the stdout a script parses.
        configure_logging(config.logging.format, config.logging.level)
        return func(config, *args, **kwargs)

    return wrapper


# -- output for people and for scripts -----------------------------------------------------------


def piped() -> bool:
    """stdout is a file or a pipe: print tab-separated lines, never a table cut to 80 columns."""
    return not sys.stdout.isatty()


def say_clamped(asked: str, requested: int, clamped_by: Sequence[str]) -> None:
    """One stderr line when the API was asked for less than requested (submit, continue)."""
    if clamped_by:
        rules = " and ".join(clamped_by)
        click.echo(f"asked the API for {asked}, not {requested}: that is what {rules} allow(s)", err=True)


def when(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}Z"


def print_json(data: View | list[Any] | Mapping[str, Any]) -> None:
    click.echo(json.dumps(data if isinstance(data, list | Mapping) else data.to_json(), indent=2))


def cell(value: Any) -> str:
    if value is None:
        return ""
    # JSON's spelling for what is not plain text: true/false, objects, arrays.
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, bool | dict | list) else str(value)
    # One record a line, one field a tab: a tab or newline inside a value would split it.
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def print_tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    click.echo("\t".join(header))
    for row in rows:
        click.echo("\t".join(cell(value) for value in row))


def print_table(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[Any]],
    shown: Iterable[Sequence[Any]],
    right: Collection[str] = (),
) -> None:
    """Records, one a row, under `columns` (header, JSON field name). Piped: the field names,
    then `rows`, tab-separated in full; on a terminal: a rich table of `shown`, the same
    records as a person reads them (None as "-"), the `right` columns right-aligned."""
    if piped():
        print_tsv([name for _, name in columns], rows)
        return
    from rich.table import Table

    table = Table(title=title)
    for header, _ in columns:
        table.add_column(header, justify="right" if header in right else "left", overflow="fold")
    for row in shown:
        table.add_row(*("-" if value is None else str(value) for value in row))
    console().print(table)


def flat(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested objects as dotted keys (`limits.max_credits`), for key<TAB>value lines."""
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def print_pairs(data: Mapping[str, Any]) -> None:
    """key<TAB>value lines, nested objects as dotted keys."""
    for key, value in flat(data):
        click.echo(f"{key}\t{cell(value)}")
