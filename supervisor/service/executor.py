"""One claimed job, one step: poll → decide → act → record.

The handler holds the job's lease. What it learns becomes a Change (core.transitions)
that the batch writer applies under that lease; once applied, the effects step logs,
counts and announces it. The decision to cancel is written and committed *before* the
cancel call, so a crash in between leaves a job in `cancelling` that the next claimer
sends again (the API answers 409 if it had landed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters import failpoints
from supervisor.adapters.clado import (
    ApiKeyRejected,
    CladoClient,
    CladoError,
    JobNotFound,
    JobStatus,
    RequestRejected,
)
from supervisor.adapters.store import JobWrite
from supervisor.config import Config
from supervisor.core import transitions
from supervisor.core.backoff import delay
from supervisor.core.job import Job
from supervisor.core.policy import Evaluation, Observation, evaluate, job_policy, observed_rate
from supervisor.core.states import State
from supervisor.core.transitions import Change
from supervisor.service.effects import Effects

log = structlog.get_logger("supervisor.handler")

Write = Callable[[JobWrite], Awaitable[bool]]

# While the API is unreachable a job is retried at growing gaps, up to its poll interval.
_ERROR_BACKOFF_FIRST = 1.0
_ERROR_BACKOFF_CAP = 60.0
# While the API key is rejected nobody polls; jobs are looked at again after this.
_AUTH_RETRY = timedelta(seconds=30)


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

    @property
    def config(self) -> Config:
        return self._config()

    def on_phase(self, callback: Callable[[str, str], None]) -> None:
        """Tell the daemon when a job enters the cancel phase (shutdown lets it finish)."""
        self._on_phase = callback

    async def handle(self, job: Job) -> None:
        if job.state is State.WATCHING:
            await self._watch(job)
        elif job.state is State.CANCELLING:
            await self._send_cancel(job)
        elif job.state is State.CONFIRMING:
            await self._confirm(job)

    # -- watching -----------------------------------------------------------------------

    async def _watch(self, job: Job) -> None:
        status = await self._poll(job)
        if status is None:
            return
        now = self._clock()
        config = self.config
        change = Change.of(job).set(self._progress(job, status, now))
        if status.is_final:
            await self._write(transitions.finish(change, status.status, now))
            return
        policy = job_policy(config, job)
        seen = change.after
        observation = Observation(
            remote_status=seen.remote_status or status.status,
            credits=seen.credits_used,
            started_at=seen.started_at,
            last_progress_at=seen.last_progress_at or now,
            credits_per_s=seen.credits_per_s,
            warned=frozenset(seen.warned),
        )
        verdict = evaluate(observation, policy, now, poll_interval=config.supervisor.poll_interval)
        change = self._warnings(change, verdict, config, now)
        if verdict.breach is not None:
            detail = transitions.decision_detail(
                f"policies.{policy.name}.{verdict.breach.limit}", seen.credits_used, config.config_hash,
                **verdict.breach.detail(),
            )  # fmt: skip
            if policy.action == "cancel" and not config.supervisor.dry_run:
                decided = transitions.decide_cancel(change, verdict.breach.reason, detail, now)
                self._on_phase(job.job_id, "cancel")
                # Keep the lease: this handler sends the cancel right after the commit.
                if await self._write(decided, release=False):
                    failpoints.hit(failpoints.AFTER_CANCEL_DECISION)
                    await self._send_cancel(decided.after)
                return
            change = transitions.would_cancel(change, verdict.breach.reason, detail, now)
        await self._write(change.set({"next_check_at": verdict.next_check_at}))

    def _progress(self, job: Job, status: JobStatus, now: datetime) -> dict[str, Any]:
        credits = status.result_count * self.config.api.credits_per_result
        started_running = job.remote_status in (None, "pending") and status.status != "pending"
        progressed = credits > job.credits_used or started_running
        return {
            "remote_status": status.status,
            "credits_used": credits,
            "remote_created_at": status.created_at or job.remote_created_at,
            "last_progress_at": now if progressed or job.last_progress_at is None else job.last_progress_at,
            "credits_per_s": observed_rate(job.credits_used, job.last_polled_at, credits, now, job.credits_per_s),
            "last_polled_at": now,
            "poll_errors": 0,
            "last_error": None,
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
        except JobNotFound:
            await self._write(transitions.lose(change, {"cancel": "HTTP 404"}, self._clock()))
            return
        except RequestRejected as exc:
            # 400/403: the API will not take this cancel, however often it is sent.
            bound.error("cancel refused by the API", error=str(exc))
            await self._write(transitions.give_up(change, {"cancel": str(exc)}, self._clock()))
            return
        except CladoError as exc:  # API down, throttled, key rejected: the decision stands, retry
            now = self._clock()
            retry = _AUTH_RETRY if isinstance(exc, ApiKeyRejected) else self._backoff(change.after.cancel_attempts)
            bound.warning("cancel not sent yet; will retry", error=str(exc), retry_in=retry.total_seconds())
            await self._write(transitions.cancel_not_sent(change, str(exc), now, now + retry))
            return
        now = self._clock()
        answer = "accepted" if result.accepted else "already final (409)"
        bound.info("cancel sent", answer=answer)
        next_check = now + self.config.supervisor.confirm_interval
        await self._write(transitions.cancel_sent(change, answer, result.message, now, next_check))

    # -- confirming ---------------------------------------------------------------------

    async def _confirm(self, job: Job) -> None:
        status = await self._poll(job)
        if status is None:
            return
        now = self._clock()
        settings = self.config.supervisor
        change = Change.of(job).set(self._progress(job, status, now))
        if status.is_final:
            await self._write(transitions.finish(change, status.status, now))
            return
        deadline = (job.cancel_acked_at or now) + settings.confirm_timeout
        if now >= deadline:
            log.error(
                "cancel not confirmed in time: the job still runs and may keep spending",
                job_id=job.job_id, policy=job.policy, reason=job.cancel_reason,
                remote_status=status.status, credits=change.after.credits_used,
            )  # fmt: skip
            await self._write(transitions.give_up(change, {"remote_status": status.status}, now))
            return
        await self._write(change.set({"next_check_at": min(now + settings.confirm_interval, deadline)}))

    # -- shared -------------------------------------------------------------------------

    async def _poll(self, job: Job) -> JobStatus | None:
        """The job's status, or None after recording why it could not be had."""
        try:
            return await self.client.status(job.job_id)
        except JobNotFound:
            await self._write(transitions.lose(Change.of(job), {"status": "HTTP 404"}, self._clock()))
        except ApiKeyRejected as exc:
            now = self._clock()
            await self._write(
                Change.of(job).set({"last_error": str(exc), "next_check_at": now + _AUTH_RETRY, "updated_at": now})
            )
        except CladoError as exc:
            now = self._clock()
            settings = self.config.supervisor
            errors = job.poll_errors + 1
            retry = min(self._backoff(errors), settings.poll_interval)
            if job.state is State.CONFIRMING:
                retry = min(retry, settings.confirm_interval)
            log.warning(
                "status poll failed", job_id=job.job_id, state=job.state.value,
                error=str(exc), errors=errors, retry_in=retry.total_seconds(),
            )  # fmt: skip
            values = {"poll_errors": errors, "last_error": str(exc), "next_check_at": now + retry, "updated_at": now}
            events = [transitions.Event("poll_error", now, detail={"error": str(exc)})] if errors == 1 else []
            await self._write(Change.of(job).set(values, *events))
        return None

    async def _write(self, change: Change, *, release: bool = True) -> bool:
        """Apply the change under this job's lease; its effects follow only if it was applied."""
        if not await self._write_job(JobWrite(change, change.job.lease_token, release=release)):
            return False
        self._effects.applied([change])
        return True

    @staticmethod
    def _backoff(attempt: int) -> timedelta:
        return timedelta(seconds=delay(attempt, _ERROR_BACKOFF_FIRST, _ERROR_BACKOFF_CAP))
