"""Log lines as journald and log shippers read them.

Under systemd, stderr is the journal's stream and JOURNAL_STREAM names its device:inode; each
line then starts with `<N>`, its syslog priority, which journald strips and files the entry
under, so `journalctl -p warning` shows warnings and errors and nothing else. The JSON keys
need no remapping for ECS or Loki: the text is `message`, there is no top-level `event`
string, and the Clado API's own text is `api_message`. The console honours NO_COLOR.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from conftest import config_text, wait_for
from fakeserver import FakeServer
from supervisor.adapters.logs import configure_logging

PY = sys.executable
# journald's reading of a stream line (SyslogLevelPrefix=yes, its default).
PREFIXED = re.compile(r"^<([0-7])>(.*)$")
# `journalctl -p warning`: priorities 0 (emerg) to 4 (warning).
WARNING = 4
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def journald_entries(raw: str) -> list[tuple[int, str]]:
    """(priority, MESSAGE) per line, as journald stores a stream's lines; a line without a
    prefix is filed at the stream's default priority, info (6)."""
    entries = []
    for line in raw.splitlines():
        found = PREFIXED.match(line)
        entries.append((int(found[1]), found[2]) if found else (6, line))
    return entries


def stream_id(path: Path) -> str:
    found = os.stat(path)
    return f"{found.st_dev}:{found.st_ino}"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []


def test_the_daemon_under_journald_ranks_its_lines(tmp_path: Path) -> None:
    """The real daemon, its stderr a file standing for the journal's stream: a runaway is
    cancelled (a warning), a broken config is refused on SIGHUP (an error); each line carries
    the priority of its level, and a `-p warning` filter keeps exactly those two."""
    with FakeServer() as server:
        job_id = server.fake.create_job(rate=20, limit=1000)
        config = tmp_path / "supervisor.toml"
        db_url = f"sqlite:///{tmp_path / 'supervisor.db'}"
        config.write_text(
            config_text(server.base_url, db_url, policies='[policies.default]\nmax_runtime = "30m"\nmax_credits = 5')
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CLADO_SUPERVISOR_CONFIG": str(config)}
        tracked = subprocess.run(
            [PY, "-m", "supervisor", "track", job_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert tracked.returncode == 0, tracked.stderr
        log_path = tmp_path / "journal-stream"
        with log_path.open("w") as journal:
            env["JOURNAL_STREAM"] = stream_id(log_path)
            daemon = subprocess.Popen(
                [PY, "-m", "supervisor", "run"], cwd=tmp_path, env=env, stdout=journal, stderr=journal
            )
            try:

                def messages() -> list[str]:
                    return [json.loads(text)["message"] for _, text in journald_entries(log_path.read_text())]

                wait_for(
                    lambda: "job cancelled" in messages(),
                    what="the runaway's cancel to be confirmed",
                    timeout=60,
                    interval=0.05,
                )
                config.write_text("[supervisor\n")  # not TOML: the reload is refused
                daemon.send_signal(signal.SIGHUP)
                wait_for(
                    lambda: any(m.startswith("config reload failed") for m in messages()),
                    what="the refused reload",
                    timeout=60,
                    interval=0.05,
                )
            finally:
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(60) == 0
    raw = log_path.read_text()
    assert all(PREFIXED.match(line) for line in raw.splitlines()), raw  # every line, libraries' too
    entries = [(priority, json.loads(text)) for priority, text in journald_entries(raw)]
    for priority, line in entries:
        assert priority == PRIORITY[line["level"]], line
        assert "event" not in line, line  # ECS's `event` is an object: never a string here
    shown = [line["message"] for priority, line in entries if priority <= WARNING]
    assert "cancelling runaway job" in shown
    assert "config reload failed; keeping the previous config" in shown
    assert "supervisor started" not in shown
    assert "job cancelled" not in shown
    # The API's own words (the cancel's answer) under their own key, not over the line's text.
    [confirming] = [line for _, line in entries if line["message"] == "job confirming"]
    assert confirming["api_message"] == "Deep research job cancelled successfully"
    assert confirming["job_id"] == job_id
    assert confirming["level"] == "info"


def test_no_prefix_unless_the_stream_is_the_journals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr was redirected elsewhere (`2>file`,
    a child of the unit) names another file: plain lines there."""
    log_path, other = tmp_path / "log", tmp_path / "elsewhere"
    other.touch()
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(other))
    with log_path.open("w") as stream:
        configure_logging("json", "info", stream=stream)
        structlog.get_logger("t").warning("plain")
    assert json.loads(log_path.read_text())["message"] == "plain"


def test_every_line_of_a_console_traceback_carries_the_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    """journald reads each line of a multi-line record as an entry of its own."""
    log_path = tmp_path / "log"
    log_path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(log_path))
    with log_path.open("a") as stream:
        configure_logging("console", "info", stream=stream)
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("t").exception("handling failed")
    lines = log_path.read_text().splitlines()
    assert len(lines) > 2
    assert any("ValueError: boom" in line for line in lines)
    assert {priority for priority, _ in journald_entries(log_path.read_text())} == {3}
    assert all(PREFIXED.match(line) for line in lines)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("no_color", "coloured"), [(None, True), ("1", False), ("", True)])
def test_the_console_honours_no_color(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None, no_color: str | None, coloured: bool
) -> None:
    """https://no-color.org: NO_COLOR present and not empty turns colours off."""
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    terminal = Terminal()
    configure_logging("auto", "info", stream=terminal)  # a TTY: the console renderer
    structlog.get_logger("t").warning("cancelling runaway job", job_id="j1", message="the API's words")
    text = terminal.getvalue()
    assert ("\x1b[" in text) is coloured
    assert "cancelling runaway job" in text
    assert "api_message" in text


def test_the_console_on_a_pipe_has_no_colour(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    pipe = io.StringIO()
    configure_logging("console", "info", stream=pipe)
    structlog.get_logger("t").error("job lost", job_id="j1")
    assert "job lost" in pipe.getvalue()
    assert "\x1b[" not in pipe.getvalue()
