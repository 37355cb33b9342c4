"""`continue` on purpose: a completed job asked for more results through admission. The API
bills the new results under the same job id; the supervisor reopens the job at once, so the
new spend is supervised and capped like the first (daemon in-process, docs-shaped simulator
over loopback HTTP, a real SQLite file; waits on the daemon's writes, no sleeps)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_policy_engine import events_of, make_config, operations_on, wait_terminal

from conftest import running_daemon
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, utcnow
from supervisor.app.errors import JobNotTracked, Refused
from supervisor.core.states import State

POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 50
"""


async def test_a_continued_job_is_clamped_to_its_limit_reopened_and_supervised_to_the_end(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(limit=20, rate=40)
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES)
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default", {"team": "growth"})], utcnow())
        first = (await wait_terminal(daemon, job_id))[job_id]
        assert (first.state, first.credits_used) == (State.COMPLETED, 20)

        async with operations_on(config) as ops:
            # 100 more asked; its max_credits of 50 leaves 30: the API is asked for 30.
            result = await ops.continue_job(job_id, 100)
            assert (result.requested, result.additional, result.clamped_by) == (100, 30, ["max_credits"])
            assert result.state == "watching"
            assert fake.job_info(job_id)["continue_calls"] == 1

            second = (await wait_terminal(daemon, job_id))[job_id]
            # Capped at the source: the whole total stays within the limit, no cancel needed.
            assert (second.state, second.credits_used, second.cancel_reason) == (State.COMPLETED, 50, None)
            assert fake.job_info(job_id)["results"] == 50

            # Nothing left to continue for: refused with the numbers, nothing sent.
            with pytest.raises(Refused, match="used 50 credits of its max_credits 50"):
                await ops.continue_job(job_id, 10)
            assert fake.job_info(job_id)["continue_calls"] == 1
            with pytest.raises(JobNotTracked):
                await ops.continue_job("not-a-tracked-job", 10)

        events = await daemon.store.events(job_id)
    (reopened,) = events_of(events, "reopened")
    assert reopened["detail"]["was"] == "completed"


async def test_only_a_completed_job_can_be_continued(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> None:
    fake = fake_server.fake
    running = fake.create_job(limit=500, rate=1)
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES)
    async with operations_on(config) as ops:
        await ops.store.add_jobs([NewJob(running, "default")], utcnow())
        with pytest.raises(Refused, match="only a completed job can be continued"):
            await ops.continue_job(running, 10)
    assert fake.job_info(running)["continue_calls"] == 0


RESERVING_BUDGET = """
[budgets.growth]
match = { team = "growth" }
period = "total"
credits = 1000
reserve = true
"""


async def test_a_continued_job_holds_its_whole_new_total_against_a_reserving_budget(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    """The reservation is the job's total (spent so far + the batch granted), as for a new job:
    held as the new batch alone, the credits already spent ate it and the budget saw none of
    the batch coming (20 spent + 30 granted counted 30, not 50)."""
    fake = fake_server.fake
    job_id = fake.create_job(limit=20, rate=10)
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES, extra=RESERVING_BUDGET)
    growth = {"team": "growth"}

    async def held() -> int:
        usage = (await daemon.store.usage([None], utcnow()))[None]
        return sum(u.spent + u.reserved for labels, u in usage if labels == growth)

    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default", growth)], utcnow())
        await wait_terminal(daemon, job_id)
        assert await held() == 20
        async with operations_on(config) as ops:
            result = await ops.continue_job(job_id, 100)
            assert result.additional == 30
            # Whatever the new batch has spent yet, the budget holds the whole total.
            assert await held() == 50
            second = (await wait_terminal(daemon, job_id))[job_id]
        assert second.credits_used == 50
        assert await held() == 50
