"""SIGHUP reloads the config, and the new one reaches every part of a running daemon: the
handler's per-job limits, the enforcer's budgets and the dispatcher's settings.

The daemon runs as `run` runs it (run_until_signalled, real signal handlers) against the
simulator over loopback; the test rewrites the config file and sends the process SIGHUP.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from conftest import config_text, eventually, load, wait_until
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, utcnow
from supervisor.config import Config
from supervisor.service.runtime import Daemon
from supervisor.service.wiring import client_for, open_store

pytestmark = pytest.mark.timeout(90)

BUDGET = """
[budgets.team-x]
match = {{ team = "x" }}
period = "day"
credits = {credits}
"""


@asynccontextmanager
async def signalled_daemon(config: Config, path: Path) -> AsyncIterator[Daemon]:
    """The daemon as `run` runs it, with its signal handlers, until the test ends."""
    store = await open_store(config)
    client = client_for(config)
    daemon = Daemon(config, store, client, config_path=path)
    running = asyncio.create_task(daemon.run_until_signalled())
    await asyncio.sleep(0)  # run_until_signalled starts the scheduler before its first wait
    try:
        assert daemon.scheduler_running
        yield daemon
    finally:
        daemon.request_stop()
        await running
        await client.aclose()
        await store.close()


def sighup() -> None:
    os.kill(os.getpid(), signal.SIGHUP)


async def test_sighup_brings_a_new_policy_limit_and_a_new_budget_into_force(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    path = tmp_path / "supervisor.toml"

    def write(max_credits: int, budget_credits: int) -> None:
        path.write_text(
            config_text(
                fake_server.base_url,
                sqlite_url,
                policies=f'[policies.default]\nmax_runtime = "30m"\nmax_credits = {max_credits}',
                extra=BUDGET.format(credits=budget_credits),
            )
        )

    write(max_credits=1000, budget_credits=100_000)
    runaway, team_job = fake.create_jobs(2, limit=1000, rate=20)
    async with signalled_daemon(load(path), path) as daemon:
        # The team's job is exempt from the policy's limit (a per-job override): only its
        # budget can stop it.
        await daemon.store.add_jobs(
            [NewJob(runaway, "default"), NewJob(team_job, "default", labels={"team": "x"}, max_credits=10_000)],
            utcnow(),
        )

        async def both_past(credits: int) -> bool:
            jobs = await daemon.store.list_jobs()
            return len(jobs) == 2 and all(job.credits_used >= credits for job in jobs)

        # Under the first config both spend past the limits the new one will set.
        await wait_until(daemon, lambda: both_past(40), what="both jobs past 40 credits")
        assert {job.state for job in await daemon.store.list_jobs()} == {"watching"}

        write(max_credits=20, budget_credits=30)
        new_hash = load(path).config_hash
        sighup()

        async def both_cancelled() -> dict[str, Any] | None:
            jobs = {job.job_id: job for job in await daemon.store.list_jobs()}
            return jobs if all(job.state == "cancelled" for job in jobs.values()) else None

        jobs = await wait_until(daemon, both_cancelled, what="both jobs cancelled")
        assert daemon.config.config_hash == new_hash
    # The handler decided on the new policy limit, the enforcer on the new budget, and
    # each decision records the config it was taken under.
    assert jobs[runaway].cancel_reason == "max_credits"
    assert jobs[team_job].cancel_reason == "budget:team-x"
    assert jobs[runaway].cancel_detail["config_hash"] == new_hash
    assert jobs[team_job].cancel_detail["config_hash"] == new_hash
    assert [fake.job_info(job_id)["cancel_calls"] for job_id in (runaway, team_job)] == [1, 1]


async def test_sighup_brings_a_new_batch_size_to_the_dispatcher(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    """Every API call takes 0.5 s, longer than a tick: once batch_size is 1, a tick that
    comes while a job is being handled finds every handler slot busy, and says so."""
    fake = fake_server.fake
    fake.set_faults(slow_rate=1.0, slow_seconds=0.5)
    ids = fake.create_jobs(3, limit=1000, rate=1)
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, sqlite_url))
    with capture_logs() as logs:
        async with signalled_daemon(load(path), path) as daemon:
            await daemon.store.add_jobs([NewJob(job_id, "default") for job_id in ids], utcnow())

            async def all_polled() -> bool:
                return all(job.last_polled_at is not None for job in await daemon.store.list_jobs())

            await wait_until(daemon, all_polled, what="every job polled")
            assert not [e for e in logs if e["event"].startswith("tick skipped")]

            path.write_text(config_text(fake_server.base_url, sqlite_url, supervisor={"batch_size": "1"}))
            sighup()

            async def slots_busy() -> bool:
                return any(e["event"] == "tick skipped: all handler slots busy" for e in logs)

            await wait_until(daemon, slots_busy, what="a tick skipped for want of a free slot")
            assert daemon.config.supervisor.batch_size == 1
    assert any(e["event"] == "config reloaded" for e in logs)
    assert not [e for e in logs if e["event"] == "config change needs a restart to take effect"]


async def test_sighup_brings_an_account_floor_into_force_and_takes_it_away(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    """The floor's chore is scheduled at start only when [account] is there: a reload that
    adds one must start it (else the new floor is silently never checked), and one that
    removes it must stop it and forget the figure."""
    fake = fake_server.fake
    fake.set_account_credits(50)
    job_id = fake.create_job(limit=500, rate=1)
    path = tmp_path / "supervisor.toml"
    floor = '[account]\nmin_credits = 80\ncheck_interval = "1s"\naction = "cancel"\n'
    path.write_text(config_text(fake_server.base_url, sqlite_url))
    async with signalled_daemon(load(path), path) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())

        async def polled() -> bool:
            job = await daemon.store.get_job(job_id)
            return job is not None and job.last_polled_at is not None

        await wait_until(daemon, polled, what="the job polled")
        assert daemon.enforcer.account_credits is None  # no floor: the account is not read

        path.write_text(config_text(fake_server.base_url, sqlite_url, extra=floor))
        sighup()

        async def cancelled() -> Any:
            job = await daemon.store.get_job(job_id)
            return job if job is not None and job.state == "cancelled" else None

        job = await wait_until(daemon, cancelled, what="the job cancelled by the reloaded floor")
        assert job.cancel_reason == "account_floor"
        assert daemon.enforcer.account_credits is not None and daemon.enforcer.account_credits < 80

        path.write_text(config_text(fake_server.base_url, sqlite_url))
        sighup()

        async def forgotten() -> bool:
            return daemon.config.account is None and daemon.enforcer.account_credits is None

        await eventually(forgotten, what="the removed floor's figure forgotten")  # no job write signals it
        assert daemon._scheduler is not None and daemon._scheduler.get_job("account") is None
