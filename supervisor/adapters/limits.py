"""The process's file descriptors: enough of them, and a share the admin API may not exceed.

Every socket to the Clado API, every database connection and every admin API connection is a
file descriptor. At the common default soft limit (1,024) a flood of idle connections to the
admin API once took them all: the API client could not connect, SQLite could not open its
file, and enforcement stopped. So the daemon raises its soft limit to the hard one at start
(an unprivileged process may), and the admin API holds at most `admin_connection_bound()`
connections, a small fraction of the limit, refusing the rest at once.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# The admin API serves an operator, a console and a metrics scraper: a few connections.
# 256 is plenty for them; an eighth of the limit leaves the rest to enforcement at any limit.
ADMIN_CONNECTIONS_MAX = 256
ADMIN_SHARE = 8
ADMIN_CONNECTIONS_MIN = 16


@dataclass(frozen=True)
class FdLimit:
    before: int  # the soft limit the process started with
    soft: int  # the soft limit now
    hard: int
    error: str | None = None  # why it could not be raised, if it could not

    @property
    def raised(self) -> bool:
        return self.soft > self.before


def raise_fd_limit() -> FdLimit:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (no privilege needed to go up to it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        # "unlimited" is not a value setrlimit accepts for the soft limit on every kernel
        # (Linux caps it at nr_open): leave the process as it is.
        return FdLimit(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        return FdLimit(soft, soft, hard, error=str(exc))
    return FdLimit(soft, hard, hard)


def admin_connection_bound(soft: int | None = None) -> int:
    """How many connections the admin API may hold at once, for a soft limit (now's by default)."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return ADMIN_CONNECTIONS_MAX
    return max(ADMIN_CONNECTIONS_MIN, min(ADMIN_CONNECTIONS_MAX, soft // ADMIN_SHARE))
