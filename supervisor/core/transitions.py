"""Every move of a job, as pure functions that return a Change.

A Change is what one writer learned about one job: the job as it read it, the column
values to write and the events that explain them. Each move checks that it is a
supervisor transition (states.check_transition) before it is built, so an impossible move
raises here, in a pure function a table test covers, and never reaches a row. The store
applies a Change (adapters.store: one path, fenced by lease or by the state read), with
the outbox rows of the webhook events core.notify says it sends, in the same transaction;
the daemon counts its decision counters from the committed events (core.notify.counts) and
the effects step (service.effects) logs it: one place each, whoever decided — a poll, a
budget, the account floor or a person.

No I/O and no clock: `now` is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from supervisor.core.job import CHECK_ENFORCE, Job
from supervisor.core.states import TERMINAL, IllegalTransition, Reason, State, check_transition, final_state

# Why a status poll found no job: the detail of a `lost` job, and `Job.miss_kind`.
NOT_FOUND = "not_found"  # 404: the API no longer knows the job
FORBIDDEN = "forbidden"  # 403: "not authorized to access this job" (not this key's job)

# Alerts about a job that fire once per job (remembered in `Job.warned`, beside the limits'
# warning keys): each is an event of that kind, a warning log line, a metric and, for some,
# a webhook (core.notify).
UNKNOWN_STATUS = "unknown_status"  # a status outside the documented list: treated as running
UNREADABLE_BODY = "unreadable_body"  # an answer with no readable count: the job keeps its credits
CANCEL_REFUSED = "cancel_refused"  # 409 / success:false while the status still says running
CANCEL_IGNORED = "cancel_ignored"  # the cancel was taken, and the job runs and spends on

# A job whose spend cannot be read is `blind` (a flag on the job, not a state): set after
# BLIND_AFTER status answers in a row with no readable count, no readable status, a 403 or a
# body that cannot be parsed; cleared by the first answer that tells the count again.
JOB_BLIND = "job_blind"
JOB_BLIND_CLEARED = "job_blind_cleared"
BLIND_AFTER = 3
NO_COUNT = "no_count"  # a status answer, but no count field and no alternative gave one
NO_STATUS = "no_status"  # an answer with no readable status field
UNPARSEABLE = "unparseable"  # not JSON, not an object, or too large with no count before `results`
BLIND_REASONS = (NO_COUNT, NO_STATUS, FORBIDDEN, UNPARSEABLE)
# An answer with no count is counted by the client's alternatives (more requests) on the
# first such answer of a run and then every RECOVER_EVERY-th, not on every poll.
RECOVER_EVERY = 3
# Where a job's count comes from changed (its count fields, or one of the client's
# alternatives): an event says which, so a reader knows what the credits rest on.
COUNT_SOURCE = "count_source"


@dataclass(frozen=True, slots=True)
class Event:
    """One row of a job's history (job_events)."""

    # tracked | transition | warning | would_cancel | cancel_error | poll_error | reopened,
    # and the once-per-job alerts above
    kind: str
    at: datetime
    from_state: State | None = None
    to_state: State | None = None
    reason: str | None = None
    detail: Mapping[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "at": self.at,
            "from_state": self.from_state.value if self.from_state else None,
            "to_state": self.to_state.value if self.to_state else None,
            "reason": self.reason,
            "detail": dict(self.detail) if self.detail is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """What one writer will write for one job: values and the events that explain them."""

    job: Job  # as its writer read it (the store fences on it; effects read its policy, labels…)
    values: Mapping[str, Any] = field(default_factory=dict)
    events: tuple[Event, ...] = ()

    @classmethod
    def of(cls, job: Job) -> Change:
        return cls(job)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def after(self) -> Job:
        """The job as it reads once this change is applied."""
        return self.job.with_values(self.values) if self.values else self.job

    @property
    def state(self) -> State:
        return State(self.values.get("state", self.job.state))

    def set(self, values: Mapping[str, Any], *events: Event) -> Change:
        """The same change with more values (later ones win) and events.

        A next check set without saying what it is for is an enforcing one (a deadline, a
        budget's crossing, a confirm, a retry): only the policy's own schedule (a routine
        poll, a probe) says otherwise, so nothing that enforces is queued behind probes."""
        if "next_check_at" in values and "check_priority" not in values:
            values = {**values, "check_priority": CHECK_ENFORCE}
        return Change(self.job, {**self.values, **values}, self.events + events)


# -- decisions --------------------------------------------------------------------------


def decision_detail(rule: str, credits: int, config_hash: str, **facts: Any) -> dict[str, Any]:
    """The detail every cancel decision records, whoever decided: the rule (a config key
    path such as `policies.default.max_credits`, `budgets.growth-daily`, `manual`), the
    job's credits when decided and the hash of the config in force, plus the rule's facts."""
    return {**facts, "credits": credits, "rule": rule, "config_hash": config_hash}


def decide_cancel(change: Change, reason: str, detail: Mapping[str, Any], now: datetime) -> Change:
    """watching → cancelling: the decision, committed before the cancel call is sent. Also
    lost → cancelling: a lost job's deadline (or blind grace) is still acted on."""
    if change.after.state not in (State.WATCHING, State.LOST):
        raise IllegalTransition(f"a cancel decision for a job in {change.after.state}")
    credits = change.after.credits_used
    return _move(
        change, State.CANCELLING, now, reason=reason, detail=detail,
        values={
            "cancel_reason": reason,
            "cancel_detail": dict(detail),
            "cancel_requested_at": now,
            "credits_at_decision": credits,
            "next_check_at": now,
        },
    )  # fmt: skip


def would_cancel(change: Change, reason: str, detail: Mapping[str, Any], now: datetime) -> Change:
    """Observe mode and dry run: the decision is recorded once per job, never acted on."""
    job = change.after
    if job.would_cancel_reason is not None or job.state is not State.WATCHING:
        return change
    values = {"would_cancel_reason": reason, "would_cancel_at": now, "would_cancel_credits": job.credits_used}
    return change.set({**values, "updated_at": now}, Event("would_cancel", now, reason=reason, detail=detail))


def warn(change: Change, key: str, limit: str, detail: Mapping[str, Any], now: datetime) -> Change:
    """A limit's warning threshold reached: fired once per job (its key is remembered)."""
    job = change.after
    if key in job.warned:
        return change
    return change.set({"warned": [*job.warned, key]}, Event("warning", now, reason=limit, detail=detail))


def alert_once(change: Change, kind: str, detail: Mapping[str, Any], now: datetime) -> Change:
    """One of the once-per-job alerts (UNKNOWN_STATUS, UNREADABLE_BODY, CANCEL_REFUSED,
    CANCEL_IGNORED): an event of that kind the first time, nothing after."""
    job = change.after
    if kind in job.warned:
        return change
    return change.set({"warned": [*job.warned, kind]}, Event(kind, now, detail=detail))


def unreadable_answer(
    change: Change, reason: str, detail: Mapping[str, Any], now: datetime, *, drifting: bool = False
) -> Change:
    """One more status answer whose spend cannot be read (`reason`, one of BLIND_REASONS).
    The BLIND_AFTER-th in a row makes the job blind: a `job_blind` event, once, until
    `sighted` clears it. The job keeps its last credits: unread is not zero. While the whole
    API drifts (`drifting`) the event says so: the drift is the one alarm (core.notify)."""
    job = change.after
    count = job.unreadable_count + 1
    if job.blind_reason is not None or count < BLIND_AFTER:
        return change.set({"unreadable_count": count})
    facts = {**detail, "answers": count, **({"during_drift": True} if drifting else {})}
    return change.set(
        {"unreadable_count": count, "blind_reason": reason, "blind_since": now},
        Event(JOB_BLIND, now, reason=reason, detail=facts),
    )


def recovery_due(job: Job) -> bool:
    """Whether this poll may try the alternatives for a count (see RECOVER_EVERY)."""
    return job.unreadable_count % RECOVER_EVERY == 0


def sighted(change: Change, now: datetime, count_source: str, *, drift_since: datetime | None = None) -> Change:
    """A status answer told the job's count (from `count_source`): the run of unreadable
    answers ends, a blind job is no longer blind (`job_blind_cleared`), and a count read
    from somewhere new is said once (`count_source`). A job that went blind in the last
    api_drift (begun at `drift_since`) was never announced blind: its clearing says so."""
    job = change.after
    values: dict[str, Any] = {}
    events: list[Event] = []
    if job.unreadable_count:
        values["unreadable_count"] = 0
    if job.blind_reason is not None:
        since = job.blind_since.isoformat() if job.blind_since else None
        values.update(blind_reason=None, blind_since=None)
        facts: dict[str, Any] = {"since": since}
        if drift_since is not None and job.blind_since is not None and job.blind_since >= drift_since:
            facts["during_drift"] = True
        events.append(Event(JOB_BLIND_CLEARED, now, reason=job.blind_reason, detail=facts))
    if count_source != job.count_source:
        values["count_source"] = count_source
        # The count fields are the documented way: only a move away from (or back to) them
        # is worth a line in the job's history, not the first poll of every job.
        if job.count_source is not None or count_source != "field":
            events.append(Event(COUNT_SOURCE, now, detail={"source": count_source, "was": job.count_source}))
    return change.set(values, *events) if values else change


# -- the cancel call and its confirmation -------------------------------------------------


def cancel_sent(
    change: Change, accepted: bool, message: str, now: datetime, next_check_at: datetime, resend_at: datetime
) -> Change:
    """cancelling → confirming: the API took the cancel, or refused it (the job already final,
    or "only pending jobs can be cancelled"). Confirming polls tell which; a job still running
    at `resend_at` is sent the cancel again. confirm_timeout counts from the first answer."""
    job = change.after
    answer = "accepted" if accepted else "refused"
    return _move(
        change, State.CONFIRMING, now, detail={"cancel": answer, "message": message},
        values={
            "cancel_acked_at": job.cancel_acked_at or now,
            "cancel_answer": answer,
            "cancel_resend_at": resend_at,
            "next_check_at": next_check_at,
        },
    )  # fmt: skip


def resend_cancel(change: Change, why: str, now: datetime) -> Change:
    """confirming → cancelling: the job still runs after its cancel was refused (`why` is
    CANCEL_REFUSED) or taken and not heeded (CANCEL_IGNORED); the decision stands, so the
    cancel is sent again at once."""
    _only_from(change, State.CONFIRMING, "a cancel re-sent")
    return _move(
        change, State.CANCELLING, now, detail={"resend": why, "remote_status": change.after.remote_status},
        values={"cancel_resend_at": None, "next_check_at": now},
    )  # fmt: skip


def cancel_not_sent(change: Change, error: str, now: datetime, retry_at: datetime) -> Change:
    """The cancel call failed (API down, throttled, key rejected): the decision stands, retried."""
    job = change.after
    _only_from(change, State.CANCELLING, "a cancel call")
    return change.set(
        {"last_error": error, "next_check_at": retry_at, "updated_at": now},
        Event("cancel_error", now, reason=job.cancel_reason, detail={"error": error}),
    )


def cancel_attempted(change: Change, now: datetime) -> Change:
    """Count a cancel call (whatever its outcome) and remember when the first was sent."""
    job = change.after
    return change.set({"cancel_attempts": job.cancel_attempts + 1, "cancel_sent_at": job.cancel_sent_at or now})


# -- endings ------------------------------------------------------------------------------


def finish(
    change: Change,
    remote_status: str,
    now: datetime,
    *,
    recheck_until: datetime | None = None,
    next_check_at: datetime | None = None,
) -> Change:
    """The API says the job is final: completed | failed | cancelled ("external" when the
    supervisor did not ask for it). Only a completed job can be continued, so only it keeps
    being looked at (`recheck_until`, next at `next_check_at`)."""
    job = change.after
    reason = job.cancel_reason
    if reason is None and remote_status == "cancelled":
        reason = Reason.EXTERNAL
    detail: dict[str, Any] = {"remote_status": remote_status, "credits": job.credits_used}
    if job.would_cancel_credits is not None:
        detail["would_have_saved"] = max(0, job.credits_used - job.would_cancel_credits)
    if job.credits_at_decision is not None:
        detail["credits_after_decision"] = max(0, job.credits_used - job.credits_at_decision)
    target = final_state(remote_status)
    values: dict[str, Any] = {"final_status": remote_status, "confirmed_at": now}
    if target is State.COMPLETED and recheck_until is not None:
        values.update(recheck_until=recheck_until, next_check_at=next_check_at or now)
    return _move(change, target, now, reason=reason, detail=detail, values=values)


def missed(change: Change, kind: str, error: str, now: datetime, retry_at: datetime) -> Change:
    """A status poll answered that the job is not there (NOT_FOUND) or not ours (FORBIDDEN):
    counted, with when the run of such answers began, so that a loss is earned (`loss_earned`)."""
    job = change.after
    again = job.miss_kind == kind and job.miss_since is not None
    count = job.miss_count + 1 if again else 1
    values = {
        "miss_kind": kind,
        "miss_count": count,
        "miss_since": job.miss_since if again else now,
        "last_error": error,
        "next_check_at": retry_at,
        "updated_at": now,
    }
    events = () if again else (Event("poll_error", now, detail={"error": error, "miss": kind}),)
    return change.set(values, *events)


def loss_earned(job: Job, now: datetime, *, polls: int, grace: timedelta) -> bool:
    """Whether a run of misses makes the job lost: `polls` answers in a row, over `grace`."""
    if job.miss_kind is None or job.miss_since is None:
        return False
    return job.miss_count >= polls and now - job.miss_since >= grace


def lose(
    change: Change,
    detail: Mapping[str, Any],
    now: datetime,
    *,
    recheck_until: datetime | None = None,
    next_check_at: datetime | None = None,
) -> Change:
    """The API no longer shows the job (404, or 403 for this key). It may come back (a 404
    from a flaky proxy, a key put right): looked at again until `recheck_until`."""
    values: dict[str, Any] = {}
    if recheck_until is not None:
        values.update(recheck_until=recheck_until, next_check_at=next_check_at or now)
    return _move(change, State.LOST, now, detail=detail, values=values)


def give_up(
    change: Change, detail: Mapping[str, Any], now: datetime, *, recheck_until: datetime, next_check_at: datetime
) -> Change:
    """The cancel could not be confirmed (timeout, or refused for good): the job may still
    spend, so it is still polled, read-only, until the API says final (or `recheck_until`)."""
    values = {"recheck_until": recheck_until, "next_check_at": next_check_at}
    return _move(change, State.UNCONFIRMED, now, detail=detail, values=values)


def reopen(change: Change, now: datetime) -> Change:
    """completed | lost → watching: the job runs again (continued by someone, or found again).
    It is a new run under the same id: its limits apply to its whole credit total, its time
    limits count from now (`Job.started_at`), and a new cancel may be decided."""
    job = change.after
    detail = {"was": job.state.value, "remote_status": job.remote_status, "credits": job.credits_used}
    fresh = {
        "reopened_at": now, "last_progress_at": now, "recheck_until": None,
        "final_status": None, "confirmed_at": None,
        "cancel_reason": None, "cancel_detail": None, "cancel_requested_at": None, "credits_at_decision": None,
        "cancel_attempts": 0, "cancel_sent_at": None, "cancel_acked_at": None, "cancel_answer": None,
        "cancel_resend_at": None,
        "would_cancel_reason": None, "would_cancel_at": None, "would_cancel_credits": None,
    }  # fmt: skip
    moved = _move(change, State.WATCHING, now, reason="reopened", detail=detail, values=fresh)
    return moved.set({}, Event("reopened", now, from_state=job.state, to_state=State.WATCHING, detail=detail))


def _only_from(change: Change, state: State, what: str) -> None:
    if change.after.state is not state:
        raise IllegalTransition(f"{what} for a job in {change.after.state}")


def _move(
    change: Change,
    target: State,
    now: datetime,
    *,
    detail: Mapping[str, Any],
    reason: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> Change:
    job = change.after
    check_transition(job.state, target)
    reason = reason if reason is not None else job.cancel_reason
    # A move ends any re-checking, unless it starts one (a RECHECKED state's move).
    moved: dict[str, Any] = {"recheck_until": None, **(values or {}), "state": target.value, "updated_at": now}
    if target in TERMINAL and target is not State.UNCONFIRMED:
        # The unused part of a reservation is released, except when the cancel was never
        # confirmed: that job may still be spending.
        moved["reserved_credits"] = None
    if target is State.CANCELLED and job.cancel_reason is None:
        moved["cancel_reason"] = reason
    event = Event("transition", now, from_state=job.state, to_state=target, reason=reason, detail=detail)
    return change.set(moved, event)
