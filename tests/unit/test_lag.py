"""The poll lag watch: a replica that cannot poll as often as asked says so, with numbers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from supervisor.adapters import metrics
from supervisor.adapters.systemd import Notifier
from supervisor.service.housekeeping import Housekeeping
from supervisor.service.lag import LagWatch

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL = 15.0


class StatusLines(Notifier):
    def __init__(self) -> None:
        super().__init__(environ={})
        self.lines: list[str] = []

    def status(self, status: str) -> None:
        self.lines.append(status)


def run(watch: LagWatch, seconds: float, asked: float, done: float, start: tuple[float, float]) -> tuple[float, float]:
    """Polls done at `done`/s of a schedule asking `asked`/s, in due order, for `seconds`;
    `start` = (first due, first poll) in seconds after T0. Returns where it ended."""
    due, at = start
    while at < start[1] + seconds:
        watch.observe(T0 + timedelta(seconds=due), T0 + timedelta(seconds=max(at, due)))
        due += 1 / asked
        at += 1 / done
    return due, at


def gauge(g: object) -> float:
    return g._value.get()  # type: ignore[attr-defined]


@pytest.fixture
def notifier() -> StatusLines:
    return StatusLines()


def test_a_replica_on_time_says_nothing(notifier: StatusLines) -> None:
    watch = LagWatch(notifier, lambda: INTERVAL)
    with capture_logs() as logs:
        run(watch, 600, asked=100, done=100, start=(0, 0.2))
    assert not watch.falling_behind
    assert logs == []
    assert notifier.lines == []
    assert watch.last is not None
    assert watch.last.p99 == pytest.approx(0.2, abs=0.01)


def test_falling_behind_is_a_warning_with_the_numbers_and_the_knobs(notifier: StatusLines) -> None:
    watch = LagWatch(notifier, lambda: INTERVAL)
    with capture_logs() as logs:
        # 667 polls/s asked (10,000 jobs at 15 s), 400/s done: the lag grows ~0.4 s a second.
        position = run(watch, 120, asked=667, done=400, start=(0, 0))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    warning = warnings[0]
    assert warning["lag_p99_s"] > INTERVAL
    assert warning["polls_done_per_s"] == pytest.approx(400, rel=0.02)
    assert warning["polls_asked_per_s"] == pytest.approx(667, rel=0.02)
    assert "api.max_concurrency" in warning["hint"]
    assert "poll_interval" in warning["hint"]
    assert "replica" in warning["hint"]
    assert "batch_size" in warning["hint"]
    assert watch.falling_behind
    assert gauge(metrics.FALLING_BEHIND) == 1
    assert notifier.lines[-1].startswith("falling behind: lag p99")
    assert "400/s done" in notifier.lines[-1]

    # Still behind: the warning comes back at most every five minutes.
    with capture_logs() as logs:
        position = run(watch, 200, asked=667, done=400, start=position)
    assert [e for e in logs if e["log_level"] == "warning"] == []
    with capture_logs() as logs:
        position = run(watch, 120, asked=667, done=400, start=position)
    assert len([e for e in logs if e["log_level"] == "warning"]) == 1

    # Caught up (the schedule jumps to now: polls on time again): one line, the gauge back at 0.
    with capture_logs() as logs:
        run(watch, 30, asked=100, done=100, start=(position[1], position[1]))
    assert [e["event"] for e in logs] == ["polls are on time again"]
    assert not watch.falling_behind
    assert gauge(metrics.FALLING_BEHIND) == 0


def test_a_short_spike_above_the_interval_is_not_falling_behind(notifier: StatusLines) -> None:
    watch = LagWatch(notifier, lambda: INTERVAL)
    with capture_logs() as logs:
        position = run(watch, 30, asked=100, done=100, start=(0, 20))  # 20 s late for 30 s
        run(watch, 60, asked=100, done=100, start=(position[1], position[1]))
    assert [e for e in logs if e["log_level"] == "warning"] == []
    assert not watch.falling_behind


def test_the_threshold_follows_the_current_poll_interval(notifier: StatusLines) -> None:
    interval = [15.0]
    watch = LagWatch(notifier, lambda: interval[0])
    interval[0] = 60.0  # reloaded: 20 s late is now within one interval
    with capture_logs() as logs:
        run(watch, 200, asked=100, done=100, start=(0, 20))
    assert [e for e in logs if e["log_level"] == "warning"] == []


class Leader:
    """The elector as the summary sees it: this replica leads."""

    is_leader = True

    def notice(self) -> bool:
        return True


class Counts:
    """The store as the summary sees it: three jobs being watched."""

    is_sqlite = True

    async def count_by_state(self) -> dict[str, int]:
        return {"watching": 3}

    async def count_blind(self) -> dict[str, int]:
        return {}


async def test_status_carries_the_summary_and_the_lag_note_whichever_changed_last(notifier: StatusLines) -> None:
    watch = LagWatch(notifier, lambda: INTERVAL)
    chores = Housekeeping(
        lambda: None,  # type: ignore[arg-type,return-value]  # the summary reads no config
        Counts(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # no enforcer: the summary enforces nothing
        Leader(),  # type: ignore[arg-type]
        notifier,
        lambda: T0,
        asyncio.Event(),
        inflight=lambda: 1,
        spawn=lambda body, name: None,
        lag_note=lambda: watch.note,
    )
    watch.beside(lambda: chores.summary)
    summary = "supervising 3 active job(s); 1 in flight (leader)"
    await chores.refresh_summary()
    assert notifier.lines[-1] == summary

    position = run(watch, 120, asked=667, done=400, start=(0, 0))  # the lag watch's turn
    assert notifier.lines[-1].startswith(f"{summary}; falling behind: lag p99")
    await chores.refresh_summary()  # the summary's turn: the note stays
    assert notifier.lines[-1].startswith(f"{summary}; falling behind: lag p99")
    assert "400/s done" in notifier.lines[-1]

    run(watch, 30, asked=100, done=100, start=(position[1], position[1]))  # on time again
    assert notifier.lines[-1] == f"{summary}; polls on time again"
    await chores.refresh_summary()
    assert notifier.lines[-1] == summary
