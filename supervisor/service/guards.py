"""How the daemon's recurring services survive a failing database: each backs off after
consecutive failures (logging sparsely) and bounds its database work."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.store import Store, database_unavailable, db_error_text
from supervisor.core.backoff import delay, renewal_cap

log = structlog.get_logger("supervisor.daemon")


class Backoff:
    """Consecutive failures of one recurring action: skip runs for a doubling delay (up to
    `cap`) and log the first failure, then at most once every `log_every` seconds while it
    lasts, and once more when it recovers. So an outage costs a few log lines, not one a tick."""

    def __init__(self, what: str, *, first: float, cap: float, log_every: float = 60.0) -> None:
        self.what = what
        self.first = max(0.05, first)
        self.cap = max(self.first, cap)
        self.log_every = log_every
        self.failures = 0
        self._retry_at = 0.0
        self._since = 0.0
        self._logged_at = -math.inf

    @classmethod
    def renewing(cls, what: str, ttl: timedelta, renewals: int) -> Backoff:
        """For renewing something that lasts `ttl`, `renewals` times within it (a lease,
        leadership): from a second up to one renewal interval (`renewal_cap`)."""
        return cls(what, first=1.0, cap=renewal_cap(ttl, renewals))

    def ready(self) -> bool:
        return time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.failures == 0:
            self._since = now
        self.failures += 1
        wait = delay(self.failures, self.first, self.cap)
        self._retry_at = now + wait
        metrics.TASK_FAILURES.labels(self.what).inc()
        if self.failures == 1 or now - self._logged_at >= self.log_every:
            self._logged_at = now
            unavailable = database_unavailable(exc)
            (log.error if self.failures == 1 else log.warning)(
                f"{self.what} failed; backing off" if self.failures == 1 else f"{self.what} still failing",
                error=db_error_text(exc) if unavailable else (str(exc) or type(exc).__name__),
                database_unavailable=unavailable,
                failures=self.failures,
                retry_in=round(wait, 3),
            )

    def succeeded(self) -> None:
        if self.failures:
            log.info(
                "%s recovered", self.what, failures=self.failures, after_s=round(time.monotonic() - self._since, 3)
            )
        self.failures = 0
        self._retry_at = 0.0


def db_timeout(store: Store, seconds: float) -> asyncio.Timeout:
    """A bound for database work. None on SQLite: a statement cancelled there keeps
    running in aiosqlite's thread and its transaction then holds the database's write
    lock for good (measured), stalling every writer; its own busy timeout (30 s) bounds
    it instead. PostgreSQL cancels cleanly (the server aborts the statement)."""
    return asyncio.timeout(None if store.is_sqlite else seconds)
