"""The CLI in scripts, through the real command: `--json` on every command that prints, plain
tab-separated lines with full values when stdout is a pipe, help on bare commands, `--version`,
`--config` after the subcommand, NO_COLOR on a real terminal (a pty) and shell completion."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
from pathlib import Path

from fakeserver import free_port

from .conftest import PY, DaemonProcess, FakeApiProcess, cli, cli_env, wait_for

# A UUID-length id: what an 80-column table used to cut to `d6ed85…`.
LONG_ID = "d6ed85f0-3c1b-4f7e-9a57-0b8c2e4f1a99"
TSV_HEADER = "job_id\tstate\tremote_status\tpolicy\tcredits_used\tmax_credits\treason\tsubmitted_at\tblind"


def as_json(*args: str, cwd: Path) -> object:
    result = cli(*args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_command_that_prints_has_json(workdir: Path, fake_api: FakeApiProcess) -> None:
    assert as_json("track", LONG_ID, "job-b", "--label", "team=a", cwd=workdir) == {
        "added": [LONG_ID, "job-b"],
        "already_tracked": [],
    }
    assert as_json("track", "job-b", cwd=workdir) == {"added": [], "already_tracked": ["job-b"]}

    submitted = as_json("submit", "engineers in Paris", "--limit", "5", cwd=workdir)
    assert isinstance(submitted, dict)
    assert set(submitted) == {"job_id", "requested_limit", "limit", "clamped_by"}
    assert fake_api.job(submitted["job_id"])["limit"] == 5

    checked = as_json("check-config", cwd=workdir)
    assert isinstance(checked, dict)
    assert checked["policies"] == ["default"]
    assert set(checked) == {"source", "config_hash", "policies", "budgets"}

    job_id = fake_api.create_job(rate=1, limit=500)
    cli("track", job_id, cwd=workdir)
    cancelled = as_json("cancel", job_id, "--reason", "wrong query", cwd=workdir)
    assert isinstance(cancelled, dict)
    assert (cancelled["job_id"], cancelled["state"], cancelled["cancel_reason"]) == (job_id, "confirming", "manual")

    snapshot = as_json("top", cwd=workdir)  # --json implies one snapshot
    assert isinstance(snapshot, dict)
    assert snapshot["counts"]["watching"] == 3
    assert snapshot["counts"]["lost"] == 0
    assert {job["job_id"] for job in snapshot["active"]} == {LONG_ID, "job-b", submitted["job_id"], job_id}

    report = as_json("report", cwd=workdir)
    assert isinstance(report, dict)
    assert report["jobs"] == 4
    listed = as_json("jobs", "list", cwd=workdir)
    assert isinstance(listed, list)
    assert LONG_ID in {job["job_id"] for job in listed}
    shown = as_json("jobs", "show", LONG_ID, cwd=workdir)
    assert isinstance(shown, dict)
    assert shown["job_id"] == LONG_ID

    # healthcheck: the answer as JSON either way, the exit code as before.
    config = workdir / "supervisor.toml"
    port = free_port()
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    down = cli("healthcheck", "--timeout", "2", "--json", cwd=workdir)
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
    answer = json.loads(down.stdout)
    assert (answer["healthy"], answer["status"]) == (False, None)
    assert "cannot reach" in answer["error"]
    daemon = DaemonProcess(workdir)
    try:
        up = wait_for(lambda: (r := cli("healthcheck", "--json", cwd=workdir)).returncode == 0 and r, what="healthz")
        assert json.loads(up.stdout) == {
            "healthy": True, "url": f"http://127.0.0.1:{port}/healthz", "status": 200, "error": None,
        }  # fmt: skip
    finally:
        assert daemon.stop() == 0


def test_piped_output_is_tab_separated_with_full_values(workdir: Path) -> None:
    cli("track", LONG_ID, "--label", "team=growth", cwd=workdir)
    listed = cli("jobs", "list", cwd=workdir)  # capture_output: stdout is a pipe
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == TSV_HEADER
    fields = lines[1].split("\t")
    assert fields[:6] == [LONG_ID, "watching", "", "default", "0", "200"]  # nothing cut, no "…"
    assert fields[7].endswith("Z")
    assert "…" not in listed.stdout
    assert "│" not in listed.stdout

    # `cut` works on it, as a script would use it.
    listing = subprocess.Popen(
        [PY, "-m", "supervisor", "jobs", "list"], cwd=workdir, env=cli_env(), stdout=subprocess.PIPE
    )
    cut = subprocess.run(["cut", "-f1,2"], stdin=listing.stdout, capture_output=True, text=True, timeout=60, check=True)
    assert listing.wait(60) == 0
    assert cut.stdout.splitlines() == ["job_id\tstate", f"{LONG_ID}\twatching"]

    shown = cli("jobs", "show", LONG_ID, cwd=workdir).stdout
    head, _, events = shown.partition("\n\n")
    pairs = dict(line.split("\t", 1) for line in head.splitlines())
    assert (pairs["job_id"], pairs["labels.team"], pairs["limits.max_credits"]) == (LONG_ID, "growth", "200")
    assert events.splitlines()[0] == "at\tkind\tfrom_state\tto_state\treason\tdetail"
    assert events.splitlines()[1].split("\t")[1:3] == ["tracked", ""]

    top = cli("top", cwd=workdir).stdout  # piped: one snapshot, never a live screen
    counts, _, table = top.partition("\n\n")
    assert "watching\t1" in counts.splitlines()
    assert table.splitlines()[0] == TSV_HEADER
    assert table.splitlines()[1].startswith(LONG_ID + "\t")

    report = dict(line.split("\t", 1) for line in cli("report", cwd=workdir).stdout.splitlines())
    assert (report["period"], report["jobs"], report["spend_by_label.team=growth"]) == ("day", "1", "0")


def test_bare_commands_print_help_and_options_go_anywhere(workdir: Path, tmp_path: Path) -> None:
    for args in ([], ["jobs"]):
        result = cli(*args, cwd=workdir)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage: clado-supervisor")
        assert "error" not in result.stderr
        assert len(result.stdout.splitlines()) > 5  # the help, not one squashed line
    assert "list" in cli("jobs", cwd=workdir).stdout
    assert "show" in cli("jobs", cwd=workdir).stdout

    version = cli("--version", cwd=workdir)
    assert version.returncode == 0
    assert version.stdout.startswith("clado-supervisor, version ")

    # --config after the subcommand, from another directory; after wins over before.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = workdir / "supervisor.toml"
    for args in (
        ["check-config", "--config", str(config)],
        ["--config", "nope.toml", "check-config", "--config", str(config)],
    ):
        result = cli(*args, "--json", cwd=elsewhere)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["source"] == str(config)
    assert cli("track", "job-x", "--config", str(config), cwd=elsewhere).returncode == 0
    assert cli("jobs", "list", "--config", str(config), cwd=elsewhere).stdout.splitlines()[1].startswith("job-x\t")
    missing = cli("check-config", "--config", "nope.toml", cwd=elsewhere)
    assert missing.returncode == 2
    assert "nope.toml" in missing.stderr


def on_a_terminal(args: list[str], cwd: Path, **env: str) -> str:
    """The CLI's stdout when it is a real terminal (a pty), as a person would see it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [PY, "-m", "supervisor", *args], cwd=cwd, env=cli_env(COLUMNS="200", TERM="xterm-256color", **env),
        stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        assert ready, "no output from the CLI within 30 s"
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the CLI closed its end
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else b""
    return output.decode()


def test_a_terminal_gets_tables_with_colour_unless_no_color(workdir: Path) -> None:
    cli("track", LONG_ID, cwd=workdir)
    coloured = on_a_terminal(["top", "--once"], workdir)
    assert LONG_ID in coloured
    assert "\x1b[36m" in coloured
    plain = on_a_terminal(["top", "--once"], workdir, NO_COLOR="1")
    assert LONG_ID in plain
    assert "\x1b[36m" not in plain
    assert "\x1b[3" not in plain
    report = on_a_terminal(["report"], workdir)
    assert "Report for this day" in report
    assert "\t" not in report
    table = on_a_terminal(["jobs", "list"], workdir, NO_COLOR="1")
    assert LONG_ID in table
    assert "\t" not in table
    # The submission time to the second in its own column (not ISO 8601: that is for pipes).
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", table)
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d", table)


def test_shell_completion_works_as_documented(workdir: Path) -> None:
    script = cli(cwd=workdir, env=cli_env(_CLADO_SUPERVISOR_COMPLETE="bash_source"))
    assert script.returncode == 0
    assert "complete -o nosort -F _clado_supervisor_completion clado-supervisor" in script.stdout
    words = cli(cwd=workdir, env=cli_env(
        _CLADO_SUPERVISOR_COMPLETE="bash_complete", COMP_WORDS="clado-supervisor jobs l", COMP_CWORD="2",
    ))  # fmt: skip
    assert words.stdout.split() == ["plain,list"]
