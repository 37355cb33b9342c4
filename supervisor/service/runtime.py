"""The daemon's runtime: the only wiring. It builds every service over one store and one
API client, holds the one current config, schedules the services, and is the process
shell (start, graceful stop, SIGHUP reload, signals, systemd notifications).

The services:
- dispatcher.py: each tick claims the due jobs and runs each through the JobHandler;
- leases.py: extends the leases of jobs handled for long;
- elector.py: the leader row, so that one replica runs the singleton chores;
- housekeeping.py: those chores (budgets, account floor, retention, summary gauges).

APScheduler runs with the memory job store (never shared between processes: replicas
coordinate through the jobs table), coalesce=True and max_instances=1; every run, scheduled
or spawned, is one stop() waits for (runs.py). A database outage is survived: every
service backs off exponentially and logs sparsely (guards.py), a handler whose write fails
has sent nothing, and its job is claimed again once its lease has expired.

Every service reads the config through `current_config` when it uses it, so a reload
reaches all of them at once; `_adopt` is the one place the current config changes, and
`reload_config` the one way a new file gets there (reload.py: read bounded, validated whole,
compared with the running config, and refused rather than adopted when it would quietly
weaken enforcement).

The database is watched (adapters/dbwatch.py): a SQLite file deleted or replaced under the
daemon, or a schema revision this version does not know, makes the daemon unready
(`database_problem`), stops all claiming and chores at once, and ends the process with a
failure after DATABASE_GRACE, so that systemd starts it again on the database as it is.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from supervisor.adapters.clado import CladoClient
from supervisor.adapters.dbwatch import DatabaseFault, DatabaseWatch
from supervisor.adapters.eventloop import loop_name
from supervisor.adapters.store import Store, db_error_text, utcnow
from supervisor.adapters.systemd import Notifier
from supervisor.adapters.webhooks import Webhooks
from supervisor.adapters.writer import BatchWriter
from supervisor.config import Config
from supervisor.service.chores import FORECAST_EVERY, Enforcer
from supervisor.service.dispatcher import Dispatcher
from supervisor.service.effects import Effects
from supervisor.service.elector import LEADER_RENEWALS, Elector
from supervisor.service.executor import JobHandler
from supervisor.service.held_signals import take_held_reload
from supervisor.service.housekeeping import RETENTION_EVERY, Housekeeping
from supervisor.service.keeper import KEEP_EVERY, ResultsKeeper
from supervisor.service.leases import LEASE_RENEWALS, LeaseKeeper
from supervisor.service.polling import Turns
from supervisor.service.queue import Scheduler
from supervisor.service.reload import Reloader
from supervisor.service.runs import Runs
from supervisor.service.tally import Tally

log = structlog.get_logger("supervisor.daemon")

# How often the database is checked for a deleted/replaced file or an unknown schema, and how
# long the daemon stays up (unready, enforcing nothing) once it found one: long enough for
# /readyz and the log to say why, short enough that systemd restarts it soon.
DATABASE_WATCH_EVERY = 5.0
DATABASE_GRACE = 10.0


def scheduler_now() -> datetime:
    """Now in APScheduler's terms (it reads datetime.now() itself), in which a job's first
    run is given: not the daemon's clock, which the demo moves (the tests' virtual clock
    replaces both)."""
    return datetime.now().astimezone()


class Service(Protocol):
    """Something that runs beside the daemon (the admin API)."""

    def start(self) -> Awaitable[None]: ...
    def stop(self) -> Awaitable[None]: ...


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
        self._config = config
        self.store = store
        self.client = client
        self.clock = clock
        self.config_path = config_path
        self._notifier = notifier or Notifier({})
        self._stopping = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self._runs = Runs(self._stopping)  # scheduled and spawned runs of the services now going
        current = self.current_config
        # A flush that hangs (a database gone silent) gives up within a lease (PostgreSQL;
        # SQLite's own busy timeout bounds its flushes, see guards.db_timeout).
        self.writer = BatchWriter(
            store, timeout=None if store.is_sqlite else max(5.0, config.supervisor.lease_ttl.total_seconds())
        )
        self.webhooks = Webhooks(config, store, clock=clock)
        self.tally = Tally(store, clock)
        self.effects = Effects(current, self.webhooks)
        self.enforcer = Enforcer(store, client, self.webhooks, self.effects, clock)
        self.handler = JobHandler(current, client, self.writer.write, clock, self.effects)
        self.elector = Elector(current, store, clock, self._stopping)
        self.housekeeping = Housekeeping(
            current,
            store,
            self.enforcer,
            self.elector,
            self._notifier,
            clock,
            self._stopping,
            inflight=lambda: len(self.dispatcher.inflight),
            spawn=self._runs.spawn,
            lag_note=lambda: self.dispatcher.lag.note,
            api_drift=lambda: self.dispatcher.api_drift,
        )
        self.dispatcher = Dispatcher(
            current,
            store,
            client,
            self.handler,
            self.webhooks,
            self._notifier,
            clock,
            self._stopping,
            ticked=self.housekeeping.after_tick,
            # A backlog is claimed as fast as it is handled, not a batch a tick.
            claim_soon=self._tick_now,
        )
        self.leases = LeaseKeeper(current, store, clock, self.dispatcher.inflight, self._stopping)
        self.queue = Scheduler(current, store, client, self.webhooks, clock, self._stopping)
        self.keeper = ResultsKeeper(current, store, client, self.elector, clock, self._stopping)
        self.handler.on_phase(self.dispatcher.set_phase)
        self.handler.lag = self.dispatcher.lag.recent_p99
        self.handler.poller.turns = Turns(config.api.max_concurrency)
        # One STATUS= line: the housekeeping's summary, the lag watch's note after it.
        self.dispatcher.lag.beside(lambda: self.housekeeping.summary)
        # A budget's cancels, and the polls brought forward to its crossing, are claimed at
        # once, not at the next tick.
        self.enforcer.on_due = self._tick_now
        # The polls brought forward to a budget's crossing: looked at again once they are recorded.
        self.effects.on_applied = self.enforcer.recorded
        self.elector.on_change(self.housekeeping.leadership_changed)
        self._reloader = Reloader(store, clock, current, self._adopt, check=self.webhooks.check)
        self._up = False  # started and serving: a SIGHUP before then is held
        self._reload_held = False
        self.database_watch = DatabaseWatch(store.url)
        self.database_watch_every = DATABASE_WATCH_EVERY
        self.database_grace = DATABASE_GRACE
        # Why the database must not be used any more (for /readyz), once the watch found it.
        self.database_problem: str | None = None
        self.database_failed = asyncio.Event()

    # -- the one current config ---------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    def current_config(self) -> Config:
        """What every service calls when it needs the config: the one in force now."""
        return self._config

    def _adopt(self, new: Config) -> None:
        """The one place the current config changes."""
        old, self._config = self._config, new
        if self._scheduler is not None and new.account != old.account:
            self._schedule_account(new)
        if new.notify != old.notify or new.config_hash != old.config_hash:
            self._runs.spawn(lambda: self.webhooks.reload(new), "webhooks-reload")

    def _every(self, body: Callable[[], Awaitable[object]], seconds: float, job_id: str, **options: object) -> None:
        assert self._scheduler is not None  # noqa: S101 - only called once start() built it
        self._scheduler.add_job(self._runs.tracked(body), "interval", seconds=seconds, id=job_id, **options)

    def _schedule_account(self, config: Config) -> None:
        """The account floor's chore at [account] check_interval, none without [account]; in
        step with reloads, so a floor added by a reload is enforced and a removed one forgotten."""
        assert self._scheduler is not None  # noqa: S101 - only called once start() built it
        if self._scheduler.get_job("account") is not None:
            self._scheduler.remove_job("account")
        if config.account is None:
            self._runs.spawn(self.housekeeping.check_account, "account")  # clears its figure
            return
        now = scheduler_now()
        self._every(self.housekeeping.check_account, config.account.check_interval.total_seconds(), "account",
                    next_run_time=now)  # fmt: skip

    def reload(self) -> None:
        """SIGHUP: start a reload (`reload_config`) beside the loop, which never waits on
        the file. Reloads run one at a time, in the order asked."""
        if self.config_path is None:
            return

        async def reload() -> None:
            await self.reload_config()

        self._runs.spawn(reload, "config-reload")

    async def reload_config(self) -> bool:
        """Adopt the config file's new content, or refuse it and keep the running config
        (reload.py). Returns whether the new config is now in force."""
        if self.config_path is None:
            return False
        return await self._reloader.reload(self.config_path)

    # -- what the admin API and the tests read ----------------------------------------------

    @property
    def notifier(self) -> Notifier:
        return self._notifier

    @notifier.setter
    def notifier(self, notifier: Notifier) -> None:
        self._notifier = self.dispatcher.notifier = self.housekeeping.notifier = self.dispatcher.lag.notifier = notifier

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader

    def problems(self) -> list[str]:
        """Why the daemon should not be counted on now, beyond the database and the tick
        (which /readyz checks itself): each a short line for an operator."""
        found = []
        if self.database_problem is not None:
            found.append(f"database: {self.database_problem}")
        if self.dispatcher.api_misconfigured:
            found.append("api: every job answers 404 and so does /api/credits: check api.base_url")
        if self.dispatcher.api_drift:
            found.append("api: job after job's status answer is unreadable (api_drift): jobs are blind")
        return found

    @property
    def last_tick_at(self) -> datetime | None:
        return self.dispatcher.last_tick_at

    @property
    def scheduler_running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running and not self._stopping.is_set()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()
        self.webhooks.start()
        config = self._config
        tick = config.supervisor.tick_interval.total_seconds()
        now = scheduler_now()
        scheduler = self._scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": AsyncIOExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(1, int(tick * 5))},
            timezone="UTC",
        )
        scheduler.add_listener(self._on_scheduler_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        every = self._every
        every(self.dispatcher.tick, tick, "tick", next_run_time=now)
        # Leases of jobs handled for long (slow API, a burst): extended every lease_ttl / 4.
        lease_every = config.supervisor.lease_ttl.total_seconds() / LEASE_RENEWALS
        every(self.leases.keep, lease_every, "leases", misfire_grace_time=None)
        # Leadership of the singleton chores: taken or renewed every leader_ttl / 3.
        # However late the loop runs it (no misfire skip): a skipped renewal costs leadership.
        every(
            self.elector.elect,
            config.supervisor.leader_ttl.total_seconds() / LEADER_RENEWALS,
            "leader",
            next_run_time=now,
            misfire_grace_time=None,
        )
        # The chores (leader only; each catches its own errors): budgets every tick or second
        # (usage moves with every poll), the account floor at its own interval, retention
        # every few minutes.
        every(self.housekeeping.sweep_budgets, max(1.0, tick), "budgets")
        every(self.housekeeping.forecast_budgets, FORECAST_EVERY.total_seconds(), "forecasts", next_run_time=now)
        if config.account is not None:
            self._schedule_account(config)
        every(self.housekeeping.retention, RETENTION_EVERY, "retention")
        # Cancelled jobs' results into their policy's keep_results directory (leader only):
        # a run of its own, so a slow export never holds up a tick.
        every(self.keeper.keep, KEEP_EVERY, "keep_results")
        # The queue (every replica: each start is claimed in one transaction): the drain every
        # tick or second, the orphan sweep and the submissions' webhooks every few seconds.
        every(self.queue.drain, max(1.0, tick), "queue", next_run_time=now)
        every(self.queue.sweep, max(2.0, tick), "orphans", next_run_time=now)
        every(self._watch_database, self.database_watch_every, "database")
        # The decision counters, from the committed events (whoever committed them).
        every(self._count, max(0.5, tick), "tally", next_run_time=now)
        scheduler.start()
        log.info(
            "supervisor started",
            poll_interval=config.supervisor.poll_interval.total_seconds(),
            tick_interval=tick,
            dry_run=config.supervisor.dry_run,
            event_loop=loop_name(),
            transport=config.api.transport,
            config_hash=config.config_hash,
        )

    def _tick_now(self) -> None:
        """A claim now, outside the schedule (the dispatcher runs one claim at a time)."""
        self._runs.spawn(self.dispatcher.tick, "tick")  # type: ignore[arg-type]

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
        await self._runs.finish(40 if self.store.is_sqlite else 5)
        inflight = self.dispatcher.inflight
        for item in inflight.values():
            if item.phase != "cancel":
                item.task.cancel()
        cancelling = [item.task for item in inflight.values() if item.phase == "cancel"]
        if cancelling:
            log.info("finishing in-flight cancels", count=len(cancelling))
            _, late = await asyncio.wait(cancelling, timeout=self._config.supervisor.shutdown_timeout.total_seconds())
            for task in late:
                task.cancel()
        leftovers = {job_id: item.lease_token for job_id, item in inflight.items()}
        await asyncio.gather(*(item.task for item in inflight.values()), return_exceptions=True)
        await self.writer.close()
        await self.webhooks.close()
        try:
            await self.store.release(leftovers)
        except Exception as exc:  # noqa: BLE001 - leases then simply expire
            log.warning("could not release leases", error=db_error_text(exc))
        await self.elector.resign()
        log.info("supervisor stopped")

    async def run_until_signalled(self, services: Sequence[Service] = ()) -> None:
        """Start, tell systemd we are ready, serve until SIGTERM/SIGINT, stop in order:
        the services (the admin API stops accepting requests) first, then the daemon.
        Raises DatabaseFault when it stopped because the database must not be used."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        started: list[Service] = []
        try:
            # The services first: an admin API that cannot bind its address fails the start
            # with one line before any job is claimed (a second daemon on the same host).
            for service in services:
                await service.start()
                started.append(service)
            self.start()
            self._notifier.ready("supervising")
            self._up = True
            # A reload asked for during start-up (here or before `run` could handle it) is
            # done now, on the file as it is now.
            if take_held_reload() or self._reload_held:
                log.info("reloading the config: a reload was asked for during start-up")
                self.reload()
            await self.wait_stopped()
        finally:
            # Signals stay handled until the end: a second SIGTERM during shutdown must not
            # kill the process halfway through finishing its cancels.
            self._stopping.set()
            self._notifier.stopping()
            for service in reversed(started):
                await service.stop()
            await self.stop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        if self.database_problem is not None:
            raise DatabaseFault(self.database_problem)

    def _on_sighup(self) -> None:
        if self._up:
            self.reload()
        else:
            self._reload_held = True
            log.info("config reload held until start-up completes")

    # -- the database watch ---------------------------------------------------------------

    async def _count(self) -> None:
        try:
            await self.tally.step()
        except Exception as exc:  # noqa: BLE001 - the database away: the next tick counts it
            log.debug("events not counted this tick", error=db_error_text(exc))

    async def _watch_database(self) -> None:
        """A deleted or replaced SQLite file, or an unknown schema revision: stop using the
        database at once (no claim, no chore, no write), say why, and exit after the grace."""
        if self.database_problem is not None:
            return
        problem = await asyncio.to_thread(self.database_watch.check)
        if problem is None or self._stopping.is_set():
            return
        self.database_problem = problem
        log.error(
            "database unusable: stopped claiming and enforcing; exiting for a restart",
            problem=problem, exit_in_seconds=self.database_grace,
        )  # fmt: skip
        self._notifier.status(f"database unusable: {problem}")
        if self._scheduler is not None:
            for job in self._scheduler.get_jobs():
                if job.id != "database":
                    job.pause()
        self.database_failed.set()
        asyncio.get_running_loop().call_later(self.database_grace, self.request_stop)

    # -- the scheduler's own troubles ------------------------------------------------------

    def _on_scheduler_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("tick missed", scheduled=str(event.scheduled_run_time))
        else:
            log.error("tick raised", error=repr(event.exception))
