"""The supervisor's state machine: public state names, reasons and allowed moves.

    watching ──breach──▶ cancelling ──200 / 409──▶ confirming ──final──▶ cancelled | completed | failed
       │                    └─ 404 ▶ lost                        └─ confirm_timeout ▶ unconfirmed
       └──remote final on its own──▶ completed | failed | cancelled ("external") | lost (404)

From the real API (DESIGN.md, "Additions"): `completed` is final for the state machine but
not for spending, so some terminal jobs are still looked at (RECHECKED, read-only):
    completed ──seen running again (continued)──▶ watching ("reopened")
    lost ──found again──▶ watching ("reopened") | its final state
    unconfirmed ──the API says final──▶ cancelled | completed | failed
and a cancel the API refuses while the job runs is sent again: confirming ──▶ cancelling.
A lost job whose deadline comes (or, with on_blind = "cancel", its blind grace ends) is still
sent the cancel: lost ──▶ cancelling.

Pure: no I/O and no clock. The daemon asks `check_transition` before every write so an
impossible move is a bug caught at once, not a corrupt row.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    WATCHING = "watching"
    CANCELLING = "cancelling"
    CONFIRMING = "confirming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    UNCONFIRMED = "unconfirmed"


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED, State.LOST, State.UNCONFIRMED})
ACTIVE = frozenset(State) - TERMINAL
# Terminal states a job may still leave, so the daemon keeps looking at it (read-only) for a
# while: `recheck_until` on its row says how long.
RECHECKED = frozenset({State.COMPLETED, State.LOST, State.UNCONFIRMED})
_FINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})

_ALLOWED: dict[State, frozenset[State]] = {
    State.WATCHING: frozenset({State.CANCELLING, State.COMPLETED, State.FAILED, State.CANCELLED, State.LOST}),
    # A permanent refusal of the cancel call (400/403) cannot be confirmed either way.
    State.CANCELLING: frozenset({State.CONFIRMING, State.LOST, State.UNCONFIRMED}),
    # Back to cancelling: the cancel was refused, or taken and not heeded, so it is sent again.
    State.CONFIRMING: _FINAL | {State.CANCELLING, State.LOST, State.UNCONFIRMED},
    State.COMPLETED: frozenset({State.WATCHING}),  # continued by someone: reopened
    # Found again; or its deadline (or its blind grace) reached while it is lost: the cancel
    # is still attempted, since a 403 on status does not mean the cancel is refused too.
    State.LOST: _FINAL | {State.WATCHING, State.CANCELLING},
    State.UNCONFIRMED: _FINAL | {State.LOST},  # the API finally says
}


class Reason:
    """Public cancel reasons. Budget reasons are `budget:<name>`."""

    MAX_RUNTIME = "max_runtime"
    MAX_QUEUED = "max_queued"
    STALL_TIMEOUT = "stall_timeout"
    MAX_CREDITS = "max_credits"
    ACCOUNT_FLOOR = "account_floor"
    MANUAL = "manual"
    BLIND = "blind"  # on_blind = "cancel": the job's spend stayed unreadable past blind_grace
    EXTERNAL = "external"


# Remote statuses of the Clado API.
RUNNING_STATUSES = frozenset({"pending", "searching", "processing"})
FINAL_STATUSES = frozenset({"completed", "error", "cancelled"})
REMOTE_STATUSES = RUNNING_STATUSES | FINAL_STATUSES
# Other spellings of the documented statuses, from an unofficial SDK: the one table of them.
STATUS_ALIASES: dict[str, str] = {
    "in_progress": "processing",
    "running": "processing",
    "queued": "pending",
    "failed": "error",
    "canceled": "cancelled",
}


def normalize_status(raw: str) -> str:
    """The documented name of a remote status (trimmed, any case, aliases mapped).

    A name outside the documented list comes back trimmed and lowercased, not refused:
    the API may grow a status, and a job we cannot name is still a running job.
    """
    name = raw.strip().lower()
    return STATUS_ALIASES.get(name, name)


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: State, target: State) -> None:
    if target not in _ALLOWED.get(current, frozenset()):
        raise IllegalTransition(f"{current} → {target} is not a supervisor transition")


def final_state(remote_status: str) -> State:
    """The terminal state that a final remote status confirms."""
    return {
        "completed": State.COMPLETED,
        "error": State.FAILED,
        "cancelled": State.CANCELLED,
    }[remote_status]
