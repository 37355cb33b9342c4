"""/metrics says only what the replica knows, scraped from real daemons.

A fresh daemon already has a series for every known reason, state and outcome (a dashboard's
`rate()` is 0, not "no data"), its version and the process's own figures; the account's
credits are absent (not 0) without an [account]; what is configured is shown and what a
reload removes goes; and a replica that loses leadership shows none of the leader's figures
(jobs by state, budgets, the account), so summing or taking the max over replicas stays right.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import config_text, eventually, load, running_daemon, wait_for
from fakeserver import FakeServer, free_port
from supervisor import __version__
from supervisor.app.http import AdminApi, AdminServer
from supervisor.core.states import Reason, State
from supervisor.service.runtime import Daemon

REPO = Path(__file__).resolve().parents[2]
P = "clado_supervisor_"
ACCOUNT = '[account]\nmin_credits = 10\ncheck_interval = "1s"\naction = "block"\n'
BUDGET = '[budgets.growth]\nmatch = { team = "growth" }\ncredits = 100\naction = "block"\n'
BUDGET_GAUGES = ("budget_spent_credits", "budget_reserved_credits", "budget_limit_credits")

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """Sample name → (labels, value) for each of its samples, through prometheus-client's own
    parser (it raises on malformed text)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return found


def value(samples: Samples, name: str, **labels: str) -> float | None:
    for found, number in samples.get(P + name, []):
        if all(found.get(key) == want for key, want in labels.items()):
            return number
    return None


def promtool_check(text: str) -> None:
    """`promtool check metrics` on the scrape, when promtool is installed (Debian: prometheus)."""
    tool = shutil.which("promtool")
    if tool is None:
        return
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip()  # no lint finding either


@asynccontextmanager
async def scraped(config_path: Path) -> AsyncIterator[tuple[Daemon, Callable[[], Any]]]:
    """The daemon in this process with its admin API on a free loopback port, and a scrape."""
    config = load(config_path)
    async with running_daemon(config) as daemon:
        daemon.config_path = config_path  # a reload reads this file, as under `run`
        server = AdminServer(AdminApi(daemon, None, config.http.max_body_bytes), config.http.listen)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:

                async def scrape() -> tuple[str, Samples]:
                    response = await http.get("/metrics")
                    assert response.status_code == 200
                    return response.text, parse(response.text)

                yield daemon, scrape
        finally:
            await server.stop()


def dashboard_and_rule_metrics() -> set[str]:
    text = (REPO / "deploy" / "grafana-dashboard.json").read_text() + (REPO / "deploy" / "alerts.yaml").read_text()
    return set(re.findall(r"\bclado_supervisor_[a-z_]+", text))


async def test_a_fresh_daemon_exports_every_known_series_and_no_invented_one(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, f"sqlite:///{tmp_path / 'supervisor.db'}"))
    async with scraped(path) as (_, scrape):

        async def summarised() -> tuple[str, Samples] | None:
            text, samples = await scrape()
            return (text, samples) if value(samples, "jobs", state="watching") is not None else None

        text, samples = await eventually(summarised, what="the leader's jobs-by-state gauges")
    assert value(samples, "build_info", version=__version__) == 1
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds"):
        assert samples[name], name
    assert samples["python_info"]
    # Nothing read, nothing to say: absent, where a plain Gauge would say 0 credits.
    assert P + "account_credits" not in samples
    assert "# TYPE clado_supervisor_account_credits gauge" in text  # the family is still described
    # A series from the start for every reason, limit, state, outcome. (The registry is the
    # process's: counters other tests in this process moved keep their counts; a fresh
    # process starts them at 0.)
    reasons = (Reason.MAX_RUNTIME, Reason.MAX_QUEUED, Reason.STALL_TIMEOUT, Reason.MAX_CREDITS,
               Reason.ACCOUNT_FLOOR, Reason.MANUAL, Reason.EXTERNAL)  # fmt: skip
    for reason in reasons:
        assert value(samples, "cancels_total", reason=reason) is not None, reason
    for limit in reasons[:4]:
        assert value(samples, "warnings_total", limit=limit) is not None, limit
        assert value(samples, "would_cancel_total", reason=limit) is not None, limit
    for state in State:
        assert value(samples, "transitions_total", state=state.value) is not None, state
        assert value(samples, "jobs", state=state.value) == 0, state  # this daemon's own, empty database
    for outcome in ("delivered", "failed", "dropped"):
        assert value(samples, "webhook_deliveries_total", outcome=outcome) is not None
    for outcome in ("success", "failure"):
        assert value(samples, "config_reloads_total", outcome=outcome) is not None
    # Every metric the shipped dashboard and alert rules query has a series, but for the
    # account, the budgets and the webhook hooks (per hook), which this config does not have.
    exposed = set(samples)
    missing = sorted(name for name in dashboard_and_rule_metrics() if name not in exposed)
    absent = ["account_credits", *BUDGET_GAUGES, "outbox_oldest_pending_seconds"]
    assert missing == sorted(P + name for name in absent)
    promtool_check(text)


async def test_the_account_and_budgets_are_shown_while_configured_and_go_with_them(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    fake_server.fake.set_account_credits(4321)
    path = tmp_path / "supervisor.toml"
    db_url = f"sqlite:///{tmp_path / 'supervisor.db'}"
    path.write_text(config_text(fake_server.base_url, db_url, extra=ACCOUNT + BUDGET))
    async with scraped(path) as (daemon, scrape):

        async def shown() -> Samples | None:
            _, samples = await scrape()
            ready = value(samples, "account_credits") is not None and value(samples, "budget_limit_credits")
            return samples if ready else None

        samples = await eventually(shown, what="the account's credits and the budget's figures")
        assert value(samples, "account_credits") == 4321
        assert value(samples, "budget_limit_credits", budget="growth") == 100
        assert value(samples, "budget_spent_credits", budget="growth") == 0
        assert value(samples, "cancels_total", reason="budget:growth") == 0  # its cancels, from the start
        failures = value(samples, "config_reloads_total", outcome="failure")

        # A reload that drops both: their series go (no stale "4321 credits" left behind).
        path.write_text(config_text(fake_server.base_url, db_url))
        assert await daemon.reload_config()

        async def gone() -> Samples | None:
            _, samples = await scrape()
            names = [P + "account_credits", *(P + name for name in BUDGET_GAUGES)]
            return samples if not any(name in samples for name in names) else None

        samples = await eventually(gone, what="the account and budget series to go")
        # A refused reload is counted as one.
        path.write_text("[supervisor\n")
        assert not await daemon.reload_config()
        _, samples = await scrape()
        assert value(samples, "config_reloads_total", outcome="failure") == (failures or 0) + 1


# -- two replicas on one PostgreSQL database --------------------------------------------------


class Replica:
    """`clado-supervisor run` in its own process (each has its own registry), on its own port."""

    def __init__(self, workdir: Path, text: str) -> None:
        self.port = free_port()
        workdir.mkdir()
        config = workdir / "supervisor.toml"
        config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{self.port}"'))
        self.log = workdir / "daemon.log"
        env = {**os.environ, "CLADO_SUPERVISOR_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run"], env=env, stdout=log, stderr=log)

    def scrape(self) -> Samples | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2)
        except httpx.TransportError:
            return None
        return parse(response.text) if response.status_code == 200 else None

    def messages(self) -> list[str]:
        return [
            str(json.loads(line).get("message")) for line in self.log.read_text().splitlines() if line.startswith("{")
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


@contextmanager
def replicas() -> Iterator[list[Replica]]:
    """The replicas a test starts, each stopped (resumed first, if paused) at the end."""
    started: list[Replica] = []
    try:
        yield started
    finally:
        for replica in started:
            replica.stop()


def leads(replica: Replica) -> Samples | None:
    """The replica's scrape once it leads and has published the leader's figures."""
    samples = replica.scrape()
    if samples is None or value(samples, "leader") != 1:
        return None
    figures = ("account_credits", "budget_limit_credits", "jobs")
    return samples if all(value(samples, name) is not None for name in figures) else None


def test_a_replica_that_loses_leadership_shows_none_of_the_leaders_figures(
    tmp_path: Path, fake_server: FakeServer, pg_url: str
) -> None:
    """The leader is paused (a frozen VM, a long GC) past leader_ttl; the other replica takes
    over; the old leader, resumed, notices it no longer leads and drops the figures it owned."""
    fake_server.fake.set_account_credits(4321)
    text = config_text(fake_server.base_url, pg_url, supervisor={"leader_ttl": '"3s"'}, extra=ACCOUNT + BUDGET)
    with replicas() as started:
        first = Replica(tmp_path / "a", text)
        started.append(first)
        # The first to lead has also migrated the database.
        wait_for(lambda: leads(first), what="the first replica to lead", timeout=60)
        second = Replica(tmp_path / "b", text)
        started.append(second)
        follower = wait_for(
            lambda: second.scrape() if "supervisor started" in second.messages() else None,
            what="the second replica to start",
            timeout=60,
        )
        # A follower shows none of it: absent, not 0 (sums and maxima over replicas stay right).
        assert value(follower, "leader") == 0
        assert P + "account_credits" not in follower
        assert not any(P + name in follower for name in ("jobs", *BUDGET_GAUGES))

        first.proc.send_signal(signal.SIGSTOP)
        taken = wait_for(lambda: leads(second), what="the second replica to take over", timeout=60)
        assert value(taken, "account_credits") == 4321
        first.proc.send_signal(signal.SIGCONT)

        def stepped_down() -> Samples | None:
            samples = first.scrape()
            return samples if samples is not None and value(samples, "leader") == 0 else None

        old = wait_for(stepped_down, what="the first replica to notice it lost leadership", timeout=60)
        assert "lost leadership" in first.messages()
        assert P + "account_credits" not in old
        for name in ("jobs", *BUDGET_GAUGES):
            assert P + name not in old, name
        # Its own counters stay: they are this process's, not the leader's.
        assert value(old, "cancels_total", reason=Reason.MAX_CREDITS) == 0
        assert leads(second) is not None
