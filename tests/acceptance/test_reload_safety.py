"""`run` as a user runs it, signalled as systemd signals it: a reload never weakens the rules in
force, whatever the file became, and a reload asked for during start-up does not end it."""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path
from typing import Any

from conftest import config_text

from .conftest import DaemonProcess, FakeApiProcess, cli, wait_for

FAILED = "config reload failed; keeping the previous config"


def write(path: Path, base_url: str, max_credits: int) -> None:
    path.write_text(
        config_text(
            base_url,
            "sqlite:///supervisor.db",
            policies=f'[policies.default]\nmax_runtime = "30m"\nmax_credits = {max_credits}',
        )
    )


def jobs(cwd: Path, config: str) -> dict[str, dict[str, Any]]:
    result = cli("--config", config, "jobs", "list", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return {job["job_id"]: job for job in json.loads(result.stdout)}


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line.get("message") == name]


def started(daemon: DaemonProcess) -> None:
    wait_for(lambda: events(daemon, "supervisor started"), what="startup")


def test_an_empty_file_or_a_fifo_on_sighup_keeps_the_running_limits(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    config = tmp_path / "supervisor.toml"
    write(config, fake_api.base_url, max_credits=40)
    # The CLI reads its own copy: supervisor.toml is about to become unreadable.
    (tmp_path / "cli.toml").write_text(config.read_text())
    daemon = DaemonProcess(tmp_path)
    try:
        started(daemon)

        config.write_bytes(b"")  # truncated, as by a bad deploy
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(events(daemon, FAILED)) == 1, what="the empty file refused")

        config.unlink()
        os.mkfifo(config)  # nobody writes to it: reading it would freeze the daemon
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for(lambda: len(events(daemon, FAILED)) == 2 and events(daemon, FAILED), what="FIFO refused")
        assert [line["level"] for line in refused] == ["error", "error"]
        assert "no settings (empty)" in refused[0]["error"]
        assert "not a regular file (it is a FIFO)" in refused[1]["error"]

        # A runaway tracked now is stopped at the limit in force (40), not the default (200).
        job_id = fake_api.create_job(limit=1000, rate=10)
        assert cli("--config", "cli.toml", "track", job_id, cwd=tmp_path).returncode == 0

        def cancelled() -> dict[str, Any] | None:
            job = jobs(tmp_path, "cli.toml").get(job_id)
            return job if job and job["state"] == "cancelled" else None

        job = wait_for(cancelled, what="the runaway cancelled")
        assert job["cancel_reason"] == "max_credits"
        assert job["credits_used"] < 100
        assert not events(daemon, "config reloaded")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


def test_a_sighup_during_start_up_is_held_and_done_once_the_daemon_is_up(
    tmp_path: Path, fake_api: FakeApiProcess
) -> None:
    """Start-up is held at the migration lock (the test takes it first), so the SIGHUPs land
    while the daemon is surely starting, as a `systemctl reload` right after a start would."""
    config = tmp_path / "supervisor.toml"
    write(config, fake_api.base_url, max_credits=40)
    lock_path = tmp_path / "supervisor.db.migrate-lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        daemon = DaemonProcess(tmp_path)

        def waiting_for_the_lock() -> bool:
            fds = Path(f"/proc/{daemon.proc.pid}/fd")
            try:
                return any(os.readlink(fd) == str(lock_path) for fd in fds.iterdir())
            except OSError:
                return False

        wait_for(waiting_for_the_lock, what="start-up waiting at the migration lock")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.proc.send_signal(signal.SIGHUP)
        write(config, fake_api.base_url, max_credits=25)
        fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        started(daemon)
        reloaded = wait_for(lambda: events(daemon, "config reloaded"), what="the held reload")
        assert reloaded[0]["changed"] == ["policies.default.max_credits"]
        assert events(daemon, "reloading the config: a reload was asked for during start-up")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
