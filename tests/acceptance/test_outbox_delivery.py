"""The outbox end to end, with the real CLI and daemon as processes and a receiver in a
thread that dedupes by `webhook-id` (as the README tells receivers to):

- a CLI `cancel` is announced by the daemon (the CLI process is long gone) and counted in
  the daemon's cancels_total{reason="manual"};
- a daemon SIGKILLed between committing a decision and delivering it delivers after its
  restart;
- chaos: during a burst the daemon is SIGKILLed and the receiver goes away and comes back;
  every delivery id arrives exactly once at the receiver or is listed `failed` with its
  reason, and `webhooks list/show/redeliver` show and replay them.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks

from conftest import config_text
from fakeserver import free_port

from .conftest import DaemonProcess, FakeApiProcess, cli, cli_env, jobs_json, wait_for

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """Answers 204 and keeps each delivery (verified, by webhook-id); `stop`/`start` take it
    off the port and back (a receiver redeploy)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.taken: Counter[str] = Counter()  # webhook-id → 2xx answers given
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                payload = standardwebhooks.Webhook(SECRET).verify(body, dict(self.headers))
                with receiver._lock:
                    delivery = self.headers["webhook-id"]
                    if not receiver.taken[delivery]:  # a copy of one it has: acknowledged, not kept
                        receiver.events.append({"id": delivery, **payload})
                    receiver.taken[delivery] += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def kept(self, event: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if event is None or e["event"] == event]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_config(cwd: Path, fake_api: FakeApiProcess, receiver: Receiver, port: int, **extra: Any) -> None:
    text = config_text(
        fake_api.base_url,
        "sqlite:///supervisor.db",
        policies=extra.pop("policies", "[policies.default]\nmax_credits = 20"),
        supervisor=extra.pop("supervisor", None),
        extra=(
            f'\n[[notify.webhooks]]\nurl = "http://127.0.0.1:{receiver.port}/hook"\nsecret_env = "HOOK_SECRET"\n'
            'events = ["cancel_requested", "cancelled"]\ntimeout = "2s"\n'
        ),
    )
    (cwd / "supervisor.toml").write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))


def env(**extra: str) -> dict[str, str]:
    return cli_env(HOOK_SECRET=SECRET, **extra)


def metric(port: int, name: str, **labels: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return None
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in body.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return None


def deliveries(cwd: Path, *args: str) -> list[dict[str, Any]]:
    result = cli("webhooks", "list", "--json", *args, cwd=cwd, env=env())
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def test_a_cli_cancel_is_announced_and_counted_by_the_daemon(
    tmp_path: Path, fake_api: FakeApiProcess, receiver: Receiver
) -> None:
    port = free_port()
    write_config(tmp_path, fake_api, receiver, port, policies='[policies.default]\nmax_runtime = "30m"')
    job_id = fake_api.create_job(queue_for=600)
    assert cli("track", job_id, cwd=tmp_path, env=env()).returncode == 0
    daemon = DaemonProcess(tmp_path, env())
    try:
        wait_for(lambda: metric(port, "clado_supervisor_cancels_total", reason="manual") == 0, what="the daemon up")
        cancelled = cli("cancel", job_id, "--reason", "wrong query", cwd=tmp_path, env=env())
        assert cancelled.returncode == 0, cancelled.stderr
        # The CLI has exited: the daemon delivers its webhook and counts its decision.
        wait_for(
            lambda: metric(port, "clado_supervisor_cancels_total", reason="manual") == 1,
            timeout=10,
            what="the CLI's cancel in the daemon's counters",
        )
        (announced,) = wait_for(lambda: receiver.kept("cancel_requested"), what="the CLI's cancel announced")
        assert (announced["job_id"], announced["reason"]) == (job_id, "manual")
        wait_for(lambda: receiver.kept("cancelled"), what="the cancel confirmed and announced")
    finally:
        assert daemon.stop() == 0
    (row,) = [r for r in deliveries(tmp_path, "--state", "delivered") if r["event"] == "cancel_requested"]
    assert row["id"] == announced["id"] and row["attempts"] == 1
    shown = cli("webhooks", "show", row["id"], "--json", cwd=tmp_path, env=env())
    assert json.loads(shown.stdout)["attempt_log"][0]["status"] == 204


def test_sigkill_between_commit_and_delivery_delivers_after_the_restart(
    tmp_path: Path, fake_api: FakeApiProcess, receiver: Receiver
) -> None:
    port = free_port()
    write_config(tmp_path, fake_api, receiver, port, supervisor={"lease_ttl": '"2s"'})
    job_id = fake_api.create_job(rate=10, limit=500)
    assert cli("track", job_id, cwd=tmp_path, env=env()).returncode == 0
    crashing = DaemonProcess(tmp_path, env(CLADO_SUPERVISOR_FAILPOINT="after-cancel-decision"))
    assert crashing.wait(timeout=60) == -signal.SIGKILL
    assert receiver.kept() == []  # killed right after the decision's commit
    (pending,) = deliveries(tmp_path, "--state", "pending")
    assert pending["event"] == "cancel_requested"

    restarted = DaemonProcess(tmp_path, env())
    try:
        wait_for(lambda: receiver.kept("cancelled"), timeout=40, what="the restarted daemon's deliveries")
    finally:
        assert restarted.stop() == 0
    assert [e["event"] for e in receiver.kept()] == ["cancel_requested", "cancelled"]
    assert receiver.kept("cancel_requested")[0]["id"] == pending["id"]  # the committed row, not a new one


def test_chaos_every_delivery_arrives_once_or_is_listed_failed(
    tmp_path: Path, fake_api: FakeApiProcess, receiver: Receiver
) -> None:
    port = free_port()
    write_config(tmp_path, fake_api, receiver, port, supervisor={"lease_ttl": '"2s"'})
    jobs = [fake_api.create_job(rate=20, limit=500) for _ in range(30)]
    assert cli("track", *jobs, cwd=tmp_path, env=env()).returncode == 0
    daemon = DaemonProcess(tmp_path, env())
    try:
        wait_for(lambda: len(receiver.kept()) >= 5, what="the burst under way")
        receiver.stop()  # the receiver goes away mid-burst …
        wait_for(
            lambda: all(j["state"] != "watching" for j in jobs_json(tmp_path).values()), what="every cancel decided"
        )
    finally:
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL  # … and the daemon is killed
    receiver.start()
    restarted = DaemonProcess(tmp_path, env())
    try:
        wait_for(lambda: not deliveries(tmp_path, "--state", "pending"), timeout=90, what="the outbox drained")
        rows = deliveries(tmp_path)
        # A redelivery of one already received: the receiver acknowledges it and keeps one copy.
        again = rows[0]["id"]
        assert cli("webhooks", "redeliver", again, cwd=tmp_path, env=env()).returncode == 0
        wait_for(lambda: receiver.taken[again] == 2, what="the redelivery")
    finally:
        assert restarted.stop() == 0

    assert len(rows) == 60  # 30 cancel_requested + 30 cancelled
    failed = [row for row in rows if row["state"] == "failed"]
    for row in failed:
        assert row["last_error"], row
    kept = {event["id"] for event in receiver.kept()}
    delivered = {row["id"] for row in rows if row["state"] == "delivered"}
    assert delivered <= kept
    assert kept | {row["id"] for row in failed} == {row["id"] for row in rows}
    for job_id in jobs:
        assert [e["event"] for e in receiver.kept() if e["job_id"] == job_id] == ["cancel_requested", "cancelled"]


def test_webhooks_commands_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "supervisor.toml").write_text(config_text("http://127.0.0.1:9", "sqlite:///supervisor.db"))
    assert cli("migrate", cwd=tmp_path).returncode == 0
    missing = "msg_" + "0" * 32
    for args, message in (
        (("show", "nope"), "id: a delivery id is msg_ and 32 hex digits"),
        (("show", missing), f"no webhook delivery {missing}"),
        (("redeliver", missing), f"no webhook delivery {missing}"),
        (("list", "--state", "lost"), "Invalid value for '--state'"),
    ):
        result = cli("webhooks", *args, cwd=tmp_path)
        assert result.returncode == 2, args
        (line,) = result.stderr.splitlines()
        assert message in line and "Traceback" not in result.stderr
    listed = cli("webhooks", "list", "--json", cwd=tmp_path)
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
