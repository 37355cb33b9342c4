"""The scheduler: submissions that wait their turn, and the one way any submission is started.

A submission's intent is a row (adapters/store.py, `submissions`) committed BEFORE the
initiate call, because the API has no idempotency key: a call whose answer is lost started a
job nobody can find again. So every start goes through `Initiator.start` — `submit` in the
CLI or the admin API, and the daemon's drain alike — and every outcome is recorded:
- a job id: the job row is inserted and the submission `started`, in one transaction;
- a failure that surely started nothing: the reservation is given back (`queued` again when
  it came from the queue, else `failed`);
- a failure after the request may have reached the API (`CladoError.maybe_sent`), or a
  process that died while `initiating` (found by `Scheduler.sweep`): `orphaned`, never sent
  again; its reservation is kept for ORPHAN_HOLD, and the daemon sends the `orphaned` alert.

The drain (`Scheduler.drain`, on every replica) starts queued submissions in order —
priority, then first come first served within a budget — as soon as they fit, at most
`api.initiate_per_minute` initiates in any minute across all replicas and submitters
(counted from the submissions table), later still while the API's 429 `retry_after` holds
the client off. Choosing a submission and taking its reservation is one serialized
transaction, so two replicas never start the same submission nor overfill a budget.

The pure rules (which submission fits now, and why the others wait) are core/queueing.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters import failpoints, metrics
from supervisor.adapters.clado import ApiUnavailable, CladoClient, CladoError, OutOfCredits, RateLimited
from supervisor.adapters.store import NewJob, Store, db_error_text
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config
from supervisor.core.notify import Notice
from supervisor.core.queueing import (
    EXPIRED,
    FAILED,
    ORPHANED,
    QUEUED,
    RATE_WINDOW,
    Forecasts,
    SubmissionPlan,
    period_starts,
    plan,
)
from supervisor.core.queueing import STATES as STATES  # re-exported: app/http.py imports them from here
from supervisor.service.forecasting import Forecaster, admission_forecasts
from supervisor.service.guards import Backoff

log = structlog.get_logger("supervisor.queue")

# States announced by a webhook event of the same name, once each (the daemon sends them).
ANNOUNCED = (QUEUED, ORPHANED, EXPIRED)

# An orphan's reservation is kept this long: its job, if one started, may be billing unseen
# (the API caps it at the limit it was asked for, which is what is reserved).
ORPHAN_HOLD = timedelta(days=1)
# How long a reservation taken for an initiate in flight lasts at least; a process that dies
# meanwhile leaves it to the orphan sweep, which extends it to ORPHAN_HOLD.
INITIATE_HOLD = timedelta(minutes=10)
# Beyond what the client may spend on one initiate (retries of requests that surely never
# left, each up to the timeout and a backoff of at most 5 s), before an `initiating`
# submission whose process may still be alive (elsewhere) is called orphaned.
_BACKOFF_MAX = timedelta(seconds=5)
_GRACE_MARGIN = timedelta(seconds=10)


def orphan_grace(config: Config) -> timedelta:
    """The longest an initiate can take in this config: past it, nobody is still waiting."""
    api = config.api
    return api.initiate_wait + (api.max_retries + 1) * (api.timeout + _BACKOFF_MAX) + _GRACE_MARGIN


# -- starting a submission ---------------------------------------------------------------------


class Initiator:
    """The one place an initiate is sent: for a submission already `initiating` (its intent
    and its reservation committed), send it and record whatever comes of it."""

    def __init__(self, config: Callable[[], Config], store: Store, client: CladoClient, clock: Callable[[], datetime]):
        self._config = config
        self._store = store
        self._client = client
        self._clock = clock

    async def start(self, row: Mapping[str, Any], *, requeue: bool) -> str:
        """The job id, once its row is recorded. On a failure that surely started nothing, the
        submission is `queued` again (`requeue`, the drain) or `failed`; on one that may have
        started a job, `orphaned`. Either way the error is raised."""
        submission_id = row["id"]
        try:
            job_id = await self._client.initiate(row["query"], int(row["granted_limit"]))
        except CladoError as exc:
            await self._failed(submission_id, exc, requeue=requeue)
            raise
        # The test hook for a process killed with the job started but not recorded.
        failpoints.hit(failpoints.AFTER_INITIATE)
        new_job = NewJob(
            job_id,
            row["policy"],
            dict(row["labels"]),
            source="submit",
            query=row["query"],
            result_limit=int(row["granted_limit"]),
            requested_limit=int(row["requested_limit"]),
            reserved_credits=None if row["admission_id"] is None else self._reserved(row),
        )
        try:
            await self._store.add_jobs(
                [new_job], self._clock(), admission_id=row["admission_id"], submission_id=submission_id
            )
        except Exception as exc:
            # The job runs and is not supervised: say its id, so a person can `track` it. The
            # submission stays `initiating`; the sweep makes it an orphan (and alerts).
            log.error("job started but not recorded: track it by hand", job_id=job_id,
                      submission_id=submission_id, error=db_error_text(exc))  # fmt: skip
            raise
        return job_id

    def _reserved(self, row: Mapping[str, Any]) -> int:
        return int(row["granted_limit"]) * self._config().api.credits_per_result

    async def _failed(self, submission_id: str, exc: CladoError, *, requeue: bool) -> None:
        now = self._clock()
        if exc.maybe_sent:
            log.error(
                "initiate failed after it may have reached the API: the submission is orphaned, never sent again",
                submission_id=submission_id, error=str(exc),
            )  # fmt: skip
            await self._store.submission_failed(
                submission_id, ORPHANED, now, reason="initiate_outcome_unknown", error=str(exc),
                hold_until=now + ORPHAN_HOLD,
            )  # fmt: skip
            return
        # Nothing was started: a wait can fix throttling, an outage or an empty account.
        again = requeue and isinstance(exc, ApiUnavailable | OutOfCredits)
        reason = "initiate_rate" if isinstance(exc, RateLimited) else type(exc).__name__
        await self._store.submission_failed(
            submission_id, QUEUED if again else FAILED, now, reason=reason, error=str(exc)
        )


def process_died(owner: str | None) -> bool:
    """Whether the process named by a store owner (`host:pid:…`) is gone. Only a process on
    this host can be checked; any other is assumed alive (the grace period covers it)."""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Scheduler:
    """The daemon's side of the queue: the drain, the orphan sweep, expiry, the webhooks."""

    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        client: CladoClient,
        webhooks: Webhooks | None,
        clock: Callable[[], datetime],
        stopping: asyncio.Event,
    ) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._webhooks = webhooks
        self._clock = clock
        self._stopping = stopping
        self.initiator = Initiator(config, store, client, clock)
        self._forecaster = Forecaster(store)
        self._held_until: datetime | None = None  # a 429's retry_after, as the drain saw it
        self._drain_backoff = Backoff("queue drain", first=1.0, cap=30.0)
        self._sweep_backoff = Backoff("queue sweep", first=1.0, cap=30.0)

    async def drain(self) -> None:
        """Expire what waited too long, then start queued submissions while they fit (at
        most a minute's worth of initiates per run)."""
        if self._stopping.is_set() or not self._drain_backoff.ready():
            return
        try:
            await self._drain()
        except Exception as exc:  # noqa: BLE001 - a recurring service: back off, log sparsely, carry on
            self._drain_backoff.failed(exc)
        else:
            self._drain_backoff.succeeded()

    async def _drain(self) -> None:
        config = self._config()
        await self._store.expire_submissions(self._clock())
        queued = await self._store.list_submissions([QUEUED])
        metrics.QUEUE_DEPTH.set(len(queued))
        if not queued:
            return
        account_credits = await self._account_credits(config)
        for _ in range(config.api.initiate_per_minute):
            if self._stopping.is_set():
                return
            now = self._clock()
            # Read again after each start: the job just started counts in the next forecast.
            forecasts = await admission_forecasts(self._forecaster, config, now)
            decide = functools.partial(
                _decide, config, now=now, account_credits=account_credits, held_until=self._hold(now),
                forecasts=forecasts,
            )  # fmt: skip
            chosen = await self._store.take_submission(
                now, period_starts(config, now), now - RATE_WINDOW, decide, ttl=INITIATE_HOLD
            )
            if chosen is None:
                return
            metrics.QUEUE_WAIT.observe(max(0.0, (now - chosen["created_at"]).total_seconds()))
            try:
                job_id = await self.initiator.start(chosen, requeue=True)
            except RateLimited as exc:
                self._held_until = self._clock() + timedelta(seconds=exc.retry_in)
                log.warning("initiate rate limited: the queue waits", retry_in=exc.retry_in)
                return
            except CladoError as exc:
                log.warning("queued submission not started", submission_id=chosen["id"], error=str(exc))
                continue
            waited = round((now - chosen["created_at"]).total_seconds(), 3)
            log.info("queued submission started", submission_id=chosen["id"], job_id=job_id, waited_s=waited)

    def _hold(self, now: datetime) -> datetime | None:
        """Until when the API asked to be left alone: the 429 the drain saw, or the client's
        own hold-off (a 429 any call of this client got)."""
        held = self._client.held_off_for
        client_hold = now + timedelta(seconds=held) if held > 0 else None
        return max((at for at in (self._held_until, client_hold) if at is not None), default=None)

    async def _account_credits(self, config: Config) -> int | None:
        if config.account is None or config.account.action == "observe":
            return None
        try:
            return await self._client.credits()
        except CladoError as exc:
            log.warning("account credits unreadable: queued submissions wait", error=str(exc))
            return 0  # unknown: nothing fits under a floor until the account can be read

    async def sweep(self) -> None:
        """`initiating` submissions whose process died (or that outlived any initiate) become
        orphans; then each queued, orphaned and expired submission is announced once."""
        if self._stopping.is_set() or not self._sweep_backoff.ready():
            return
        try:
            config = self._config()
            now = self._clock()
            for row in await self._store.orphan_submissions(
                now, now - orphan_grace(config), process_died, now + ORPHAN_HOLD
            ):
                log.error("submission orphaned: its initiate may have started a job whose id was never recorded",
                          submission_id=row["id"], reason=row["reason"])  # fmt: skip
            await self._announce(config)
        except Exception as exc:  # noqa: BLE001 - a recurring service: back off, log sparsely, carry on
            self._sweep_backoff.failed(exc)
        else:
            self._sweep_backoff.succeeded()

    async def _announce(self, config: Config) -> None:
        for row in await self._store.unannounced_submissions(ANNOUNCED):
            credits = (row["granted_limit"] or row["requested_limit"]) * config.api.credits_per_result
            fields = {
                "submission_id": row["id"], "state": row["state"], "reason": row["reason"], "policy": row["policy"],
                "labels": row["labels"], "credits": credits,
                "detail": {"limit": row["granted_limit"] or row["requested_limit"], "error": row["error"],
                           "priority": row["priority"]},
            }  # fmt: skip
            now = self._clock()
            notice = Notice(row["state"], now, f"submission:{row['id']}", fields)
            # Its webhook events' outbox rows with the announcement, once (another replica
            # may have announced it).
            if await self._store.mark_announced(row["id"], row["state"], [notice], now) and self._webhooks is not None:
                self._webhooks.wake()


def _decide(
    config: Config,
    candidates: list[dict[str, Any]],
    usage: Any,
    initiates: list[datetime],
    *,
    now: datetime,
    account_credits: int | None,
    held_until: datetime | None,
    forecasts: Forecasts | None,
) -> SubmissionPlan:
    return plan(
        config, candidates, usage, initiates, now, account_credits=account_credits, held_until=held_until,
        forecasts=forecasts,
    )  # fmt: skip
