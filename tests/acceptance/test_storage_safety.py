"""The database as `run` and the CLI meet it: a SQLite file deleted under the daemon ends it
with a failure (so systemd restarts it), a schema from a newer version gets one line saying
what to do, and what the supervisor writes to disk is readable by its owner only."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import config_text
from fakeserver import free_port

from .conftest import DaemonProcess, FakeApiProcess, cli, wait_for

PREFIX = "clado-supervisor: error: "
NEWER = (
    "database: the database schema is at revision f00dfeed9999, which this version of clado-supervisor does not "
    "know (a newer version migrated it): upgrade the clado-supervisor package (`migrate` cannot help)"
)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """What a login shell or systemd gives (0022): files default to world-readable."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line.get("message", "").startswith(name)]


def one_line_error(result: Any, expected: str, code: int) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    assert result.stderr.splitlines() == [expected]


def test_a_sqlite_file_deleted_under_the_daemon_ends_it_with_a_failure(workdir: Path) -> None:
    daemon = DaemonProcess(workdir)
    wait_for(lambda: events(daemon, "supervisor started"), what="startup")
    (workdir / "supervisor.db").unlink()  # an operator's mistake, a cleanup job, a restore

    code = daemon.wait(timeout=60)  # found within a watch period, then a grace

    assert code == 1
    [found] = events(daemon, "database unusable")
    assert found["level"] == "error"
    assert f"the database file {workdir / 'supervisor.db'} was deleted" in found["problem"]
    last = daemon.log_lines()[-1]
    assert last["message"] == f"{PREFIX}database: {found['problem']}"  # the CLI's one line, not JSON


def test_a_schema_from_a_newer_version_gets_one_line_saying_what_to_do(workdir: Path) -> None:
    assert cli("migrate", cwd=workdir).returncode == 0
    with sqlite3.connect(workdir / "supervisor.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'f00dfeed9999'")
    for command in (["jobs", "list"], ["track", "8a9c1f5e-3b7d-4e21-9f60-2d4b8c7a1e53"], ["report"], ["migrate"]):
        one_line_error(cli(*command, cwd=workdir), PREFIX + NEWER, 1)
    daemon = DaemonProcess(workdir)
    assert daemon.wait(timeout=60) == 1
    assert daemon.log_lines()[-1]["message"] == PREFIX + NEWER


def test_an_older_schema_without_auto_migrate_says_run_migrate(workdir: Path) -> None:
    config = workdir / "supervisor.toml"
    config.write_text(
        config.read_text().replace(
            'url = "sqlite:///supervisor.db"', 'url = "sqlite:///supervisor.db"\nauto_migrate = false'
        )
    )
    one_line_error(
        cli("jobs", "list", cwd=workdir),
        f"{PREFIX}supervisor.toml: database.auto_migrate: the database schema is not current; "
        "run `clado-supervisor migrate`",
        2,
    )


def test_database_files_are_owner_only_and_a_webhook_password_stays_out_of_the_log(
    tmp_path: Path, fake_api: FakeApiProcess
) -> None:
    # Nothing listens on the hook's port: each attempt fails, and the failure is logged.
    hook = f"http://hookbot:hunter2-pw@127.0.0.1:{free_port()}/hook?token=t0ps3cret"
    (tmp_path / "supervisor.toml").write_text(
        config_text(
            fake_api.base_url,
            "sqlite:///supervisor.db",
            policies='[policies.default]\nmax_runtime = "30m"\nmax_credits = 20',
            extra=f'\n[[notify.webhooks]]\nurl = "{hook}"\nevents = ["cancel_requested"]\ntimeout = "1s"\n',
        )
    )
    job_id = fake_api.create_job(limit=1000, rate=20)
    assert cli("track", job_id, cwd=tmp_path).returncode == 0
    daemon = DaemonProcess(tmp_path)
    try:
        # The outbox keeps the delivery and retries it; the first failure is logged once.
        failing = "webhook receiver failing; its deliveries wait and are retried"
        failed = wait_for(lambda: events(daemon, failing), what="a failing webhook receiver")
        assert "hunter2-pw" not in failed[0]["url"]
        # While the daemon runs, SQLite's -wal and -shm files exist beside the database.
        files = ["supervisor.db", "supervisor.db-wal", "supervisor.db-shm", "supervisor.db.migrate-lock"]
        modes = {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in files}
        assert modes == dict.fromkeys(files, "0o600")
    finally:
        assert daemon.stop() == 0
    log_text = daemon.log_path.read_text()
    assert "hunter2-pw" not in log_text
    assert "t0ps3cret" not in log_text
    assert json.loads(cli("jobs", "list", "--json", cwd=tmp_path).stdout)[0]["cancel_reason"] == "max_credits"


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`path` made immutable (chattr +i): a write is refused even to root, who ignores
    permission bits (the tests run as root here), as on a read-only mount."""
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({made.stderr.strip() or made.returncode}), and as root no "
                    "permission bit refuses a write")  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("refusing", ["file", "directory"])
def test_a_database_that_refuses_writes_is_one_line_for_every_command_and_no_initiate(
    workdir: Path, fake_api: FakeApiProcess, refusing: str
) -> None:
    assert cli("migrate", cwd=workdir).returncode == 0
    database = workdir / "supervisor.db"
    for companion in ("supervisor.db-wal", "supervisor.db-shm"):  # left by no one: migrate closed them
        assert not (workdir / companion).exists()
    if refusing == "file":
        expected = f"{PREFIX}database: cannot open the SQLite file {database} for writing: Operation not permitted"
    else:
        expected = (
            f"{PREFIX}database: cannot write beside the SQLite file {database}: its directory {workdir} refuses new "
            "files (SQLite creates its -wal and -shm files there)"
        )
    commands = (["submit", "engineers in Berlin"], ["track", "8a9c1f5e-3b7d-4e21-9f60-2d4b8c7a1e53"], ["jobs", "list"])
    with immutable(database if refusing == "file" else workdir):
        for command in commands:
            one_line_error(cli(*command, cwd=workdir), expected, 1)
    assert fake_api.get("/_fake/stats")["initiate"] == 0
    # Writable again, the same database works: nothing was half-written.
    assert cli("jobs", "list", "--json", cwd=workdir).stdout.strip() == "[]"
