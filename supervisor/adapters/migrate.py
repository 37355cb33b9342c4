"""Schema upgrades through Alembic, from the scripts shipped in supervisor.migrations, and
what a database's schema revision means for this version of the code."""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from urllib.parse import quote

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, pool, text
from sqlalchemy.engine import make_url

from supervisor.adapters.store import private_sqlite_file, sync_url


class SchemaUnknown(Exception):
    """The database is at a schema revision this version does not know: a newer version
    migrated it (a downgrade, or two versions on one database). Migrating cannot help."""


def _alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    # Found by name: the package is mapped from migrations/ at install time (pyproject.toml),
    # a mapping that a type checker reading the source tree cannot follow.
    config.set_main_option("script_location", str(resources.files("supervisor.migrations")))
    config.attributes["url"] = sync_url(url)
    return config


def upgrade(url: str) -> None:
    """Bring the database to the newest schema (a no-op when it already is).

    Serialized across processes (the daemon and a CLI command may both auto-migrate a new
    database at once): the second one waits, then finds the schema at head."""
    private_sqlite_file(url)
    with _migration_lock(url):
        schema = schema_of(url)
        if not schema.known:
            raise SchemaUnknown(schema.problem)
        command.upgrade(_alembic_config(url), "head")


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database.startswith((":memory:", "file:")):
            yield
            return
        # SQLite runs DDL outside transactions, so a lock file is the reliable mutex.
        # Owner-only, like the database beside it.
        fd = os.open(f"{database}.migrate-lock", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with open(fd, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    engine = create_engine(sync_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(7346002)"))
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(7346002)"))
                connection.commit()
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Schema:
    """A database's schema revisions against the scripts shipped with this version."""

    revisions: tuple[str, ...]  # empty: no schema yet (a new database)
    head: str
    known: bool  # every revision is one of ours (else a newer version wrote it)

    @property
    def current(self) -> bool:
        return self.revisions == (self.head,)

    @property
    def problem(self) -> str:
        """One line for the user: what is wrong and what to do, or "" when current."""
        found = ", ".join(self.revisions) or "none"
        if not self.known:
            return (
                f"the database schema is at revision {found}, which this version of clado-supervisor does not "
                "know (a newer version migrated it): upgrade the clado-supervisor package (`migrate` cannot help)"
            )
        if not self.current:
            return (
                f"the database schema is at revision {found}, older than this version needs: "
                "run `clado-supervisor migrate`"
            )
        return ""


def schema_of(url: str, *, read_only: bool = False) -> Schema:
    """The database's schema revisions. `read_only` (a running daemon's check) opens a SQLite
    file read-only, so a database file deleted meanwhile is not created again, empty."""
    ours, head = _our_revisions()
    engine = _engine(url, read_only)
    try:
        with engine.connect() as connection:
            revisions = tuple(sorted(MigrationContext.configure(connection).get_current_heads()))
    finally:
        engine.dispose()
    return Schema(revisions, head, all(rev in ours for rev in revisions))


@functools.cache
def _our_revisions() -> tuple[frozenset[str], str]:
    """The revisions the shipped scripts define, and their head (read once: a running
    daemon checks its database's schema periodically)."""
    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    return frozenset(revision.revision for revision in script.walk_revisions()), script.get_current_head() or ""


def _engine(url: str, read_only: bool) -> Engine:
    parsed = make_url(url)
    database = parsed.database or ""
    if read_only and parsed.get_backend_name() == "sqlite" and database and not database.startswith(":memory:"):
        uri = f"file:{quote(os.path.abspath(database))}?mode=ro"
        return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=pool.NullPool)
    return create_engine(sync_url(url), poolclass=pool.NullPool)


def check_schema(url: str) -> Schema:
    """The schema of the database a command is about to use (created owner-only if new)."""
    private_sqlite_file(url)
    return schema_of(url)
