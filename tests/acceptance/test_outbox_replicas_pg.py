"""Two replicas of `clado-supervisor run` on one PostgreSQL database deliver one outbox; one
is SIGKILLed mid-burst. Each delivery is recorded delivered once (one successful attempt in
its log, by one replica), none is lost, and the receiver sees a copy only of what the dead
replica had in flight when it died (at most its max_in_flight).

Needs CLADO_SUPERVISOR_TEST_PG_URL; skipped with that reason otherwise."""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import config_text
from fakeserver import free_port

from .conftest import DaemonProcess, FakeApiProcess, cli, wait_for
from .test_outbox_delivery import Receiver, env

pytestmark = pytest.mark.timeout(240)
IN_FLIGHT = 4


def test_two_replicas_share_the_outbox_and_one_dies(tmp_path: Path, fake_api: FakeApiProcess, pg_url: str) -> None:
    receiver = Receiver(free_port())
    receiver.start()
    text = config_text(
        fake_api.base_url, pg_url, supervisor={"lease_ttl": '"3s"'}, policies="[policies.default]\nmax_credits = 20",
        extra=(
            f'\n[[notify.webhooks]]\nurl = "http://127.0.0.1:{receiver.port}/hook"\nsecret_env = "HOOK_SECRET"\n'
            f'events = ["cancel_requested", "cancelled"]\ntimeout = "2s"\nmax_in_flight = {IN_FLIGHT}\n'
        ),
    )  # fmt: skip
    (tmp_path / "supervisor.toml").write_text(text)
    assert cli("migrate", cwd=tmp_path, env=env()).returncode == 0
    jobs = [fake_api.create_job(rate=20, limit=500) for _ in range(40)]
    replicas = [DaemonProcess(tmp_path, env()) for _ in range(2)]
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)

    def rows(sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(sql).fetchall()

    try:
        assert cli("track", *jobs, cwd=tmp_path, env=env()).returncode == 0
        wait_for(lambda: len(receiver.kept()) >= 10, timeout=60, what="deliveries under way")
        assert replicas[0].stop(signal.SIGKILL) == -signal.SIGKILL
        wait_for(
            lambda: rows("select count(*) from outbox where state = 'delivered'")[0][0] == 80,
            timeout=120,
            what="every delivery delivered",
        )
    finally:
        for replica in replicas[1:]:
            assert replica.stop() == 0
        receiver.stop()

    delivered = {str(r[0]) for r in rows("select delivery_id from outbox where state = 'delivered'")}
    assert len(delivered) == 80
    assert {event["id"] for event in receiver.kept()} == delivered  # none lost
    successes = rows("select delivery_id, count(*) from outbox_attempts where status < 300 group by delivery_id")
    assert all(count == 1 for _, count in successes) and len(successes) == 80  # recorded once, by one replica
    copies = sum(receiver.taken.values()) - len(delivered)
    assert copies <= IN_FLIGHT  # only what the killed replica had posted but not yet recorded
    for job_id in jobs:
        assert [e["event"] for e in receiver.kept() if e["job_id"] == job_id] == ["cancel_requested", "cancelled"]
