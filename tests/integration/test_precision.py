"""Precision to the credit on the paths a new user meets, at the default 15 s poll interval
and 1 s tick: jobs tracked while still pending, results that come in steps, a team budget
shared by running jobs, jobs tracked a moment after they started.

The daemon runs in-process against the docs-shaped simulator over loopback, on a real SQLite
file, both on one virtual clock that moves only when both are idle (virtualtime.py): a poll,
a write, a cancel take no time, so each bound checks the rule (when the daemon looks, what it
predicts, when it cancels), never how fast the machine answers. How close the same cases
land on the wall clock, under load too, is `bench precision`'s figure (bench/precision.py).

Each figure is the simulator's own: a job's results when it stopped (it is billed for every
one). Tests wait on the daemon's writes or on the simulator's count, never for a fixed time;
their timeouts are virtual seconds.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from test_policy_engine import make_config, track, wait_terminal

from conftest import eventually, running_daemon
from supervisor.core.states import State
from supervisor.service import chores
from virtualtime import FakeOnLoop, VirtualClock, run, serve_fake

# The shipped defaults (the test config's short intervals put back), so the figures are a
# new user's.
DEFAULTS = {"poll_interval": '"15s"', "tick_interval": '"1s"', "confirm_interval": '"2s"'}
MAX_50 = '[policies.default]\nmax_runtime = "30m"\nmax_credits = 50\nwarn_at = [0.8]'


def overshoots(server: FakeOnLoop, job_ids: list[str], limit: int) -> list[int]:
    return [server.fake.job_info(job_id)["results"] - limit for job_id in job_ids]


def test_jobs_tracked_while_pending_are_probed_and_stopped_at_their_limit(tmp_path: Path, sqlite_url: str) -> None:
    async def scenario(clock: VirtualClock) -> list[int]:
        async with serve_fake(clock) as api:
            config = make_config(tmp_path, api, sqlite_url, policies=MAX_50, supervisor=DEFAULTS)
            # Pending for 0.5-3 s after they are tracked, then 5 or 10 results a second.
            jobs = [
                api.fake.create_job(limit=1000, rate=rate, queue_for=queued)
                for rate in (5, 10)
                for queued in (0.5, 1.5, 3.0)
            ]
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, *jobs)
                rows = await wait_terminal(daemon, *jobs, timeout=60)
            assert {row.state for row in rows.values()} == {State.CANCELLED}
            assert {row.cancel_reason for row in rows.values()} == {"max_credits"}
            return overshoots(api, jobs, 50)

    over = run(scenario)
    assert all(0 <= o <= 3 for o in over), over


def test_results_in_steps_are_measured_over_the_steps(tmp_path: Path, sqlite_url: str) -> None:
    async def scenario(clock: VirtualClock) -> list[int]:
        async with serve_fake(clock) as api:
            config = make_config(tmp_path, api, sqlite_url, policies=MAX_50, supervisor=DEFAULTS)
            # 5 results at once, every half second (10/s): a poll between two steps sees no growth.
            jobs = [api.fake.create_job(limit=1000, rate=10, step=5, queue_for=q) for q in (0.0, 0.7)]
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, *jobs)
                rows = await wait_terminal(daemon, *jobs, timeout=60)
            assert {row.cancel_reason for row in rows.values()} == {"max_credits"}
            return overshoots(api, jobs, 50)

    over = run(scenario)
    assert all(0 <= o <= 8 for o in over), over


def team_budget_spend(tmp_path: Path, sqlite_url: str, *, credits: int, jobs: int, rate: float, timeout: float) -> int:
    """Credits spent by `jobs` running jobs of one team (`rate` results a second each) whose
    day budget of `credits` cancels them; each must have been cancelled by that budget within
    `timeout` (virtual) seconds."""
    budget = f'[budgets.team]\nmatch = {{ team = "x" }}\nperiod = "day"\ncredits = {credits}\naction = "cancel"\n'

    async def scenario(clock: VirtualClock) -> int:
        async with serve_fake(clock) as api:
            config = make_config(
                tmp_path,
                api,
                sqlite_url,
                policies='[policies.default]\nmax_runtime = "30m"\nmax_credits = 200',
                supervisor=DEFAULTS,
                extra=budget,
            )
            job_ids = api.fake.create_jobs(jobs, limit=1000, rate=rate)
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, *job_ids, labels={"team": "x"})
                rows = await wait_terminal(daemon, *job_ids, timeout=timeout)
            assert {row.cancel_reason for row in rows.values()} == {"budget:team"}
            return sum(api.fake.job_info(job_id)["results"] for job_id in job_ids)

    return run(scenario)


def test_a_team_budget_shared_by_running_jobs_is_stopped_at_its_limit(tmp_path: Path, sqlite_url: str) -> None:
    spent = team_budget_spend(tmp_path, sqlite_url, credits=90, jobs=3, rate=4, timeout=60)
    assert 90 <= spent <= 95, spent


def test_a_budget_is_looked_at_again_as_soon_as_the_polls_at_its_crossing_are_recorded(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fallback for polls another replica makes, set too long to matter: only the answers
    # of the polls brought forward to the crossing can bring the sweep back in time (25 s).
    monkeypatch.setattr(chores, "_SETTLE", timedelta(seconds=30))
    monkeypatch.setattr(chores, "_SWEEP_SPAN", timedelta(seconds=60))
    spent = team_budget_spend(tmp_path, sqlite_url, credits=60, jobs=2, rate=5, timeout=25)
    assert 60 <= spent <= 65, spent


def test_jobs_tracked_a_moment_after_they_start_are_stopped_at_their_limit(tmp_path: Path, sqlite_url: str) -> None:
    async def scenario(clock: VirtualClock) -> list[int]:
        async with serve_fake(clock) as api:
            config = make_config(tmp_path, api, sqlite_url, policies=MAX_50, supervisor=DEFAULTS)
            jobs = []
            async with running_daemon(config, clock=clock) as daemon:
                # 5/s, each handed over once it has 2-7 results: 0.4-1.4 s after it started.
                for seen in (2, 3, 4, 6, 7):
                    job_id = api.fake.create_job(limit=1000, rate=5)
                    await eventually(lambda j=job_id, n=seen: api.fake.job_info(j)["results"] >= n, every=0.01)
                    await track(daemon, job_id)
                    jobs.append(job_id)
                rows = await wait_terminal(daemon, *jobs, timeout=60)
            assert {row.cancel_reason for row in rows.values()} == {"max_credits"}
            return overshoots(api, jobs, 50)

    over = run(scenario)
    assert all(0 <= o <= 3 for o in over), over


def test_cancel_lead_lands_the_billed_total_at_the_limit(tmp_path: Path, sqlite_url: str) -> None:
    policies = MAX_50 + '\ncancel_lead = "300ms"'

    async def scenario(clock: VirtualClock) -> list[int]:
        async with serve_fake(clock) as api:
            config = make_config(tmp_path, api, sqlite_url, policies=policies, supervisor=DEFAULTS)
            # The cancel takes 0.3 s to land (at 10/s: 3 results) and the lead is set to it.
            jobs = api.fake.create_jobs(3, limit=1000, rate=10, cancel_delay=0.3)
            async with running_daemon(config, clock=clock) as daemon:
                await track(daemon, *jobs)
                rows = await wait_terminal(daemon, *jobs, timeout=60)
            decided = [row.cancel_detail or {} for row in rows.values()]
            assert all("predicted" in detail for detail in decided), decided
            return overshoots(api, jobs, 50)

    over = run(scenario)
    assert all(-2 <= o <= 2 for o in over), over
