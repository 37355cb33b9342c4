"""What a user can ask of the supervisor, for the CLI and the admin API alike: every use
case with its input rules (app/inputs.py), without the parsing and printing (cli.py, http.py).
Failures are SupervisorErrors or the lower layers' own, which app/errors.py translates."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from supervisor.adapters import migrate
from supervisor.adapters.clado import CladoClient, validate_job_id
from supervisor.adapters.logs import configure_logging
from supervisor.adapters.secrets import api_key, read_secret
from supervisor.adapters.store import JobWrite, NewJob, Store, utcnow
from supervisor.adapters.systemd import Notifier
from supervisor.app import inputs
from supervisor.app.errors import JobNotTracked
from supervisor.app.views import TrackResult
from supervisor.config import Config, ConfigError, load_config
from supervisor.core.budgets import AdmissionRefused, check_admission, period_start, statuses
from supervisor.core.job import Job
from supervisor.core.states import Reason, State
from supervisor.service.executor import JobHandler
from supervisor.service.runtime import Daemon

# How long an admission's reservation counts if its submitter dies before recording the job.
ADMISSION_TTL = timedelta(minutes=10)


class RuntimeFailure(Exception):
    """Something outside the user's input failed (database, API): exit 1."""


def client_for(config: Config) -> CladoClient:
    return CladoClient(
        config.api.base_url,
        api_key(config),
        timeout=config.api.timeout.total_seconds(),
        max_concurrency=config.api.max_concurrency,
        max_retries=config.api.max_retries,
    )


async def open_store(config: Config) -> Store:
    """A store on a database at the current schema (migrating it if auto_migrate is on)."""
    url = config.database.url
    try:
        if config.database.auto_migrate:
            await asyncio.to_thread(migrate.upgrade, url)
        elif not await asyncio.to_thread(migrate.is_current, url):
            raise ConfigError(
                f"{config.source}: database.auto_migrate: the database schema is not current; "
                "run `clado-supervisor migrate`"
            )
    except SQLAlchemyError as exc:
        raise RuntimeFailure(f"cannot open the database: {_db_error(exc)}") from None
    return Store(url)


def _db_error(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]


async def run_daemon(config_path: Path) -> None:
    config = load_config(config_path)
    configure_logging(config.logging.format, config.logging.level)
    # SIGTERM/SIGINT during startup (migrations can take a while) mean "stop", exit 0, not
    # death by the default handler; the daemon installs its own handlers once it runs.
    started: list[Daemon] = []
    stop_early = asyncio.Event()

    def stop() -> None:
        stop_early.set()
        for daemon in started:
            daemon.request_stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    client = client_for(config)
    try:
        admin_token = read_secret(
            env_name=config.http.token_env, file=config.http.token_file, key="http.token_file", source=config.source
        )
        store = await open_store(config)
        try:
            if stop_early.is_set():
                return
            daemon = Daemon(config, store, client, config_path=config_path, notifier=Notifier())
            started.append(daemon)
            services = []
            if config.http.enabled:
                from supervisor.app.http import AdminApi, AdminServer

                api = AdminApi(daemon, admin_token, config.http.max_body_bytes)
                services.append(AdminServer(api, config.http.listen))
            if stop_early.is_set():
                daemon.request_stop()
            try:
                await daemon.run_until_signalled(services)
            except OSError as exc:  # the admin API could not bind its address
                raise RuntimeFailure(str(exc)) from None
        finally:
            await store.close()
    finally:
        await client.aclose()


def parse_ids(ids: Iterable[str]) -> list[str]:
    """Validate every id before anything is written or sent: all or nothing."""
    return [validate_job_id(job_id) for job_id in ids]


class Operations:
    """What a user can ask of the supervisor (CLI and admin API), over one store.

    The API client is made on first use, so commands that only read need no API key."""

    def __init__(self, config: Config, store: Store, client: CladoClient | None = None) -> None:
        self.config = config
        self.store = store
        self._client = client
        self._owns_client = client is None

    @property
    def client(self) -> CladoClient:
        if self._client is None:
            self._client = client_for(self.config)
        return self._client

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    async def track(
        self,
        ids: list[str],
        *,
        labels: Mapping[str, str],
        policy: str | None = None,
        max_runtime: timedelta | str | int | None = None,
        max_credits: int | None = None,
    ) -> TrackResult:
        """Track jobs started elsewhere (idempotent): every input is checked before any is written."""
        checked = inputs.labels(labels)
        runtime = inputs.duration("max_runtime", max_runtime)
        inputs.count("max_credits", max_credits, 1, inputs.MAX_DB_INT)
        job_ids = parse_ids(ids)
        name = self.config.choose_policy(checked, policy)
        new_jobs = [
            NewJob(
                job_id=job_id,
                policy=name,
                labels=checked,
                max_runtime_s=runtime.total_seconds() if runtime else None,
                max_credits=max_credits,
            )
            for job_id in job_ids
        ]
        added, existing = await self.store.add_jobs(new_jobs, utcnow())
        return TrackResult(added=added, already_tracked=existing)

    async def submit(self, query: str, *, limit: int, labels: Mapping[str, str], policy: str | None = None) -> str:
        """Admit, start the job through the API and track it; returns its id.

        Admission refuses (AdmissionRefused, with the numbers) when a matching budget is
        blocked, when a reserving budget cannot hold the job's worst case (limit ×
        credits_per_result), or when the account would drop below its floor. The
        reservation is recorded before the API call and handed to the job after it."""
        inputs.text("query", query, max_length=inputs.MAX_QUERY, required=True)
        inputs.count("limit", limit, inputs.MIN_LIMIT, inputs.MAX_LIMIT)
        checked = inputs.labels(labels)
        name = self.config.choose_policy(checked, policy)
        need = limit * self.config.api.credits_per_result
        await self._check_account_floor(need)
        admission_id = await self._admit(checked, need)
        try:
            job_id = await self.client.initiate(query, limit)
        except BaseException:
            if admission_id is not None:
                await self.store.drop_admission(admission_id)
            raise
        new_job = NewJob(
            job_id,
            name,
            checked,
            source="submit",
            query=query,
            result_limit=limit,
            reserved_credits=need if admission_id is not None else None,
        )
        await self.store.add_jobs([new_job], utcnow(), admission_id=admission_id)
        return job_id

    async def _admit(self, labels: dict[str, str], need: int) -> str | None:
        if not self.config.budgets:
            return None
        now = utcnow()
        starts = {period_start(b.period, b.timezone, now) for b in self.config.budgets.values()}

        def check(usage: Any) -> bool:
            return bool(check_admission(self.config, labels, need, statuses(self.config, now, usage)))

        return await self.store.admit(labels, need, now, check, starts, ADMISSION_TTL)

    async def _check_account_floor(self, need: int) -> None:
        account = self.config.account
        if account is None or account.action == "observe":
            return
        credits = await self.client.credits()
        if credits - need < account.min_credits:
            raise AdmissionRefused(
                f"the account has {credits} credits; this job may use {need}, which would take it "
                f"below its floor of {account.min_credits} (account.min_credits)"
            )

    async def cancel(self, job_id: str, note: str | None = None) -> Job | None:
        """Commit a manual cancel decision and, unless the daemon holds the job, send it now.

        Returns the job afterwards, or None if it is not tracked."""
        validate_job_id(job_id)
        now = utcnow()
        job = await self.store.request_cancel(job_id, Reason.MANUAL, {"note": note} if note else {}, now)
        if job is None or job.state != State.CANCELLING.value:
            return job
        claimed = await self.store.claim_due(
            now, horizon=timedelta(0), limit=1, lease_ttl=self.config.supervisor.lease_ttl, job_id=job_id
        )
        if claimed:  # else the daemon claimed it first and sends the cancel itself
            handler = JobHandler(self.config, self.client, self._write, utcnow)
            await handler.handle(claimed[0])
        return await self.store.get_job(job_id)

    async def _write(self, job_write: JobWrite) -> bool:
        return job_write.job_id in await self.store.apply([job_write])

    async def manual_cancel(self, job_id: str, note: str | None = None) -> Job:
        """The manual cancel use case: its inputs checked, then `cancel`; JobNotTracked if unknown."""
        validate_job_id(job_id)
        inputs.text("reason", note, max_length=inputs.MAX_REASON)
        job = await self.cancel(job_id, note)
        if job is None:
            raise JobNotTracked(job_id)
        return job

    async def jobs(self, state: str | None = None, labels: Mapping[str, str] | None = None) -> list[Job]:
        """The jobs in `state` (all if None) that carry every one of `labels`."""
        found = await self.store.list_jobs(inputs.state(state))
        wanted = (labels or {}).items()
        return [job for job in found if all(job.labels.get(key) == value for key, value in wanted)]

    async def job(self, job_id: str) -> tuple[Job, list[dict[str, Any]]]:
        """A job and its events; JobNotTracked if unknown."""
        validate_job_id(job_id)
        job = await self.store.get_job(job_id)
        if job is None:
            raise JobNotTracked(job_id)
        return job, await self.store.events(job_id)


@asynccontextmanager
async def operations(config: Config) -> AsyncIterator[Operations]:
    """Operations on the configured database, for one CLI command."""
    store = await open_store(config)
    ops = Operations(config, store)
    try:
        yield ops
    finally:
        await ops.aclose()
        await store.close()
