"""Every move of a job, as pure functions that return a Change.

A Change is what one writer learned about one job: the job as it read it, the column
values to write and the events that explain them. Each move checks that it is a
supervisor transition (states.check_transition) before it is built, so an impossible move
raises here, in a pure function a table test covers, and never reaches a row. The store
applies a Change (adapters.store: one path, fenced by lease or by the state read) and the
effects step (service.effects) turns the applied Change into its metrics, webhooks and
decision log lines: one place each, whoever decided — a poll, a budget, the account
floor or a person.

No I/O and no clock: `now` is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from supervisor.core.job import Job
from supervisor.core.states import TERMINAL, IllegalTransition, Reason, State, check_transition, final_state


@dataclass(frozen=True, slots=True)
class Event:
    """One row of a job's history (job_events)."""

    kind: str  # tracked | transition | warning | would_cancel | cancel_error | poll_error
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
        """The same change with more values (later ones win) and events."""
        return Change(self.job, {**self.values, **values}, self.events + events)


# -- decisions --------------------------------------------------------------------------


def decision_detail(rule: str, credits: int, config_hash: str, **facts: Any) -> dict[str, Any]:
    """The detail every cancel decision records, whoever decided: the rule (a config key
    path such as `policies.default.max_credits`, `budgets.growth-daily`, `manual`), the
    job's credits when decided and the hash of the config in force, plus the rule's facts."""
    return {**facts, "credits": credits, "rule": rule, "config_hash": config_hash}


def decide_cancel(change: Change, reason: str, detail: Mapping[str, Any], now: datetime) -> Change:
    """watching → cancelling: the decision, committed before the cancel call is sent."""
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


# -- the cancel call and its confirmation -------------------------------------------------


def cancel_sent(change: Change, answer: str, message: str, now: datetime, next_check_at: datetime) -> Change:
    """cancelling → confirming: the API took the cancel (or said the job was already final)."""
    return _move(
        change, State.CONFIRMING, now, detail={"cancel": answer, "message": message},
        values={"cancel_acked_at": now, "next_check_at": next_check_at},
    )  # fmt: skip


def cancel_not_sent(change: Change, error: str, now: datetime, retry_at: datetime) -> Change:
    """The cancel call failed (API down, throttled, key rejected): the decision stands, retried."""
    job = change.after
    if job.state is not State.CANCELLING:
        raise IllegalTransition(f"a cancel call for a job in {job.state}")
    return change.set(
        {"last_error": error, "next_check_at": retry_at, "updated_at": now},
        Event("cancel_error", now, reason=job.cancel_reason, detail={"error": error}),
    )


def cancel_attempted(change: Change, now: datetime) -> Change:
    """Count a cancel call (whatever its outcome) and remember when the first was sent."""
    job = change.after
    return change.set({"cancel_attempts": job.cancel_attempts + 1, "cancel_sent_at": job.cancel_sent_at or now})


# -- endings ------------------------------------------------------------------------------


def finish(change: Change, remote_status: str, now: datetime) -> Change:
    """The API says the job is final: completed | failed | cancelled ("external" when the
    supervisor did not ask for it)."""
    job = change.after
    reason = job.cancel_reason
    if reason is None and remote_status == "cancelled":
        reason = Reason.EXTERNAL
    detail: dict[str, Any] = {"remote_status": remote_status, "credits": job.credits_used}
    if job.would_cancel_credits is not None:
        detail["would_have_saved"] = max(0, job.credits_used - job.would_cancel_credits)
    if job.credits_at_decision is not None:
        detail["credits_after_decision"] = max(0, job.credits_used - job.credits_at_decision)
    return _move(
        change, final_state(remote_status), now, reason=reason, detail=detail,
        values={"final_status": remote_status, "confirmed_at": now},
    )  # fmt: skip


def lose(change: Change, detail: Mapping[str, Any], now: datetime) -> Change:
    """The API no longer knows the job (404)."""
    return _move(change, State.LOST, now, detail=detail)


def give_up(change: Change, detail: Mapping[str, Any], now: datetime) -> Change:
    """The cancel could not be confirmed (timeout, or refused for good): the job may still spend."""
    return _move(change, State.UNCONFIRMED, now, detail=detail)


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
    moved: dict[str, Any] = {**(values or {}), "state": target.value, "updated_at": now}
    if target in TERMINAL and target is not State.UNCONFIRMED:
        # The unused part of a reservation is released, except when the cancel was never
        # confirmed: that job may still be spending.
        moved["reserved_credits"] = None
    if target is State.CANCELLED and job.cancel_reason is None:
        moved["cancel_reason"] = reason
    event = Event("transition", now, from_state=job.state, to_state=target, reason=reason, detail=detail)
    return change.set(moved, event)
