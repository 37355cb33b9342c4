"""The daemon against the fake API over loopback HTTP, on a real SQLite file and on
PostgreSQL (the latter needs CLADO_SUPERVISOR_TEST_PG_URL; skipped with that reason
otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import config_text, load, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, Store, utcnow
from supervisor.core.states import TERMINAL

POLICIES = """
[policies.default]
max_runtime = "4s"
max_credits = 20
"""

# name: (scenario knobs, expected state, expected reason, runaway?)
SCENARIOS = {
    "completes": ({"rate": 20, "limit": 10}, "completed", None, False),
    "too_many_credits": ({"rate": 10, "limit": 100}, "cancelled", "max_credits", True),
    "too_long": ({"rate": 1, "limit": 100}, "cancelled", "max_runtime", True),
    "fails": ({"rate": 1, "limit": 100, "fail_after": 1}, "failed", None, False),
    "cancelled_elsewhere": ({"rate": 1, "limit": 100, "external_cancel_after": 1}, "cancelled", "external", False),
    "loses_the_race": ({"rate": 10, "limit": 100, "race": True}, "completed", "max_credits", True),
    "confirms_slowly": ({"rate": 10, "limit": 100, "cancel_delay": 1.5}, "cancelled", "max_credits", True),
    # Lost (404s) before its 4 s deadline: still sent the cancel at the deadline (a 404 too).
    "vanishes": ({"rate": 1, "limit": 100, "vanish_after": 0.5}, "lost", "max_runtime", True),
}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


async def test_every_kind_of_job_ends_in_the_right_state(tmp_path: Path, fake_server: FakeServer, db_url: str) -> None:
    fake = fake_server.fake
    ids = {name: fake.create_job(**knobs) for name, (knobs, *_rest) in SCENARIOS.items()}
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, db_url, policies=POLICIES))
    config = load(path)

    async with running_daemon(config) as daemon:
        await daemon.store.add_jobs([NewJob(job_id, "default") for job_id in ids.values()], utcnow())

        async def all_terminal() -> bool:
            jobs = await daemon.store.list_jobs()
            # A job lost before its deadline is terminal, and still sent its cancel then.
            vanished = next(job for job in jobs if job.job_id == ids["vanishes"])
            return all(job.state in TERMINAL for job in jobs) and vanished.cancel_attempts > 0

        await wait_until(daemon, all_terminal, timeout=30, what="every job terminal")
        jobs = {job.job_id: job for job in await daemon.store.list_jobs()}

    for name, (_knobs, state, reason, runaway) in SCENARIOS.items():
        job, info = jobs[ids[name]], fake.job_info(ids[name])
        assert (name, job.state, job.cancel_reason) == (name, state, reason)
        # exactly one cancel call per runaway, none for the others
        assert (name, info["cancel_calls"]) == (name, 1 if runaway else 0)
        if job.state in ("cancelled", "completed", "failed"):
            assert job.final_status == info["status"]
            assert job.confirmed_at is not None
            assert job.credits_used == info["results"]

    # After each cancel, the final state was confirmed by a status poll, not assumed.
    store = Store(db_url)
    try:
        for name, (_knobs, _state, _reason, runaway) in SCENARIOS.items():
            if not runaway:
                continue
            events = await store.events(ids[name])
            moves = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "transition"]
            if name == "vanishes":
                assert moves == [("watching", "lost"), ("lost", "cancelling"), ("cancelling", "lost")]
                continue
            assert moves[0] == ("watching", "cancelling")
            assert moves[1] == ("cancelling", "confirming")
            assert moves[2][0] == "confirming"
            decision = events[[e["to_state"] for e in events].index("cancelling")]
            assert decision["detail"]["rule"].startswith("policies.default.")
            assert decision["detail"]["config_hash"] == config.config_hash
    finally:
        await store.close()
