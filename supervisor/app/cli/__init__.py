"""`clado-supervisor`: parse, call the app, print. Exit codes: 0 ok, 1 runtime failure,
2 bad usage, bad config or bad input — always one line on stderr, never a traceback.

Output for scripts: every command that prints takes `--json` (the views of app/views.py, the
admin API's shapes); tables are rich tables on a terminal and tab-separated lines with full
values (header first) when stdout is not one. Colour follows rich, so NO_COLOR turns it off.

The commands live by what they are about: jobs.py (track, submit, cancel, continue, jobs),
queue.py, webhooks.py, daemon.py (run, top, report, budgets, healthcheck, fake-api, demo) and install.py
(check-config, migrate); common.py has what they share.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from supervisor.app.cli import daemon, install, jobs, queue, webhooks
from supervisor.app.cli.common import CONFIG_HELP, PROG, fail
from supervisor.config import config_path


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
            fail(exc.format_message().replace("\n", " ") + hint, exc.exit_code)


@click.group(
    cls=_OneLineErrors,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    commands=[
        jobs.track, jobs.submit, jobs.cancel, jobs.continue_command, jobs.jobs,
        queue.queue,
        webhooks.webhooks,
        daemon.run, daemon.top, daemon.report, daemon.budgets, daemon.healthcheck, daemon.fake_api_command, daemon.demo,
        install.check_config, install.migrate_command,
    ],
)  # fmt: skip
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), help=CONFIG_HELP)
@click.version_option(package_name="clado-supervisor", prog_name=PROG)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Keeps Clado deep research jobs from burning money.

    Shell completion (bash, zsh, fish): eval "$(_CLADO_SUPERVISOR_COMPLETE=bash_source clado-supervisor)"
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path(config_file)
