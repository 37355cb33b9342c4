"""The CLI contract of DESIGN.md, through the real command as subprocesses."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from .conftest import DaemonProcess, FakeApiProcess, cli, jobs_json, wait_for

PUBLIC_FIELDS = {
    "job_id", "state", "remote_status", "labels", "policy", "credits_used", "cancel_reason",
    "final_status", "submitted_at", "cancel_requested_at", "confirmed_at",
}  # fmt: skip


def test_track_is_idempotent_and_reads_ids_from_a_file_or_stdin(workdir: Path) -> None:
    first = cli("track", "job-a", "job-b", "--label", "team=growth", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "tracking 2 new job(s); 0 already tracked" in first.stdout

    (workdir / "ids.txt").write_text("job-b\n\n# a comment\njob-c\n")
    again = cli("track", "--from-file", "ids.txt", cwd=workdir)
    assert "tracking 1 new job(s); 1 already tracked" in again.stdout

    piped = cli("track", "--from-file", "-", cwd=workdir, stdin="job-d\njob-a\n")
    assert "tracking 1 new job(s); 1 already tracked" in piped.stdout

    jobs = jobs_json(workdir)
    assert sorted(jobs) == ["job-a", "job-b", "job-c", "job-d"]
    assert jobs["job-a"]["labels"] == {"team": "growth"}
    assert all(job["state"] == "watching" for job in jobs.values())


def test_bad_job_ids_are_rejected_before_anything_is_written(workdir: Path, fake_api: FakeApiProcess) -> None:
    for bad in ["", "../etc/passwd", "a b", "x" * 129, "job\x07", "јob", "a/b", "%2e%2e"]:
        result = cli("track", "good-one", bad, cwd=workdir)
        assert result.returncode == 2, (bad, result.stderr)
        if bad.strip():
            assert "invalid job id" in result.stderr
        assert "Traceback" not in result.stderr
    assert jobs_json(workdir) == {}  # all or nothing: the good id was not written either
    for command in (["jobs", "show", "../x"], ["cancel", "../x"]):
        result = cli(*command, cwd=workdir)
        assert result.returncode == 2
        assert "invalid job id" in result.stderr
    assert fake_api.get("/_fake/stats")["status"] == 0


def test_policy_choice_labels_and_overrides(workdir: Path) -> None:
    config = workdir / "supervisor.toml"
    config.write_text(
        config.read_text().replace(
            "[logging]", '[policies.bulk]\nmatch = { team = "growth" }\nmax_credits = 1000\n\n[logging]'
        )
    )
    assert cli("track", "j1", "--label", "team=growth", cwd=workdir).returncode == 0
    assert cli("track", "j2", "--label", "team=search", cwd=workdir).returncode == 0
    overrides = ["--policy", "bulk", "--max-credits", "7", "--max-runtime", "90s"]
    assert cli("track", "j3", *overrides, cwd=workdir).returncode == 0
    jobs = jobs_json(workdir)
    assert (jobs["j1"]["policy"], jobs["j1"]["limits"]["max_credits"]) == ("bulk", 1000)
    assert (jobs["j2"]["policy"], jobs["j2"]["limits"]["max_credits"]) == ("default", 200)
    assert jobs["j3"]["limits"]["max_credits"] == 7
    assert jobs["j3"]["limits"]["max_runtime_s"] == 90

    unknown = cli("track", "j4", "--policy", "nope", cwd=workdir)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("clado-supervisor: error: unknown policy 'nope' (known: default, bulk)")
    bad_label = cli("track", "j4", "--label", "novalue", cwd=workdir)
    assert bad_label.returncode == 2
    assert "KEY=VALUE" in bad_label.stderr
    assert "j4" not in jobs_json(workdir)


def test_jobs_list_and_show_json_contract(workdir: Path) -> None:
    cli("track", "j1", "--label", "team=a", cwd=workdir)
    listed = json.loads(cli("jobs", "list", "--json", cwd=workdir).stdout)
    assert isinstance(listed, list)
    assert len(listed) == 1
    assert set(listed[0]) >= PUBLIC_FIELDS
    assert listed[0]["submitted_at"].endswith("Z")
    assert isinstance(listed[0]["credits_used"], int)

    shown = json.loads(cli("jobs", "show", "j1", "--json", cwd=workdir).stdout)
    assert set(shown) >= PUBLIC_FIELDS
    assert [e["kind"] for e in shown["events"]] == ["tracked"]

    human = cli("jobs", "list", cwd=workdir)
    assert human.returncode == 0
    assert "j1" in human.stdout
    assert "watching" in human.stdout
    assert cli("jobs", "list", "--state", "cancelled", "--json", cwd=workdir).stdout.strip() == "[]"
    missing = cli("jobs", "show", "nope", cwd=workdir)
    assert missing.returncode == 2
    assert "not tracked" in missing.stderr


def test_submit_starts_a_job_and_tracks_it(workdir: Path, fake_api: FakeApiProcess) -> None:
    result = cli("submit", "engineers in Paris", "--limit", "5", "--label", "team=x", cwd=workdir)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert fake_api.job(job_id)["limit"] == 5
    job = jobs_json(workdir)[job_id]
    assert (job["source"], job["query"], job["labels"]) == ("submit", "engineers in Paris", {"team": "x"})

    rejected = cli("submit", "q", cwd=workdir, env={"PATH": "/usr/bin:/bin"})
    assert rejected.returncode == 2
    assert "CLADO_API_KEY is not set" in rejected.stderr


def test_manual_cancel_without_a_daemon_sends_it_then_the_daemon_confirms(
    workdir: Path, fake_api: FakeApiProcess
) -> None:
    job_id = fake_api.create_job(rate=1, limit=500)
    cli("track", job_id, cwd=workdir)
    result = cli("cancel", job_id, "--reason", "wrong query", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"{job_id}: confirming (reason manual)" in result.stdout
    assert fake_api.job(job_id)["cancel_calls"] == 1

    again = cli("cancel", job_id, cwd=workdir)
    assert again.returncode == 0
    assert fake_api.job(job_id)["cancel_calls"] == 1  # not sent twice

    daemon = DaemonProcess(workdir)
    try:
        wait_for(lambda: jobs_json(workdir)[job_id]["state"] == "cancelled", what="confirmation")
    finally:
        assert daemon.stop() == 0
    shown = json.loads(cli("jobs", "show", job_id, "--json", cwd=workdir).stdout)
    assert shown["cancel_reason"] == "manual"
    decision = next(e for e in shown["events"] if e["to_state"] == "cancelling")
    # The shape every decision records (rule, credits, config hash), and the person's note.
    assert (decision["detail"]["note"], decision["detail"]["rule"]) == ("wrong query", "manual")
    assert {"credits", "config_hash"} <= set(decision["detail"])
    assert cli("cancel", "never-tracked", cwd=workdir).returncode == 2


def test_run_stops_gracefully_on_sigterm_and_sigint(workdir: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        daemon = DaemonProcess(workdir)
        wait_for(
            lambda d=daemon: any(line.get("message") == "supervisor started" for line in d.log_lines()), what="startup"
        )
        assert daemon.stop(sig) == 0
        events = [line.get("message") for line in daemon.log_lines()]
        assert events[-1] == "supervisor stopped"
        assert not any(line.get("unparsed") for line in daemon.log_lines())  # JSON lines only


def test_sighup_reloads_and_a_broken_file_keeps_the_old_config(workdir: Path) -> None:
    daemon = DaemonProcess(workdir)
    config = workdir / "supervisor.toml"
    try:
        wait_for(
            lambda: any(line.get("message") == "supervisor started" for line in daemon.log_lines()), what="startup"
        )
        config.write_text(config.read_text().replace("max_credits = 200", "max_credits = 150"))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(line.get("message") == "config reloaded" for line in daemon.log_lines()), what="reload")
        config.write_text("[policies.default]\nmax_credits = -1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = wait_for(
            lambda: [line for line in daemon.log_lines() if line.get("message", "").startswith("config reload failed")],
            what="failed reload",
        )
        assert "policies.default.max_credits" in failed[0]["error"]
        assert daemon.proc.poll() is None  # still running
    finally:
        assert daemon.stop() == 0


def test_check_config_and_migrate(workdir: Path) -> None:
    ok = cli("check-config", cwd=workdir)
    assert ok.returncode == 0
    assert "OK" in ok.stdout
    migrated = cli("migrate", cwd=workdir)
    assert migrated.returncode == 0
    assert (workdir / "supervisor.db").exists()
    assert cli("migrate", cwd=workdir).returncode == 0  # idempotent
    help_text = cli("--help", cwd=workdir).stdout
    for command in ("run", "migrate", "check-config", "track", "submit", "jobs", "cancel", "fake-api", "demo"):
        assert command in help_text
    assert cli(cwd=workdir).stdout == help_text  # bare: the same help, exit 0


def test_top_once_and_healthcheck(workdir: Path) -> None:
    from fakeserver import free_port

    cli("track", "job-top", "--label", "team=a", cwd=workdir)
    snapshot = cli("top", "--once", cwd=workdir)
    assert snapshot.returncode == 0, snapshot.stderr
    # Piped: the counts as state<TAB>count lines, then the active jobs (test_cli_scripting.py).
    assert "job-top\twatching" in snapshot.stdout
    assert "watching\t1" in snapshot.stdout.splitlines()

    config = workdir / "supervisor.toml"
    port = free_port()
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    down = cli("healthcheck", "--timeout", "2", cwd=workdir)
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
    daemon = DaemonProcess(workdir)
    try:
        healthy = wait_for(lambda: (r := cli("healthcheck", cwd=workdir)).returncode == 0 and r, what="healthz")
        assert "healthy" in healthy.stdout
    finally:
        assert daemon.stop() == 0


def test_a_second_daemon_on_the_same_port_fails_with_one_line_before_any_work(workdir: Path) -> None:
    from fakeserver import free_port

    config = workdir / "supervisor.toml"
    port = free_port()
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    first = DaemonProcess(workdir)
    try:
        wait_for(lambda: cli("healthcheck", cwd=workdir).returncode == 0, what="the first daemon's /healthz")
        second = DaemonProcess(workdir)
        assert second.wait(60) == 1
        lines = second.log_lines()
        assert lines[-1] == {
            "message": f"clado-supervisor: error: admin API cannot listen on 127.0.0.1:{port}: Address already in use",
            "unparsed": True,
        }
        events = [line["message"] for line in lines]
        # It stopped before its scheduler ran: no tick, no claim, no traceback of a cancelled tick.
        assert "supervisor started" not in events
        assert not any("Traceback" in event or "CancelledError" in event for event in events), events
        assert first.proc.poll() is None  # the first one is untouched
    finally:
        assert first.stop() == 0
