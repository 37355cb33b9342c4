"""The daemon's decision counters, counted from the committed events.

Whichever process committed a job event (this daemon, another replica, a CLI `cancel`, the
admin API, the console), the counters of every daemon count it once within a tick: each
tick reads the job_events rows committed since the last one (by id) and adds what
core.notify.counts says. Counting starts after the newest row older than the process (a
Prometheus counter starts at zero with its process, as usual), and every id is counted at
most once per process. On PostgreSQL a lower id may commit after a higher one: ids skipped
over are looked at again for GAP_WAIT, then given up (a rolled-back insert leaves a gap
that never fills).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.store import Store
from supervisor.core.notify import counts

log = structlog.get_logger("supervisor.tally")

GAP_WAIT = timedelta(minutes=2)
_COUNTERS = {
    "cancels": metrics.CANCELS,
    "transitions": metrics.TRANSITIONS,
    "warnings": metrics.WARNINGS,
    "would_cancel": metrics.WOULD_CANCEL,
    "job_alerts": metrics.JOB_ALERTS,
}


class Tally:
    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock
        self._started = clock()
        self._cursor: int | None = None  # the highest id counted
        self._gaps: dict[int, datetime] = {}  # ids below the cursor not seen yet, since when

    async def step(self) -> int:
        """Count the events committed since the last step; how many. The first step starts
        from the newest event older than this process (what happened before it started is
        not in its counters; what happened since, before the first step, is)."""
        if self._cursor is None:
            self._cursor = await self._store.last_event_id(before=self._started)
        now = self._clock()
        self._gaps = {gap: since for gap, since in self._gaps.items() if now - since < GAP_WAIT}
        rows = await self._store.events_from(self._cursor, sorted(self._gaps))
        counted = 0
        for row in sorted(rows, key=lambda row: row["id"]):
            event_id = row["id"]
            if event_id > self._cursor:
                self._gaps.update(dict.fromkeys(range(self._cursor + 1, event_id), now))
                self._cursor = event_id
            elif self._gaps.pop(event_id, None) is None:
                continue  # counted already
            for counter, label in counts(row["kind"], row["from_state"], row["to_state"], row["reason"]):
                _COUNTERS[counter].labels(label).inc()
            counted += 1
        return counted
