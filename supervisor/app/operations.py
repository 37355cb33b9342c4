"""What the commands do, without the parsing and printing (that is cli.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from supervisor.adapters import migrate
from supervisor.core.budgets import AdmissionRefused, check_admission, period_start, statuses
from supervisor.adapters.clado import CladoClient, validate_job_id
from supervisor.config import Config, ConfigError, load_config
from supervisor.adapters.secrets import api_key, read_secret
from supervisor.service.runtime import Daemon
from supervisor.service.executor import JobHandler, job_policy
from supervisor.core.states import TERMINAL, Reason, State
from supervisor.adapters.logs import configure_logging
from supervisor.adapters.store import Job, JobWrite, NewJob, Store, utcnow
from supervisor.adapters.systemd import Notifier


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
        initiate_wait=config.api.initiate_wait.total_seconds(),
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
        labels: dict[str, str],
        policy: str | None = None,
        max_runtime: timedelta | None = None,
        max_credits: int | None = None,
    ) -> tuple[list[str], list[str]]:
        """Track jobs started elsewhere. Returns (added, already tracked)."""
        name = self.config.choose_policy(labels, policy)
        new_jobs = [
            NewJob(
                job_id=job_id,
                policy=name,
                labels=labels,
                max_runtime_s=max_runtime.total_seconds() if max_runtime else None,
                max_credits=max_credits,
            )
            for job_id in parse_ids(ids)
        ]
        return await self.store.add_jobs(new_jobs, utcnow())

    async def submit(
        self, query: str, *, limit: int, labels: dict[str, str], policy: str | None = None
    ) -> str:
        """Admit, start the job through the API and track it; returns its id.

        Admission refuses (AdmissionRefused, with the numbers) when a matching budget is
        blocked, when a reserving budget cannot hold the job's worst case (limit ×
        credits_per_result), or when the account would drop below its floor. The
        reservation is recorded before the API call and handed to the job after it."""
        name = self.config.choose_policy(labels, policy)
        need = limit * self.config.api.credits_per_result
        await self._check_account_floor(need)
        admission_id = await self._admit(labels, need)
        try:
            job_id = await self.client.initiate(query, limit)
        except BaseException:
            if admission_id is not None:
                await self.store.drop_admission(admission_id)
            raise
        new_job = NewJob(
            job_id, name, labels, source="submit", query=query, result_limit=limit,
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
        if job is None or job["state"] != State.CANCELLING.value:
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

    async def jobs(self, state: str | None = None) -> list[Job]:
        return await self.store.list_jobs(state)

    async def job(self, job_id: str) -> tuple[Job | None, list[dict[str, Any]]]:
        validate_job_id(job_id)
        job = await self.store.get_job(job_id)
        return job, (await self.store.events(job_id) if job else [])


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


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_json(config: Config, job: Job) -> dict[str, Any]:
    """The public JSON shape of a job (`jobs list --json`, `jobs show --json`)."""
    policy = job_policy(config, job)
    return {
        "job_id": job["job_id"],
        "state": job["state"],
        "remote_status": job["remote_status"],
        "labels": job["labels"] or {},
        "policy": job["policy"],
        "credits_used": job["credits_used"],
        "cancel_reason": job["cancel_reason"],
        "final_status": job["final_status"],
        "submitted_at": _iso(job["submitted_at"]),
        "cancel_requested_at": _iso(job["cancel_requested_at"]),
        "confirmed_at": _iso(job["confirmed_at"]),
        "source": job["source"],
        "query": job["query"],
        "limits": {
            "max_runtime_s": policy.max_runtime.total_seconds() if policy.max_runtime else None,
            "max_queued_s": policy.max_queued.total_seconds() if policy.max_queued else None,
            "stall_timeout_s": policy.stall_timeout.total_seconds() if policy.stall_timeout else None,
            "max_credits": policy.max_credits,
            "action": policy.action,
        },
        "remote_created_at": _iso(job["remote_created_at"]),
        "last_polled_at": _iso(job["last_polled_at"]),
        "next_check_at": _iso(job["next_check_at"]) if job["state"] not in TERMINAL else None,
        "cancel_detail": job["cancel_detail"],
        "would_cancel_reason": job["would_cancel_reason"],
        "would_cancel_at": _iso(job["would_cancel_at"]),
        "last_error": job["last_error"],
    }


def event_json(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "at": _iso(event["at"]),
        "kind": event["kind"],
        "from_state": event["from_state"],
        "to_state": event["to_state"],
        "reason": event["reason"],
        "detail": event["detail"],
    }

