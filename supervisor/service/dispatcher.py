"""Claim the jobs that are due and run each through the JobHandler.

Each tick claims, in one query, the jobs due before the next tick (up to the free
capacity: a limit that adapts so that a claimed job is handled well within its lease) and
starts a task per job that waits for the job's own due time, so a deadline is acted on
within milliseconds rather than a tick. The tick itself only claims and dispatches: it is
short, bounded by a timeout, and catches its own errors. Claims are exclusive across
replicas and leases fence every write, so every replica ticks.

Claims are continuous, not one batch a tick: the limit counts the jobs being handled (due,
their poll started), not those claimed ahead and still waiting for their due time; and when
a claim came back full (more was due than it took), a claim is made again as soon as a
quarter of the limit is free, rather than at the next tick. So a replica with a backlog is
bounded by how fast it handles jobs (its CPU, the API), not by `batch_size` per tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.clado import CladoClient
from supervisor.adapters.store import Store, database_unavailable, db_error_text
from supervisor.adapters.systemd import Notifier
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config
from supervisor.core.job import CHECK_ENFORCE, Job
from supervisor.service.executor import JobHandler
from supervisor.service.guards import Backoff, db_timeout
from supervisor.service.lag import LagWatch
from supervisor.service.leases import LEASE_USE, InFlight

log = structlog.get_logger("supervisor.daemon")

# Cap of the claim's exponential backoff after consecutive database failures.
CLAIM_BACKOFF_CAP = 5.0
# With a backlog (the last claim came back full), claim again once this share of the limit
# is free: often enough that handlers never run dry, rarely enough that a claim (one
# transaction) is not made for every job that finishes.
REFILL_AT = 0.25


class Dispatcher:
    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        client: CladoClient,
        handler: JobHandler,
        webhooks: Webhooks,
        notifier: Notifier,
        clock: Callable[[], datetime],
        stopping: asyncio.Event,
        ticked: Callable[[], None],
        claim_soon: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._handler = handler
        self._webhooks = webhooks
        self.notifier = notifier
        self._clock = clock
        self._stopping = stopping
        self._ticked = ticked  # after every tick that claimed: the runtime's periodic work
        self._claim_soon = claim_soon  # runs a tick now, outside the schedule (the runtime's)
        self.inflight: dict[str, InFlight] = {}
        # Of those in flight, the jobs being handled (past their due time): what the limit counts.
        self.handling = 0
        self.enforcing = 0  # of those, the ones whose check enforces something
        self._claiming = False  # one claim at a time: the capacity is reckoned before it
        self._claim_again = False  # a claim was asked for while one ran
        self.last_tick_at: datetime | None = None
        self.ticks = 0
        self.lag = LagWatch(notifier, lambda: config().supervisor.poll_interval.total_seconds())
        self._key_rejected = False
        settings = config()
        tick = settings.supervisor.tick_interval.total_seconds()
        self._backoff = Backoff("claim", first=tick, cap=max(tick, CLAIM_BACKOFF_CAP))
        # Claim only what can be handled within a lease: the limit adapts so that handling
        # a job (its API calls and its commit, queueing included) takes about half of the
        # time a lease allows. Without it, a replica that claims a burst (a restart, the end
        # of an outage, several replicas' worth of jobs) would time out on most of them and
        # their leases would bounce between replicas.
        # The floor is the client's concurrency, fixed when the client was made ([api] needs a restart).
        self._claim_floor = settings.api.max_concurrency
        self.claim_limit = min(settings.supervisor.batch_size, self._claim_floor * 4)
        self._handling_s: float | None = None  # moving average of handling times
        self._last_claim_full = False  # the limit, not the due jobs, bounded the last claim
        self._refill_asked = False  # a claim_soon is on its way
        metrics.CLAIM_LIMIT.set(self.claim_limit)

    async def tick(self) -> int:
        """Claim the jobs due before the next tick and start a task for each."""
        self._refill_asked = False
        if self._stopping.is_set():
            return 0
        if self._claiming:
            # Asked for while a claim runs (a budget's polls brought forward, a refill): the
            # running claim may have read the rows before they moved, so claim once more
            # right after it, rather than at the next tick.
            self._claim_again = True
            return 0
        self._claiming = True
        claimed = 0
        try:
            while True:
                self._claim_again = False
                claimed += await self._tick()
                if not self._claim_again or self._stopping.is_set():
                    return claimed
        finally:
            self._claiming = False

    async def _tick(self) -> int:
        # The loop is alive, whatever happens to the claim: a database outage or a rejected
        # key must not get the process killed by systemd's watchdog.
        self.notifier.watchdog()
        if self._client.api_key_rejected:
            if not self._key_rejected:
                self._key_rejected = True
                self._webhooks.emit("api_key_rejected")
            return 0  # backing off: the client logged it once
        self._key_rejected = False
        started = time.perf_counter()
        settings = self._config().supervisor
        self._adapt_claim_limit()
        capacity = self._capacity()
        # At the claim limit the tick claims only enforcing checks (up to the limit of those
        # being handled): the rest wait in the database, where another replica may take them.
        enforcing_only = capacity <= 0
        if enforcing_only:
            if self.handling >= settings.batch_size:
                log.warning("tick skipped: all handler slots busy", inflight=len(self.inflight), handling=self.handling)
            capacity = min(settings.batch_size, self.claim_limit) - self.enforcing
        jobs: list[Job] = []
        if capacity > 0:
            if not self._backoff.ready():
                return 0  # the database failed lately: wait out the backoff
            claimed_at = asyncio.get_running_loop().time()
            try:
                async with db_timeout(self._store, max(5.0, settings.tick_interval.total_seconds() * 5)):
                    jobs = await self._store.claim_due(
                        self._clock(), horizon=settings.tick_interval, limit=capacity, lease_ttl=settings.lease_ttl,
                        priority_at_most=CHECK_ENFORCE if enforcing_only else None,
                    )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a failed claim backs off; the tick must not die
                self._backoff.failed(exc)
                self.notifier.status(f"database unavailable; retrying ({db_error_text(exc)})")
                return 0
            self._backoff.succeeded()
            self._last_claim_full = len(jobs) >= capacity and not enforcing_only
            deadline = claimed_at + settings.lease_ttl.total_seconds() * LEASE_USE
            for job in jobs:
                task = asyncio.create_task(self._run_job(job), name=f"job-{job.job_id}")
                # A claimed job always holds the lease it was claimed under.
                self.inflight[job.job_id] = InFlight(task, job.lease_token or "", claimed_at, deadline)
        self.last_tick_at = self._clock()
        self.ticks += 1
        metrics.TICK_DURATION.observe(time.perf_counter() - started)
        metrics.TICK_JOBS.observe(len(jobs))
        metrics.LAST_TICK.set(self.last_tick_at.timestamp())
        self._ticked()
        return len(jobs)

    @property
    def api_misconfigured(self) -> bool:
        """Every request answers 404, the credits endpoint too (a wrong `api.base_url` path):
        no job is marked lost meanwhile; /readyz reports not ready."""
        return self._handler.api_misconfigured

    @property
    def api_drift(self) -> bool:
        """Job after job's status answer is unreadable (api_drift): /readyz reports not ready."""
        return self._handler.api_drift

    def set_phase(self, job_id: str, phase: str) -> None:
        """The handler's report of where a job's handling is (a started cancel is let
        finish on shutdown)."""
        item = self.inflight.get(job_id)
        if item is not None:
            item.phase = phase

    async def _run_job(self, job: Job) -> None:
        job_id = job.job_id
        item = self.inflight[job_id]  # registered by the tick before this task first runs
        started: float | None = None
        enforcing = False
        try:
            # Bounded so that the lease cannot expire under a job still being handled (see
            # leases.py: the keeper moves this deadline on when it extends the lease).
            async with asyncio.timeout_at(item.deadline) as scope:
                item.scope = scope
                step: Job | None = job
                while step is not None:
                    # The job's due time; a check due before the next tick is made here again
                    # under the same lease (the handler returns the job).
                    delay = (step.next_check_at - self._clock()).total_seconds()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if started is None:
                        self.lag.observe(step.next_check_at, self._clock())
                        self.set_phase(job_id, "poll")
                        started = time.monotonic()
                        self.handling += 1
                        enforcing = step.check_priority == CHECK_ENFORCE
                        self.enforcing += enforcing
                    at = time.monotonic()
                    step = await self._handler.handle(step)
                    self._observe_handling(time.monotonic() - at)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            if started is not None:
                self._observe_handling(max(self._handling_budget(), time.monotonic() - started))
            log.warning("job handling timed out; its lease will expire and it is retried", job_id=job_id)
        except Exception as exc:
            if database_unavailable(exc):
                # The writer logged the failed batch once; nothing was sent after it.
                log.debug(
                    "job not recorded: database unavailable; retried once its lease expires",
                    job_id=job_id,
                    error=db_error_text(exc),
                )
            else:
                log.exception("job handling failed; its lease will expire and it is retried", job_id=job_id)
        finally:
            if started is not None:
                self.handling -= 1
                self.enforcing -= enforcing
            if self.inflight.get(job_id) is item:
                del self.inflight[job_id]
            self._refill()

    def _capacity(self) -> int:
        """How many jobs a claim may take now: what the limit leaves of the jobs being
        handled, at most `batch_size` (the operator's bound on one claim and on handling)."""
        return min(self._config().supervisor.batch_size, self.claim_limit) - self.handling

    def _refill(self) -> None:
        """Claim again at once when the last claim left jobs due behind and enough of the
        limit is free (REFILL_AT): a backlog drains at the speed of the handling."""
        if not self._last_claim_full or self._refill_asked or self._claiming or self._stopping.is_set():
            return
        if self._capacity() >= max(1, int(min(self._config().supervisor.batch_size, self.claim_limit) * REFILL_AT)):
            self._refill_asked = True
            self._claim_soon()

    def _handling_budget(self) -> float:
        """How long one job's handling may take: its lease, less a tick (it was claimed up
        to a tick before it was due), with a margin."""
        settings = self._config().supervisor
        budget = settings.lease_ttl - settings.tick_interval
        return max(timedelta(seconds=1), budget * 0.8).total_seconds()

    def _observe_handling(self, seconds: float) -> None:
        previous = self._handling_s
        self._handling_s = seconds if previous is None else previous + 0.05 * (seconds - previous)

    def _adapt_claim_limit(self) -> None:
        """Decrease (x0.8 a tick) while handling takes over half its budget; double while it
        takes under a quarter and the limit is what holds claims back (the last claim came
        back full, or most of the limit is still in flight)."""
        if self._handling_s is None:
            return
        target = self._handling_budget() / 2
        limit = self.claim_limit
        bound = self._last_claim_full or self.handling >= limit * 0.8
        if self._handling_s > target:
            limit = max(self._claim_floor, int(limit * 0.8))
        elif self._handling_s < target / 2 and bound:
            limit = min(self._config().supervisor.batch_size, limit * 2)
        if limit != self.claim_limit:
            self.claim_limit = limit
            metrics.CLAIM_LIMIT.set(limit)
