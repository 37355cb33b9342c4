"""Schema upgrades through Alembic, from the scripts shipped in supervisor.migrations."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from . import migrations
from .store import sync_url


def _alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["url"] = sync_url(url)
    return config


def upgrade(url: str) -> None:
    """Bring the database to the newest schema (a no-op when it already is)."""
    command.upgrade(_alembic_config(url), "head")


def is_current(url: str) -> bool:
    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    engine = create_engine(sync_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision() == head
    finally:
        engine.dispose()
