"""One claimed job, one step: poll → decide → act → record.

The handler holds the job's lease. What it learns becomes a Change (core.transitions)
that the batch writer applies under that lease; once applied, the effects step logs,
counts and announces it. The decision to cancel is written and committed *before* the
cancel call, so a crash in between leaves a job in `cancelling` that the next claimer
sends again (the API answers 409 if it had landed).

Some terminal jobs are still looked at, read-only (states.RECHECKED, until the row's
`recheck_until`): a completed job anyone may continue, a lost one that may come back, an
unconfirmed one that may still spend. A look that finds one running again reopens it.

The poll itself, what a failed one means (backoff, misses earning `lost`, the all-404 check)
and when a job is looked at next are polling.py's.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters import failpoints
from supervisor.adapters.clado import ApiKeyRejected, CladoClient, CladoError, JobNotFound, JobStatus, RequestRejected
from supervisor.adapters.store import JobWrite
from supervisor.config import Config, Policy
from supervisor.core import transitions
from supervisor.core.backoff import delay
from supervisor.core.job import CHECK_ENFORCE, Job
from supervisor.core.policy import (
    MIN_POLL_GAP,
    Breach,
    Evaluation,
    Observation,
    evaluate,
    job_policy,
    next_deadline,
    observed_rate,
)
from supervisor.core.states import RECHECKED, Reason, State
from supervisor.core.transitions import Change
from supervisor.service.effects import Effects
from supervisor.service.polling import (
    AUTH_RETRY,
    Poller,
    error_backoff,
    next_recheck,
    recheck_window,
    unconfirmed_watch,
)

log = structlog.get_logger("supervisor.handler")

Write = Callable[[JobWrite], Awaitable[bool]]

# A cancel the job does not heed is sent again at growing gaps, up to this many poll intervals.
_RESEND_CAP_POLLS = 4
# The remote status of a job never seen answered: not `pending` (no max_queued from nothing).
_UNKNOWN_STATUS = "unknown"


class JobHandler:
    def __init__(
        self,
        config: Callable[[], Config],
        client: CladoClient,
        write: Write,
        clock: Callable[[], datetime],
        effects: Effects,
    ) -> None:
        self._config = config
        self.client = client
        self._write_job = write
        self._clock = clock
        self._effects = effects
        self._on_phase: Callable[[str, str], None] = lambda job_id, phase: None
        # How late polls run now, in seconds (the dispatcher's lag watch): probes widen with it.
        self.lag: Callable[[], float] = lambda: 0.0
        # The draw (0..1) that brings a regular poll up to 10 % early (core.policy
        # ROUTINE_JITTER): random, so jobs tracked together spread out; a test may fix it.
        self.jitter: Callable[[], float] = random.random
        self.poller = Poller(config, client, clock, effects)

    @property
    def config(self) -> Config:
        return self._config()

    @property
    def api_misconfigured(self) -> bool:
        """Every request 404s, the credits endpoint too (/readyz reads this, through the
        dispatcher): the base_url is wrong, so no job is lost for it."""
        return self.poller.api_misconfigured

    @property
    def api_drift(self) -> bool:
        """Job after job's status answer is unreadable, none readable in between."""
        return self.poller.api_drift

    def on_phase(self, callback: Callable[[str, str], None]) -> None:
        """Tell the daemon when a job enters the cancel phase (shutdown lets it finish)."""
        self._on_phase = callback

    async def handle(self, job: Job) -> Job | None:
        """One step of the job. Returns the job when its next check is due before the next
        tick: its lease is kept, and the caller makes that check itself at
        `next_check_at` (see `_enforce`); else None."""
        if job.state is State.WATCHING:
            return await self._watch(job)
        if job.state is State.CANCELLING:
            await self._send_cancel(job)
        elif job.state is State.CONFIRMING:
            await self._confirm(job)
        elif job.state in RECHECKED and job.recheck_until is not None:
            return await self._recheck(job)
        return None

    # -- watching -----------------------------------------------------------------------

    async def _poll(self, job: Job) -> JobStatus | None:
        """The job's status; or None once what a failed poll means is written, with the limits
        that need no status (runtime, queued, blind grace) still enforced."""
        outcome = await self.poller.status(job)
        if isinstance(outcome, JobStatus):
            return outcome
        await self._unseen(outcome)
        return None

    async def _unseen(self, change: Change) -> None:
        """A poll that gave no status: a watching job, or one lost while it was watched, still
        has its deadlines. Its breach is decided and the cancel sent as for any other; else it
        is looked at again by its next deadline (a lost job's re-checking lasts until then)."""
        job = change.after
        now = self._clock()
        settings = self.config.supervisor
        acked = job.cancel_acked_at
        if job.state is State.CONFIRMING and acked is not None and now >= acked + settings.confirm_timeout:
            # No status to confirm with, for confirm_timeout: the job may still spend.
            detail = {"remote_status": job.remote_status, "cancel": job.cancel_answer, "error": job.last_error}
            await self._write(transitions.give_up(change, detail, now, **unconfirmed_watch(settings, now)))
            return
        watched = job.state is State.WATCHING or (job.state is State.LOST and job.cancel_requested_at is None)
        if not watched:
            await self._write(change)
            return
        policy = job_policy(self.config, job)
        observation = self._observation(job, now, unread=True)
        # The failed poll's own retry is the regular next look; a deadline before it wins.
        retry = max(job.next_check_at - now, MIN_POLL_GAP)
        verdict = evaluate(observation, policy, now, poll_interval=retry)
        if (breach := verdict.breach) is not None:
            if await self._breached(change, breach, policy, now):
                return
            change = transitions.would_cancel(change, breach.reason, self._detail(change, breach, policy), now)
        check = verdict.next_check
        upcoming: dict[str, Any] = {"next_check_at": check.at, "check_priority": check.priority}
        deadline = next_deadline(observation, policy, now)
        if job.state is State.LOST and deadline is not None:
            # Still claimed when its deadline comes, past the reopen window if need be.
            upcoming["recheck_until"] = max(deadline, job.recheck_until or deadline)
            if deadline < check.at:
                upcoming.update(next_check_at=deadline, check_priority=CHECK_ENFORCE)
        await self._write(change.set(upcoming))

    def _observation(self, job: Job, now: datetime, *, unread: bool) -> Observation:
        return Observation(
            remote_status=job.remote_status or _UNKNOWN_STATUS,
            credits=job.credits_used,
            started_at=job.started_at,
            last_progress_at=job.last_progress_at or now,
            credits_per_s=job.credits_per_s,
            warned=frozenset(job.warned),
            first_seen_at=job.submitted_at,
            unread=unread,
            blind_since=job.blind_since,
            # The most the API lets it spend: at or under max_credits its rate need not be probed.
            api_cap=None if job.result_limit is None else job.result_limit * self.config.api.credits_per_result,
        )

    async def _watch(self, job: Job) -> Job | None:
        status = await self._poll(job)
        if status is None:
            return None
        now = self._clock()
        change = self._observed(Change.of(job), status, now)
        if status.is_final:
            await self._write(self._finish(change, status.status, now))
            return None
        return await self._enforce(change, status, now)

    async def _enforce(self, change: Change, status: JobStatus, now: datetime) -> Job | None:
        """A watching job seen running: its limits evaluated, a breach decided and sent."""
        config = self.config
        job = change.job
        policy = job_policy(config, job)
        seen = change.after
        observation = self._observation(seen, now, unread=status.result_count is None)
        verdict = evaluate(
            observation, policy, now, poll_interval=config.supervisor.poll_interval,
            lag=timedelta(seconds=self.lag()), jitter=self.jitter(),
        )  # fmt: skip
        change = self._warnings(change, verdict, config, now)
        if (breach := verdict.breach) is not None:
            if await self._breached(change, breach, policy, now):
                return None
            change = transitions.would_cancel(change, breach.reason, self._detail(change, breach, policy), now)
        check = verdict.next_check
        change = change.set({"next_check_at": check.at, "check_priority": check.priority})
        # The dispatcher claims at its ticks: a check due before the next one would wait for
        # it (up to a tick: 10 credits at 10 results/s), so the lease is kept and the caller
        # makes that check itself, on time (waiting for it outside its handling slot).
        soon = check.at - now < config.supervisor.tick_interval
        if await self._write(change, release=not soon) and soon:
            return change.after
        return None

    async def _breached(self, change: Change, breach: Breach, policy: Policy, now: datetime) -> bool:
        """A breach decided (written before the call) and its cancel sent: True. False when
        the policy only observes or this is a dry run (the caller records `would_cancel`)."""
        if policy.action != "cancel" or self.config.supervisor.dry_run:
            return False
        decided = transitions.decide_cancel(change, breach.reason, self._detail(change, breach, policy), now)
        self._on_phase(change.job_id, "cancel")
        # Keep the lease: this handler sends the cancel right after the commit.
        if await self._write(decided, release=False):
            failpoints.hit(failpoints.AFTER_CANCEL_DECISION)
            await self._send_cancel(decided.after)
        return True

    def _detail(self, change: Change, breach: Breach, policy: Policy) -> dict[str, Any]:
        # A blind cancel follows on_blind (the policy's, or a covering budget's).
        key = "on_blind" if breach.reason == Reason.BLIND else breach.limit
        return transitions.decision_detail(
            f"policies.{policy.name}.{key}", change.after.credits_used, self.config.config_hash, **breach.detail()
        )

    def _observed(self, change: Change, status: JobStatus, now: datetime) -> Change:
        """What a status answer tells of the job: its progress, and an alert the first time
        its status is outside the documented list."""
        change = change.set(self._progress(change.after, status, now))
        if status.count_source is None:
            change = transitions.unreadable_answer(
                change, transitions.NO_COUNT, {"remote_status": status.status}, now, drifting=self._effects.drifting
            )
        else:
            change = transitions.sighted(change, now, status.count_source, drift_since=self._effects.drift_since)
        if not status.recognized:
            change = transitions.alert_once(change, transitions.UNKNOWN_STATUS, {"status": status.status}, now)
        return change

    def _progress(self, job: Job, status: JobStatus, now: datetime) -> dict[str, Any]:
        # Billing never refunds: the record keeps the highest count seen, and only a count
        # above it is progress (a count flickering 50/49/50 is a stall, not progress).
        if status.result_count is None:
            # No count: the job keeps its last credits, progress and rate (unread is not zero).
            return {
                "remote_status": status.status, "remote_created_at": status.created_at or job.remote_created_at,
                "last_polled_at": now, "poll_errors": 0, "last_error": None,
                "miss_kind": None, "miss_count": 0, "miss_since": None, "updated_at": now,
            }  # fmt: skip
        credits = max(job.credits_used, status.result_count * self.config.api.credits_per_result)
        started_running = job.remote_status in (None, "pending") and status.status != "pending"
        progressed = credits > job.credits_used or started_running
        # A rate is measured between two looks at the job running (see observed_rate).
        running = not started_running and status.status != "pending"
        return {
            "remote_status": status.status,
            "credits_used": credits,
            "remote_created_at": status.created_at or job.remote_created_at,
            "last_progress_at": now if progressed or job.last_progress_at is None else job.last_progress_at,
            "credits_per_s": observed_rate(
                job.credits_used, job.last_progress_at, credits, now, job.credits_per_s, running=running
            ),
            "last_polled_at": now,
            "poll_errors": 0,
            "last_error": None,
            "miss_kind": None,
            "miss_count": 0,
            "miss_since": None,
            "updated_at": now,
        }

    @staticmethod
    def _warnings(change: Change, verdict: Evaluation, config: Config, now: datetime) -> Change:
        for warning in verdict.warnings:
            detail = {
                "limit": warning.limit,
                "fraction": warning.fraction,
                "value": round(warning.value, 3),
                "threshold": warning.threshold,
                "config_hash": config.config_hash,
            }
            change = transitions.warn(change, warning.key, warning.limit, detail, now)
        return change

    # -- cancelling ---------------------------------------------------------------------

    async def _send_cancel(self, job: Job) -> None:
        self._on_phase(job.job_id, "cancel")
        now = self._clock()
        change = transitions.cancel_attempted(Change.of(job), now)
        bound = log.bind(job_id=job.job_id, state=job.state.value, policy=job.policy, reason=job.cancel_reason)
        try:
            result = await self.client.cancel(job.job_id)
        except JobNotFound as exc:
            if self.api_misconfigured or await self.poller.check_api_path(job):
                # Every request 404s: the job is not lost, the URL is wrong; the decision stands.
                now = self._clock()
                retry = self.config.supervisor.poll_interval
                await self._write(transitions.cancel_not_sent(change, f"HTTP 404: {exc}", now, now + retry))
                return
            now = self._clock()
            await self._write(
                transitions.lose(change, {"cancel": "HTTP 404"}, now, **recheck_window(self.config.supervisor, now))
            )
            return
        except RequestRejected as exc:
            # 400/403: the API will not take this cancel, however often it is sent.
            bound.error("cancel refused by the API", error=str(exc))
            now = self._clock()
            if exc.status_code == 403 and job.miss_kind == transitions.FORBIDDEN:
                # Sent at the deadline of a job lost to 403s: it ends lost, as it was.
                recheck = recheck_window(self.config.supervisor, now)
                await self._write(transitions.lose(change, {"cancel": str(exc)}, now, **recheck))
                return
            await self._write(
                transitions.give_up(change, {"cancel": str(exc)}, now, **unconfirmed_watch(self.config.supervisor, now))
            )
            return
        except CladoError as exc:  # API down, throttled, key rejected: the decision stands, retry
            now = self._clock()
            retry = AUTH_RETRY if isinstance(exc, ApiKeyRejected) else error_backoff(change.after.cancel_attempts)
            bound.warning("cancel not sent yet; will retry", error=str(exc), retry_in=retry.total_seconds())
            await self._write(transitions.cancel_not_sent(change, str(exc), now, now + retry))
            return
        now = self._clock()
        settings = self.config.supervisor
        bound.info("cancel sent", answer="accepted" if result.accepted else "refused")
        # A refused cancel is sent again at growing gaps while the job runs; a taken one once
        # the job had half its confirm_timeout to stop (a cancel may take a while to land),
        # if it is still running and spending.
        first = (
            max(settings.poll_interval, settings.confirm_timeout / 2) if result.accepted else settings.confirm_interval
        )
        cap = max(first, settings.poll_interval * _RESEND_CAP_POLLS)
        gap = timedelta(seconds=delay(change.after.cancel_attempts, first.total_seconds(), cap.total_seconds()))
        next_check = now + settings.confirm_interval
        await self._write(transitions.cancel_sent(change, result.accepted, result.message, now, next_check, now + gap))

    # -- confirming ---------------------------------------------------------------------

    async def _confirm(self, job: Job) -> None:
        status = await self._poll(job)
        if status is None:
            return
        now = self._clock()
        settings = self.config.supervisor
        change = self._observed(Change.of(job), status, now)
        if status.is_final:
            await self._write(self._finish(change, status.status, now))
            return
        seen = change.after
        deadline = (job.cancel_acked_at or now) + settings.confirm_timeout
        if now >= deadline:
            log.error(
                "cancel not confirmed in time: the job still runs and may keep spending; polled until final",
                job_id=job.job_id, policy=job.policy, reason=job.cancel_reason,
                remote_status=status.status, credits=seen.credits_used,
            )  # fmt: skip
            detail = {"remote_status": status.status, "cancel": job.cancel_answer}
            await self._write(
                transitions.give_up(change, detail, now, **unconfirmed_watch(self.config.supervisor, now))
            )
            return
        # Still running after its cancel was answered: refused ("only pending jobs can be
        # cancelled"), or taken and not heeded while the count still grows.
        refused = job.cancel_answer == "refused"
        ignored = not refused and seen.credits_used > job.credits_used
        if refused:
            change = transitions.alert_once(change, transitions.CANCEL_REFUSED, {"remote_status": status.status}, now)
        due = job.cancel_resend_at is not None and now >= job.cancel_resend_at
        if due and (refused or ignored):
            why = transitions.CANCEL_REFUSED if refused else transitions.CANCEL_IGNORED
            if ignored:
                facts = {"remote_status": status.status, "credits_since_cancel": seen.credits_used}
                change = transitions.alert_once(change, transitions.CANCEL_IGNORED, facts, now)
            resend = transitions.resend_cancel(change, why, now)
            if await self._write(resend, release=False):
                await self._send_cancel(resend.after)
            return
        await self._write(change.set({"next_check_at": min(now + settings.confirm_interval, deadline)}))

    # -- terminal jobs still looked at ----------------------------------------------------

    async def _recheck(self, job: Job) -> Job | None:
        """A read-only look at a completed, lost or unconfirmed job: its spend is recorded,
        a job running again is reopened (completed, lost) and watched, a final status ends
        an unconfirmed or lost job."""
        status = await self._poll(job)
        if status is None:
            return None
        now = self._clock()
        change = self._observed(Change.of(job), status, now)
        if job.state is State.UNCONFIRMED:
            if status.is_final:
                await self._write(self._finish(change, status.status, now))
            else:
                await self._write(change.set(unconfirmed_watch(self.config.supervisor, now)))
            return None
        if not status.is_final:
            return await self._enforce(transitions.reopen(change, now), status, now)
        if job.state is State.LOST:
            await self._write(self._finish(change, status.status, now))
            return None
        await self._write(change.set(next_recheck(self.config.supervisor, job, now)))
        return None

    def _finish(self, change: Change, remote_status: str, now: datetime) -> Change:
        return transitions.finish(change, remote_status, now, **recheck_window(self.config.supervisor, now))

    # -- shared -------------------------------------------------------------------------

    async def _write(self, change: Change, *, release: bool = True) -> bool:
        """Apply the change under this job's lease; its effects follow only if it was applied."""
        if not await self._write_job(JobWrite(change, change.job.lease_token, release=release)):
            return False
        self._effects.applied([change])
        return True
