"""What the commands do, without the parsing and printing (that is cli.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from supervisor.adapters.clado import CladoClient, validate_job_id
from supervisor.adapters.secrets import read_secret
from supervisor.adapters.store import JobWrite, NewJob, Store, utcnow
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config, ConfigError
from supervisor.core import transitions
from supervisor.core.budgets import AdmissionRefused, check_admission, period_start, statuses
from supervisor.core.job import Job
from supervisor.core.policy import job_policy
from supervisor.core.states import TERMINAL, Reason, State
from supervisor.core.transitions import Change
from supervisor.service import wiring
from supervisor.service.effects import Effects
from supervisor.service.executor import JobHandler
from supervisor.service.runtime import Daemon, Service
from supervisor.service.wiring import client_for, open_store

log = structlog.get_logger("supervisor.app")

# How long an admission's reservation counts if its submitter dies before recording the job.
ADMISSION_TTL = timedelta(minutes=10)


def admin_api(config: Config) -> Callable[[Daemon], list[Service]]:
    """The admin API beside the daemon, when [http] enables it. Its token is read now,
    before the database is opened, so a missing secret fails before any migration."""
    token = read_secret(
        env_name=config.http.token_env, file=config.http.token_file, key="http.token_file", source=config.source
    )

    def build(daemon: Daemon) -> list[Service]:
        if not config.http.enabled:
            return []
        from supervisor.app.http import AdminApi, AdminServer

        return [AdminServer(AdminApi(daemon, token, config.http.max_body_bytes), config.http.listen)]

    return build


async def run_daemon(config_path: Path) -> None:
    """`run`: the daemon, with the admin API beside it."""
    await wiring.run_daemon(config_path, services=admin_api)


def parse_ids(ids: Iterable[str]) -> list[str]:
    """Validate every id before anything is written or sent: all or nothing."""
    return [validate_job_id(job_id) for job_id in ids]


class Operations:
    """What a user can ask of the supervisor (CLI and admin API), over one store.

    The API client is made on first use, so commands that only read need no API key."""

    def __init__(
        self, config: Config, store: Store, client: CladoClient | None = None, effects: Effects | None = None
    ) -> None:
        self.config = config
        self.store = store
        self._client = client
        self._owns_client = client is None
        # In the daemon (admin API) its own effects: its metrics and webhook queues. For a
        # CLI command, webhooks of its own, made when a cancel needs them and drained on close.
        self._effects = effects
        self._webhooks: Webhooks | None = None

    @property
    def client(self) -> CladoClient:
        if self._client is None:
            self._client = client_for(self.config)
        return self._client

    @property
    def effects(self) -> Effects:
        if self._effects is None:
            try:
                self._webhooks = Webhooks(self.config)
                self._webhooks.start()
            except ConfigError as exc:  # a cancel must not wait on a webhook's secret
                log.warning("webhooks disabled for this command", error=str(exc))
            self._effects = Effects(lambda: self.config, self._webhooks)
        return self._effects

    async def aclose(self) -> None:
        if self._webhooks is not None:
            await self._webhooks.close()
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

        The decision is the same Change a policy or a budget makes (rule `manual`, the job's
        credits, the config hash), written without a lease: fenced by the job still watching,
        it clears the lease of a poll in flight so that poll's stale write is dropped.
        Returns the job afterwards, or None if it is not tracked."""
        validate_job_id(job_id)
        job = await self.store.get_job(job_id)
        if job is None or job.state is not State.WATCHING:
            return job
        now = utcnow()
        facts = {"note": note} if note else {}
        detail = transitions.decision_detail("manual", job.credits_used, self.config.config_hash, **facts)
        change = transitions.decide_cancel(Change.of(job), Reason.MANUAL, detail, now)
        if await self.store.apply_each([JobWrite(change, lease_token=None)]) == [True]:
            self.effects.applied([change])
            claimed = await self.store.claim_due(
                now, horizon=timedelta(0), limit=1, lease_ttl=self.config.supervisor.lease_ttl, job_id=job_id
            )
            if claimed:  # else the daemon claimed it first and sends the cancel itself
                handler = JobHandler(lambda: self.config, self.client, self._write, utcnow, self.effects)
                await handler.handle(claimed[0])
        return await self.store.get_job(job_id)

    async def _write(self, job_write: JobWrite) -> bool:
        return await self.store.apply_each([job_write]) == [True]

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
        "job_id": job.job_id,
        "state": job.state,
        "remote_status": job.remote_status,
        "labels": job.labels or {},
        "policy": job.policy,
        "credits_used": job.credits_used,
        "cancel_reason": job.cancel_reason,
        "final_status": job.final_status,
        "submitted_at": _iso(job.submitted_at),
        "cancel_requested_at": _iso(job.cancel_requested_at),
        "confirmed_at": _iso(job.confirmed_at),
        "source": job.source,
        "query": job.query,
        "limits": {
            "max_runtime_s": policy.max_runtime.total_seconds() if policy.max_runtime else None,
            "max_queued_s": policy.max_queued.total_seconds() if policy.max_queued else None,
            "stall_timeout_s": policy.stall_timeout.total_seconds() if policy.stall_timeout else None,
            "max_credits": policy.max_credits,
            "action": policy.action,
        },
        "remote_created_at": _iso(job.remote_created_at),
        "last_polled_at": _iso(job.last_polled_at),
        "next_check_at": _iso(job.next_check_at) if job.state not in TERMINAL else None,
        "cancel_detail": job.cancel_detail,
        "would_cancel_reason": job.would_cancel_reason,
        "would_cancel_at": _iso(job.would_cancel_at),
        "last_error": job.last_error,
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

