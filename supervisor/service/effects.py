"""What follows from an applied Change in this process: its decision log lines.

Run only once the Change is committed (a dropped write, whose lease was lost, has no
effects), so a cancel decided by a poll, a budget, the account floor or a person is logged
the same way. Its webhook events are outbox rows the store wrote in the Change's own
transaction (core.notify.notices), and the decision counters are counted by the daemon
from the committed events (service.tally): neither depends on which process decided.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.webhooks import Webhooks
from supervisor.config import Config
from supervisor.core import transitions
from supervisor.core.notify import ALERTS, BLIND_EVENTS, is_resend
from supervisor.core.policy import job_policy
from supervisor.core.states import TERMINAL, Reason, State
from supervisor.core.transitions import Change, Event

log = structlog.get_logger("supervisor.handler")

# Whole-API problems: their gauge, the line when one starts, the line when it ends.
API_MISCONFIGURED = "api_misconfigured"
API_DRIFT = "api_drift"
_API_PROBLEMS = {
    API_MISCONFIGURED: (
        metrics.API_MISCONFIGURED,
        "every API request answers 404: check api.base_url; no job is marked lost meanwhile",
        "the API answers again; 404s count towards lost jobs again",
    ),
    API_DRIFT: (
        metrics.API_DRIFT,
        "job after job's status answer is unreadable (api_drift): the API changed or a proxy rewrites it",
        "status answers readable again: api_drift is over",
    ),
}

_ALERT_LINES = {
    transitions.UNKNOWN_STATUS: "job status outside the documented list; treated as running",
    transitions.UNREADABLE_BODY: "job status answer has no readable count; the job keeps its last credits",
    transitions.CANCEL_REFUSED: "cancel refused while the job still runs; it is sent again and its spend observed",
    transitions.CANCEL_IGNORED: "cancel taken but the job keeps running and spending; it is sent again",
    "reopened": "job running again after it ended (continued or found again); its limits apply anew",
}


class Effects:
    def __init__(self, config: Callable[[], Config], webhooks: Webhooks | None = None) -> None:
        self._config = config
        self._webhooks = webhooks
        # Told of every applied Change once its effects are out (the budget enforcer waits
        # for the answers of the polls it brought forward to a crossing).
        self.on_applied: Callable[[Change], None] = lambda change: None
        # api_drift (see `api_drift`): while it lasts, and since when the current or last one
        # began (the blind transitions of its jobs say they happened in it, and announce nothing).
        self.drifting = False
        self.drift_since: datetime | None = None

    def applied(self, changes: Iterable[Change]) -> None:
        for change in changes:
            for event in change.events:
                self._event(change, event)
            self.on_applied(change)
        if self._webhooks is not None:
            self._webhooks.wake()  # their outbox rows are committed: deliver them now

    def _event(self, change: Change, event: Event) -> None:
        job = change.after
        fields: dict[str, Any] = {"job_id": job.job_id, "policy": job.policy}
        if event.kind == "warning":
            log.warning("limit warning", **fields, **dict(event.detail or {}))
        elif event.kind == "would_cancel":
            log.warning(
                "would cancel (observe mode)",
                **fields,
                state=job.state.value,
                reason=event.reason,
                **dict(event.detail or {}),
            )
        elif event.kind in ALERTS:
            detail = dict(event.detail or {})
            log.warning(_ALERT_LINES[event.kind], **fields, alert=event.kind, **{"credits": job.credits_used, **detail})
        elif event.kind in BLIND_EVENTS:
            facts = {"reason": event.reason, "state": job.state.value, "credits": job.credits_used}
            if event.kind == transitions.JOB_BLIND:
                log.error("job's spend cannot be read: it is blind; its deadlines still act", **fields, **facts,
                          **dict(event.detail or {}))  # fmt: skip
            else:
                log.info(
                    "job's spend can be read again: no longer blind", **fields, **facts, **dict(event.detail or {})
                )
        elif event.kind == transitions.COUNT_SOURCE:
            log.info("job's count read from another source", **fields, **dict(event.detail or {}))
        elif event.kind == "transition" and event.to_state is not None:
            self._transition(change, event, event.to_state, fields)

    def api_misconfigured(self, misconfigured: bool, **facts: Any) -> None:
        """Every status poll answers 404, and the credits endpoint too: the base_url is wrong,
        so no job is marked lost; said once when it starts and once when it ends."""
        self._api_problem(API_MISCONFIGURED, misconfigured, **facts)

    def api_drift(self, drifting: bool, **facts: Any) -> None:
        """Status answers whose spend cannot be read for job after job, none readable in
        between (a proxy rewriting bodies, an API change, a key that lost its read scope):
        one alarm for the whole API, said once when it starts and once when it ends; the
        jobs it blinds meanwhile send no webhook each (core.notify)."""
        if drifting and not self.drifting:
            self.drift_since = facts.get("at")
        self.drifting = drifting
        self._api_problem(API_DRIFT, drifting, **{k: v for k, v in facts.items() if k != "at"})

    def _api_problem(self, kind: str, active: bool, **facts: Any) -> None:
        """A whole-API problem (API_PROBLEMS): its gauge, an error line and a webhook when it
        starts, an info line when it ends."""
        gauge, started, ended = _API_PROBLEMS[kind]
        gauge.set(1 if active else 0)
        if active:
            log.error(started, **facts)
            if self._webhooks is not None:
                self._webhooks.emit(kind, **facts)
        else:
            log.info(ended, **facts)

    def _transition(self, change: Change, event: Event, target: State, fields: dict[str, Any]) -> None:
        job = change.after
        detail = dict(event.detail or {})
        if is_resend(event):
            log.warning("re-sending cancel", **fields, state=target.value, reason=event.reason, **detail)
            return
        if target is State.CANCELLING:
            log.warning("cancelling runaway job", **fields, state=target.value, reason=event.reason, **detail)
            return
        level = "error" if target in (State.UNCONFIRMED, State.LOST) else "info"
        getattr(log, level)("job " + target.value, **fields, state=target.value, reason=event.reason, **detail)
        # Measured once per decision: when it first ended (an unconfirmed job that ends later
        # moves out of a terminal state).
        if target in TERMINAL and event.from_state not in TERMINAL and job.cancel_requested_at is not None:
            metrics.CONFIRMATION.observe((event.at - job.cancel_requested_at).total_seconds())
            limit = job_policy(self._config(), job).max_credits
            if job.cancel_reason == Reason.MAX_CREDITS and limit is not None:
                metrics.CREDIT_OVERSHOOT.observe(max(0, job.credits_used - limit))
