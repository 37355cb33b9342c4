"""`webhooks list/show/redeliver`: the outbox's delivery log, and replaying a delivery."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from supervisor.app.cli.common import JSON_HELP, call_app, cell, flat, piped, print_json, print_table, when, with_config
from supervisor.config import Config

if TYPE_CHECKING:
    from supervisor.app.views import DeliveryView, RedeliverResult


@click.group(no_args_is_help=True)
def webhooks() -> None:
    """Webhook deliveries: pending, delivered, failed; redeliver one."""


COLUMNS = (
    ("delivery id", "id"),
    ("state", "state"),
    ("event", "event"),
    ("hook", "hook"),
    ("subject", "subject"),
    ("attempts", "attempts"),
    ("created", "created_at"),
    ("last error", "last_error"),
)


@webhooks.command("list")
@click.option("--state", type=click.Choice(["pending", "delivered", "failed"]), help="Only deliveries in this state.")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@with_config
def webhooks_list(config: Config, state: str | None, as_json: bool) -> None:
    """Deliveries, failed first, then pending, then delivered (newest first in each)."""
    items: list[DeliveryView] = call_app(config, lambda ops: ops.deliveries(state))
    if as_json:
        print_json([item.to_json() for item in items])
        return
    rows = [[item.to_json()[name] for _, name in COLUMNS] for item in items]
    shown = (
        [item.id, item.state, item.event, item.hook, item.subject, item.attempts, when(item.created_at),
         item.last_error or "-"]
        for item in items
    )  # fmt: skip
    print_table(f"{len(items)} deliver{'y' if len(items) == 1 else 'ies'}", COLUMNS, rows, shown)


@webhooks.command("show")
@click.argument("delivery_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def webhooks_show(config: Config, delivery_id: str, as_json: bool) -> None:
    """One delivery with its attempts (piped: key<TAB>value lines)."""
    item: DeliveryView = call_app(config, lambda ops: ops.delivery(delivery_id))
    data = item.to_json()
    if as_json:
        print_json(data)
        return
    for key, value in flat(data):
        click.echo(f"{key}\t{cell(value)}" if piped() else f"{key}: {'-' if value is None else cell(value)}")


@webhooks.command("redeliver")
@click.argument("delivery_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def webhooks_redeliver(config: Config, delivery_ids: tuple[str, ...], as_json: bool) -> None:
    """Queue deliveries again (the daemon sends them within a second), with the same id."""
    result: RedeliverResult = call_app(config, lambda ops: ops.redeliver(delivery_ids))
    if as_json:
        print_json(result.to_json())
        return
    for value in result.redelivered:
        click.echo(f"redelivering {value}")
