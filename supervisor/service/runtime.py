"""The daemon: APScheduler ticks that claim due jobs and hand each to a JobHandler.

Each tick claims, in one query, the jobs due before the next tick (up to the free
capacity: a limit that adapts so that a claimed job is handled well within its lease) and
starts a task per job that waits for the job's own due time, so a deadline
is acted on within milliseconds rather than a tick. The tick itself only claims and
dispatches: it is short, bounded by a timeout, and catches its own errors.

APScheduler runs with the memory job store (never shared between processes: replicas
coordinate through the jobs table), coalesce=True and max_instances=1.

Replicas: every replica ticks (claims are exclusive, leases fence every write); one of
them, the holder of the `leaders` row, also runs the singleton chores — budget sweeps, the
account floor, retention and the jobs-by-state gauges. A database outage is survived: the
claim, the chores and the leader renewal back off exponentially and log sparsely, a
handler whose write fails has sent nothing, and its job is claimed again once its lease
has expired.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import structlog
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from supervisor.adapters import metrics
from supervisor.core.budgets import period_start
from supervisor.adapters.clado import CladoClient
from supervisor.config import Config, ConfigError, load_config
from supervisor.service.chores import Enforcer
from supervisor.service.executor import JobHandler
from supervisor.core.states import ACTIVE, State
from supervisor.adapters.webhooks import Webhooks
from supervisor.adapters.store import Store, database_unavailable, db_error_text, utcnow
from supervisor.core.job import Job
from supervisor.adapters.systemd import Notifier
from supervisor.adapters.writer import BatchWriter

log = structlog.get_logger("supervisor.daemon")

# The leader row's name: one leader for all singleton chores.
LEADER_ROLE = "chores"
# How often the leader prunes terminal jobs older than [supervisor] retention.
RETENTION_EVERY = 300.0
# A job whose handling outlives this is let time out even if its lease could be extended.
MAX_HANDLING = 120.0
# Handling stops this fraction of a lease after the lease was taken or last extended,
# leaving the rest for the final commit and the clocks' differences.
LEASE_USE = 0.8
# Caps of the exponential backoff after consecutive database failures.
CLAIM_BACKOFF_CAP = 5.0
CHORE_BACKOFF_CAP = 30.0

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

    def ready(self) -> bool:
        return time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.failures == 0:
            self._since = now
        self.failures += 1
        delay = min(self.cap, self.first * 2 ** min(self.failures - 1, 30))
        self._retry_at = now + delay
        metrics.TASK_FAILURES.labels(self.what).inc()
        if self.failures == 1 or now - self._logged_at >= self.log_every:
            self._logged_at = now
            unavailable = database_unavailable(exc)
            (log.error if self.failures == 1 else log.warning)(
                f"{self.what} failed; backing off" if self.failures == 1 else f"{self.what} still failing",
                error=db_error_text(exc) if unavailable else (str(exc) or type(exc).__name__),
                database_unavailable=unavailable,
                failures=self.failures,
                retry_in=round(delay, 3),
            )

    def succeeded(self) -> None:
        if self.failures:
            log.info(f"{self.what} recovered", failures=self.failures,
                     after_s=round(time.monotonic() - self._since, 3))
        self.failures = 0
        self._retry_at = 0.0


class Service(Protocol):
    """Something that runs beside the daemon (the admin API)."""

    def start(self) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...


@dataclass
class _InFlight:
    task: asyncio.Task[None]
    lease_token: str
    claimed_at: float  # loop time just before the claim (the lease started after it)
    deadline: float  # loop time by which handling stops: before the lease can expire
    phase: str = "wait"  # wait → poll → cancel (a started cancel is let finish on shutdown)
    scope: asyncio.Timeout | None = None  # the handling's timeout, moved on when the lease is


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        client: CladoClient,
        *,
        clock: Callable[[], datetime] = utcnow,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.client = client
        self.clock = clock
        self.config_path = config_path
        # A flush that hangs (a database gone silent) gives up within a lease (PostgreSQL;
        # SQLite's own busy timeout bounds its flushes, see _db_timeout).
        self.writer = BatchWriter(
            store, timeout=None if store.is_sqlite else max(5.0, config.supervisor.lease_ttl.total_seconds())
        )
        self.webhooks = Webhooks(config)
        self.enforcer = Enforcer(store, client, self.webhooks, clock)
        self.handler = JobHandler(config, client, self.writer.write, clock, self.webhooks)
        self.handler.on_phase(self._set_phase)
        self.inflight: dict[str, _InFlight] = {}
        self.last_tick_at: datetime | None = None
        self.ticks = 0
        self._stopping = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self.notifier = notifier or Notifier({})
        self._background: set[asyncio.Task[None]] = set()
        self._running: set[asyncio.Task[object]] = set()  # scheduler jobs running now
        self._summary_due = 0.0
        self._key_rejected = False
        tick = config.supervisor.tick_interval.total_seconds()
        self._claim_backoff = Backoff("claim", first=tick, cap=max(tick, CLAIM_BACKOFF_CAP))
        self._chore_backoff: dict[str, Backoff] = {}
        self._leader_backoff = Backoff(
            "leader renewal", first=1.0, cap=max(1.0, config.supervisor.leader_ttl.total_seconds() / 3)
        )
        self._leader_until = 0.0  # monotonic: leadership is ours until then without renewal
        self._keeper_backoff = Backoff("lease extension", first=1.0, cap=max(1.0, config.supervisor.lease_ttl.total_seconds() / 4))
        # Claim only what can be handled within a lease: the limit adapts so that handling
        # a job (its API calls and its commit, queueing included) takes about half of the
        # time a lease allows. Without it, a replica that claims a burst (a restart, the end
        # of an outage, several replicas' worth of jobs) would time out on most of them and
        # their leases would bounce between replicas.
        self._claim_floor = config.api.max_concurrency
        self.claim_limit = min(config.supervisor.batch_size, config.api.max_concurrency * 4)
        self._handling_s: float | None = None  # moving average of handling times
        self._last_claim_full = False  # the limit, not the due jobs, bounded the last claim
        metrics.CLAIM_LIMIT.set(self.claim_limit)
        self._was_leader = False
        self._warned_total_budget = False
        metrics.LEADER.set(0)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()
        self.webhooks.start()
        settings = self.config.supervisor
        tick = settings.tick_interval.total_seconds()
        self._scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": AsyncIOExecutor()},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": max(1, int(tick * 5)),
            },
            timezone="UTC",
        )
        self._scheduler.add_listener(self._on_scheduler_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        self._scheduler.add_job(
            self._scheduled(self.tick), "interval", seconds=tick, id="tick",
            next_run_time=datetime.now().astimezone(),
        )
        # Leases of jobs handled for long (slow API, a burst): extended every lease_ttl / 4.
        self._scheduler.add_job(
            self._scheduled(self._keep_leases), "interval", seconds=settings.lease_ttl.total_seconds() / 4, id="leases",
            misfire_grace_time=None,
        )
        # Leadership of the singleton chores: taken or renewed every leader_ttl / 3.
        # However late the loop runs it (no misfire skip): a skipped renewal costs leadership.
        self._scheduler.add_job(
            self._scheduled(self._elect), "interval", seconds=settings.leader_ttl.total_seconds() / 3, id="leader",
            next_run_time=datetime.now().astimezone(), misfire_grace_time=None,
        )
        # Aggregate rules (leader only): every second for budgets (usage moves with every
        # poll), the account floor at its own interval, retention every few minutes. All
        # catch their own errors.
        self._scheduler.add_job(self._chore(self._sweep_budgets), "interval", seconds=max(1.0, tick), id="budgets")
        if self.config.account is not None:
            self._scheduler.add_job(
                self._chore(self._check_account), "interval",
                seconds=self.config.account.check_interval.total_seconds(), id="account",
                next_run_time=datetime.now().astimezone(),
            )
        self._scheduler.add_job(self._chore(self._retention), "interval", seconds=RETENTION_EVERY, id="retention")
        self._scheduler.start()
        log.info(
            "supervisor started",
            poll_interval=settings.poll_interval.total_seconds(),
            tick_interval=tick,
            dry_run=settings.dry_run,
            config_hash=self.config.config_hash,
        )

    @property
    def scheduler_running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running and not self._stopping.is_set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Stop claiming, let started cancels finish (bounded), give back the other leases."""
        self._stopping.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        # Runs already started (a claim, a renewal, a chore) finish: each is short and bounded
        # (on SQLite by its busy timeout: a write cancelled there would keep its lock).
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=40 if self.store.is_sqlite else 5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for item in self.inflight.values():
            if item.phase != "cancel":
                item.task.cancel()
        cancelling = [item.task for item in self.inflight.values() if item.phase == "cancel"]
        if cancelling:
            log.info("finishing in-flight cancels", count=len(cancelling))
            _, late = await asyncio.wait(
                cancelling, timeout=self.config.supervisor.shutdown_timeout.total_seconds()
            )
            for task in late:
                task.cancel()
        leftovers = {job_id: item.lease_token for job_id, item in self.inflight.items()}
        await asyncio.gather(*(item.task for item in self.inflight.values()), return_exceptions=True)
        await self.writer.close()
        await self.webhooks.close()
        try:
            await self.store.release(leftovers)
        except Exception as exc:  # leases then simply expire
            log.warning("could not release leases", error=db_error_text(exc))
        await self._resign()
        log.info("supervisor stopped")

    def reload(self) -> None:
        """SIGHUP: adopt a valid new config for every job's next evaluation; keep the old one
        if the file is broken."""
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload failed; keeping the previous config", error=str(exc))
            return
        for section in ("database", "api", "notify", "http"):
            if getattr(new, section) != getattr(self.config, section):
                log.warning("config change needs a restart to take effect", section=section)
        for key in ("tick_interval", "lease_ttl", "leader_ttl"):  # the scheduler's intervals
            if getattr(new.supervisor, key) != getattr(self.config.supervisor, key):
                log.warning("config change needs a restart to take effect", key=f"supervisor.{key}")
        self.config = new
        self.handler.config = new
        log.info("config reloaded", config_hash=new.config_hash)

    async def run_until_signalled(self, services: Sequence[Service] = ()) -> None:
        """Start, tell systemd we are ready, serve until SIGTERM/SIGINT, stop in order:
        the services (the admin API stops accepting requests) first, then the daemon."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        started: list[Service] = []
        try:
            self.start()
            for service in services:
                await service.start()
                started.append(service)
            self.notifier.ready("supervising")
            await self.wait_stopped()
        finally:
            # Signals stay handled until the end: a second SIGTERM during shutdown must not
            # kill the process halfway through finishing its cancels.
            self._stopping.set()
            self.notifier.stopping()
            for service in reversed(started):
                await service.stop()
            await self.stop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    # -- the tick -------------------------------------------------------------------------

    async def tick(self) -> int:
        """Claim the jobs due before the next tick and start a task for each."""
        if self._stopping.is_set():
            return 0
        # The loop is alive, whatever happens to the claim: a database outage or a rejected
        # key must not get the process killed by systemd's watchdog.
        self.notifier.watchdog()
        if self.client.api_key_rejected:
            if not self._key_rejected:
                self._key_rejected = True
                self.webhooks.emit("api_key_rejected")
            return 0  # backing off: the client logged it once
        self._key_rejected = False
        started = time.perf_counter()
        settings = self.config.supervisor
        if len(self.inflight) >= settings.batch_size:
            log.warning("tick skipped: all handler slots busy", inflight=len(self.inflight))
            return 0
        self._adapt_claim_limit()
        capacity = min(settings.batch_size, self.claim_limit) - len(self.inflight)
        jobs: list[Job] = []
        # At the claim limit the tick claims nothing: the jobs wait in the database, where
        # another replica may take them.
        if capacity > 0:
            if not self._claim_backoff.ready():
                return 0  # the database failed lately: wait out the backoff
            claimed_at = asyncio.get_running_loop().time()
            try:
                async with self._db_timeout(max(5.0, settings.tick_interval.total_seconds() * 5)):
                    jobs = await self.store.claim_due(
                        self.clock(),
                        horizon=settings.tick_interval,
                        limit=capacity,
                        lease_ttl=settings.lease_ttl,
                    )
            except Exception as exc:
                self._claim_backoff.failed(exc)
                self.notifier.status(f"database unavailable; retrying ({db_error_text(exc)})")
                return 0
            self._claim_backoff.succeeded()
            self._last_claim_full = len(jobs) >= capacity
            deadline = claimed_at + settings.lease_ttl.total_seconds() * LEASE_USE
            for job in jobs:
                task = asyncio.create_task(self._run_job(job), name=f"job-{job.job_id}")
                self.inflight[job.job_id] = _InFlight(task, job.lease_token, claimed_at, deadline)
        self.last_tick_at = self.clock()
        self.ticks += 1
        metrics.TICK_DURATION.observe(time.perf_counter() - started)
        metrics.TICK_JOBS.observe(len(jobs))
        metrics.LAST_TICK.set(self.last_tick_at.timestamp())
        self._after_tick()
        return len(jobs)

    async def _run_job(self, job: Job) -> None:
        job_id = job.job_id
        item = self.inflight[job_id]  # registered by the tick before this task first runs
        started: float | None = None
        try:
            # Bounded so that the lease cannot expire under a job still being handled: the
            # deadline is a fraction of the lease from the claim, pushed on each time the
            # lease keeper extends the lease (a slow API call, a queue behind a burst).
            async with asyncio.timeout_at(item.deadline) as scope:
                item.scope = scope
                delay = (job.next_check_at - self.clock()).total_seconds()
                if delay > 0:
                    await asyncio.sleep(delay)
                metrics.POLL_LAG.observe(max(0.0, (self.clock() - job.next_check_at).total_seconds()))
                self._set_phase(job_id, "poll")
                started = time.monotonic()
                await self.handler.handle(job)
            self._observe_handling(time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            if started is not None:
                self._observe_handling(max(self._handling_budget(), time.monotonic() - started))
            log.warning("job handling timed out; its lease will expire and it is retried", job_id=job_id)
        except Exception as exc:
            if database_unavailable(exc):
                # The writer logged the failed batch once; nothing was sent after it.
                log.debug("job not recorded: database unavailable; retried once its lease expires",
                          job_id=job_id, error=db_error_text(exc))
            else:
                log.exception("job handling failed; its lease will expire and it is retried", job_id=job_id)
        finally:
            if self.inflight.get(job_id) is item:
                del self.inflight[job_id]

    async def _keep_leases(self) -> None:
        """Extend the leases of jobs still being handled once a fifth of their lease is
        used, and move their deadlines on. A lease that could not be extended (database
        down, lease lost) keeps its deadline: that handling stops before it expires."""
        if self._stopping.is_set() or not self.inflight:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        ttl = self.config.supervisor.lease_ttl
        # Due once a fifth of the lease is used: a few rounds of this keeper (every quarter
        # lease) before the deadline, should one be slow.
        due = {
            job_id: item.lease_token
            for job_id, item in self.inflight.items()
            if item.deadline - now < ttl.total_seconds() * (LEASE_USE - 0.2) and now - item.claimed_at < MAX_HANDLING
        }
        if not due or not self._keeper_backoff.ready():
            return
        try:
            # The new deadlines count from before this call, so a slow answer is still safe.
            async with self._db_timeout(max(1.0, ttl.total_seconds() / 2)):
                kept = await self.store.extend_leases(due, ttl, self.clock())
        except Exception as exc:
            self._keeper_backoff.failed(exc)
            return
        self._keeper_backoff.succeeded()
        deadline = now + ttl.total_seconds() * LEASE_USE
        for job_id, token in kept.items():
            item = self.inflight.get(job_id)
            if item is not None and item.lease_token == token and deadline > item.deadline:
                item.deadline = deadline
                if item.scope is not None:
                    item.scope.reschedule(deadline)
        if len(kept) < len(due):
            # Mostly handlers that released their lease with their last write meanwhile; a
            # lease taken by another replica instead shows as "lease lost; write dropped".
            log.debug("leases not extended", jobs=len(due) - len(kept))

    def _handling_budget(self) -> float:
        """How long one job's handling may take: its lease, less a tick (it was claimed up
        to a tick before it was due), with a margin."""
        settings = self.config.supervisor
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
        bound = self._last_claim_full or len(self.inflight) >= limit * 0.8
        if self._handling_s > target:
            limit = max(self._claim_floor, int(limit * 0.8))
        elif self._handling_s < target / 2 and bound:
            limit = min(self.config.supervisor.batch_size, limit * 2)
        if limit != self.claim_limit:
            self.claim_limit = limit
            metrics.CLAIM_LIMIT.set(limit)

    def _db_timeout(self, seconds: float) -> asyncio.Timeout:
        """A bound for database work. None on SQLite: a statement cancelled there keeps
        running in aiosqlite's thread and its transaction then holds the database's write
        lock for good (measured), stalling every writer; its own busy timeout (30 s) bounds
        it instead. PostgreSQL cancels cleanly (the server aborts the statement)."""
        return asyncio.timeout(None if self.store.is_sqlite else seconds)

    def _scheduled(self, body: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        """A scheduler job whose run stop() can wait for (and, late, cancel quietly)."""

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                await body()
            except asyncio.CancelledError:
                if not self._stopping.is_set():
                    raise
            finally:
                self._running.discard(task)

        # APScheduler names a job after these in its log lines ("Daemon.tick …").
        run.__name__, run.__qualname__ = body.__name__, body.__qualname__
        return run

    def _chore(self, body: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """A singleton chore: run by the leader only, bounded, errors caught and backed off."""
        name = body.__name__.lstrip("_")
        backoff = self._chore_backoff.setdefault(
            name, Backoff(f"chore {name}", first=1.0, cap=CHORE_BACKOFF_CAP)
        )

        async def run() -> None:
            if self._stopping.is_set() or not self.is_leader or not backoff.ready():
                return
            try:
                # Never outlives the leadership it started under (a successor may start the
                # same chore once the leader row has expired).
                async with self._db_timeout(min(30.0, self._leader_until - time.monotonic())):
                    await body()
            except Exception as exc:
                backoff.failed(exc)
            else:
                backoff.succeeded()

        run.__name__, run.__qualname__ = body.__name__, body.__qualname__
        return self._scheduled(run)

    async def _sweep_budgets(self) -> None:
        await self.enforcer.sweep_budgets(self.config)

    async def _check_account(self) -> None:
        await self.enforcer.check_account(self.config)

    async def _retention(self) -> None:
        """Delete terminal jobs (and their events) not updated for [supervisor] retention,
        in bounded batches; a budget's current period is always kept whole."""
        now = self.clock()
        cutoff = now - self.config.supervisor.retention
        for name, budget in self.config.budgets.items():
            start = period_start(budget.period, budget.timezone, now)
            if start is None:  # period = "total": every job ever counts against it
                if not self._warned_total_budget:
                    self._warned_total_budget = True
                    log.warning("retention disabled: a budget counts every job ever", budget=name)
                return
            cutoff = min(cutoff, start)
        deleted = await self.store.prune(cutoff)
        admissions = await self.store.prune_admissions(now - timedelta(days=1))
        if deleted or admissions:
            log.info("retention: pruned", jobs=deleted, admissions=admissions, older_than=cutoff.isoformat())

    # -- leadership ---------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this replica may run the singleton chores now: it renewed the leader row
        less than leader_ttl ago (measured from before the renewal, on the monotonic clock,
        so the row cannot have expired in the database's clock while this says True)."""
        return time.monotonic() < self._leader_until

    async def _elect(self) -> None:
        """Take or renew leadership; notice losing it. Catches its own errors."""
        if self._stopping.is_set():
            return
        ttl = self.config.supervisor.leader_ttl
        started = time.monotonic()
        if self._leader_backoff.ready():
            try:
                # Leadership counts from before this call, so a slow answer is still safe.
                async with self._db_timeout(max(1.0, ttl.total_seconds() / 2)):
                    expires = await self.store.acquire_leader(LEADER_ROLE, ttl, self.clock())
            except Exception as exc:
                self._leader_backoff.failed(exc)
            else:
                self._leader_backoff.succeeded()
                self._leader_until = started + ttl.total_seconds() if expires is not None else 0.0
        self._leadership_changed()

    def _leadership_changed(self) -> None:
        leader = self.is_leader
        if leader == self._was_leader:
            return
        self._was_leader = leader
        metrics.LEADER.set(1 if leader else 0)
        if leader:
            log.info("became leader", owner=self.store.owner, role=LEADER_ROLE)
            # Catch up at once rather than at the chores' next interval.
            self._spawn(self._refresh_summary(), "summary")
            if self.config.account is not None:
                self._spawn(self._chore(self._check_account)(), "account")
        else:
            log.warning("lost leadership", owner=self.store.owner, role=LEADER_ROLE)
            # The totals gauges are the leader's: summed over replicas they stay right.
            metrics.JOBS.clear()

    async def _resign(self) -> None:
        """Shutdown: give the leader row up (if it is still ours) so that another replica
        takes over at once instead of after leader_ttl."""
        self._leader_until = 0.0
        self._was_leader = False
        metrics.LEADER.set(0)
        try:
            async with self._db_timeout(5):
                if await self.store.release_leader(LEADER_ROLE):
                    log.info("gave up leadership", owner=self.store.owner, role=LEADER_ROLE)
        except Exception as exc:  # it then expires on its own
            log.warning("could not give up leadership", error=db_error_text(exc))

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _after_tick(self) -> None:
        """Prove the loop is alive to systemd; refresh the summary every few seconds."""
        self.notifier.watchdog()
        now = time.monotonic()
        if now >= self._summary_due:
            self._summary_due = now + 5
            self._spawn(self._refresh_summary(), "summary")

    async def _refresh_summary(self) -> None:
        """The jobs-by-state gauges (leader only: one query for the whole fleet) and the
        systemd status line."""
        self._leadership_changed()
        if not self.is_leader:
            self.notifier.status(f"supervising; {len(self.inflight)} job(s) in flight (not the leader)")
            return
        backoff = self._chore_backoff.setdefault("summary", Backoff("chore summary", first=5.0, cap=CHORE_BACKOFF_CAP))
        if not backoff.ready():
            return
        try:
            async with self._db_timeout(10):
                counts = await self.store.count_by_state()
        except Exception as exc:
            backoff.failed(exc)
            return
        backoff.succeeded()
        for state in State:
            metrics.JOBS.labels(state.value).set(counts.get(state.value, 0))
        active = sum(counts.get(state.value, 0) for state in ACTIVE)
        self.notifier.status(f"supervising {active} active job(s); {len(self.inflight)} in flight (leader)")

    def _set_phase(self, job_id: str, phase: str) -> None:
        item = self.inflight.get(job_id)
        if item is not None:
            item.phase = phase

    def _on_scheduler_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("tick missed", scheduled=str(event.scheduled_run_time))
        else:
            log.error("tick raised", error=repr(event.exception))
