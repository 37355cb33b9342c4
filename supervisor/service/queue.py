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

`plan` is the pure rule: which submission fits now, and why the others wait.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters import failpoints, metrics
from supervisor.adapters.clado import ApiUnavailable, CladoClient, CladoError, OutOfCredits, RateLimited
from supervisor.adapters.store import NewJob, Store, SubmissionPlan, Waiting, db_error_text
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config
from supervisor.core.budgets import AdmissionRefused, BudgetStatus, Usage, grant, period_start, statuses
from supervisor.service.guards import Backoff

log = structlog.get_logger("supervisor.queue")

QUEUED, INITIATING, STARTED, ORPHANED = "queued", "initiating", "started", "orphaned"
EXPIRED, CANCELLED, FAILED = "expired", "cancelled", "failed"
STATES = (QUEUED, INITIATING, STARTED, ORPHANED, EXPIRED, CANCELLED, FAILED)
# States announced by a webhook event of the same name, once each (the daemon sends them).
ANNOUNCED = (QUEUED, ORPHANED, EXPIRED)

RATE_WINDOW = timedelta(minutes=1)  # initiate_per_minute is reckoned over any sliding minute
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


def next_period_start(period: str, timezone: str, now: datetime) -> datetime | None:
    """When the period after the one containing `now` starts (None: a total budget never resets)."""
    start = period_start(period, timezone, now)
    if start is None:
        return None
    # Past the end of any period of this kind, then aligned back (DST-safe, months of any length).
    step = {"hour": timedelta(minutes=90), "day": timedelta(hours=36), "week": timedelta(days=8)}
    return period_start(period, timezone, start + step.get(period, timedelta(days=32)))


# -- the pure rule -----------------------------------------------------------------------------


def wanted(config: Config, row: Mapping[str, Any]) -> tuple[int, int | None]:
    """(results a submission asks for, its policy's max_credits if enforced). The policy caps
    it at the source; a budget never clamps a queued submission: it waits until it fits."""
    policy = config.resolve_policy(row["policy"])
    # An observe-mode policy or a dry run only records what it would do: no clamp either.
    enforced = policy.action == "cancel" and not config.supervisor.dry_run
    max_credits = policy.max_credits if enforced else None
    results = int(row["requested_limit"])
    if max_credits is not None:
        results = min(results, max_credits // config.api.credits_per_result)
    return results, max_credits


def _holding(config: Config, labels: Mapping[str, str], budget_statuses: Sequence[BudgetStatus]) -> list[BudgetStatus]:
    """The budgets that can hold a submission back: those it matches that do not only observe."""
    return [
        status
        for status in budget_statuses
        if status.name in config.budgets_for(dict(labels)) and config.budgets[status.name].action != "observe"
    ]


def never_fits(config: Config, row: Mapping[str, Any], budget_statuses: Sequence[BudgetStatus]) -> str | None:
    """Why waiting cannot help (the job's own worst case exceeds a reserving budget's whole
    period, or its policy allows no result), else None."""
    results, max_credits = wanted(config, row)
    if results < 1:
        per = config.api.credits_per_result
        return f"the job's max_credits ({max_credits}) allows no result at {per} credits each"
    need = results * config.api.credits_per_result
    for status in _holding(config, row["labels"], budget_statuses):
        if config.budgets[status.name].reserve and need > status.credits:
            return (
                f"budget {status.name!r} holds {status.credits} credits a {status.period}; this job may use "
                f"{need} (limit {results}): it would never fit, however long it waited"
            )
    return None


def _wait_for_budgets(
    config: Config, row: Mapping[str, Any], budget_statuses: Sequence[BudgetStatus], now: datetime
) -> Waiting | None:
    """Why the submission's whole reservation does not fit now (None: it does)."""
    results, _ = wanted(config, row)
    need = results * config.api.credits_per_result
    for status in _holding(config, row["labels"], budget_statuses):
        budget = config.budgets[status.name]
        blocked = budget.action == "block" and status.full
        if status.exhausted or blocked or (budget.reserve and status.remaining < need):
            return Waiting(f"budget:{status.name}", next_period_start(budget.period, budget.timezone, now))
    return None


def _floor_refusal(config: Config, account_credits: int | None, need: int) -> str | None:
    account = config.account
    if account is None or account.action == "observe" or account_credits is None:
        return None
    if account_credits - need < account.min_credits:
        return (
            f"the account has {account_credits} credits; this job may use {need}, which would take it "
            f"below its floor of {account.min_credits} (account.min_credits)"
        )
    return None


def plan(
    config: Config,
    candidates: Sequence[Mapping[str, Any]],
    usage: Mapping[datetime | None, Sequence[tuple[Mapping[str, str], Usage]]],
    initiates: Sequence[datetime],
    now: datetime,
    *,
    account_credits: int | None = None,
    held_until: datetime | None = None,
    only: str | None = None,
    queue: bool = True,
) -> SubmissionPlan:
    """Which submission to initiate now, and why the others wait.

    `candidates` are in queue order. `only` restricts the choice to one submission (a new
    one, submitted now): it still waits behind earlier submissions of its budgets. Without
    `queue` (a submission that is refused rather than queued) the old admission rule holds:
    the limit is clamped to what the budgets have left (core.budgets.grant), and whatever
    does not fit raises AdmissionRefused. With `queue`, a submission is never clamped by a
    budget: it waits until its whole reservation fits, the account floor allows it, and the
    initiate rate has a slot; one that never could fit is refused at once (AdmissionRefused)."""
    budget_statuses = statuses(config, now, usage)
    if not queue:
        row = next(row for row in candidates if row["id"] == only)
        results, max_credits = wanted(config, row)
        granted = grant(config, row["labels"], int(row["requested_limit"]), budget_statuses, max_credits=max_credits)
        refusal = _floor_refusal(config, account_credits, granted.credits)
        if refusal:
            raise AdmissionRefused(refusal)
        return SubmissionPlan(
            row["id"], granted.results, granted.credits if granted.reserving else None, granted.clamped_by
        )
    if only is not None:
        fresh = next(row for row in candidates if row["id"] == only)
        problem = never_fits(config, fresh, budget_statuses)
        if problem:
            raise AdmissionRefused(problem)
    waiting: dict[str, Waiting] = {}
    slot = _rate_slot(config, initiates, now, held_until)
    if slot is not None:
        return SubmissionPlan(waiting={row["id"]: Waiting("initiate_rate", slot) for row in candidates})
    blocked: dict[str, Waiting] = {}  # budget → why its queue is held (first come, first served)
    for row in candidates:
        names = {status.name for status in _holding(config, row["labels"], budget_statuses)}
        ahead = next((blocked[name] for name in sorted(names) if name in blocked), None)
        if ahead is not None:
            waiting[row["id"]] = ahead
            continue
        problem = never_fits(config, row, budget_statuses)
        wait = Waiting("never_fits", None) if problem else _wait_for_budgets(config, row, budget_statuses, now)
        results, max_credits = wanted(config, row)
        need = results * config.api.credits_per_result
        if wait is None and _floor_refusal(config, account_credits, need):
            wait = Waiting("account_floor", None)
        if wait is None and only is not None and row["id"] != only:
            # An earlier submission that fits now is the drain's to start, first.
            blocked.update(dict.fromkeys(names, Waiting("behind_earlier", now)))
            continue
        if wait is not None:
            waiting[row["id"]] = wait
            if not problem:
                blocked.update(dict.fromkeys(names, wait))
            continue
        granted = grant(config, row["labels"], results, budget_statuses, max_credits=max_credits)
        return SubmissionPlan(
            row["id"], granted.results, granted.credits if granted.reserving else None, granted.clamped_by, waiting
        )
    return SubmissionPlan(waiting=waiting)


def _rate_slot(
    config: Config, initiates: Sequence[datetime], now: datetime, held_until: datetime | None
) -> datetime | None:
    """When the next initiate may be sent, if not now: a minute after the oldest of the last
    `initiate_per_minute` initiates, or later while the API holds the client off."""
    per_minute = config.api.initiate_per_minute
    recent = sorted(at for at in initiates if at > now - RATE_WINDOW)
    slot = recent[-per_minute] + RATE_WINDOW if len(recent) >= per_minute else None
    if held_until is not None and held_until > now:
        slot = max(slot or held_until, held_until)
    return slot


# -- starting a submission ---------------------------------------------------------------------


def new_submission(
    config: Config,
    query: str,
    *,
    labels: Mapping[str, str],
    policy: str,
    limit: int,
    priority: int,
    expires_after: timedelta | None,
    now: datetime,
) -> dict[str, Any]:
    """A submission's row before it is decided on (its state is set by the store)."""
    return {
        "id": str(uuid.uuid4()), "state": QUEUED, "query": query, "labels": dict(labels), "policy": policy,
        "requested_limit": limit, "granted_limit": None, "clamped_by": None, "priority": priority,
        "reason": None, "expected_at": None, "created_at": now, "updated_at": now,
        "expires_at": now + (expires_after or config.scheduler.expires_after), "initiating_at": None,
        "owner": None, "admission_id": None, "job_id": None, "error": None, "announced": None,
    }  # fmt: skip


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
            decide = functools.partial(
                _decide, config, now=now, account_credits=account_credits, held_until=self._hold(now)
            )
            chosen = await self._store.take_submission(
                now, _period_starts(config, now), now - RATE_WINDOW, decide, ttl=INITIATE_HOLD
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
            if not await self._store.mark_announced(row["id"], row["state"]):
                continue  # another replica announced it
            credits = (row["granted_limit"] or row["requested_limit"]) * config.api.credits_per_result
            if self._webhooks is not None:
                self._webhooks.emit(
                    row["state"], submission_id=row["id"], state=row["state"], reason=row["reason"],
                    policy=row["policy"], labels=row["labels"], credits=credits,
                    detail={"limit": row["granted_limit"] or row["requested_limit"], "error": row["error"],
                            "priority": row["priority"]},
                )  # fmt: skip


def _decide(
    config: Config,
    candidates: list[dict[str, Any]],
    usage: Any,
    initiates: list[datetime],
    *,
    now: datetime,
    account_credits: int | None,
    held_until: datetime | None,
) -> SubmissionPlan:
    return plan(config, candidates, usage, initiates, now, account_credits=account_credits, held_until=held_until)


def _period_starts(config: Config, now: datetime) -> set[datetime | None]:
    return {period_start(b.period, b.timezone, now) for b in config.budgets.values()}
