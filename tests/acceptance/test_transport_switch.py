"""The harness's transport switch ($CLADO_SUPERVISOR_TEST_TRANSPORT) reaches the daemon under
test: `make test-httpx` runs the chaos suites again on httpx's own transport, and this proves
that pass is not the default transport under another name."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import REPO, TRANSPORT_ENV, chosen_transport

from .conftest import PY, DaemonProcess, cli_env, wait_for


def test_the_daemon_under_test_runs_on_the_chosen_transport(workdir: Path) -> None:
    daemon = DaemonProcess(workdir)
    try:
        started = wait_for(
            lambda: [line for line in daemon.log_lines() if line.get("message") == "supervisor started"],
            what="startup",
        )
    finally:
        assert daemon.stop() == 0
    assert started[0]["transport"] == chosen_transport()
    # uvloop is a core dependency (not on Windows): `make install` runs the daemon on it.
    assert started[0]["event_loop"] == "uvloop"


def test_an_unknown_transport_stops_the_session_with_the_choices() -> None:
    result = subprocess.run(
        [PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "tests/unit/test_backoff.py"],
        cwd=REPO,
        env={**cli_env(), TRANSPORT_ENV: "requests"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"{TRANSPORT_ENV}='requests': use one of aiohttp, httpx" in result.stdout + result.stderr
