"""A reload is a transaction: the running config stays in force, with one error line and a
metric, unless the new file is whole, valid, not empty, and orphans no running job's policy
or budget (or says it may). The daemon runs on the simulator over loopback and a real store;
the test rewrites the config file and reloads as SIGHUP does."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from conftest import config_text, load, running_daemon
from fakeserver import FakeServer
from supervisor.adapters import metrics
from supervisor.adapters.store import NewJob, utcnow

pytestmark = pytest.mark.timeout(90)

POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 200

[policies.bulk]
match = { team = "growth" }
max_credits = 30
"""
DEFAULT_ONLY = '[policies.default]\nmax_runtime = "30m"\nmax_credits = 200'
BUDGET = '\n[budgets.team-x]\nmatch = { team = "x" }\ncredits = 1000\nreserve = true\n'
REFUSED = "config reload failed; keeping the previous config"
EMPTY = "the file has no settings (empty); refusing to fall back to the built-in defaults"


def reloads(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("clado_supervisor_config_reloads_total", {"outcome": outcome}) or 0.0


def errors(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "error"]


def put(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "supervisor.toml"


async def test_a_reload_that_removes_a_policy_running_jobs_use_is_refused(
    path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    base = fake_server.base_url
    put(path, config_text(base, sqlite_url, policies=POLICIES))
    job = fake_server.fake.create_job(limit=1000, rate=1)
    async with running_daemon(load(path)) as daemon:
        daemon.config_path = path
        await daemon.store.add_jobs([NewJob(job, "bulk", labels={"team": "growth"})], utcnow())
        before = reloads("failure")

        put(path, config_text(base, sqlite_url, policies=DEFAULT_ONLY))
        with capture_logs() as logs:
            assert await daemon.reload_config() is False

        # One error line naming the problem, a metric, and the old rules still in force.
        assert [entry["error"] for entry in errors(logs)] == [
            (
                f"{path}: policies.bulk: removed, but 1 running job(s) use it (set supervisor.allow_orphaning = true "
                "to remove it anyway)"
            ),
        ]
        assert errors(logs)[0]["event"] == REFUSED
        assert reloads("failure") == before + 1
        assert daemon.config.resolve_policy("bulk").max_credits == 30

        # The operator says so: the same change goes through, and the log says what changed.
        put(path, config_text(base, sqlite_url, policies=DEFAULT_ONLY, supervisor={"allow_orphaning": "true"}))
        with capture_logs() as logs:
            assert await daemon.reload_config() is True
        assert errors(logs) == []
        [reloaded] = [entry for entry in logs if entry["event"] == "config reloaded"]
        assert {"policies.bulk", "supervisor.allow_orphaning"} <= set(reloaded["changed"])
        assert "bulk" not in daemon.config.policies


async def test_a_policy_no_running_job_uses_can_be_removed(
    path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    put(path, config_text(fake_server.base_url, sqlite_url, policies=POLICIES))
    async with running_daemon(load(path)) as daemon:
        daemon.config_path = path
        put(path, config_text(fake_server.base_url, sqlite_url, policies=DEFAULT_ONLY))
        assert await daemon.reload_config() is True
        assert list(daemon.config.policies) == ["default"]


async def test_a_reload_that_removes_a_budget_with_an_open_reservation_is_refused(
    path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    base = fake_server.base_url
    put(path, config_text(base, sqlite_url, extra=BUDGET))
    async with running_daemon(load(path)) as daemon:
        daemon.config_path = path
        # A submission admitted against the budget, whose job is not recorded yet.
        admission = await daemon.store.admit(
            {"team": "x"}, utcnow(), decide=lambda usage: 50, starts=[None], ttl=timedelta(minutes=10)
        )
        assert admission is not None

        put(path, config_text(base, sqlite_url))
        with capture_logs() as logs:
            assert await daemon.reload_config() is False
        assert [entry["error"] for entry in errors(logs)] == [
            (
                f"{path}: budgets.team-x: removed, but 0 running job(s) and 1 open reservation(s) count against it "
                "(set supervisor.allow_orphaning = true to remove it anyway)"
            ),
        ]
        assert "team-x" in daemon.config.budgets


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("", "the file has no settings (empty); refusing to fall back to the built-in defaults"),
        (
            "# every line commented out\n",
            "the file has no settings (empty); refusing to fall back to the built-in defaults",
        ),
        ("[policies.default]\nmax_credits = true\n", "policies.default.max_credits: must be an integer, got true"),
    ],
)
async def test_an_empty_or_invalid_file_is_refused(
    path: Path, fake_server: FakeServer, sqlite_url: str, body: str, problem: str
) -> None:
    put(path, config_text(fake_server.base_url, sqlite_url, policies=POLICIES))
    async with running_daemon(load(path)) as daemon:
        daemon.config_path = path
        running_hash = daemon.config.config_hash
        put(path, body)
        with capture_logs() as logs:
            assert await daemon.reload_config() is False
        assert [entry["error"] for entry in errors(logs)] == [f"{path}: {problem}"]
        assert daemon.config.config_hash == running_hash


async def test_a_fifo_in_place_of_the_config_is_refused_without_blocking(
    path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    put(path, config_text(fake_server.base_url, sqlite_url))
    async with running_daemon(load(path)) as daemon:
        daemon.config_path = path
        os.unlink(path)
        os.mkfifo(path)  # nobody ever writes to it
        with capture_logs() as logs:
            assert await daemon.reload_config() is False
        assert [entry["error"] for entry in errors(logs)] == [
            f"{path}: not a regular file (it is a FIFO); the config must be a regular file"
        ]
        assert daemon.scheduler_running
