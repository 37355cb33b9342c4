"""Never blind and silent: jobs whose spend cannot be read, against the simulator over
loopback HTTP and a real SQLite database.

Each shape of issue 24's table is a simulator knob: no count field (and no alternative to
count with), no status field, 403 on status while cancel works, and oversized bodies whose
counts come first. For each: the job is reported blind within 3 polls, its runtime limit is
cancelled at its deadline (never before it), and with on_blind = "cancel" it is cancelled
with reason `blind` once its grace is over. The assertions are about what happened and in
which order, not how fast: a loaded 2-core machine must not break them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_webhooks import Receiver

from conftest import config_text, load, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters import metrics
from supervisor.adapters.store import NewJob, utcnow
from supervisor.core.job import Job
from supervisor.core.states import TERMINAL
from supervisor.service.runtime import Daemon

# name: (simulator knobs, blind reason). Rate 10 results/s, as in the issue.
SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    # No count field, no pagination, and neither the unpaged answer nor pages of 100 allowed.
    "no count": ({"count_field": "none", "unpaged": False, "max_page_size": 1}, "no_count"),
    "no status": ({"hide_status": True}, "no_status"),
    "403 on status": ({"forbidden_after": 0}, "forbidden"),
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = Receiver()
    yield hooks
    hooks.close()


def daemon_config(tmp_path: Path, server: FakeServer, policies: str, extra: str = "") -> Any:
    path = tmp_path / "supervisor.toml"
    db = f"sqlite:///{tmp_path / 'supervisor.db'}"
    path.write_text(config_text(server.base_url, db, policies=policies, extra=extra))
    return load(path)


async def job_of(daemon: Daemon, job_id: str) -> Job:
    (job,) = [job for job in await daemon.store.list_jobs() if job.job_id == job_id]
    return job


async def events_of(daemon: Daemon, job_id: str) -> list[dict[str, Any]]:
    return list(await daemon.store.events(job_id))


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_each_shape_is_reported_blind_within_three_polls_and_cleared_never_by_silence(
    tmp_path: Path, fake_server: FakeServer, receiver: Receiver, shape: str
) -> None:
    knobs, reason = SHAPES[shape]
    job_id = fake_server.fake.create_job(limit=1000, rate=10, **knobs)
    extra = f'[[notify.webhooks]]\nurl = "{receiver.url("/hooks")}"\nallow_insecure_http = true\n'
    config = daemon_config(tmp_path, fake_server, '[policies.default]\nmax_runtime = "30m"\nmax_credits = 40', extra)
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())

        async def blind() -> Job | None:
            job = await job_of(daemon, job_id)
            return job if job.blind_reason else None

        job = await wait_until(daemon, blind, timeout=30, what="the job blind")
        events = await events_of(daemon, job_id)
        await wait_until(daemon, lambda: _async(bool(receiver.at("/hooks"))), timeout=30, what="a webhook")

    assert job.blind_reason == reason
    (said,) = [e for e in events if e["kind"] == "job_blind"]
    assert said["reason"] == reason
    assert said["detail"]["answers"] == 3  # the third unreadable answer in a row, not later
    # Unread is not zero, and not a stall: the job keeps what it had and is not cancelled.
    assert job.credits_used == 0
    assert job.cancel_reason is None
    hooks = [r["json"] for r in receiver.at("/hooks") if r["json"].get("event") == "job_blind"]
    assert [h["job_id"] for h in hooks] == [job_id]
    assert hooks[0]["reason"] == reason


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_blind_jobs_runtime_limit_is_cancelled_at_its_deadline(
    tmp_path: Path, fake_server: FakeServer, shape: str
) -> None:
    knobs, _reason = SHAPES[shape]
    fake = fake_server.fake
    job_id = fake.create_job(limit=1000, rate=10, **knobs)
    config = daemon_config(tmp_path, fake_server, '[policies.default]\nmax_runtime = "4s"\nmax_credits = 40')
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())

        async def cancel_answered() -> Job | None:
            job = await job_of(daemon, job_id)
            return job if job.cancel_attempts and job.state != "cancelling" else None

        job = await wait_until(daemon, cancel_answered, timeout=30, what="the cancel sent and answered")
        events = await events_of(daemon, job_id)
    info = fake.job_info(job_id)

    assert job.cancel_reason == "max_runtime"
    # Sent no earlier than the deadline (created_at + 4 s, as the simulator's clock says), and
    # taken: the simulator's job is cancelled.
    assert info["cancel_call_times"], "the cancel was never sent"
    assert info["cancel_call_times"][0] >= info["created_at_ts"] + 4
    print(f"\n{shape}: cancel sent {info['cancel_call_times'][0] - info['created_at_ts'] - 4:.3f} s after the deadline")
    assert info["status"] == "cancelled"
    decided = [e for e in events if e["to_state"] == "cancelling"]
    assert decided[0]["reason"] == "max_runtime"
    assert decided[0]["detail"]["rule"] == "policies.default.max_runtime"
    # The decision is written before the call that acts on it, and its answer recorded.
    assert job.cancel_requested_at is not None and job.cancel_sent_at is not None
    assert job.cancel_requested_at <= job.cancel_sent_at
    assert job.cancel_answer == "accepted" or job.state == "lost"
    if shape == "403 on status":
        # Lost to its 403s before the deadline, and still sent the cancel at the deadline.
        moves = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
        assert moves[:2] == [("watching", "lost"), ("lost", "cancelling")]


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_on_blind_cancel_cancels_a_job_still_blind_after_its_grace(
    tmp_path: Path, fake_server: FakeServer, shape: str
) -> None:
    knobs, reason = SHAPES[shape]
    fake = fake_server.fake
    job_id = fake.create_job(limit=1000, rate=10, **knobs)
    policies = '[policies.default]\nmax_runtime = "30m"\nmax_credits = 40\non_blind = "cancel"\nblind_grace = "2s"'
    config = daemon_config(tmp_path, fake_server, policies)
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())

        async def decided() -> Job | None:
            job = await job_of(daemon, job_id)
            return job if job.cancel_sent_at else None

        job = await wait_until(daemon, decided, timeout=30, what="the blind job's cancel")
        events = await events_of(daemon, job_id)

    assert job.cancel_reason == "blind"
    (blind,) = [e for e in events if e["kind"] == "job_blind"]
    (decision,) = [e for e in events if e["to_state"] == "cancelling"]
    assert decision["reason"] == "blind"
    assert decision["detail"]["rule"] == "policies.default.on_blind"
    # Not before the grace: decided at least blind_grace after the job went blind.
    assert decision["at"] - blind["at"] >= timedelta(seconds=2)
    waited = (decision["at"] - blind["at"]).total_seconds()
    print(f"\n{shape}: blind → cancel decided after {waited:.3f} s (grace 2 s, poll 1 s)")
    assert fake.job_info(job_id)["cancel_calls"] >= 1
    assert reason == blind["reason"]


async def test_a_budget_with_on_blind_cancel_covers_jobs_whose_policy_only_alerts(
    tmp_path: Path, fake_server: FakeServer
) -> None:
    fake = fake_server.fake
    covered = fake.create_job(limit=1000, rate=10, hide_status=True)
    other = fake.create_job(limit=1000, rate=10, hide_status=True)
    policies = (
        '[policies.default]\nmax_runtime = "30m"\nmax_credits = 40\nblind_grace = "1s"\n\n'
        '[budgets.growth]\nmatch = { team = "growth" }\ncredits = 100000\non_blind = "cancel"'
    )
    config = daemon_config(tmp_path, fake_server, policies)
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs(
            [NewJob(covered, "default", labels={"team": "growth"}), NewJob(other, "default")], utcnow()
        )

        async def both_blind_and_one_cancelled() -> bool:
            jobs = {job.job_id: job for job in await daemon.store.list_jobs()}
            return bool(jobs[covered].cancel_sent_at and jobs[other].blind_reason)

        await wait_until(daemon, both_blind_and_one_cancelled, timeout=30, what="the covered job cancelled")
        jobs = {job.job_id: job for job in await daemon.store.list_jobs()}
    assert jobs[covered].cancel_reason == "blind"
    assert (jobs[other].state, jobs[other].cancel_reason) == ("watching", None)  # alerted, not cancelled


@pytest.mark.parametrize(
    ("knobs", "source"),
    [
        ({"count_field": "none"}, "unpaged"),  # the unpaged answer counts
        ({"count_field": "none", "unpaged": False}, "page_walk"),  # pages of 100 count
        ({"bloat_mb": 5}, "field"),  # every answer over the 1 MB bound, its counts first
    ],
    ids=["no count, unpaged", "no count, page walk", "oversized, counts first"],
)
async def test_the_count_is_recovered_and_the_credit_limit_cancels(
    tmp_path: Path, fake_server: FakeServer, knobs: dict[str, Any], source: str
) -> None:
    fake = fake_server.fake
    job_id = fake.create_job(limit=1000, rate=10, **knobs)
    config = daemon_config(tmp_path, fake_server, '[policies.default]\nmax_runtime = "30m"\nmax_credits = 40')
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())

        async def ended() -> Job | None:
            job = await job_of(daemon, job_id)
            return job if job.state in TERMINAL else None

        job = await wait_until(daemon, ended, timeout=30, what="the job ended")
        events = await events_of(daemon, job_id)
    info = fake.job_info(job_id)

    assert (job.state, job.cancel_reason) == ("cancelled", "max_credits")
    assert job.blind_reason is None
    assert job.count_source == source
    # Overshoot at most 3 + what one extra poll costs (10 results/s, 1 s polls).
    assert 40 <= info["results"] <= 40 + 3 + 10
    print(f"\n{source}: {info['results']} results billed against max_credits = 40")
    if source != "field":
        said = [e["detail"]["source"] for e in events if e["kind"] == "count_source"]
        assert said == [source]


async def test_a_whole_api_drift_is_one_alarm_not_one_per_job(
    tmp_path: Path, fake_server: FakeServer, receiver: Receiver
) -> None:
    fake = fake_server.fake
    ids = fake.create_jobs(30, limit=1000, rate=1)
    extra = f'[[notify.webhooks]]\nurl = "{receiver.url("/hooks")}"\nallow_insecure_http = true\n'
    config = daemon_config(tmp_path, fake_server, '[policies.default]\nmax_runtime = "30m"\nmax_credits = 900', extra)
    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default") for job_id in ids], utcnow())

        async def all_read() -> bool:
            return all(job.last_polled_at for job in await daemon.store.list_jobs())

        await wait_until(daemon, all_read, timeout=30, what="every job read once")
        # The API drifts: every status answer loses its status field.
        fake.reshape(hide_status=True)

        async def all_blind() -> bool:
            return all(job.blind_reason for job in await daemon.store.list_jobs())

        await wait_until(daemon, all_blind, timeout=60, what="every job blind")
        assert daemon.dispatcher.api_drift
        assert any("api_drift" in problem for problem in daemon.problems())
        assert metrics.REGISTRY.get_sample_value("clado_supervisor_api_drift") == 1

        async def gauge_counts_them() -> bool:
            blind = metrics.REGISTRY.get_sample_value("clado_supervisor_jobs_blind", {"reason": "no_status"})
            return blind == len(ids)

        await wait_until(daemon, gauge_counts_them, timeout=30, what="jobs_blind{reason=no_status} = 30")
        await wait_until(daemon, lambda: _async(_events(receiver, "api_drift")), timeout=30, what="api_drift")

        # Readable again: the drift is over, and said once.
        fake.reshape(hide_status=False)

        async def none_blind() -> bool:
            return not any(job.blind_reason for job in await daemon.store.list_jobs())

        await wait_until(daemon, none_blind, timeout=60, what="no job blind")
        assert not daemon.dispatcher.api_drift

    assert len(_events(receiver, "api_drift")) == 1
    # The jobs it blinded sent no webhook each, going blind nor coming back.
    assert _events(receiver, "job_blind") == []
    assert _events(receiver, "job_blind_cleared") == []


def _events(receiver: Receiver, name: str) -> list[dict[str, Any]]:
    return [r["json"] for r in receiver.at("/hooks") if r["json"].get("event") == name]
