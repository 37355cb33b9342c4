"""keep_results end to end: the daemon in-process against the simulator over loopback HTTP,
on a real SQLite file. A job the supervisor cancels has its partial (billed) results written
to its policy's directory once it is final, owner-only; jobs it did not cancel, and jobs on
a policy without the key, get no file; a restarted daemon writes what is not yet written and
continues a file cut short, and what it records names the file and the count, never a result."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from test_policy_engine import make_config, track

from conftest import eventually, running_daemon
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, utcnow
from supervisor.core.states import State
from supervisor.service.runtime import Daemon
from supervisor.sim.model import person

POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 20

[policies.kept]
match = {{ team = "keep" }}
keep_results = "{kept}"
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


def lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def kept_event(daemon: Daemon, job_id: str) -> dict[str, object] | None:
    found = [event for event in await daemon.store.events(job_id) if event["kind"] == "results_kept"]
    return found[0] if found else None


async def test_a_cancelled_job_s_partial_results_land_in_its_directory_owner_only_once_final(
    tmp_path: Path, fake_server: FakeServer, db_url: str
) -> None:
    fake = fake_server.fake
    kept = tmp_path / "kept"  # not there yet: the daemon creates it, owner-only
    config = make_config(tmp_path, fake_server, db_url, policies=POLICIES.format(kept=kept))
    runaway = fake.create_job(limit=1000, rate=40)  # cancelled at 20 credits: its results are billed
    small = fake.create_job(limit=5, rate=40)  # completes under its limit: nothing to keep
    elsewhere = fake.create_job(limit=1000, rate=40)  # cancelled, but its policy keeps nothing
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(config) as daemon:
            await daemon.store.add_jobs(
                [NewJob(runaway, "kept", {"team": "keep"}), NewJob(small, "kept", {"team": "keep"})], utcnow()
            )
            await track(daemon, elsewhere)
            event = await eventually(lambda: kept_event(daemon, runaway), timeout=60, what="the results kept")
            job = await daemon.store.get_job(runaway)
            others = [await daemon.store.get_job(job_id) for job_id in (small, elsewhere)]
            events = [await daemon.store.events(job_id) for job_id in (small, elsewhere)]

    assert job is not None and job.state == State.CANCELLED and job.cancel_reason == "max_credits"
    final = fake.job_info(runaway)["results"]  # what the API holds (and billed) once cancelled
    assert final >= 20
    path = kept / f"{runaway}.jsonl"
    assert lines(path) == [person(runaway, index) for index in range(final)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700
    assert event["detail"] == {"path": str(path), "results": final}
    # The job that completed on its own and the one on a policy without the key: no file.
    assert sorted(item.name for item in kept.iterdir()) == [path.name]
    assert [item.state for item in others if item is not None] == [State.COMPLETED, State.CANCELLED]
    assert not any(event["kind"] == "results_kept" for history in events for event in history)
    # The customer's data is in the file only: no log line carries a result.
    assert not [line for line in logs if any(str(value).find("linkedin.com") >= 0 for value in line.values())]


async def test_a_restarted_daemon_writes_the_results_not_yet_written_and_continues_a_cut_file(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o700)
    unkept = POLICIES.format(kept=kept).replace("keep_results", "# keep_results")
    before = make_config(tmp_path, fake_server, sqlite_url, policies=unkept)
    first, second = fake.create_job(limit=1000, rate=40), fake.create_job(limit=1000, rate=40)
    labels = {"team": "keep"}
    async with running_daemon(before) as daemon:
        await daemon.store.add_jobs([NewJob(first, "kept", labels), NewJob(second, "kept", labels)], utcnow())

        async def both_cancelled() -> bool:
            found = [await daemon.store.get_job(job_id) for job_id in (first, second)]
            return all(job is not None and job.state == State.CANCELLED for job in found)

        await eventually(both_cancelled, timeout=60, what="both jobs cancelled and final")
    assert not list(kept.iterdir())
    # A daemon killed while writing: the file holds 7 whole results and half of the 8th.
    cut = kept / f"{first}.jsonl"
    whole = "".join(json.dumps(person(first, index), separators=(",", ":")) + "\n" for index in range(7))
    cut.write_text(whole + json.dumps(person(first, 7))[:25])
    cut.chmod(0o644)

    after = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES.format(kept=kept))
    async with running_daemon(after) as daemon:
        for job_id in (first, second):
            await eventually(lambda job_id=job_id: kept_event(daemon, job_id), timeout=60, what="the results kept")
        status_calls = fake.request_count("status", job_id=first)

    for job_id in (first, second):
        final = fake.job_info(job_id)["results"]
        assert lines(kept / f"{job_id}.jsonl") == [person(job_id, index) for index in range(final)]
        assert stat.S_IMODE((kept / f"{job_id}.jsonl").stat().st_mode) == 0o600
    # Written once: a third daemon finds nothing left to write.
    async with running_daemon(after) as daemon:
        await eventually(lambda: daemon.is_leader, what="leadership")  # the keeper's runs are the leader's
        await daemon.keeper.keep()
    assert fake.request_count("status", job_id=first) == status_calls


class StuckResults:
    """A client whose results never come (an API that hangs on the pages): `entered` is set
    once the keeper is waiting on them."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def results(self, job_id: str, *, start: int = 0) -> AsyncIterator[Any]:
        self.entered.set()
        await asyncio.Event().wait()
        yield  # pragma: no cover - never reached


async def test_an_export_that_hangs_holds_up_no_poll_and_no_cancel(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    kept = tmp_path / "kept"
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES.format(kept=kept))
    first, later = fake.create_job(limit=1000, rate=40), fake.create_job(limit=1000, rate=40)
    stuck = StuckResults()
    async with running_daemon(config) as daemon:
        daemon.keeper._client = stuck  # type: ignore[assignment]
        await daemon.store.add_jobs([NewJob(first, "kept", {"team": "keep"})], utcnow())
        await eventually(stuck.entered.wait, timeout=60, what="the keeper waiting on the first job's results")
        # While that export hangs, a new runaway is polled, cancelled at its limit and confirmed.
        await daemon.store.add_jobs([NewJob(later, "kept", {"team": "keep"})], utcnow())

        async def cancelled() -> bool:
            job = await daemon.store.get_job(later)
            return job is not None and job.state == State.CANCELLED

        await eventually(cancelled, timeout=60, what="the later job cancelled and confirmed")
        assert fake.job_info(later)["results"] >= 20
        # ... all while the keeper was still stuck on the first job (one job at a time).
        assert await kept_event(daemon, first) is None
        assert [(item.name, item.stat().st_size) for item in kept.iterdir()] == [(f"{first}.jsonl", 0)]


def chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False).returncode == 0


async def test_a_directory_that_refuses_the_file_is_logged_with_the_path_and_kept_once_it_accepts(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    fake = fake_server.fake
    kept = tmp_path / "kept"
    kept.mkdir(mode=0o700)
    # Immutable: refused even to root, who ignores permission bits (the tests run as root here).
    if not await asyncio.to_thread(chattr, "+i", kept):
        pytest.skip("chattr +i is not available here, and as root no permission bit refuses a write")
    config = make_config(tmp_path, fake_server, sqlite_url, policies=POLICIES.format(kept=kept))
    job_id = fake.create_job(limit=1000, rate=40)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_daemon(config) as daemon:
                await daemon.store.add_jobs([NewJob(job_id, "kept", {"team": "keep"})], utcnow())

                def refused() -> list[dict[str, Any]]:
                    return [line for line in logs if line["event"] == "could not keep results"]

                [line] = await eventually(refused, timeout=60, what="the refusal logged")
                assert await kept_event(daemon, job_id) is None
    finally:
        assert await asyncio.to_thread(chattr, "-i", kept)
    path = kept / f"{job_id}.jsonl"
    assert line["job_id"] == job_id and line["path"] == str(path)
    assert "Operation not permitted" in line["error"] and line["retry_in"] == 30
    assert not any("linkedin.com" in str(value) for entry in logs for value in entry.values())
    # The directory accepts it again: the next daemon writes it at once.
    async with running_daemon(config) as daemon:
        await eventually(lambda: kept_event(daemon, job_id), timeout=60, what="the results kept")
    assert lines(path) == [person(job_id, index) for index in range(fake.job_info(job_id)["results"])]
