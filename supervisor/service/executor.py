"""One claimed job, one step: poll → decide → act → record.

The handler holds the job's lease. What it learns becomes a `JobWrite` (values and
events) that the batch writer applies under that lease. The decision to cancel is
written and committed *before* the cancel call, so a crash in between leaves a job in
`cancelling` that the next claimer sends again (the API answers 409 if it had landed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from supervisor.adapters import failpoints, metrics
from supervisor.adapters.clado import (
    ApiKeyRejected,
    CladoClient,
    CladoError,
    JobNotFound,
    JobStatus,
    RequestRejected,
)
from supervisor.config import Config, Policy
from supervisor.core.states import TERMINAL, Reason, State, check_transition, final_state
from supervisor.core.policy import Evaluation, Observation, evaluate, observed_rate
from supervisor.adapters.webhooks import Webhooks
from supervisor.adapters.store import JobWrite, event_row
from supervisor.core.job import Job

log = structlog.get_logger("supervisor.handler")

Write = Callable[[JobWrite], Awaitable[bool]]

# While the API is unreachable a job is retried at growing gaps, up to its poll interval.
_ERROR_BACKOFF_FIRST = 1.0
# While the API key is rejected nobody polls; jobs are looked at again after this.
_AUTH_RETRY = timedelta(seconds=30)


def job_policy(config: Config, job: Job) -> Policy:
    """The job's policy from the current config, with its per-job overrides."""
    policy = config.resolve_policy(job.policy)
    overrides: dict[str, Any] = {}
    if job.max_runtime_s is not None:
        overrides["max_runtime"] = timedelta(seconds=job.max_runtime_s)
    if job.max_credits is not None:
        overrides["max_credits"] = job.max_credits
    return policy.model_copy(update=overrides) if overrides else policy


class JobHandler:
    def __init__(
        self,
        config: Config,
        client: CladoClient,
        write: Write,
        clock: Callable[[], datetime],
        webhooks: Webhooks | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self._write = write
        self._clock = clock
        self._webhooks = webhooks
        self._on_phase: Callable[[str, str], None] = lambda job_id, phase: None

    def on_phase(self, callback: Callable[[str, str], None]) -> None:
        """Tell the daemon when a job enters the cancel phase (shutdown lets it finish)."""
        self._on_phase = callback

    async def handle(self, job: Job) -> None:
        state = State(job.state)
        if state is State.WATCHING:
            await self._watch(job)
        elif state is State.CANCELLING:
            await self._send_cancel(job)
        elif state is State.CONFIRMING:
            await self._confirm(job)

    # -- watching -----------------------------------------------------------------------

    async def _watch(self, job: Job) -> None:
        status = await self._poll(job)
        if status is None:
            return
        now = self._clock()
        values = self._progress(job, status, now)
        if status.is_final:
            await self._finish(job, status, values, now, reason=self._external_reason(status))
            return
        policy = job_policy(self.config, job)
        observation = Observation(
            remote_status=status.status,
            credits=values["credits_used"],
            started_at=values["remote_created_at"] or job.submitted_at,
            last_progress_at=values["last_progress_at"],
            credits_per_s=values["credits_per_s"],
            warned=frozenset(job.warned or ()),
        )
        verdict = evaluate(
            observation, policy, now, poll_interval=self.config.supervisor.poll_interval
        )
        events = self._warnings(job, verdict, values, now)
        if verdict.breach is not None:
            if policy.action == "cancel" and not self.config.supervisor.dry_run:
                await self._decide_cancel(job, values, events, verdict, policy, now)
                return
            self._would_cancel(job, verdict, policy, values, events, now)
        values["next_check_at"] = verdict.next_check_at
        if await self._write(JobWrite(job.job_id, job.lease_token, values, events)):
            self._emit_warnings(job, events, values)

    def _progress(self, job: Job, status: JobStatus, now: datetime) -> dict[str, Any]:
        credits = status.result_count * self.config.api.credits_per_result
        started_running = job.remote_status in (None, "pending") and status.status not in (
            "pending",
        )
        progressed = credits > job.credits_used or started_running
        return {
            "remote_status": status.status,
            "credits_used": credits,
            "remote_created_at": status.created_at or job.remote_created_at,
            "last_progress_at": now if progressed or job.last_progress_at is None else job.last_progress_at,
            "credits_per_s": observed_rate(
                job.credits_used, job.last_polled_at, credits, now, job.credits_per_s
            ),
            "last_polled_at": now,
            "poll_errors": 0,
            "last_error": None,
            "updated_at": now,
        }

    def _warnings(
        self, job: Job, verdict: Evaluation, values: dict[str, Any], now: datetime
    ) -> list[dict[str, Any]]:
        events = []
        for warning in verdict.warnings:
            detail = {
                "limit": warning.limit,
                "fraction": warning.fraction,
                "value": round(warning.value, 3),
                "threshold": warning.threshold,
                "config_hash": self.config.config_hash,
            }
            log.warning("limit warning", job_id=job.job_id, policy=job.policy, **detail)
            metrics.WARNINGS.labels(warning.limit).inc()
            events.append(event_row("warning", now, reason=warning.limit, detail=detail))
        if verdict.warnings:
            values["warned"] = [*(job.warned or ()), *(w.key for w in verdict.warnings)]
        return events

    def _would_cancel(
        self,
        job: Job,
        verdict: Evaluation,
        policy: Policy,
        values: dict[str, Any],
        events: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        """Observe mode and dry run: record the decision once, do not act on it."""
        if job.would_cancel_reason is not None or verdict.breach is None:
            return
        detail = self._decision_detail(verdict, policy, values)
        values.update(
            would_cancel_reason=verdict.breach.reason,
            would_cancel_at=now,
            would_cancel_credits=values["credits_used"],
        )
        events.append(event_row("would_cancel", now, reason=verdict.breach.reason, detail=detail))
        metrics.WOULD_CANCEL.labels(verdict.breach.reason).inc()
        log.warning(
            "would cancel (observe mode)",
            job_id=job.job_id, state=job.state, policy=policy.name,
            reason=verdict.breach.reason, **detail,
        )

    async def _decide_cancel(
        self,
        job: Job,
        values: dict[str, Any],
        events: list[dict[str, Any]],
        verdict: Evaluation,
        policy: Policy,
        now: datetime,
    ) -> None:
        assert verdict.breach is not None
        check_transition(State.WATCHING, State.CANCELLING)
        reason = verdict.breach.reason
        detail = self._decision_detail(verdict, policy, values)
        values.update(
            state=State.CANCELLING.value,
            cancel_reason=reason,
            cancel_detail=detail,
            cancel_requested_at=now,
            credits_at_decision=values["credits_used"],
            next_check_at=now,
        )
        events.append(
            event_row(
                "transition", now, from_state=State.WATCHING.value,
                to_state=State.CANCELLING.value, reason=reason, detail=detail,
            )
        )
        log.warning(
            "cancelling runaway job",
            job_id=job.job_id, state=State.CANCELLING.value, policy=policy.name,
            reason=reason, **detail,
        )
        self._on_phase(job.job_id, "cancel")
        metrics.CANCELS.labels(reason).inc()
        # Keep the lease: this handler sends the cancel right after the commit.
        committed = await self._write(
            JobWrite(job.job_id, job.lease_token, values, events, release=False)
        )
        if committed:
            self._emit_warnings(job, events, values)
            self._emit("cancel_requested", job, reason=reason, state=State.CANCELLING.value,
                       credits=values["credits_used"], detail=detail)
            failpoints.hit(failpoints.AFTER_CANCEL_DECISION)
            await self._send_cancel(job.with_values(values))

    def _decision_detail(self, verdict: Evaluation, policy: Policy, values: dict[str, Any]) -> dict[str, Any]:
        assert verdict.breach is not None
        return {
            **verdict.breach.detail(),
            "credits": values["credits_used"],
            "rule": f"policies.{policy.name}.{verdict.breach.limit}",
            "config_hash": self.config.config_hash,
        }

    # -- cancelling ---------------------------------------------------------------------

    async def _send_cancel(self, job: Job) -> None:
        self._on_phase(job.job_id, "cancel")
        attempts = job.cancel_attempts + 1
        base = {"cancel_attempts": attempts, "cancel_sent_at": job.cancel_sent_at or self._clock()}
        bound = log.bind(job_id=job.job_id, state=job.state, policy=job.policy, reason=job.cancel_reason)
        try:
            result = await self.client.cancel(job.job_id)
        except JobNotFound:
            await self._transition(job, State.LOST, base, detail={"cancel": "HTTP 404"})
            return
        except RequestRejected as exc:
            # 400/403: the API will not take this cancel, however often it is sent.
            bound.error("cancel refused by the API", error=str(exc))
            await self._transition(job, State.UNCONFIRMED, base, detail={"cancel": str(exc)})
            return
        except CladoError as exc:  # API down, throttled, key rejected: the decision stands, retry
            now = self._clock()
            retry = _AUTH_RETRY if isinstance(exc, ApiKeyRejected) else self._backoff(attempts)
            bound.warning("cancel not sent yet; will retry", error=str(exc), retry_in=retry.total_seconds())
            values = {**base, "last_error": str(exc), "next_check_at": now + retry, "updated_at": now}
            events = [event_row("cancel_error", now, reason=job.cancel_reason, detail={"error": str(exc)})]
            await self._write(JobWrite(job.job_id, job.lease_token, values, events))
            return
        now = self._clock()
        answer = "accepted" if result.accepted else "already final (409)"
        bound.info("cancel sent", answer=answer)
        await self._transition(
            job,
            State.CONFIRMING,
            {**base, "cancel_acked_at": now, "next_check_at": now + self.config.supervisor.confirm_interval},
            detail={"cancel": answer, "message": result.message},
        )

    # -- confirming ---------------------------------------------------------------------

    async def _confirm(self, job: Job) -> None:
        status = await self._poll(job)
        if status is None:
            return
        now = self._clock()
        values = self._progress(job, status, now)
        if status.is_final:
            await self._finish(job, status, values, now, reason=job.cancel_reason)
            return
        deadline = (job.cancel_acked_at or now) + self.config.supervisor.confirm_timeout
        if now >= deadline:
            log.error(
                "cancel not confirmed in time: the job still runs and may keep spending",
                job_id=job.job_id, policy=job.policy, reason=job.cancel_reason,
                remote_status=status.status, credits=values["credits_used"],
            )
            await self._transition(job, State.UNCONFIRMED, values, detail={"remote_status": status.status})
            return
        values["next_check_at"] = min(now + self.config.supervisor.confirm_interval, deadline)
        await self._write(JobWrite(job.job_id, job.lease_token, values))

    # -- shared -------------------------------------------------------------------------

    async def _poll(self, job: Job) -> JobStatus | None:
        """The job's status, or None after recording why it could not be had."""
        try:
            return await self.client.status(job.job_id)
        except JobNotFound:
            await self._transition(job, State.LOST, {}, detail={"status": "HTTP 404"})
        except ApiKeyRejected as exc:
            now = self._clock()
            values = {"last_error": str(exc), "next_check_at": now + _AUTH_RETRY, "updated_at": now}
            await self._write(JobWrite(job.job_id, job.lease_token, values))
        except CladoError as exc:
            now = self._clock()
            errors = job.poll_errors + 1
            retry = min(self._backoff(errors), self.config.supervisor.poll_interval)
            if job.state == State.CONFIRMING.value:
                retry = min(retry, self.config.supervisor.confirm_interval)
            log.warning(
                "status poll failed", job_id=job.job_id, state=job.state,
                error=str(exc), errors=errors, retry_in=retry.total_seconds(),
            )
            values = {
                "poll_errors": errors,
                "last_error": str(exc),
                "next_check_at": now + retry,
                "updated_at": now,
            }
            events = [event_row("poll_error", now, detail={"error": str(exc)})] if errors == 1 else []
            await self._write(JobWrite(job.job_id, job.lease_token, values, events))
        return None

    async def _finish(
        self, job: Job, status: JobStatus, values: dict[str, Any], now: datetime, reason: str | None
    ) -> None:
        values.update(final_status=status.status, confirmed_at=now)
        detail: dict[str, Any] = {"remote_status": status.status, "credits": values["credits_used"]}
        if job.would_cancel_credits is not None:
            detail["would_have_saved"] = max(0, values["credits_used"] - job.would_cancel_credits)
        if job.credits_at_decision is not None:
            detail["credits_after_decision"] = max(0, values["credits_used"] - job.credits_at_decision)
        await self._transition(job, final_state(status.status), values, detail=detail, reason=reason)

    async def _transition(
        self,
        job: Job,
        target: State,
        values: dict[str, Any],
        *,
        detail: dict[str, Any],
        reason: str | None = None,
    ) -> None:
        current = State(job.state)
        check_transition(current, target)
        now = self._clock()
        reason = reason if reason is not None else job.cancel_reason
        values = {**values, "state": target.value, "updated_at": now}
        if target in TERMINAL and target is not State.UNCONFIRMED:
            # The unused part of a reservation is released, except when the cancel was never
            # confirmed: that job may still be spending.
            values["reserved_credits"] = None
        if target is State.CANCELLED and job.cancel_reason is None:
            values["cancel_reason"] = reason
        event = event_row(
            "transition", now, from_state=current.value, to_state=target.value, reason=reason, detail=detail
        )
        level = "error" if target in (State.UNCONFIRMED, State.LOST) else "info"
        getattr(log, level)(
            "job " + target.value,
            job_id=job.job_id, state=target.value, policy=job.policy, reason=reason, **detail,
        )
        if await self._write(JobWrite(job.job_id, job.lease_token, values, [event])):
            self._observe_transition(job, target, values, now)

    def _emit_warnings(self, job: Job, events: list[dict[str, Any]], values: dict[str, Any]) -> None:
        """Webhooks for warnings, once their events are committed (so each fires once)."""
        for event in events:
            if event["kind"] == "warning":
                self._emit("warning", job, reason=event["reason"], credits=values["credits_used"], detail=event["detail"])

    def _emit(self, event: str, job: Job, **fields: Any) -> None:
        if self._webhooks is not None:
            self._webhooks.emit(event, job_id=job.job_id, policy=job.policy, **fields)

    def _observe_transition(self, job: Job, target: State, values: dict[str, Any], now: datetime) -> None:
        metrics.TRANSITIONS.labels(target.value).inc()
        if target in (State.CANCELLED, State.UNCONFIRMED):
            self._emit(target.value, job, reason=values.get("cancel_reason") or job.cancel_reason,
                       state=target.value, credits=values.get("credits_used", job.credits_used))
        if job.cancel_requested_at is None or target not in TERMINAL:
            return
        metrics.CONFIRMATION.observe((now - job.cancel_requested_at).total_seconds())
        limit = job_policy(self.config, job).max_credits
        if job.cancel_reason == Reason.MAX_CREDITS and limit is not None and "credits_used" in values:
            metrics.CREDIT_OVERSHOOT.observe(max(0, values["credits_used"] - limit))

    @staticmethod
    def _external_reason(status: JobStatus) -> str | None:
        return Reason.EXTERNAL if status.status == "cancelled" else None

    @staticmethod
    def _backoff(attempt: int) -> timedelta:
        return timedelta(seconds=min(60.0, _ERROR_BACKOFF_FIRST * 2 ** (attempt - 1)))
