"""`queue list/show/cancel`: submissions waiting their turn (submit --queue), and orphaned ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from supervisor.app.cli.common import (
    JSON_HELP,
    call_app,
    cell,
    flat,
    piped,
    print_json,
    print_table,
    when,
    with_config,
)
from supervisor.config import Config

if TYPE_CHECKING:
    from supervisor.app.views import QueueItemView


@click.group(no_args_is_help=True)
def queue() -> None:
    """Submissions waiting their turn (submit --queue), and orphaned ones."""


QUEUE_COLUMNS = (
    ("queue id", "id"),
    ("state", "state"),
    ("priority", "priority"),
    ("limit", "requested_limit"),
    ("reason", "reason"),
    ("expected start", "expected_start"),
    ("created", "created_at"),
    ("job id", "job_id"),
)


def print_queue(items: Sequence[QueueItemView], title: str) -> None:
    rows = [[item.to_json()[name] for _, name in QUEUE_COLUMNS] for item in items]
    shown = (
        [
            item.id, item.state, item.priority, item.limit or item.requested_limit, item.reason or "-",
            when(item.expected_start), when(item.created_at), item.job_id or "-",
        ]
        for item in items
    )  # fmt: skip
    print_table(title, QUEUE_COLUMNS, rows, shown)


@queue.command("list")
@click.option("--state", "states", multiple=True, help="Only submissions in this state (repeatable; default: all).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array, for scripts.")
@with_config
def queue_list(config: Config, states: tuple[str, ...], as_json: bool) -> None:
    """Submissions in the queue's order (priority, then age), with why each waits."""

    items: list[QueueItemView] = call_app(config, lambda ops: ops.queue(states or None))
    if as_json:
        print_json([item.to_json() for item in items])
        return
    print_queue(items, f"{len(items)} submission(s)")


@queue.command("show")
@click.argument("submission_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def queue_show(config: Config, submission_id: str, as_json: bool) -> None:
    """One submission (piped: key<TAB>value lines)."""
    _print_item(call_app(config, lambda ops: ops.queue_item(submission_id)), as_json)


@queue.command("cancel")
@click.argument("submission_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@with_config
def queue_cancel(config: Config, submission_id: str, as_json: bool) -> None:
    """Take a queued submission off the queue, or settle an orphaned one (its reservation is
    given back: do it once its job, if any, has been found or ruled out)."""
    _print_item(call_app(config, lambda ops: ops.cancel_queued(submission_id)), as_json)


def _print_item(item: QueueItemView, as_json: bool) -> None:
    data = item.to_json()
    if as_json:
        print_json(data)
        return
    for key, value in flat(data):
        click.echo(f"{key}\t{cell(value)}" if piped() else f"{key}: {'-' if value is None else cell(value)}")
