"""The pure transition core: every move is checked, a forbidden one raises before any row
could be written, and each move records what a reader of the job's history needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from supervisor.core import transitions
from supervisor.core.job import FIELDS, Job
from supervisor.core.states import ACTIVE, TERMINAL, IllegalTransition, State
from supervisor.core.transitions import Change

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
DETAIL = {"rule": "policies.default.max_credits", "credits": 40, "config_hash": "abc"}


def job(state: State, **values: object) -> Job:
    row: dict[str, object] = {name: None for name in FIELDS}
    row.update(job_id="j1", state=state.value, labels={"team": "growth"}, policy="default", source="track",
               credits_used=40, submitted_at=NOW - timedelta(minutes=5), next_check_at=NOW, poll_errors=0,
               warned=[], cancel_attempts=0, updated_at=NOW)  # fmt: skip
    row.update(values)
    return Job.from_row(row)


MOVES = {
    "decide_cancel": lambda c: transitions.decide_cancel(c, "max_credits", DETAIL, NOW),
    "cancel_sent": lambda c: transitions.cancel_sent(c, "accepted", "ok", NOW, NOW),
    "cancel_not_sent": lambda c: transitions.cancel_not_sent(c, "HTTP 503", NOW, NOW),
    "finish completed": lambda c: transitions.finish(c, "completed", NOW),
    "finish cancelled": lambda c: transitions.finish(c, "cancelled", NOW),
    "lose": lambda c: transitions.lose(c, {"status": "HTTP 404"}, NOW),
    "give_up": lambda c: transitions.give_up(c, {"remote_status": "processing"}, NOW),
}

# (move, state it starts from) → the state it ends in, or None where the move is forbidden.
TABLE: dict[tuple[str, State], State | None] = {
    ("decide_cancel", State.WATCHING): State.CANCELLING,
    ("cancel_sent", State.CANCELLING): State.CONFIRMING,
    ("cancel_not_sent", State.CANCELLING): State.CANCELLING,
    ("finish completed", State.WATCHING): State.COMPLETED,
    ("finish completed", State.CONFIRMING): State.COMPLETED,
    ("finish cancelled", State.WATCHING): State.CANCELLED,
    ("finish cancelled", State.CONFIRMING): State.CANCELLED,
    ("lose", State.WATCHING): State.LOST,
    ("lose", State.CANCELLING): State.LOST,
    ("lose", State.CONFIRMING): State.LOST,
    ("give_up", State.CANCELLING): State.UNCONFIRMED,
    ("give_up", State.CONFIRMING): State.UNCONFIRMED,
}


@pytest.mark.parametrize("start", list(State), ids=str)
@pytest.mark.parametrize("move", list(MOVES))
def test_every_move_from_every_state(move: str, start: State) -> None:
    expected = TABLE.get((move, start))
    change = Change.of(job(start))
    if expected is None:
        with pytest.raises(IllegalTransition):
            MOVES[move](change)
        return
    moved = MOVES[move](change)
    assert moved.after.state is expected
    assert moved.job.state is start  # the job as read is never changed: a Change is a new value


def test_nothing_moves_out_of_a_terminal_state() -> None:
    for state in TERMINAL:
        assert not any(TABLE.get((move, state)) for move in MOVES), state
    assert {start for _, start in TABLE} <= set(ACTIVE)


def test_a_decision_records_the_rule_the_credits_and_the_config_hash() -> None:
    detail = transitions.decision_detail("budgets.growth-daily", 40, "abc", spent=95, budget_credits=90)
    decided = transitions.decide_cancel(Change.of(job(State.WATCHING)), "budget:growth-daily", detail, NOW)
    after = decided.after
    assert (after.cancel_reason, after.cancel_requested_at, after.credits_at_decision) == ("budget:growth-daily", NOW, 40)
    assert after.next_check_at == NOW  # sent at once
    (event,) = decided.events
    assert (event.kind, event.from_state, event.to_state, event.reason) == (
        "transition", State.WATCHING, State.CANCELLING, "budget:growth-daily",
    )  # fmt: skip
    assert {"rule", "credits", "config_hash"} <= set(event.detail or {})


def test_a_final_status_ends_the_job_and_releases_its_reservation_unless_unconfirmed() -> None:
    confirming = job(State.CONFIRMING, cancel_reason="max_credits", credits_at_decision=40, reserved_credits=100)
    done = transitions.finish(Change.of(confirming).set({"credits_used": 43}), "cancelled", NOW).after
    assert (done.state, done.final_status, done.confirmed_at, done.reserved_credits) == (State.CANCELLED, "cancelled", NOW, None)
    unconfirmed = transitions.give_up(Change.of(confirming), {"remote_status": "processing"}, NOW).after
    assert unconfirmed.reserved_credits == 100  # it may still be spending


def test_a_job_cancelled_by_someone_else_is_external() -> None:
    ended = transitions.finish(Change.of(job(State.WATCHING)), "cancelled", NOW)
    assert ended.after.cancel_reason == "external"
    assert ended.events[0].reason == "external"


def test_a_warning_fires_once_and_would_cancel_is_recorded_once() -> None:
    change = Change.of(job(State.WATCHING))
    warned = transitions.warn(change, "max_credits@0.8", "max_credits", {"fraction": 0.8}, NOW)
    assert warned.after.warned == ("max_credits@0.8",)
    assert transitions.warn(warned, "max_credits@0.8", "max_credits", {}, NOW).events == warned.events
    observed = transitions.would_cancel(change, "max_credits", DETAIL, NOW)
    assert observed.after.would_cancel_credits == 40
    assert transitions.would_cancel(Change.of(observed.after), "max_credits", DETAIL, NOW).events == ()
