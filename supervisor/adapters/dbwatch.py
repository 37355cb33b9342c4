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
        # As the kernel names open files (symlinks resolved), to find the daemon's own.
        self.path: Path | None = Path(os.path.realpath(database)) if is_file else None
        # The file the daemon opened: the watch is made once the store has opened it.
        self._identity = self._file_identity()

    def _file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file now at the database's path, None when there is none."""
        if self.path is None:
            return None
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_dev, info.st_ino

    def _open_files(self) -> list[tuple[int, int, int]] | None:
        """(device, inode, link count) of each file the process has open under the database's
        name (its SQLite connections), from /proc/self/fd; None where there is no /proc.
        They tell a deleted file even when a new one took its name and inode number."""
        try:
            fds = os.listdir("/proc/self/fd")
        except OSError:
            return None
        names = {str(self.path), f"{self.path} (deleted)"}
        found = []
        for fd in fds:
            link = f"/proc/self/fd/{fd}"
            try:
                if os.readlink(link) in names:
                    info = os.stat(link)
                    found.append((info.st_dev, info.st_ino, info.st_nlink))
            except OSError:
                continue  # closed meanwhile
        return found

    def check(self) -> str | None:
        """The problem found, as one line for the log and /readyz, or None. Blocking (a
        stat, a look at the open files, one query): run it in a thread."""
        if self.path is not None:
            identity = self._file_identity()
            if identity is None:
                return f"the database file {self.path} was deleted while the daemon ran (what it wrote since is lost)"
            if self._identity is None:
                self._identity = identity
            held = self._open_files() or []
            if identity != self._identity or any(links == 0 or (dev, ino) != identity for dev, ino, links in held):
                return self._replaced()
        try:
            schema = migrate.schema_of(self.url, read_only=True)
        except SQLAlchemyError:
            return None  # an outage, not a fault of this kind: the services back off and retry
        if not schema.revisions:
            # It had a schema when the daemon started: a new empty file took the old one's
            # name (and inode number, once the daemon's connections let go), or it was wiped.
            return self._replaced() if self.path else "the database lost its schema while the daemon ran"
        return schema.problem or None

    def _replaced(self) -> str:
        return (
            f"the database file {self.path} was deleted or replaced while the daemon ran "
            "(the file at that path is not the one it opened)"
        )
