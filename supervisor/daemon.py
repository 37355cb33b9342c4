"""The daemon: APScheduler ticks that claim due jobs and hand each to a JobHandler.

Each tick claims, in one query, the jobs due before the next tick (up to the free
capacity) and starts a task per job that waits for the job's own due time, so a deadline
is acted on within milliseconds rather than a tick. The tick itself only claims and
dispatches: it is short, bounded by a timeout, and catches its own errors.

APScheduler runs with the memory job store (never shared between processes: replicas
coordinate through the jobs table), coalesce=True and max_instances=1.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from . import metrics
from .clado import CladoClient
from .config import Config, ConfigError, load_config
from .enforcement import Enforcer
from .handler import JobHandler
from .lifecycle import ACTIVE, State
from .notify import Webhooks
from .store import Job, Store, utcnow
from .systemd import Notifier
from .writer import BatchWriter

log = structlog.get_logger("supervisor.daemon")


class Service(Protocol):
    """Something that runs beside the daemon (the admin API)."""

    def start(self) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...


@dataclass
class _InFlight:
    task: asyncio.Task[None]
    lease_token: str
    phase: str = "wait"  # wait → poll → cancel (a started cancel is let finish on shutdown)


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
        self.writer = BatchWriter(store)
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
        self._summary_due = 0.0
        self._key_rejected = False

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
            self.tick, "interval", seconds=tick, id="tick", next_run_time=datetime.now().astimezone()
        )
        # Aggregate rules: every second for budgets (usage moves with every poll), and the
        # account floor at its own interval. Both catch their own errors.
        self._scheduler.add_job(self._chore(self._sweep_budgets), "interval", seconds=max(1.0, tick), id="budgets")
        if self.config.account is not None:
            self._scheduler.add_job(
                self._chore(self._check_account), "interval",
                seconds=self.config.account.check_interval.total_seconds(), id="account",
                next_run_time=datetime.now().astimezone(),
            )
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
            log.warning("could not release leases", error=str(exc))
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
        if new.supervisor.tick_interval != self.config.supervisor.tick_interval:
            log.warning("config change needs a restart to take effect", key="supervisor.tick_interval")
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
        if self.client.api_key_rejected:
            if not self._key_rejected:
                self._key_rejected = True
                self.webhooks.emit("api_key_rejected")
            return 0  # backing off: the client logged it once
        self._key_rejected = False
        started = time.perf_counter()
        settings = self.config.supervisor
        capacity = settings.batch_size - len(self.inflight)
        if capacity <= 0:
            log.warning("tick skipped: all handler slots busy", inflight=len(self.inflight))
            return 0
        try:
            async with asyncio.timeout(max(5.0, settings.tick_interval.total_seconds() * 5)):
                jobs = await self.store.claim_due(
                    self.clock(),
                    horizon=settings.tick_interval,
                    limit=capacity,
                    lease_ttl=settings.lease_ttl,
                )
        except Exception as exc:
            log.error("tick failed to claim jobs; will retry", error=str(exc) or type(exc).__name__)
            return 0
        for job in jobs:
            task = asyncio.create_task(self._run_job(job), name=f"job-{job['job_id']}")
            self.inflight[job["job_id"]] = _InFlight(task, job["lease_token"])
        self.last_tick_at = self.clock()
        self.ticks += 1
        metrics.TICK_DURATION.observe(time.perf_counter() - started)
        metrics.TICK_JOBS.observe(len(jobs))
        metrics.LAST_TICK.set(self.last_tick_at.timestamp())
        self._after_tick()
        return len(jobs)

    async def _run_job(self, job: Job) -> None:
        job_id = job["job_id"]
        try:
            delay = (job["next_check_at"] - self.clock()).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            metrics.POLL_LAG.observe(max(0.0, (self.clock() - job["next_check_at"]).total_seconds()))
            self._set_phase(job_id, "poll")
            # Bounded so that the lease cannot expire under a job still being handled.
            budget = self.config.supervisor.lease_ttl - self.config.supervisor.tick_interval
            async with asyncio.timeout(max(timedelta(seconds=1), budget * 0.8).total_seconds()):
                await self.handler.handle(job)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.warning("job handling timed out; its lease will expire and it is retried", job_id=job_id)
        except Exception:
            log.exception("job handling failed; its lease will expire and it is retried", job_id=job_id)
        finally:
            self.inflight.pop(job_id, None)

    def _chore(self, body: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if self._stopping.is_set():
                return
            try:
                async with asyncio.timeout(30):
                    await body()
            except Exception as exc:
                log.error("chore failed; will retry", chore=body.__name__, error=str(exc) or type(exc).__name__)

        run.__name__ = body.__name__
        return run

    async def _sweep_budgets(self) -> None:
        await self.enforcer.sweep_budgets(self.config)

    async def _check_account(self) -> None:
        await self.enforcer.check_account(self.config)

    def _after_tick(self) -> None:
        """Prove the loop is alive to systemd; refresh the summary every few seconds."""
        self.notifier.watchdog()
        now = time.monotonic()
        if now >= self._summary_due:
            self._summary_due = now + 5
            task = asyncio.create_task(self._refresh_summary(), name="summary")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _refresh_summary(self) -> None:
        try:
            counts = await self.store.count_by_state()
        except Exception as exc:
            log.warning("could not count jobs", error=str(exc))
            return
        for state in State:
            metrics.JOBS.labels(state.value).set(counts.get(state.value, 0))
        active = sum(counts.get(state.value, 0) for state in ACTIVE)
        self.notifier.status(f"supervising {active} active job(s); {len(self.inflight)} in flight")

    def _set_phase(self, job_id: str, phase: str) -> None:
        item = self.inflight.get(job_id)
        if item is not None:
            item.phase = phase

    def _on_scheduler_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("tick missed", scheduled=str(event.scheduled_run_time))
        else:
            log.error("tick raised", error=repr(event.exception))
