"""What an install needs before `run`: a valid config file (`check-config`) and the newest
database schema (`migrate`)."""

from __future__ import annotations

import click

from supervisor.app.cli.common import JSON_HELP, print_json, reported, with_config
from supervisor.config import Config


@click.command("migrate")
@with_config
def migrate_command(config: Config) -> None:
    """Upgrade the database schema to the newest version."""
    from supervisor.adapters import migrate

    with reported():
        migrate.upgrade(config.database.url)
    click.echo("database schema is up to date")


@click.command("check-config")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def check_config(config: Config, as_json: bool) -> None:
    """Validate the config file."""
    if as_json:
        from supervisor.app.views import ConfigCheckView

        print_json(ConfigCheckView.of(config))
        return
    click.echo(f"{config.source}: OK (policies: {', '.join(config.policies)}; hash {config.config_hash})")
