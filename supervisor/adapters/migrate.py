"""Schema upgrades through Alembic, from the scripts shipped in supervisor.migrations."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

from supervisor.adapters.store import sync_url


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
    with _migration_lock(url):
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
        with open(f"{database}.migrate-lock", "a") as lock:
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


def is_current(url: str) -> bool:
    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    engine = create_engine(sync_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision() == head
    finally:
        engine.dispose()
