"""The lifecycle against the docs-shaped simulator (its defaults: integer created_at,
success:false refusals, /continue): what the real Clado API does to a job, and that no job
escapes supervision. The daemon runs in-process over loopback HTTP on a real SQLite file;
tests wait on the daemon's writes (`wait_until`), never a fixed sleep."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_policy_engine import HookReceiver, events_of, make_config

from conftest import API_KEY, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, utcnow
from supervisor.core.job import Job
from supervisor.core.states import State
from supervisor.service.runtime import Daemon
from virtualtime import VirtualClock, run, serve_fake

POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 20
stall_timeout = "2s"
"""
FINAL = {State.CANCELLED, State.COMPLETED, State.FAILED}


@pytest.fixture
def hooks() -> Iterator[HookReceiver]:
    receiver = HookReceiver()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


async def job_in(daemon: Daemon, job_id: str, states: set[State]) -> Job:
    async def reached() -> Job | None:
        job = await daemon.store.get_job(job_id)
        return job if job is not None and job.state in states else None

    found: Job = await wait_until(daemon, reached, timeout=30, what=f"{job_id} in {sorted(states)}")
    return found


def continue_job(server: FakeServer, job_id: str, additional: int) -> None:
    """What someone else holding the key does: POST /continue on a completed job."""
    answer = httpx.post(
        f"{server.base_url}/api/search/deep_research/{job_id}/continue",
        json={"additionalLimit": additional},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert answer.status_code == 200, answer.text


async def test_the_real_api_s_lifecycle_keeps_every_job_supervised(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, hooks: HookReceiver
) -> None:
    fake = fake_server.fake
    two_hours_ago = int(time.time()) - 7200
    ids = {
        # created long before it is tracked (integer epoch seconds, the docs' form)
        "old": fake.create_job(limit=100, rate=1, created_at_value=two_hours_ago),
        # millisecond created_at: cancelled within 1 s of its own 3 s deadline
        "ms": fake.create_job(limit=100, rate=1, created_at="epoch_ms"),
        "total_only": fake.create_job(limit=100, rate=10, count_field="total"),
        "unknown_status": fake.create_job(limit=100, rate=10, running_status="thinking"),
        "forbidden": fake.create_job(limit=100, rate=1, forbidden_after=0.5),
        "continued": fake.create_job(limit=10, rate=40),
        # "only pending jobs can be cancelled": every cancel refused while it runs, to 60
        "refused": fake.create_job(limit=60, rate=10, cancel_only_pending=True, refuse_status=409),
        # the cancel is taken (success: true) and never applied: re-sent, then polled until final
        "ignored": fake.create_job(limit=90, rate=6, cancel_ignored=True),
        "accepted_202": fake.create_job(limit=100, rate=10, accept_status=202),
        # stuck at 5 results, shown as 5/4/5/4…: still a stall
        "flicker": fake.create_job(limit=100, rate=10, stall_after=5, flicker=True),
    }
    extra = f'[[notify.webhooks]]\nurl = "{hooks.url("/hook")}"\n'
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES, extra=extra)
    async with running_daemon(config) as daemon:
        tracked = [NewJob(job_id, "default", max_runtime_s=3 if name == "ms" else None) for name, job_id in ids.items()]
        await daemon.store.add_jobs(tracked, utcnow())

        old = await job_in(daemon, ids["old"], FINAL)
        ms = await job_in(daemon, ids["ms"], FINAL)
        total_only = await job_in(daemon, ids["total_only"], FINAL)
        unknown = await job_in(daemon, ids["unknown_status"], FINAL)
        forbidden = await job_in(daemon, ids["forbidden"], {State.LOST})
        forbidden_polls = fake.request_count("status", ids["forbidden"])
        accepted_202 = await job_in(daemon, ids["accepted_202"], FINAL)
        flicker = await job_in(daemon, ids["flicker"], FINAL)

        await job_in(daemon, ids["continued"], {State.COMPLETED})
        continue_job(fake_server, ids["continued"], 100)
        continued = await job_in(daemon, ids["continued"], {State.CANCELLED})

        refused = await job_in(daemon, ids["refused"], FINAL)
        ignored = await job_in(daemon, ids["ignored"], FINAL)
        events = {name: await daemon.store.events(job_id) for name, job_id in ids.items()}

    info = {name: fake.job_info(job_id) for name, job_id in ids.items()}
    # Time limits count from the API's created_at, whatever its form.
    assert (old.state, old.cancel_reason) == (State.CANCELLED, "max_runtime")
    assert info["old"]["status_calls"] <= 3  # at once: its first poll
    assert (ms.state, ms.cancel_reason) == (State.CANCELLED, "max_runtime")
    decided = info["ms"]["cancel_call_times"][0] - info["ms"]["created_at_ts"]
    assert decided >= 3.0 - 0.002  # how soon after: see the virtual-clock test below
    # A total-only count and an unknown status still reach max_credits.
    assert (total_only.state, total_only.cancel_reason) == (State.CANCELLED, "max_credits")
    assert (unknown.state, unknown.cancel_reason) == (State.CANCELLED, "max_credits")
    assert [e["detail"] for e in events_of(events["unknown_status"], "unknown_status")] == [{"status": "thinking"}]
    # 403 three polls in a row: lost (forbidden), with a bounded number of polls, and an alert.
    assert forbidden_polls <= 5
    lost = [e for e in events["forbidden"] if e["to_state"] == "lost"]
    assert lost[0]["detail"]["lost"] == "forbidden"
    assert forbidden.recheck_until is not None  # looked at again within the reopen window
    # A 202 cancel that stopped the job ends cancelled, not unconfirmed.
    assert (accepted_202.state, accepted_202.cancel_reason) == (State.CANCELLED, "max_credits")
    # A count flickering 5/4 is a stall, and the record keeps the highest count seen.
    assert (flicker.state, flicker.cancel_reason) == (State.CANCELLED, "stall_timeout")
    assert flicker.credits_used == 5
    # Continued by someone else: reopened, its limit on its whole total, cancelled.
    assert (continued.cancel_reason, continued.reopened_at is not None) == ("max_credits", True)
    assert len(events_of(events["continued"], "reopened")) == 1
    assert continued.credits_used >= 20
    assert info["continued"]["cancel_calls"] == 1
    # Refused while running: re-sent at growing gaps, its spend observed to the end.
    assert refused.state is State.COMPLETED
    assert refused.credits_used == info["refused"]["results"] == 60
    assert info["refused"]["cancel_calls"] >= 3
    sent = info["refused"]["cancel_call_times"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert gaps[-1] > 1.5 * gaps[0]  # at growing gaps
    assert len(events_of(events["refused"], "cancel_refused")) == 1
    # Taken and ignored: re-sent once with an alert, then polled read-only until final.
    assert info["ignored"]["cancel_calls"] >= 2
    assert len(events_of(events["ignored"], "cancel_ignored")) == 1
    assert (ignored.state, ignored.credits_used) == (State.COMPLETED, info["ignored"]["results"])
    assert any(e["to_state"] == "unconfirmed" for e in events["ignored"])
    announced = hooks.events("/hook")
    for alert in ("lost", "reopened", "cancel_refused", "cancel_ignored"):
        assert alert in announced, alert


def test_a_millisecond_created_at_is_cancelled_within_a_second_of_its_deadline(tmp_path: Path, sqlite_url: str) -> None:
    # On the virtual clock (virtualtime.py), so the second is the rule's, not the machine's.
    async def scenario(clock: VirtualClock) -> dict[str, Any]:
        async with serve_fake(clock) as api:
            job_id = api.fake.create_job(limit=100, rate=1, created_at="epoch_ms")
            config = make_config(tmp_path, api, sqlite_url, policies=POLICIES)
            async with running_daemon(config, clock=clock) as daemon:
                await daemon.store.add_jobs([NewJob(job_id, "default", max_runtime_s=3)], daemon.clock())
                job = await job_in(daemon, job_id, FINAL)
            assert (job.state, job.cancel_reason) == (State.CANCELLED, "max_runtime")
            return api.fake.job_info(job_id)

    info = run(scenario)
    decided = info["cancel_call_times"][0] - info["created_at_ts"]
    assert 3.0 - 0.002 <= decided < 4.0


async def test_an_api_that_answers_404_to_everything_loses_no_job(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    job_ids = [fake.create_job(limit=100, rate=1) for _ in range(3)]
    fake.set_faults(not_found=True)  # as behind a wrong base_url path
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES.replace('"2s"', '"1h"'))
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default") for job_id in job_ids], utcnow())

        async def polled_past_the_grace() -> bool:
            # Three polls over two poll intervals would make each lost; give them six.
            return all(fake.request_count("status", job_id) >= 6 for job_id in job_ids)

        await wait_until(daemon, polled_past_the_grace, timeout=30, what="six polls of each job")
        assert daemon.dispatcher.api_misconfigured
        # What /readyz reports beside its own checks: the operator is told where to look.
        assert any("api.base_url" in problem for problem in daemon.problems())
        states = {job.job_id: job.state for job in await daemon.store.list_jobs()}
        assert set(states.values()) == {State.WATCHING}

        fake.set_faults(not_found=False)  # the URL put right: supervision simply goes on

        async def polled_again() -> list[Any]:
            jobs = [await daemon.store.get_job(job_id) for job_id in job_ids]
            return [job for job in jobs if job is not None and job.credits_used > 0 and job.last_error is None]

        assert len(await wait_until(daemon, lambda: _all(polled_again, 3), what="jobs polled again")) == 3
        assert not daemon.dispatcher.api_misconfigured
        assert daemon.problems() == []


async def _all(found: Any, count: int) -> Any:
    result = await found()
    return result if len(result) == count else None
