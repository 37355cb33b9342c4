"""The database is watched: a SQLite file deleted or replaced under the running daemon, or a
schema revision this version does not know, makes the daemon unready (`database_problem`),
stops its claims and chores at once, and ends `run_until_signalled` with DatabaseFault
(exit 1 from `run`) after a grace, so that systemd starts it again on the database as it is.
The daemon runs against the simulator over loopback; the grace and the watch's period are
shortened for the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from structlog.testing import capture_logs

from conftest import config_text, load
from fakeserver import FakeServer
from supervisor.adapters import migrate
from supervisor.adapters.dbwatch import DatabaseFault
from supervisor.adapters.store import sync_url
from supervisor.service import runtime
from supervisor.service.runtime import Daemon
from supervisor.service.wiring import client_for, open_store

pytestmark = pytest.mark.timeout(90)

UNKNOWN = "f00dfeed9999"
REPLACED = (
    "the database file {db} was deleted or replaced while the daemon ran "
    "(the file at that path is not the one it opened)"
)  # fmt: skip


@pytest.fixture(autouse=True)
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "DATABASE_WATCH_EVERY", 0.2)
    monkeypatch.setattr(runtime, "DATABASE_GRACE", 0.5)


def write_config(path: Path, text_: str) -> Path:
    path.write_text(text_)
    return path


@asynccontextmanager
async def daemon_on(db_url: str, base_url: str, tmp_path: Path) -> AsyncIterator[tuple[Daemon, asyncio.Task[None]]]:
    """The daemon as `run` runs it (run_until_signalled), and the task running it."""
    config = load(write_config(tmp_path / "supervisor.toml", config_text(base_url, db_url)))
    store = await open_store(config)
    client = client_for(config)
    daemon = Daemon(config, store, client)
    running = asyncio.create_task(daemon.run_until_signalled())
    try:
        yield daemon, running
    finally:
        daemon.request_stop()
        await asyncio.gather(running, return_exceptions=True)
        await client.aclose()
        await store.close()


async def found(daemon: Daemon) -> str:
    await asyncio.wait_for(daemon.database_failed.wait(), timeout=30)
    assert daemon.database_problem is not None
    return daemon.database_problem


def sqlite_file(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


@pytest.mark.parametrize("files", [("",), ("", "-wal", "-shm")], ids=["rm supervisor.db", "rm supervisor.db*"])
async def test_a_deleted_sqlite_file_stops_claims_and_ends_the_daemon_with_a_failure(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str, files: tuple[str, ...]
) -> None:
    db = sqlite_file(sqlite_url)
    with capture_logs() as logs:
        async with daemon_on(sqlite_url, fake_server.base_url, tmp_path) as (daemon, running):
            assert daemon.database_problem is None
            for suffix in files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{db}{suffix}")

            problem = await found(daemon)
            ticks = daemon.dispatcher.ticks
            with pytest.raises(DatabaseFault) as fault:
                await asyncio.wait_for(running, timeout=30)
            # Nothing was claimed once the fault was found, though ticks are every 200 ms.
            assert daemon.dispatcher.ticks == ticks
    # A connection the pool opens after the delete may create an empty file of the same name.
    assert problem in {
        f"the database file {db} was deleted while the daemon ran (what it wrote since is lost)",
        f"{REPLACED.format(db=db)}",
    }
    assert str(fault.value) == problem
    # Said once (the services' own lines about failed statements may come before it).
    found_lines = [entry for entry in logs if entry["event"].startswith("database unusable")]
    assert [(entry["log_level"], entry["problem"]) for entry in found_lines] == [("error", problem)]


async def test_a_replaced_sqlite_file_is_found(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> None:
    db = sqlite_file(sqlite_url)
    other = tmp_path / "other.db"
    await asyncio.to_thread(migrate.upgrade, f"sqlite:///{other}")
    async with daemon_on(sqlite_url, fake_server.base_url, tmp_path) as (daemon, running):
        os.replace(other, db)  # a restore from backup, say, under the running daemon
        assert await found(daemon) == REPLACED.format(db=db)
        with pytest.raises(DatabaseFault):
            await asyncio.wait_for(running, timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_schema_revision_this_version_does_not_know_is_found(
    tmp_path: Path, fake_server: FakeServer, backend: str, request: pytest.FixtureRequest
) -> None:
    """Another (newer) version migrated the database the daemon runs on."""
    db_url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    async with daemon_on(db_url, fake_server.base_url, tmp_path) as (daemon, running):
        engine = create_engine(sync_url(db_url))
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": UNKNOWN})
        engine.dispose()
        assert await found(daemon) == (
            f"the database schema is at revision {UNKNOWN}, which this version of clado-supervisor does not know "
            "(a newer version migrated it): upgrade the clado-supervisor package (`migrate` cannot help)"
        )
        with pytest.raises(DatabaseFault):
            await asyncio.wait_for(running, timeout=30)


async def test_a_healthy_database_is_left_alone(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> None:
    async with daemon_on(sqlite_url, fake_server.base_url, tmp_path) as (daemon, running):
        checks: list[str | None] = []
        five_checks = asyncio.Event()
        check = daemon.database_watch.check
        loop = asyncio.get_running_loop()

        def counted() -> str | None:  # the real check, counted (it runs in a thread)
            checks.append(result := check())
            if len(checks) == 5:
                loop.call_soon_threadsafe(five_checks.set)
            return result

        daemon.database_watch.check = counted  # type: ignore[method-assign]
        await asyncio.wait_for(five_checks.wait(), timeout=30)
        assert checks[:5] == [None] * 5
        assert daemon.database_problem is None
        assert not running.done()
