"""Faults under a running daemon's database that no query reports.

A SQLite file deleted (or replaced by another file of the same name) while the daemon runs
goes unnoticed by SQLite: the open connections keep reading and writing the old inode, every
statement succeeds, and all of it is gone at the next start. A schema revision this version
does not know (a newer version migrated the database under it) makes its statements wrong
in ways no error may show. `DatabaseWatch.check` looks for both; the runtime calls it
periodically and stops enforcing on that database when it finds one.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from supervisor.adapters import migrate


class DatabaseFault(Exception):
    """The daemon stopped because of such a fault: the process exits non-zero, so that its
    supervisor (systemd) starts it again on the database as it now is."""


class DatabaseWatch:
    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        database = parsed.database or ""
        is_file = parsed.get_backend_name() == "sqlite" and database and not database.startswith((":memory:", "file:"))
        self.path: Path | None = Path(database).absolute() if is_file else None
        # The file the daemon opened: the watch is made once the store has opened it.
        self._identity = self._file_identity()

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def check(self) -> str | None:
        """The problem found, as one line for the log and /readyz, or None. Blocking (a
        stat and one query): run it in a thread."""
        if self.path is not None:
            identity = self._file_identity()
            if identity is None:
                return f"the database file {self.path} was deleted while the daemon ran (what it wrote since is lost)"
            if self._identity is None:
                self._identity = identity
            elif identity != self._identity:
                return f"the database file {self.path} was replaced by another file while the daemon ran"
        try:
            schema = migrate.schema_of(self.url, read_only=True)
        except SQLAlchemyError:
            return None  # an outage, not a fault of this kind: the services back off and retry
        return schema.problem or None
