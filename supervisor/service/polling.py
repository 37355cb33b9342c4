"""A job's status from the API, or the record of why there is none; and when a job is looked
at next.

A failed poll is retried at growing gaps, up to the poll interval. A 404 or 403 counts
towards `lost`, which is earned: that many misses in a row, the 404s spread over a few poll
intervals, so a blip of a proxy loses no job; and never while every request 404s, the
credits endpoint too (a wrong base_url path: `api_misconfigured`, which /readyz reports).
A rejected API key stops polling for a while (the client itself backs off its requests).
An answer whose spend cannot be read (no status, not JSON, a 403) also counts towards `blind`
(core.transitions.unreadable_answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters.clado import (
    ApiKeyRejected,
    CladoClient,
    CladoError,
    CreditsUnavailable,
    JobNotFound,
    JobStatus,
    NoStatus,
    RequestRejected,
    UnreadableBody,
)
from supervisor.config import Config, SupervisorConfig
from supervisor.core import transitions
from supervisor.core.backoff import delay
from supervisor.core.job import Job
from supervisor.core.states import State
from supervisor.core.transitions import Change
from supervisor.service.effects import Effects

log = structlog.get_logger("supervisor.handler")

# While the API is unreachable a job is retried at growing gaps, up to its poll interval.
_ERROR_BACKOFF_FIRST = 1.0
_ERROR_BACKOFF_CAP = 60.0
# While the API key is rejected nobody polls; jobs are looked at again after this.
AUTH_RETRY = timedelta(seconds=30)
# `lost` is earned: this many 404s (or 403s) in a row, the 404s spread over at least this
# many poll intervals (30 s at the default 15 s), so a blip of a proxy loses no job.
_MISS_POLLS = 3
_NOT_FOUND_GRACE_POLLS = 2
# A completed or lost job is looked at this often (in poll intervals) within the reopen window.
_RECHECK_POLLS = 4
# An unconfirmed job is polled until the API says final; one that stops answering is given
# up after this long without a running status.
_UNCONFIRMED_WATCH = timedelta(days=1)
# Distinct jobs whose status answered 404 with no status answered in between: enough to ask
# whether every request 404s (a wrong base_url path) before anything is marked lost.
_ALL_NOT_FOUND_JOBS = 3
# The same idea for answers whose spend cannot be read (no count, no status, 403, not
# parseable): this many distinct jobs in a row, none readable in between, is api_drift. More
# than for 404s, since a few jobs of one odd shape must not sound the whole-API alarm.
_DRIFT_JOBS = 10


# -- when a job is looked at next -------------------------------------------------------


def error_backoff(attempt: int) -> timedelta:
    """The gap after the `attempt`-th failure in a row to reach the API for a job."""
    return timedelta(seconds=delay(attempt, _ERROR_BACKOFF_FIRST, _ERROR_BACKOFF_CAP))


def recheck_window(settings: SupervisorConfig, now: datetime) -> dict[str, Any]:
    """How a job that completed or was lost now is looked at again: for the reopen window."""
    window = settings.reopen_window
    if not window:
        return {}
    return {"recheck_until": now + window, "next_check_at": now + settings.poll_interval}


def next_recheck(settings: SupervisorConfig, job: Job, now: datetime) -> dict[str, Any]:
    """The next look at a completed or lost job, or none once its window is over."""
    until = job.recheck_until
    if until is None or now >= until:
        return {"recheck_until": None}
    return {"next_check_at": min(now + settings.poll_interval * _RECHECK_POLLS, until)}


def unconfirmed_watch(settings: SupervisorConfig, now: datetime) -> dict[str, Any]:
    """How a job whose cancel could not be confirmed is polled: until final, for a day."""
    return {"recheck_until": now + _UNCONFIRMED_WATCH, "next_check_at": now + settings.poll_interval}


# -- the poll ---------------------------------------------------------------------------


class Turns:
    """The status requests' slots (as many as the client's: api.max_concurrency), granted
    in (priority, due time) order rather than first come: with a backlog of claimed jobs
    waiting for the client, a poll that enforces something goes before the probes and
    routine re-polls claimed ahead of it. Only the request holds a slot, not the write after
    it, so a slow commit does not idle the client."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[int, float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def turn(self, priority: int, due: float) -> AsyncIterator[None]:
        await self._acquire(priority, due)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int, due: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, due, next(self._order), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release()  # granted as it was cancelled: pass the slot on
            raise  # a waiter cancelled unserved stays in the heap, skipped when popped

    def _release(self) -> None:
        while self._waiting:
            granted = heapq.heappop(self._waiting)[3]
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1


@dataclass
class Poller:
    """The handler's poll (built by JobHandler with the handler's own tools)."""

    _config: Callable[[], Config]
    _client: CladoClient
    _clock: Callable[[], datetime]
    _effects: Effects
    # Jobs whose status answered 404 since the last status that answered at all.
    _not_found_streak: set[str] = field(default_factory=set)
    # Every request 404s, the credits endpoint too: the base_url is wrong, so no job is
    # lost for it.
    api_misconfigured: bool = False
    # Jobs whose answer was unreadable since the last readable one; api_drift once enough.
    _unreadable_streak: set[str] = field(default_factory=set)
    api_drift: bool = False
    # The daemon's (runtime.py): status requests in priority order. None: first come.
    turns: Turns | None = None

    async def status(self, job: Job) -> JobStatus | Change:
        """The job's status, or the Change (not written yet: the handler adds what can still
        be enforced without a status) that records why it could not be had."""
        # While the whole API drifts no alternative count is asked for, nor an unreadable
        # answer retried: the drift must not raise the request rate.
        recover = transitions.recovery_due(job) and not self.api_drift
        try:
            if self.turns is None:
                status = await self._client.status(job.job_id, recover=recover, retry_unreadable=not self.api_drift)
            else:
                async with self.turns.turn(job.check_priority, job.next_check_at.timestamp()):
                    status = await self._client.status(job.job_id, recover=recover, retry_unreadable=not self.api_drift)
        except JobNotFound as exc:
            return await self._missed(job, transitions.NOT_FOUND, f"HTTP 404: {exc}")
        except RequestRejected as exc:
            if exc.status_code == 403:
                self._unreadable(job)
                return await self._missed(job, transitions.FORBIDDEN, str(exc))
            return self._failed(job, exc)
        except ApiKeyRejected as exc:
            now = self._clock()
            return Change.of(job).set({"last_error": str(exc), "next_check_at": now + AUTH_RETRY, "updated_at": now})
        except CladoError as exc:
            return self._failed(job, exc)
        self._not_found_streak.clear()
        if self.api_misconfigured:
            self.api_misconfigured = False
            self._effects.api_misconfigured(False, job_id=job.job_id)
        if status.count_source is None:
            self._unreadable(job)
        else:
            self._unreadable_streak.clear()
            if self.api_drift:
                self.api_drift = False
                self._effects.api_drift(False, job_id=job.job_id)
        return status

    def _unreadable(self, job: Job) -> None:
        """One more job whose answer could not be read: api_drift once enough in a row."""
        self._unreadable_streak.add(job.job_id)
        if len(self._unreadable_streak) >= _DRIFT_JOBS and not self.api_drift:
            self.api_drift = True
            # Named after the job whose answer tipped it, as api_misconfigured is.
            self._effects.api_drift(True, job_id=job.job_id, jobs=len(self._unreadable_streak), at=self._clock())

    async def check_api_path(self, job: Job) -> bool:
        """Whether every request answers 404 (the credits endpoint too): a wrong base_url path,
        not lost jobs. Said once when it begins; any status answered ends it (`status`)."""
        try:
            await self._client.account()
        except CreditsUnavailable:
            misconfigured = True
        except CladoError:
            return self.api_misconfigured  # cannot tell now: keep what was known
        else:
            misconfigured = False
            self._not_found_streak.clear()
        if misconfigured and not self.api_misconfigured:
            self._effects.api_misconfigured(True, job_id=job.job_id)
        self.api_misconfigured = misconfigured
        return misconfigured

    def _failed(self, job: Job, exc: CladoError) -> Change:
        now = self._clock()
        settings = self._config().supervisor
        errors = job.poll_errors + 1
        unreadable = isinstance(exc, UnreadableBody)
        # An unreadable answer was already retried by the client and does not get better in
        # a second: looked at again at the regular poll (a drift must not raise the rate).
        retry = settings.poll_interval if unreadable else min(error_backoff(errors), settings.poll_interval)
        if job.state is State.CONFIRMING:
            retry = min(retry, settings.confirm_interval)
        log.warning(
            "status poll failed", job_id=job.job_id, state=job.state.value,
            error=str(exc), errors=errors, retry_in=retry.total_seconds(),
        )  # fmt: skip
        values = {"poll_errors": errors, "last_error": str(exc), "next_check_at": now + retry, "updated_at": now}
        events = [transitions.Event("poll_error", now, detail={"error": str(exc)})] if errors == 1 else []
        change = Change.of(job).set(values, *events)
        if unreadable:
            # Not a zero: the job keeps its last credits, and someone is told the API changed.
            self._unreadable(job)
            change = transitions.alert_once(change, transitions.UNREADABLE_BODY, {"error": str(exc)}, now)
            why = transitions.NO_STATUS if isinstance(exc, NoStatus) else transitions.UNPARSEABLE
            change = transitions.unreadable_answer(
                change, why, {"error": str(exc)}, now, drifting=self._effects.drifting
            )
        return change

    async def _missed(self, job: Job, kind: str, error: str) -> Change:
        """A 404 or 403 on status: counted; the job is lost once that is earned, never while
        every request 404s (a wrong base_url)."""
        settings = self._config().supervisor
        if kind == transitions.NOT_FOUND:
            self._not_found_streak.add(job.job_id)
            if len(self._not_found_streak) >= _ALL_NOT_FOUND_JOBS and not self.api_misconfigured:
                await self.check_api_path(job)
        now = self._clock()
        if kind == transitions.NOT_FOUND and self.api_misconfigured:
            # Not the job's fault: nothing counts towards its loss while the API path is wrong.
            return Change.of(job).set(
                {"last_error": error, "next_check_at": now + settings.poll_interval, "updated_at": now}
            )
        change = transitions.missed(Change.of(job), kind, error, now, now + settings.poll_interval)
        if kind == transitions.FORBIDDEN:
            # A 403 hides the spend, not the job: it counts towards `blind` as well as `lost`.
            change = transitions.unreadable_answer(
                change, transitions.FORBIDDEN, {"error": error}, now, drifting=self._effects.drifting
            )
        if job.state in (State.COMPLETED, State.LOST):
            # Already over: looked at again within its window, in case it comes back.
            return change.set(next_recheck(settings, job, now))
        grace = settings.poll_interval * _NOT_FOUND_GRACE_POLLS if kind == transitions.NOT_FOUND else timedelta(0)
        if not transitions.loss_earned(change.after, now, polls=_MISS_POLLS, grace=grace):
            return change
        if kind == transitions.NOT_FOUND and await self.check_api_path(job):
            return change.set({"next_check_at": now + settings.poll_interval})
        facts = change.after
        since = facts.miss_since.isoformat() if facts.miss_since else None
        detail = {"lost": kind, "status": error, "polls": facts.miss_count, "since": since}
        return transitions.lose(change, detail, now, **recheck_window(settings, now))
