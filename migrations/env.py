"""Alembic environment. The URL comes from the caller (supervisor.adapters.migrate) or, for
developers running `alembic` by hand, from $CLADO_SUPERVISOR_DB_URL."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from supervisor.adapters.tables import metadata

config = context.config
url = config.attributes.get("url") or os.environ.get("CLADO_SUPERVISOR_DB_URL")
if not url:
    raise SystemExit("set CLADO_SUPERVISOR_DB_URL to the database to migrate")


def run_migrations() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            # SQLite cannot ALTER most things: batch mode recreates tables instead.
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
