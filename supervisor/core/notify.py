"""What an applied Change announces and counts: the one rule for both.

The store calls `notices` inside the transaction that applies a Change, so every webhook
event is an outbox row committed with its cause, whichever process decided (the daemon, the
CLI, the admin API, the console). The daemon's decision counters are counted by
`counts` from the committed event rows (job_events), so they too do not depend on which
process made the change. Delivery timing (`next_attempt`) is here too, as a pure rule.

No I/O and no clock: times are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from supervisor.core import transitions
from supervisor.core.backoff import delay
from supervisor.core.states import State
from supervisor.core.transitions import Change, Event

# Webhook events sent when a job reaches these states.
ANNOUNCED = {State.CANCELLED: "cancelled", State.UNCONFIRMED: "unconfirmed", State.LOST: "lost"}
# Once-per-job alerts (core.transitions) and the webhook event each sends, if any.
ALERTS: dict[str, str | None] = {
    transitions.UNKNOWN_STATUS: None,
    transitions.UNREADABLE_BODY: None,
    transitions.CANCEL_REFUSED: "cancel_refused",
    transitions.CANCEL_IGNORED: "cancel_ignored",
    "reopened": "reopened",
}

# A job turned blind, or readable again (core.transitions.unreadable_answer / sighted).
BLIND_EVENTS = (transitions.JOB_BLIND, transitions.JOB_BLIND_CLEARED)


@dataclass(frozen=True)
class Notice:
    """One webhook event: its name, what it is about (a job, a submission, a budget: the
    unit within which deliveries keep their commit order) and its payload fields."""

    event: str
    at: datetime
    subject: str
    fields: Mapping[str, Any] = field(default_factory=dict)


def is_resend(event: Event) -> bool:
    """A cancel sent again (confirming → cancelling): the same decision, counted and
    announced once, when it was decided."""
    return event.to_state is State.CANCELLING and event.from_state is State.CONFIRMING


def notices(change: Change) -> list[Notice]:
    """The webhook events an applied Change sends, in the order of its events."""
    job = change.after
    base: dict[str, Any] = {"job_id": job.job_id, "policy": job.policy}
    out: list[Notice] = []
    for event in change.events:
        detail = dict(event.detail or {})
        name: str | None = None
        fields: dict[str, Any] = {}
        if event.kind == "warning":
            name = "warning"
            fields = {"reason": event.reason, "credits": job.credits_used, "detail": detail}
        elif event.kind in ALERTS:
            name = ALERTS[event.kind]
            fields = {"state": job.state.value, "credits": job.credits_used, "detail": detail}
        elif event.kind in BLIND_EVENTS and not detail.get("during_drift"):
            # During an api_drift the drift is the one alarm, not one webhook per job.
            name = event.kind
            fields = {"reason": event.reason, "state": job.state.value, "credits": job.credits_used, "detail": detail}
        elif event.kind == "transition" and event.to_state is not None and not is_resend(event):
            if event.to_state is State.CANCELLING:
                name = "cancel_requested"
                fields = {"reason": event.reason, "state": event.to_state.value}
            elif event.to_state in ANNOUNCED:
                name = ANNOUNCED[event.to_state]
                fields = {"reason": job.cancel_reason, "state": event.to_state.value}
            fields |= {"credits": job.credits_used, "detail": detail}
        if name is not None:
            out.append(Notice(name, event.at, f"job:{job.job_id}", {**base, **fields}))
    return out


def counts(kind: str, from_state: str | None, to_state: str | None, reason: str | None) -> list[tuple[str, str]]:
    """The decision counters one committed event row adds to, as (counter, label): the daemon
    counts them from job_events, whichever process wrote the row."""
    if kind == "warning":
        return [("warnings", reason or "")]
    if kind == "would_cancel":
        return [("would_cancel", reason or "")]
    if kind in ALERTS or kind == transitions.JOB_BLIND:
        return [("job_alerts", kind)]
    if kind == "transition" and to_state is not None:
        out = [("transitions", to_state)]
        if to_state == State.CANCELLING.value and from_state != State.CONFIRMING.value:
            out.append(("cancels", reason or ""))
        return out
    return []


# Between attempts of one delivery, without a Retry-After: 5 s, doubling, at most an hour,
# with jitter; attempts go on until `retry_for` after the event.
FIRST_RETRY = 5.0
MAX_RETRY = 3600.0


def next_attempt(
    attempts: int,
    created_at: datetime,
    now: datetime,
    retry_for: timedelta,
    *,
    retry_after: float | None,
    jitter: float,
) -> datetime | None:
    """When to try a delivery again after its `attempts`-th failed attempt, or None when
    that was the last (the next would fall after `created_at + retry_for`).

    `jitter` in [0, 1) spreads the retries of many deliveries that failed together (full
    jitter over the upper half of the step, so the gaps still grow); a receiver's
    `Retry-After` is honoured as a floor."""
    step = delay(attempts, FIRST_RETRY, MAX_RETRY)
    wait = step * (0.5 + 0.5 * jitter)
    if retry_after is not None:
        wait = max(wait, retry_after)
    when = now + timedelta(seconds=wait)
    if when > created_at + retry_for:
        return None
    return when
