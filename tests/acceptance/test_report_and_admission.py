"""Budgets through the real CLI: admission refusals, `report`, and budget config errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import config_text

from .conftest import DaemonProcess, FakeApiProcess, cli, cli_env, jobs_json, wait_for


def write_config(workdir: Path, fake_api: FakeApiProcess, *, policies: str, extra: str) -> None:
    (workdir / "supervisor.toml").write_text(
        config_text(
            fake_api.base_url,
            "sqlite:///supervisor.db",
            supervisor={"lease_ttl": '"2s"'},
            policies=policies,
            extra=extra,
        )
    )


def one_error_line(result: Any) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("clado-supervisor: error: ")
    return lines[0]


def test_submit_refused_by_a_budget_exits_2_and_tracks_nothing(workdir: Path, fake_api: FakeApiProcess) -> None:
    write_config(
        workdir, fake_api, policies='[policies.default]\nmax_credits = 200',
        extra='[budgets.growth-pool]\nmatch = { team = "growth" }\ncredits = 50\nreserve = true\naction = "block"\n',
    )  # fmt: skip
    # Prevention first: the API is asked only for what the budget can hold, and told so.
    first = cli("submit", "engineers in SF", "--limit", "60", "--label", "team=growth", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "asked the API for 50 results, not 60" in first.stderr
    clamped = first.stdout.strip()
    assert fake_api.job(clamped)["limit"] == 50
    # Nothing is left: the next matching submission is refused with the numbers.
    result = cli("submit", "engineers in SF", "--limit", "60", "--label", "team=growth", cwd=workdir)
    line = one_error_line(result)
    assert line.startswith("clado-supervisor: error: submission refused: budget 'growth-pool' ")
    for number in ("spent 0", "reserved 50", "of 50"):
        assert number in line, line
    assert result.stdout == ""
    assert list(jobs_json(workdir)) == [clamped]
    assert fake_api.get("/_fake/stats")["initiate"] == 1  # the refused one was never started

    # The same submission outside the budget's match goes through whole.
    ok = cli("submit", "engineers in SF", "--limit", "60", "--label", "team=search", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""
    job_id = ok.stdout.strip()
    assert fake_api.job(job_id)["limit"] == 60
    assert sorted(jobs_json(workdir)) == sorted([clamped, job_id])


REPORT_POLICIES = """
[policies.default]
max_credits = 10
warn_at = [0.5]
"""

REPORT_BUDGETS = """
[budgets.growth-cap]
match = { team = "growth" }
credits = 10
warn_at = [0.5]
action = "block"
"""

BUDGET_FIELDS = {"name", "credits", "spent", "reserved", "remaining", "action", "exhausted", "warnings_fired"}


def report_json(workdir: Path) -> dict[str, Any]:
    result = cli("report", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_report_after_a_runaway_is_cancelled_and_a_full_budget_blocks(workdir: Path, fake_api: FakeApiProcess) -> None:
    write_config(workdir, fake_api, policies=REPORT_POLICIES, extra=REPORT_BUDGETS)
    # Migrate first: `run` and `submit` both auto-migrate, and two first-time migrations of
    # one fresh SQLite file at the same moment can fail ("table jobs already exists").
    migrated = cli("migrate", cwd=workdir)
    assert migrated.returncode == 0, migrated.stderr
    daemon = DaemonProcess(workdir)
    try:
        # Started elsewhere (a submit through the supervisor would have been capped at 10).
        job_id = fake_api.create_job(query="runaway search", limit=100, rate=10)
        tracked = cli("track", job_id, "--label", "team=growth", cwd=workdir)
        assert tracked.returncode == 0, tracked.stderr
        job = wait_for(
            lambda: (j := jobs_json(workdir).get(job_id)) and j["state"] == "cancelled" and j,
            timeout=30, what="the runaway cancelled",
        )  # fmt: skip
        # The budget sweep (every second) records the warning once the spend shows.
        wait_for(lambda: report_json(workdir)["budgets"][0]["warnings_fired"], timeout=15, what="the budget warning")
    finally:
        assert daemon.stop() == 0

    credits = job["credits_used"]
    assert credits == fake_api.job(job_id)["results"] >= 10
    shown = json.loads(cli("jobs", "show", job_id, "--json", cwd=workdir).stdout)
    at_decision = shown["cancel_detail"]["credits"]

    data = report_json(workdir)
    assert data["period"] == "day"
    (budget,) = data["budgets"]
    assert set(budget) >= BUDGET_FIELDS
    assert budget == {
        **budget,
        "name": "growth-cap", "credits": 10, "spent": credits, "reserved": 0, "remaining": 0,
        "action": "block", "exhausted": True, "warnings_fired": ["0.5"],
    }  # fmt: skip
    assert data["cancels_by_reason"] == {"max_credits": 1}
    # Started elsewhere, its limit is unknown here: what it would have billed is not claimed.
    assert data["saved_by_cancels"] == 0
    assert data["observe_would_have_saved"] == 0
    assert data["leaked_after_decision"] == credits - at_decision
    assert data["warnings_by_limit"] == {"max_credits": 1}

    # The budget is spent: a block budget refuses the next matching submission.
    refused = cli("submit", "one more", "--limit", "1", "--label", "team=growth", cwd=workdir)
    line = one_error_line(refused)
    assert "submission refused: budget 'growth-cap' is exhausted" in line
    assert f"spent {credits}" in line and "of 10" in line
    assert list(jobs_json(workdir)) == [job_id]

    # Piped, the report is key<TAB>value lines with the same figures (tables on a terminal:
    # test_cli_scripting.py).
    piped = cli("report", cwd=workdir, env=cli_env(COLUMNS="200"))
    assert piped.returncode == 0, piped.stderr
    figures = dict(line.split("\t", 1) for line in piped.stdout.splitlines())
    assert figures["budgets.growth-cap.exhausted"] == "true", piped.stdout
    assert figures["cancels_by_reason.max_credits"] == "1", piped.stdout
    assert figures["saved_by_cancels"] == "0", piped.stdout  # started elsewhere: its limit is unknown


BAD_BUDGETS = {
    "unknown_period": ('[budgets.b]\ncredits = 10\nperiod = "fortnight"\n', "budgets.b.period"),
    "unknown_timezone": ('[budgets.b]\ncredits = 10\ntimezone = "Mars/Olympus_Mons"\n', "budgets.b.timezone"),
    "unknown_action": ('[budgets.b]\ncredits = 10\naction = "kill"\n', "budgets.b.action"),
    "bad_label_key": ('[budgets.b]\ncredits = 10\nmatch = { "bad key" = "x" }\n', "budgets.b.match"),
    "warn_at_above_1": ("[budgets.b]\ncredits = 10\nwarn_at = [0.5, 1.5]\n", "budgets.b.warn_at"),
    "webhook_ftp_url": ('[[notify.webhooks]]\nurl = "ftp://hooks.example/x"\n', "notify.webhooks[0].url"),
}


@pytest.mark.parametrize("case", list(BAD_BUDGETS))
def test_budget_and_webhook_config_errors_exit_2_with_one_line(
    case: str, workdir: Path, fake_api: FakeApiProcess
) -> None:
    snippet, key = BAD_BUDGETS[case]
    write_config(workdir, fake_api, policies="[policies.default]\nmax_credits = 200", extra=snippet)
    result = cli("check-config", cwd=workdir)
    line = one_error_line(result)
    assert "supervisor.toml" in line and key in line, line
    assert result.stdout == ""
