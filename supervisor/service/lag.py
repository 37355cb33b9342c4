"""Poll lag: how late this replica polls its jobs, and saying so when it falls behind.

Every poll reports its due time and when it started. Over windows of `WINDOW` seconds the
watch takes the lag p99, the polls done per second and the polls asked for per second. The
asked rate comes from the due times themselves: jobs are claimed in due order, so the polls
of a window cover a span of due times, and `polls / span` is how many the schedule asked for
per second (a span shorter than the window means the backlog grew). When the p99 stays above
one poll interval for `SUSTAIN` (or a poll interval, if longer) the replica is falling
behind: a warning with the numbers and the knobs to turn (at most every `LOG_EVERY`), the
gauges, and a note on systemd's STATUS= line; once a window is back under it, one line says so.

STATUS= is shared: the housekeeping's summary ("supervising 3 active job(s); …") comes first
and the lag note after it (`status_line`), whichever of the two changed, so that neither
hides the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.systemd import Notifier

log = structlog.get_logger("supervisor.daemon")

WINDOW = 10.0
SUSTAIN = 60.0
LOG_EVERY = 300.0
# A window keeps at most this many lag samples for its p99 (10 s at 10,000 polls/s).
MAX_SAMPLES = 100_000
# What limits a replica, most often first: its CPU (about 600 us a poll: ~1,500 polls/s a
# core), the claims (at most supervisor.batch_size jobs a tick), the requests in flight.
KNOBS = (
    "fewer jobs per replica (add replicas), a longer supervisor.poll_interval, a larger supervisor.batch_size "
    "(at most that many jobs are claimed a tick), or more api.max_concurrency"
)


@dataclass(frozen=True)
class LagWindow:
    """What one window measured."""

    p99: float
    done_per_s: float
    asked_per_s: float


def status_line(summary: str, note: str | None) -> str:
    """systemd's STATUS=: the daemon's summary, then the lag note while there is one."""
    return "; ".join(part for part in (summary, note) if part)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class LagWatch:
    def __init__(self, notifier: Notifier, poll_interval: Callable[[], float]) -> None:
        """`poll_interval` is read at each window (the current config's, after a reload)."""
        self.notifier = notifier
        self._summary: Callable[[], str] = lambda: ""
        self._poll_interval = poll_interval
        self._start: float | None = None
        self._lags: list[float] = []
        self._polls = 0
        self._first_due = math.inf
        self._last_due = -math.inf
        self._behind_since: float | None = None
        self._warned_at: float | None = None
        self.falling_behind = False
        self.last: LagWindow | None = None
        # What STATUS= says after the summary while this replica falls behind, else None.
        self.note: str | None = None

    def recent_p99(self) -> float:
        """The lag p99 of the last window, in seconds (0 before the first): how late polls run."""
        return self.last.p99 if self.last is not None else 0.0

    def beside(self, summary: Callable[[], str]) -> None:
        """Put the note after `summary` (the housekeeping's latest) on STATUS=."""
        self._summary = summary

    def observe(self, due: datetime, now: datetime) -> None:
        """A poll that was due at `due` starts at `now` (the daemon's clock)."""
        lag = max(0.0, (now - due).total_seconds())
        metrics.POLL_LAG.observe(lag)
        at, due_at = now.timestamp(), due.timestamp()
        if self._start is None:
            self._start = at
        self._polls += 1
        if len(self._lags) < MAX_SAMPLES:
            self._lags.append(lag)
        self._first_due = min(self._first_due, due_at)
        self._last_due = max(self._last_due, due_at)
        if at - self._start >= WINDOW:
            self._close(at, at - self._start)

    def _close(self, at: float, elapsed: float) -> None:
        span = self._last_due - self._first_due
        window = LagWindow(
            p99=_p99(self._lags),
            done_per_s=self._polls / elapsed,
            # A burst of jobs due at one instant asked for them all at once: no finite rate.
            asked_per_s=self._polls / span if span > 0 else math.inf,
        )
        self.last = window
        self._start, self._lags, self._polls = at, [], 0
        self._first_due, self._last_due = math.inf, -math.inf
        metrics.POLL_LAG_P99.set(window.p99)
        interval = self._poll_interval()
        if window.p99 <= interval:
            self._behind_since = None
            if self.falling_behind:
                self.falling_behind = False
                metrics.FALLING_BEHIND.set(0)
                self.note = None
                log.info("polls are on time again", lag_p99_s=round(window.p99, 3), threshold_s=interval)
                self.notifier.status(status_line(self._summary(), "polls on time again"))
            return
        if self._behind_since is None:
            self._behind_since = at - elapsed
        if at - self._behind_since < max(SUSTAIN, interval):
            return
        self.falling_behind = True
        metrics.FALLING_BEHIND.set(1)
        asked = "a burst" if math.isinf(window.asked_per_s) else f"~{window.asked_per_s:.0f}/s"
        self.note = (
            f"falling behind: lag p99 {window.p99:.1f}s > poll interval {interval:g}s; "
            f"polls {window.done_per_s:.0f}/s done, {asked} asked"
        )
        self.notifier.status(status_line(self._summary(), self.note))
        if self._warned_at is None or at - self._warned_at >= LOG_EVERY:
            self._warned_at = at
            log.warning(
                "falling behind: polls are later than one poll interval",
                lag_p99_s=round(window.p99, 3),
                threshold_s=interval,
                behind_for_s=round(at - self._behind_since),
                polls_done_per_s=round(window.done_per_s, 1),
                polls_asked_per_s=None if math.isinf(window.asked_per_s) else round(window.asked_per_s, 1),
                hint=f"this replica cannot poll its jobs as often as asked: {KNOBS}",
            )
