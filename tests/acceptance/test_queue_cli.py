"""The queue through the real CLI, as a user scripts it: `submit --queue` returns a queue id
at once when the budget is spent, `queue list/show/cancel`, the errors' exit codes, and an
orphaned submission in `jobs list` on a terminal."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import config_text

from .conftest import FakeApiProcess, cli
from .test_cli_scripting import on_a_terminal

BUDGET = """
[budgets.growth]
match = { team = "growth" }
period = "day"
credits = 50
action = "block"
reserve = true
"""


def test_submit_queue_and_the_queue_commands(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    (tmp_path / "supervisor.toml").write_text(config_text(fake_api.base_url, "sqlite:///supervisor.db", extra=BUDGET))
    team = ("--label", "team=growth")
    started = cli("submit", "engineers", "--limit", "50", *team, cwd=tmp_path)
    assert started.returncode == 0, started.stderr

    # Without --queue a spent budget refuses, with the numbers (exit 2) …
    refused = cli("submit", "engineers", "--limit", "10", *team, cwd=tmp_path)
    assert refused.returncode == 2
    assert "budget 'growth'" in refused.stderr
    # … with it, the submission waits and its queue id is printed at once.
    queued = cli("submit", "engineers", "--limit", "10", *team, "--queue", "--priority", "3", cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    queue_id = queued.stdout.strip()
    assert "queued (budget:growth); expected to start at " in queued.stderr
    as_json = cli("submit", "engineers", "--limit", "10", *team, "--queue", "--expires-after", "2h", "--json",
                  cwd=tmp_path)  # fmt: skip
    later = json.loads(as_json.stdout)
    assert later["state"] == "queued"
    assert later["reason"] == "budget:growth"
    # What no wait could fit is refused at once.
    never = cli("submit", "engineers", "--limit", "60", *team, "--queue", cwd=tmp_path)
    assert never.returncode == 2
    assert "would never fit" in never.stderr

    listed = cli("queue", "list", cwd=tmp_path)  # piped: tab-separated, header first
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split("\t")[:3] == ["id", "state", "priority"]
    queued_rows = [row.split("\t") for row in rows if row.split("\t")[1] == "queued"]
    assert [row[0] for row in queued_rows] == [queue_id, later["id"]]  # priority first

    shown = json.loads(cli("queue", "show", queue_id, "--json", cwd=tmp_path).stdout)
    assert (shown["id"], shown["priority"], shown["requested_limit"]) == (queue_id, 3, 10)
    cancelled = cli("queue", "cancel", queue_id, "--json", cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    again = cli("queue", "cancel", queue_id, "--json", cwd=tmp_path)  # idempotent
    assert json.loads(again.stdout)["state"] == "cancelled"
    [first] = [row[0] for row in (r.split("\t") for r in rows) if row[1] == "started"]
    too_late = cli("queue", "cancel", first, cwd=tmp_path)
    assert too_late.returncode == 2
    assert "is started: only a queued or orphaned one can be cancelled" in too_late.stderr
    unknown = cli("queue", "show", "6f1c2a34-0000-4000-8000-000000000000", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "no submission" in unknown.stderr
    bad = cli("queue", "show", "not-a-uuid", cwd=tmp_path)
    assert bad.returncode == 2
    assert fake_api.get("/_fake/stats")["initiate"] == 1


def test_an_orphaned_submission_shows_in_jobs_list_on_a_terminal(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    (tmp_path / "supervisor.toml").write_text(config_text(fake_api.base_url, "sqlite:///supervisor.db"))
    fake_api.post("/_fake/faults", {"drop_rate": 1.0})  # the job starts, its answer is cut off
    failed = cli("submit", "engineers", cwd=tmp_path)
    fake_api.post("/_fake/faults", {"drop_rate": 0.0})
    assert failed.returncode == 1
    [orphan] = json.loads(cli("queue", "list", "--state", "orphaned", "--json", cwd=tmp_path).stdout)
    screen = on_a_terminal(["jobs", "list"], tmp_path)
    assert "1 orphaned submission(s)" in screen
    assert orphan["id"] in screen
    assert "initiate_outcome_unknown" in screen
