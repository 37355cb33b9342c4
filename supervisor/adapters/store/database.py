"""The database a Store talks to: URLs and drivers, the engine and its pool, SQLite's
settings, which errors mean "the database is away", and the small read helpers the
store's parts share."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Executable, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from supervisor.adapters.store.routes import Routes
from supervisor.core.job import Job


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """A datetime in UTC, for values read past the table's column type (aggregates, the
    database's clock, RETURNING), which the driver may give naive."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def async_url(url: str) -> str:
    """The async driver for a configured URL: aiosqlite for SQLite, psycopg 3 for PostgreSQL."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """The blocking driver for the same database, for Alembic."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite").render_as_string(hide_password=False)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


class SqliteFileUnwritable(Exception):
    """The SQLite file (or the directory its -wal, -shm and lock files go in) refuses writes:
    an immutable file, a read-only mount, no write permission. Every command needs to write
    (a read takes WAL's shared memory, and commands migrate), so this ends it with one line."""


# SQLite's companions of the database file, created beside it (WAL, its index, our lock).
_COMPANIONS = ("-wal", "-shm", ".migrate-lock")


def private_sqlite_file(url: str) -> None:
    """Create a SQLite database file readable by its owner only (0600), before SQLite would
    create it 0644: it holds job queries and labels. SQLite gives its -wal and -shm files
    the database file's mode. An existing file is left as it is.

    Checked writable here, file and directory, before any command acts (a submit must not
    initiate a job it cannot record): SqliteFileUnwritable names the file and the problem."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database.startswith((":memory:", "file:")):
        return
    path = os.path.abspath(database)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise SqliteFileUnwritable(f"cannot open the SQLite file {path} for writing: {exc.strerror}") from None
    # access() sees what a write would meet (a read-only mount, an immutable flag, the
    # permission bits) without creating anything.
    directory = os.path.dirname(path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SqliteFileUnwritable(
            f"cannot write beside the SQLite file {path}: its directory {directory} refuses new files "
            "(SQLite creates its -wal and -shm files there)"
        )
    for suffix in _COMPANIONS:
        companion = path + suffix
        if os.path.exists(companion) and not os.access(companion, os.W_OK):
            raise SqliteFileUnwritable(f"cannot open {companion} (beside the SQLite file) for writing")


SQLITE_CACHED_STATEMENTS = 32


def configure_sqlite(engine: Any) -> None:
    """WAL (readers never block the writer), a busy timeout for the CLI writing beside the
    daemon, and BEGIN IMMEDIATE so a write transaction takes the lock up front instead
    of failing halfway with SQLITE_BUSY."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or the connection broke (as
    opposed to a bug or a constraint): the caller logs it briefly and retries later."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OSError)


def db_error_text(exc: BaseException) -> str:
    """One short line for a log: the driver's message without SQLAlchemy's SQL and links."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0][:300] if message else type(exc).__name__


# Ids per IN list: well under the 999 bound parameters a statement may have on older SQLite.
IN_LIST = 500


def chunks(items: Sequence[str], size: int = IN_LIST) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Database:
    """The engine, its owner (host:pid:…, written on leases, leader rows and initiating
    submissions) and whether it is SQLite (one host) or PostgreSQL (several replicas)."""

    def __init__(self, url: str, *, owner: str | None = None, pool_size: int = 5) -> None:
        self.url = url
        self.owner = owner or default_owner()
        # Which hooks want which events: every transaction that records a cause writes its
        # webhook events' outbox rows by these (none until whoever opens the store sets them).
        self.routes = Routes()
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        options: dict[str, Any] = {}
        if not self.is_sqlite:
            options = {
                "pool_size": pool_size,
                "max_overflow": pool_size,
                # A connection the server dropped (restart, failover) is replaced at checkout.
                "pool_pre_ping": True,
                "pool_timeout": 10,
                "connect_args": {
                    # Fail fast while the server is down instead of hanging a tick.
                    "connect_timeout": 5,
                    # Notice a peer that vanished without a FIN (network partition).
                    "keepalives": 1,
                    "keepalives_idle": 10,
                    "keepalives_interval": 5,
                    "keepalives_count": 3,
                    # Which replica a session belongs to, in pg_stat_activity.
                    "application_name": f"clado-supervisor {self.owner}"[:63],
                },
            }
        if self.is_sqlite:
            private_sqlite_file(url)
            # sqlite3 keeps each connection's last 128 prepared statements (C memory that
            # tracemalloc does not see), and every length of an IN list is a statement of
            # its own: at 5,000 jobs, tens of KB each, they grew the daemon by ~7 MB/min.
            # The fixed statements of a tick fit in a smaller cache; the IN variants churn.
            options = {"connect_args": {"cached_statements": SQLITE_CACHED_STATEMENTS}}
        self.engine: AsyncEngine = create_async_engine(async_url(url), **options)
        if self.is_sqlite:
            configure_sqlite(self.engine.sync_engine)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                # Outside any transaction: every SQLite transaction here starts with BEGIN
                # IMMEDIATE (the write lock), and one cancelled mid-statement (a health check
                # timing out) would keep that lock for good.
                raw = await conn.get_raw_connection()
                cursor = await raw.driver_connection.execute("SELECT 1")  # type: ignore[union-attr]
                await cursor.close()
            else:
                await conn.execute(text("SELECT 1"))

    # Reads outside any write transaction: one connection, one statement.

    async def _rows(self, query: Executable) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def _row(self, query: Executable) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else dict(row._mapping)

    async def _jobs(self, query: Executable) -> list[Job]:
        async with self.engine.connect() as conn:
            return [Job.from_row(row._mapping) for row in await conn.execute(query)]
