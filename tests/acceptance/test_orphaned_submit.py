"""Initiates whose outcome is unknown, through the real CLI: a `submit` killed (SIGKILL, the
after-initiate failpoint) between the initiate call and the job's row, and a daemon killed
the same way in the middle of draining the queue. The API has no idempotency key, so
nothing may be sent twice: each such submission is `orphaned`, listed where a person looks,
announced once, and its reservation kept."""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import config_text

from .conftest import DaemonProcess, FakeApiProcess, cli, cli_env, wait_for

KILLED = cli_env(CLADO_SUPERVISOR_FAILPOINT="after-initiate")
BUDGET = """
[budgets.growth]
match = { team = "growth" }
period = "day"
credits = 500
reserve = true
"""


class Hooks:
    """A webhook receiver on 127.0.0.1:0 in a thread: the events it was sent, in order."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [event["event"] for event in list(self.received)]


def write_config(cwd: Path, fake_api: FakeApiProcess, *, api: str = "", extra: str = "") -> None:
    text = config_text(fake_api.base_url, "sqlite:///supervisor.db", supervisor={"lease_ttl": '"2s"'}, extra=extra)
    (cwd / "supervisor.toml").write_text(text.replace("max_retries = 2\n", f"max_retries = 2\n{api}\n", 1))


def queue_json(cwd: Path) -> list[dict[str, Any]]:
    result = cli("queue", "list", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def report_json(cwd: Path) -> dict[str, Any]:
    result = cli("report", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_submit_killed_after_initiate_leaves_an_orphan_that_the_daemon_announces_once(
    tmp_path: Path, fake_api: FakeApiProcess
) -> None:
    hooks = Hooks()
    hook = f'\n[[notify.webhooks]]\nurl = "{hooks.url}"\nevents = ["orphaned"]\n'
    write_config(tmp_path, fake_api, extra=BUDGET + hook)
    try:
        killed = cli(
            "submit", "engineers in Paris", "--limit", "40", "--label", "team=growth", cwd=tmp_path, env=KILLED
        )
        assert killed.returncode == -signal.SIGKILL
        assert fake_api.get("/_fake/stats")["jobs"] == 1  # a billed job, whose id nobody recorded

        daemon = DaemonProcess(tmp_path)
        try:
            wait_for(lambda: hooks.events() == ["orphaned"], what="the orphaned webhook", timeout=40)
            [orphan] = queue_json(tmp_path)
            assert orphan["state"] == "orphaned"
            assert orphan["reason"] == "process_died"  # the submitter's pid is gone: no grace needed
            assert orphan["job_id"] is None
            # Its reservation is kept: the budget counts the 40 credits the job may bill.
            report = report_json(tmp_path)
            assert [item["id"] for item in report["orphaned_submissions"]] == [orphan["id"]]
            assert report["budgets"][0]["reserved"] == 40
            # Shown where a person looks for what is running (piped: on stderr, the lines stay jobs).
            listing = cli("jobs", "list", cwd=tmp_path)
            assert listing.returncode == 0, listing.stderr
            assert listing.stdout.splitlines()[1:] == []
            assert f"1 orphaned submission(s), initiated but job id unknown, not supervised: {orphan['id']}" in (
                listing.stderr
            )
        finally:
            assert daemon.stop(signal.SIGTERM) == 0
        assert hooks.events() == ["orphaned"]
        assert hooks.received[0]["submission_id"] == orphan["id"]  # once, however many sweeps ran
        assert fake_api.get("/_fake/stats")["initiate"] == 1  # never sent again
    finally:
        hooks.server.shutdown()


def test_a_daemon_killed_while_draining_loses_nothing_and_starts_nothing_twice(
    tmp_path: Path, fake_api: FakeApiProcess
) -> None:
    # One initiate a minute: the first submit starts at once, the next three are queued.
    write_config(tmp_path, fake_api, api="initiate_per_minute = 1")
    first = cli("submit", "engineers 0", "--queue", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    for n in (1, 2, 3):
        queued = cli("submit", f"engineers {n}", "--queue", "--json", cwd=tmp_path)
        assert queued.returncode == 0, queued.stderr
        assert json.loads(queued.stdout)["state"] == "queued"
        assert json.loads(queued.stdout)["reason"] == "initiate_rate"

    # The daemon may send more now; it dies right after its first initiate.
    write_config(tmp_path, fake_api, api="initiate_per_minute = 100")
    crashing = DaemonProcess(tmp_path, KILLED)
    assert crashing.wait(timeout=60) == -signal.SIGKILL
    assert fake_api.get("/_fake/stats")["initiate"] == 2

    restarted = DaemonProcess(tmp_path)
    try:
        items = wait_for(
            lambda: (q := queue_json(tmp_path)) and all(i["state"] in ("started", "orphaned") for i in q) and q,
            what="every submission started or orphaned", timeout=40,
        )  # fmt: skip
    finally:
        assert restarted.stop(signal.SIGTERM) == 0
    states = sorted(item["state"] for item in items)
    assert states == ["orphaned", "started", "started", "started"]
    stats = fake_api.get("/_fake/stats")
    assert stats["initiate"] == 4  # one each: the orphan was never re-sent
    assert stats["jobs"] == 4
    started = [item["job_id"] for item in items if item["state"] == "started"]
    assert len(set(started)) == 3
