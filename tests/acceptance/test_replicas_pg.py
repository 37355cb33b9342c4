"""Three replicas of `clado-supervisor run` on one PostgreSQL database; one is killed with
SIGKILL mid-run. Every job is still handled by exactly one replica at a time: each runaway
is cancelled and confirmed, no well-behaved job is cancelled, nothing is left running, a
cancel is sent twice only for a job the dead replica held when it died, and its jobs are
taken over within a lease.

Needs CLADO_SUPERVISOR_TEST_PG_URL (a PostgreSQL server where the test may create a
database); skipped with that reason otherwise.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from conftest import config_text

from .conftest import DaemonProcess, FakeApiProcess, cli, cli_env, wait_for

pytestmark = pytest.mark.timeout(180)

LEASE_TTL = 3.0
TICK = 0.2
LEADER_TTL = 3.0
WAVES = 10
RUNAWAYS_PER_WAVE = 17  # 170 runaways
GOOD_PER_WAVE = 34  # 340 well-behaved jobs
WAVE_GAP = 1.0  # seconds between waves, so that the run spans the kill

POLICIES = """
[policies.default]
max_runtime = "5m"
max_credits = 20
"""


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _pid_of(owner: str | None) -> int | None:
    """Owners are "host:pid:random"."""
    if not owner:
        return None
    return int(owner.rsplit(":", 2)[1])


def _admin_address(daemon: DaemonProcess) -> str | None:
    for line in daemon.log_lines():
        if line.get("message") == "admin API listening":
            return str(line["address"])
    return None


TOKEN = "replica-test-token-8d1f"


def _track(replicas: list[DaemonProcess], job_ids: list[str]) -> None:
    """POST /v1/jobs to the first live replica that answers (tracking is idempotent)."""
    body = json.dumps({"job_ids": job_ids}).encode()
    for replica in replicas:
        address = _admin_address(replica)
        if replica.proc.poll() is not None or address is None:
            continue
        request = urllib.request.Request(
            f"http://{address}/v1/jobs",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status in (200, 201):
                    return
        except OSError:
            continue
    raise AssertionError("no replica took the jobs")


def _readyz(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_three_replicas_one_killed_every_job_handled_exactly_once(
    tmp_path: Path, fake_api: FakeApiProcess, pg_url: str
) -> None:
    dsn = _dsn(pg_url)
    (tmp_path / "supervisor.toml").write_text(
        config_text(
            fake_api.base_url,
            pg_url,
            policies=POLICIES,
            supervisor={
                "lease_ttl": f'"{LEASE_TTL:g}s"',
                "leader_ttl": f'"{LEADER_TTL:g}s"',
                "tick_interval": f'"{int(TICK * 1000)}ms"',
                "poll_interval": '"1s"',
                "confirm_interval": '"200ms"',
                "confirm_timeout": '"20s"',
            },
        )
    )
    # One migration up front (as a deployment's one-shot `migrate` step would).
    migrated = cli("migrate", cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr

    # Waves of jobs started and tracked about a second apart, before and after the kill:
    # runaways pass 20 credits ~2.1 s after they start (10 a second, up to 200);
    # well-behaved jobs finish at 15 results after 3 s.
    runaways: list[str] = []
    good: list[str] = []
    feeder_errors: list[str] = []

    def feed() -> None:
        for wave in range(WAVES):
            due = started + wave * WAVE_GAP
            time.sleep(max(0.0, due - time.monotonic()))
            bad = fake_api.post("/_fake/jobs/bulk", {"count": RUNAWAYS_PER_WAVE, "limit": 200, "rate": 10})["job_ids"]
            fine = fake_api.post("/_fake/jobs/bulk", {"count": GOOD_PER_WAVE, "limit": 15, "rate": 5})["job_ids"]
            try:
                _track(replicas, bad + fine)
            except AssertionError as exc:
                feeder_errors.append(str(exc))
                return
            runaways.extend(bad)
            good.extend(fine)

    replicas = [DaemonProcess(tmp_path, cli_env(CLADO_SUPERVISOR_TOKEN=TOKEN)) for _ in range(3)]
    by_pid = {replica.proc.pid: replica for replica in replicas}
    wait_for(lambda: all(_admin_address(r) for r in replicas), timeout=30, what="three replicas serving")
    started = time.monotonic()
    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    feeder.start()
    try:
        # Mid-run: some cancels have happened, most jobs are still running.
        wait_for(
            lambda: _rows(dsn, "SELECT count(*) FROM jobs WHERE cancel_requested_at IS NOT NULL")[0][0] >= 20,
            timeout=60,
            what="the first cancels",
            interval=0.05,
        )

        # Kill the leader (so the chores fail over too), at a moment it holds job leases.
        def leader_holding_leases() -> int | None:
            [(owner,)] = _rows(dsn, "SELECT owner FROM leaders WHERE name = 'chores'") or [(None,)]
            pid = _pid_of(owner)
            if pid not in by_pid:
                return None
            held = _rows(dsn, "SELECT count(*) FROM jobs WHERE lease_owner = %s", owner)[0][0]
            return pid if held >= 3 else None

        victim_pid = wait_for(leader_holding_leases, timeout=20, what="a leader holding leases", interval=0.01)
        victim = by_pid[victim_pid]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        kill_wall = datetime.now(UTC)
        killed_at = time.monotonic()
        time.sleep(0.1)  # a commit already on the wire lands; no takeover can be this fast
        held = {
            job_id: {"state": state, "expires": expires, "cancel_attempts": attempts}
            for job_id, state, expires, attempts in _rows(
                dsn,
                "SELECT job_id, state, lease_expires_at, cancel_attempts FROM jobs WHERE lease_owner LIKE %s",
                f"%:{victim_pid}:%",
            )
        }
        assert held, "the killed replica held no lease"
        cancelled_before_kill = _rows(
            dsn,
            "SELECT count(*) FROM jobs WHERE cancel_requested_at IS NOT NULL AND cancel_requested_at < %s",
            kill_wall,
        )[0][0]
        active_at_kill = _rows(
            dsn, "SELECT count(*) FROM jobs WHERE state IN ('watching', 'cancelling', 'confirming')"
        )[0][0]

        # Watch the dead replica's jobs being taken over: the new lease (its claim time is
        # its expiry less the TTL, in database time), and the first write after the kill
        # (every handler write sets updated_at; polls come at most once a second, and this
        # samples faster, so it sees the first one).
        claimed_again: dict[str, datetime] = {}
        handled_again: dict[str, datetime] = {}
        new_leader: tuple[str, float] | None = None
        while time.monotonic() - killed_at < LEASE_TTL + 8 and (len(handled_again) < len(held) or new_leader is None):
            for job_id, updated_at, owner, expires in _rows(
                dsn,
                "SELECT job_id, updated_at, lease_owner, lease_expires_at FROM jobs WHERE job_id = ANY(%s)",
                list(held),
            ):
                if job_id not in claimed_again and owner and _pid_of(owner) != victim_pid:
                    claimed_again[job_id] = expires - timedelta(seconds=LEASE_TTL)
                if job_id not in handled_again and updated_at > kill_wall:
                    handled_again[job_id] = updated_at
                    # A lease held for less than a sample: the write bounds the claim.
                    claimed_again.setdefault(job_id, updated_at)
            if new_leader is None:
                rows = _rows(dsn, "SELECT owner FROM leaders WHERE name = 'chores' AND expires_at > now()")
                if rows and _pid_of(rows[0][0]) != victim_pid:
                    new_leader = (rows[0][0], time.monotonic() - killed_at)
            time.sleep(0.05)

        # Then everything settles.
        feeder.join(60)
        assert not feeder_errors, feeder_errors
        wait_for(
            lambda: (
                _rows(dsn, "SELECT count(*) FROM jobs WHERE state IN ('watching', 'cancelling', 'confirming')")[0][0]
                == 0
            ),
            timeout=60,
            what="every job terminal",
            interval=0.2,
        )
        settled = time.monotonic() - started
        survivors = [replica for replica in replicas if replica is not victim]
        for replica in survivors:
            assert replica.proc.poll() is None, "a surviving replica exited"
            address = _admin_address(replica)
            assert address is not None
            assert _readyz(address) == 200
    finally:
        stopping_wall = datetime.now(UTC)
        codes = [replica.stop(signal.SIGTERM) for replica in replicas if replica.proc.poll() is None]
        for replica in replicas:
            if not replica._log.closed:
                replica._log.close()
    assert codes == [0, 0]

    # -- every job ended right -----------------------------------------------------------
    all_ids = runaways + good
    assert len(all_ids) == WAVES * (RUNAWAYS_PER_WAVE + GOOD_PER_WAVE) >= 500
    jobs = {
        row[0]: row for row in _rows(dsn, "SELECT job_id, state, cancel_reason, final_status, confirmed_at FROM jobs")
    }
    assert set(jobs) == set(all_ids)
    fake = {job_id: fake_api.job(job_id) for job_id in all_ids}
    for job_id in runaways:
        _, state, reason, final_status, confirmed_at = jobs[job_id]
        assert (state, reason, final_status) == ("cancelled", "max_credits", "cancelled"), job_id
        assert confirmed_at is not None
        assert fake[job_id]["status"] == "cancelled"
    for job_id in good:
        assert jobs[job_id][1:4] == ("completed", None, "completed"), job_id
        assert fake[job_id]["cancel_calls"] == 0, job_id

    # -- exactly one cancel call per runaway, except across the kill ----------------------
    calls = {job_id: fake[job_id]["cancel_calls"] for job_id in runaways}
    twice = {job_id for job_id, count in calls.items() if count == 2}
    assert all(1 <= count <= 2 for count in calls.values()), {j: c for j, c in calls.items() if c > 2}
    # A second call only where the kill fell between sending and recording: the job was
    # the dead replica's (its lease), it was in `cancelling`, the first call went out
    # before the kill, the second after.
    assert twice <= set(held), twice - set(held)
    kill_ts = kill_wall.timestamp()
    for job_id in twice:
        assert held[job_id]["state"] == "cancelling", (job_id, held[job_id])
        first, second = fake[job_id]["cancel_call_times"]
        assert first < kill_ts < second, (job_id, first, kill_ts, second)

    # -- takeover within a lease ----------------------------------------------------------
    unfinished = {job_id for job_id in held if held[job_id]["state"] in ("watching", "cancelling", "confirming")}
    assert unfinished and set(handled_again) >= unfinished, unfinished - set(handled_again)
    claims = {job_id: (claimed_again[job_id] - kill_wall).total_seconds() for job_id in unfinished}
    delays = {job_id: (handled_again[job_id] - kill_wall).total_seconds() for job_id in unfinished}
    # Claimed again within a lease and a tick (plus the claim query itself) ...
    assert max(claims.values()) <= LEASE_TTL + TICK + 0.3, sorted(claims.values())[-5:]
    # ... and handled: a poll (or a cancel) and a commit, queued behind the survivors' own
    # jobs on a small, busy machine.
    assert max(delays.values()) <= LEASE_TTL + TICK + 2.5, sorted(delays.values())[-5:]
    for job_id in unfinished:  # and never before the dead replica's lease had expired
        assert claimed_again[job_id] >= held[job_id]["expires"], job_id
    assert new_leader is not None and new_leader[1] <= LEADER_TTL + LEADER_TTL / 3 + 1.0, new_leader

    # -- the survivors' logs: leadership moved, nothing crashed, no write was fenced off ---
    survivor_logs = [line for replica in survivors for line in replica.log_lines()]
    became = [line for line in survivor_logs if line.get("message") == "became leader"]
    after_kill = [
        line["owner"] for line in became if kill_wall < datetime.fromisoformat(line["timestamp"]) < stopping_wall
    ]
    assert after_kill == [new_leader[0]]
    # Before the kill the victim led; a survivor that led before it lost a renewal under load.
    flaps = (
        len(became)
        - len(after_kill)
        - sum(1 for line in became if datetime.fromisoformat(line["timestamp"]) > stopping_wall)
    )
    assert not [
        line
        for line in survivor_logs
        if line.get("message") == "job handling failed; its lease will expire and it is retried"
    ]
    assert not [line for line in survivor_logs if line.get("unparsed") and "Traceback" in line["message"]]
    fenced = sum(1 for line in survivor_logs if line.get("message") == "lease lost; write dropped")

    print(
        f"\n{len(all_ids)} jobs, {len(runaways)} runaways; killed pid {victim_pid} (the leader) "
        f"{killed_at - started:.1f}s in, after {cancelled_before_kill} cancel decisions, "
        f"{active_at_kill} jobs active, {len(held)} held by it ({len(unfinished)} unfinished); "
        f"cancelled twice: {len(twice)}; claimed again after max {max(claims.values()):.2f}s "
        f"(median {sorted(claims.values())[len(claims) // 2]:.2f}s, lease {LEASE_TTL:g}s), handled after max "
        f"{max(delays.values()):.2f}s (median {sorted(delays.values())[len(delays) // 2]:.2f}s); "
        f"new leader after {new_leader[1]:.2f}s (earlier leader changes {flaps}); fenced writes {fenced}; "
        f"all terminal at {settled:.1f}s"
    )


# -- the deployment files for replicas (no PostgreSQL needed) -------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_replicas_compose_file_and_config() -> None:
    """deploy/compose.replicas.yaml: PostgreSQL 15 with a volume and a health check, two
    replicas of one image that wait for it and read deploy/supervisor.replicas.toml, which
    passes check-config and points at that server."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the compose file")
    compose = yaml.safe_load((REPO / "deploy" / "compose.replicas.yaml").read_text())
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert any(volume.split(":")[0] in compose["volumes"] for volume in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    replicas = [service for name, service in services.items() if name.startswith("supervisor-")]
    assert len(replicas) == 2
    assert len({service["image"] for service in replicas}) == 1
    assert len({port for service in replicas for port in service["ports"]}) == 2
    for service in replicas:
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "./supervisor.replicas.toml:/etc/clado-supervisor/supervisor.toml:ro" in service["volumes"]
        assert service["environment"]["PGPASSFILE"] == "/run/secrets/pgpass"
        assert set(service["secrets"]) <= set(compose["secrets"])

    checked = cli("--config", str(REPO / "deploy" / "supervisor.replicas.toml"), "check-config", cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    import tomllib

    config = tomllib.loads((REPO / "deploy" / "supervisor.replicas.toml").read_text())
    url = make_url(config["database"]["url"])
    assert (url.drivername, url.host, url.password) == ("postgresql+psycopg", "postgres", None)
    assert url.database == postgres["environment"]["POSTGRES_DB"]
    assert url.username == postgres["environment"]["POSTGRES_USER"]
