"""What a user can ask of the supervisor, for the CLI and the admin API alike: every use
case with its input rules (app/inputs.py), without the parsing and printing (cli.py, http.py).
Failures are SupervisorErrors or the lower layers' own, which app/errors.py translates."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from supervisor.adapters.clado import CladoClient, CladoError, RateLimited, validate_job_id
from supervisor.adapters.results import ResultsFile, Saved, save_results
from supervisor.adapters.secrets import admin_token
from supervisor.adapters.store import DELIVERY_STATES, JobWrite, NewJob, Store, utcnow
from supervisor.app import inputs
from supervisor.app.errors import BadInput, JobNotTracked, NotFound, Refused
from supervisor.app.report import budget_views
from supervisor.app.views import (
    BudgetsView,
    ContinueResult,
    DeliveryView,
    DryRunBudget,
    DryRunView,
    QueueItemView,
    RedeliverResult,
    SubmitResult,
    TrackResult,
)
from supervisor.config import Config, labels_match
from supervisor.core import transitions
from supervisor.core.budgets import AdmissionRefused, Grant, grant, statuses
from supervisor.core.forecast import expected_cost, money
from supervisor.core.job import Job
from supervisor.core.policy import job_policy
from supervisor.core.queueing import RATE_WINDOW, forecast_block, new_submission, period_starts, plan, wanted
from supervisor.core.queueing import STATES as SUBMISSION_STATES
from supervisor.core.states import Reason, State
from supervisor.core.transitions import Change
from supervisor.service import wiring
from supervisor.service.effects import Effects
from supervisor.service.executor import JobHandler
from supervisor.service.forecasting import Forecaster, admission_forecasts
from supervisor.service.queue import INITIATE_HOLD, Initiator
from supervisor.service.runtime import Daemon, Service
from supervisor.service.wiring import client_for, open_store

log = structlog.get_logger("supervisor.app")

# How long an admission's reservation counts if its submitter dies before recording the job.
ADMISSION_TTL = timedelta(minutes=10)


def admin_api(config: Config) -> Callable[[Daemon], list[Service]]:
    """The admin API beside the daemon, when [http] enables it. Its token is read now,
    before the database is opened, so a missing secret fails before any migration; beyond
    loopback it is required (secrets.admin_token) and its plain HTTP is warned about."""
    token = admin_token(config)

    def build(daemon: Daemon) -> list[Service]:
        if not config.http.enabled:
            return []
        from supervisor.app.http import AdminApi, AdminServer

        if config.http.beyond_loopback:
            log.warning(
                "the admin API listens beyond loopback over plain HTTP: put it behind TLS or a private network",
                listen=config.http.listen,
            )
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
        self,
        config: Config,
        store: Store,
        client: CladoClient | None = None,
        effects: Effects | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock  # everything it records is timed by it (submissions: their pacing, their expiry)
        self._client = client
        self._owns_client = client is None
        # In the daemon (admin API) its own effects. A CLI command's are its log lines only:
        # its webhook events are outbox rows committed with its changes (the daemon delivers
        # them) and the daemon counts its decisions from the committed events.
        self._effects = effects

    @property
    def client(self) -> CladoClient:
        if self._client is None:
            self._client = client_for(self.config)
        return self._client

    @property
    def effects(self) -> Effects:
        if self._effects is None:
            self._effects = Effects(lambda: self.config)
        return self._effects

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
        added, existing = await self.store.add_jobs(new_jobs, self.clock())
        return TrackResult(added=added, already_tracked=existing)

    async def submit(
        self,
        query: str,
        *,
        limit: int,
        labels: Mapping[str, str],
        policy: str | None = None,
        queue: bool | None = None,
        priority: int = 0,
        expires_after: timedelta | str | int | None = None,
    ) -> SubmitResult | QueueItemView:
        """Admit, start the job through the API and track it; or, with `queue` (default:
        `[scheduler] default`), queue it when it does not fit now.

        Prevention first: the API is asked for at most what the job may spend — the smaller
        of `limit`, what the policy's max_credits allows and what each reserving budget it
        matches has left (core.budgets.grant) — so the API itself caps the job and no cancel
        is needed. Admission refuses (AdmissionRefused, with the numbers) when a matching
        budget is exhausted or blocked, when nothing is left, or when the account would drop
        below its floor. Queued, a submission is never clamped by a budget: it waits (the
        daemon starts it, service/queue.py) until its whole reservation fits, the floor
        allows it and the initiate rate has a slot; what could never fit is still refused.

        The intent is committed (a submission, with its reservation) before the API call, so
        an initiate whose outcome is unknown leaves an `orphaned` record, never a silent job."""
        inputs.text("query", query, max_length=inputs.MAX_QUERY, required=True)
        inputs.count("limit", limit, inputs.MIN_LIMIT, inputs.MAX_LIMIT)
        inputs.count("priority", priority, -inputs.MAX_PRIORITY, inputs.MAX_PRIORITY)
        expiry = inputs.duration("expires_after", expires_after)
        checked = inputs.labels(labels)
        name = self.config.choose_policy(checked, policy)
        queueing = self.config.scheduler.default == "queue" if queue is None else queue
        now = self.clock()
        fresh = new_submission(
            self.config, query, labels=checked, policy=name, limit=limit, priority=priority,
            expires_after=expiry, now=now,
        )  # fmt: skip
        account_credits = await self._account_credits()
        forecasts = await admission_forecasts(Forecaster(self.store), self.config, now)
        decide = functools.partial(
            plan, self.config, now=now, account_credits=account_credits, only=fresh["id"], queue=queueing,
            held_until=now + timedelta(seconds=self.client.held_off_for) if self.client.held_off_for else None,
            forecasts=forecasts,
        )  # fmt: skip
        chosen = await self.store.take_submission(
            now, period_starts(self.config, now), now - RATE_WINDOW, decide, ttl=INITIATE_HOLD, fresh=fresh
        )
        if chosen is None:
            log.info("submission queued", submission_id=fresh["id"], reason=fresh["reason"])
            return QueueItemView.of(self.config, fresh)
        initiator = Initiator(lambda: self.config, self.store, self.client, self.clock)
        try:
            job_id = await initiator.start(chosen, requeue=queueing)
        except RateLimited:
            if not queueing:
                raise
            queued = await self.store.get_submission(chosen["id"])
            return QueueItemView.of(self.config, queued or chosen)
        return SubmitResult(job_id=job_id, requested_limit=limit, limit=int(chosen["granted_limit"]),
                            clamped_by=list(chosen["clamped_by"] or ()))  # fmt: skip

    async def submit_dry_run(
        self, query: str, *, limit: int, labels: Mapping[str, str], policy: str | None = None
    ) -> DryRunView:
        """What `submit` would do, without calling the API or writing anything: the results the
        job would be granted (the same grant as a real submission: its policy, every reserving
        budget), its predicted cost (a typical job of its budgets, at most the grant) and, for
        each budget it matches, whether it fits the budget's forecast. The account floor is not
        checked (that needs the API)."""
        inputs.text("query", query, max_length=inputs.MAX_QUERY, required=True)
        inputs.count("limit", limit, inputs.MIN_LIMIT, inputs.MAX_LIMIT)
        checked = inputs.labels(labels)
        name = self.config.choose_policy(checked, policy)
        now = self.clock()
        row = new_submission(
            self.config, query, labels=checked, policy=name, limit=limit, priority=0, expires_after=None, now=now
        )
        results, max_credits = wanted(self.config, row)
        outlooks = await Forecaster(self.store).outlooks(self.config, now)
        budget_statuses = [o.status for o in outlooks]
        refused = None
        try:
            granted = grant(self.config, checked, limit, budget_statuses, max_credits=max_credits)
            credits = granted.credits
            results, clamped_by = granted.results, list(granted.clamped_by)
        except AdmissionRefused as exc:
            refused, credits, clamped_by = str(exc), results * self.config.api.credits_per_result, []
        matching = [o for o in outlooks if o.status.name in self.config.budgets_for(checked)]
        costs = [expected_cost(credits, o.history) for o in matching]
        predicted = min(costs) if costs else float(credits)
        fits = [DryRunBudget.of(self.config, o, expected_cost(credits, o.history)) for o in matching]
        blocked = forecast_block(
            self.config, checked, credits, {o.status.name: (o.forecast, o.history) for o in matching}
        )
        if refused is None and blocked is not None:
            refused = blocked[1]
        return DryRunView(
            query=query, policy=name, requested_limit=limit, limit=results, clamped_by=clamped_by,
            credits=credits, predicted_credits=round(predicted, 1), fits=all(b.fits for b in fits) and refused is None,
            refused=refused, budgets=fits,
            money=money(self.config.billing, {"credits": credits, "predicted_credits": round(predicted, 1)}),
        )  # fmt: skip

    async def _account_credits(self) -> int | None:
        """The account's credits, where a floor that blocks needs them (else None)."""
        account = self.config.account
        if account is None or account.action == "observe":
            return None
        return await self.client.credits()

    async def queue(self, states: Iterable[str] | None = None) -> list[QueueItemView]:
        """Submissions (in `states`, else all), in the queue's order."""
        wanted = None if states is None else [inputs.state_of("submission", s, SUBMISSION_STATES) for s in states]
        return [QueueItemView.of(self.config, row) for row in await self.store.list_submissions(wanted)]

    async def queue_item(self, submission_id: str) -> QueueItemView:
        row = await self.store.get_submission(inputs.submission_id(submission_id))
        if row is None:
            raise NotFound(f"no submission {submission_id} in the queue")
        return QueueItemView.of(self.config, row)

    async def cancel_queued(self, submission_id: str) -> QueueItemView:
        """`queue cancel`: a queued submission will not start; an orphaned one is settled (its
        reservation given back: a person has dealt with its job). Refused for the others."""
        row = await self.store.cancel_submission(inputs.submission_id(submission_id), self.clock())
        if row is None:
            raise NotFound(f"no submission {submission_id} in the queue")
        if row["state"] != "cancelled":
            state = row["state"]
            raise Refused(f"submission {submission_id} is {state}: only a queued or orphaned one can be cancelled")
        return QueueItemView.of(self.config, row)

    async def deliveries(self, state: str | None = None) -> list[DeliveryView]:
        """The outbox's deliveries (in `state`, else all): failed first."""
        wanted = None if state is None else inputs.state_of("delivery", state, DELIVERY_STATES)
        return [DeliveryView.of(row) for row in await self.store.list_deliveries(wanted)]

    async def delivery(self, delivery_id: str) -> DeliveryView:
        row = await self.store.get_delivery(inputs.delivery_id(delivery_id))
        if row is None:
            raise NotFound(f"no webhook delivery {delivery_id}")
        return DeliveryView.of(row)

    async def redeliver(self, delivery_ids: Iterable[str]) -> RedeliverResult:
        """Queue deliveries again (the daemon sends them within a second); all or none."""
        ids = [inputs.delivery_id(value) for value in delivery_ids]
        if not ids:
            raise BadInput("name at least one delivery id", field="id")
        found = await self.store.redeliver(ids, self.clock())
        missing = [value for value in ids if value not in found]
        if missing:
            raise NotFound(f"no webhook delivery {missing[0]}")
        return RedeliverResult(redelivered=found)

    async def orphaned_submissions(self) -> list[QueueItemView]:
        """Submissions whose initiate may have started a job that is not supervised."""
        return [QueueItemView.of(self.config, row) for row in await self.store.list_submissions(["orphaned"])]

    async def continue_job(self, job_id: str, additional: int = 30) -> ContinueResult:
        """Ask a completed job for more results, through admission like a submission.

        The API bills each new result under the same job id, which goes back to pending; the
        supervisor reopens the job at once (its limits apply to its whole credit total), so
        the new spend is supervised from the first result. `additional` is clamped to what
        the job's max_credits still allows and to what a reserving budget has left; nothing
        left is refused with the numbers."""
        validate_job_id(job_id)
        inputs.count("additional", additional, inputs.MIN_LIMIT, inputs.MAX_LIMIT)
        job = await self.store.get_job(job_id)
        if job is None:
            raise JobNotTracked(job_id)
        if job.state is not State.COMPLETED:
            raise Refused(f"job {job_id} is {job.state}: only a completed job can be continued")
        policy = job_policy(self.config, job)
        room = None if policy.max_credits is None else max(0, policy.max_credits - job.credits_used)
        if room == 0:
            raise Refused(
                f"job {job_id} has used {job.credits_used} credits of its max_credits {policy.max_credits}: "
                "nothing is left to continue for"
            )
        granted, admission_id = await self._admit(dict(job.labels), additional, room)
        await self._check_account_floor(granted.credits)
        try:
            await self.client.continue_job(job_id, granted.results)
        except CladoError as exc:
            # Sent or not, a reservation that may cover a running batch is kept until it
            # expires; one that surely started nothing is given back.
            if admission_id is not None and not exc.maybe_sent:
                await self.store.drop_admission(admission_id)
            raise
        now = self.clock()
        values = {
            "result_limit": (job.result_limit or job.credits_used) + granted.results,
            # The job's whole total, as for a new job: usage counts reserved minus spent.
            "reserved_credits": job.credits_used + granted.credits if admission_id is not None else None,
        }
        change = transitions.reopen(Change.of(job).set(values), now)
        if await self.store.apply_each([JobWrite(change, lease_token=None)]) == [True]:
            self.effects.applied([change])
        if admission_id is not None:
            await self.store.drop_admission(admission_id)  # the job holds its reservation now
        reopened = await self.store.get_job(job_id)
        return ContinueResult(
            job_id=job_id, state=(reopened or job).state.value, requested=additional,
            additional=granted.results, clamped_by=list(granted.clamped_by),
        )  # fmt: skip

    async def _admit(self, labels: dict[str, str], requested: int, max_credits: int | None) -> tuple[Grant, str | None]:
        """The grant, and the id of the admission holding its reservation (None if no
        reserving budget matches). Serialized in the store, so two submitters cannot both
        take the last of a budget."""
        if not self.config.budgets:
            return grant(self.config, labels, requested, (), max_credits=max_credits), None
        now = self.clock()
        starts = period_starts(self.config, now)
        decided: list[Grant] = []

        def decide(usage: Any) -> int | None:
            budget_statuses = statuses(self.config, now, usage)
            decided.append(grant(self.config, labels, requested, budget_statuses, max_credits=max_credits))
            return decided[-1].credits if decided[-1].reserving else None

        admission_id = await self.store.admit(labels, now, decide, starts, ADMISSION_TTL)
        return decided[-1], admission_id

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
        now = self.clock()
        facts = {"note": note} if note else {}
        detail = transitions.decision_detail("manual", job.credits_used, self.config.config_hash, **facts)
        change = transitions.decide_cancel(Change.of(job), Reason.MANUAL, detail, now)
        if await self.store.apply_each([JobWrite(change, lease_token=None)]) == [True]:
            self.effects.applied([change])
            claimed = await self.store.claim_due(
                now, horizon=timedelta(0), limit=1, lease_ttl=self.config.supervisor.lease_ttl, job_id=job_id
            )
            if claimed:  # else the daemon claimed it first and sends the cancel itself
                handler = JobHandler(lambda: self.config, self.client, self._write, self.clock, self.effects)
                await handler.handle(claimed[0])
        return await self.store.get_job(job_id)

    async def _write(self, job_write: JobWrite) -> bool:
        return await self.store.apply_each([job_write]) == [True]

    async def manual_cancel(self, job_id: str, note: str | None = None) -> Job:
        """The manual cancel use case: its inputs checked, then `cancel`; JobNotTracked if unknown."""
        validate_job_id(job_id)
        inputs.text("reason", note, max_length=inputs.MAX_REASON)
        job = await self.cancel(job_id, note)
        if job is None:
            raise JobNotTracked(job_id)
        return job

    async def results(self, job_id: str, target: ResultsFile) -> Saved:
        """A job's results into `target` (continued where a file ends), whether it is tracked
        or not: any job the API key can read."""
        validate_job_id(job_id)
        return await save_results(self.client, job_id, target)

    async def budgets(self) -> BudgetsView:
        """Every budget's period and forecast (`budgets`, `GET /v1/budgets`)."""
        now = self.clock()
        return BudgetsView(generated_at=now, budgets=await budget_views(self.store, self.config, now))

    async def jobs(self, state: str | None = None, labels: Mapping[str, str] | None = None) -> list[Job]:
        """The jobs in `state` (all if None) that carry every one of `labels`."""
        found = await self.store.list_jobs(inputs.state(state))
        return [job for job in found if labels_match(labels, job.labels)]

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
