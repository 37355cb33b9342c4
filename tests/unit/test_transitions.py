"""The pure transition core: every move is checked, a forbidden one raises before any row
could be written, and each move records what a reader of the job's history needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from supervisor.core import transitions
from supervisor.core.job import CHECK_ENFORCE, CHECK_PROBE, FIELDS, Job
from supervisor.core.states import RECHECKED, TERMINAL, IllegalTransition, State
from supervisor.core.transitions import Change

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
DETAIL = {"rule": "policies.default.max_credits", "credits": 40, "config_hash": "abc"}


def job(state: State, **values: object) -> Job:
    row: dict[str, object] = dict.fromkeys(FIELDS)
    row.update(job_id="j1", state=state.value, labels={"team": "growth"}, policy="default", source="track",
               credits_used=40, submitted_at=NOW - timedelta(minutes=5), next_check_at=NOW, poll_errors=0,
               warned=[], cancel_attempts=0, updated_at=NOW)  # fmt: skip
    row.update(values)
    return Job.from_row(row)


LATER = NOW + timedelta(hours=1)

MOVES = {
    "decide_cancel": lambda c: transitions.decide_cancel(c, "max_credits", DETAIL, NOW),
    "cancel_sent": lambda c: transitions.cancel_sent(c, True, "ok", NOW, NOW, NOW),
    "cancel_refused": lambda c: transitions.cancel_sent(c, False, "only pending jobs can be cancelled", NOW, NOW, NOW),
    "cancel_not_sent": lambda c: transitions.cancel_not_sent(c, "HTTP 503", NOW, NOW),
    "resend_cancel": lambda c: transitions.resend_cancel(c, transitions.CANCEL_REFUSED, NOW),
    "finish completed": lambda c: transitions.finish(c, "completed", NOW),
    "finish cancelled": lambda c: transitions.finish(c, "cancelled", NOW),
    "lose": lambda c: transitions.lose(c, {"status": "HTTP 404"}, NOW),
    "give_up": lambda c: transitions.give_up(c, {"remote_status": "processing"}, NOW, recheck_until=LATER,
                                             next_check_at=NOW),
    "reopen": lambda c: transitions.reopen(c, NOW),
}  # fmt: skip

# (move, state it starts from) → the state it ends in, or None where the move is forbidden.
TABLE: dict[tuple[str, State], State | None] = {
    ("decide_cancel", State.WATCHING): State.CANCELLING,
    # A lost job's deadline (or blind grace) is still acted on: its cancel is attempted.
    ("decide_cancel", State.LOST): State.CANCELLING,
    ("cancel_sent", State.CANCELLING): State.CONFIRMING,
    ("cancel_refused", State.CANCELLING): State.CONFIRMING,
    ("cancel_not_sent", State.CANCELLING): State.CANCELLING,
    # The API refused the cancel, or took it and the job runs on: sent again.
    ("resend_cancel", State.CONFIRMING): State.CANCELLING,
    ("finish completed", State.WATCHING): State.COMPLETED,
    ("finish completed", State.CONFIRMING): State.COMPLETED,
    ("finish cancelled", State.WATCHING): State.CANCELLED,
    ("finish cancelled", State.CONFIRMING): State.CANCELLED,
    # Terminal jobs still looked at: an unconfirmed one the API finally calls final, a lost one found again.
    ("finish completed", State.UNCONFIRMED): State.COMPLETED,
    ("finish cancelled", State.UNCONFIRMED): State.CANCELLED,
    ("finish completed", State.LOST): State.COMPLETED,
    ("finish cancelled", State.LOST): State.CANCELLED,
    ("lose", State.WATCHING): State.LOST,
    ("lose", State.CANCELLING): State.LOST,
    ("lose", State.CONFIRMING): State.LOST,
    ("lose", State.UNCONFIRMED): State.LOST,
    ("give_up", State.CANCELLING): State.UNCONFIRMED,
    ("give_up", State.CONFIRMING): State.UNCONFIRMED,
    # Running again: continued by someone (completed), or found again (lost).
    ("reopen", State.COMPLETED): State.WATCHING,
    ("reopen", State.LOST): State.WATCHING,
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


def test_only_re_checked_terminal_states_move_and_failed_or_cancelled_never_do() -> None:
    moving = {start for (_, start), end in TABLE.items() if end is not None and start in TERMINAL}
    assert moving == set(RECHECKED)
    assert not any(TABLE.get((move, state)) for move in MOVES for state in (State.FAILED, State.CANCELLED))


def test_a_decision_records_the_rule_the_credits_and_the_config_hash() -> None:
    detail = transitions.decision_detail("budgets.growth-daily", 40, "abc", spent=95, budget_credits=90)
    decided = transitions.decide_cancel(Change.of(job(State.WATCHING)), "budget:growth-daily", detail, NOW)
    after = decided.after
    decision = (after.cancel_reason, after.cancel_requested_at, after.credits_at_decision)
    assert decision == ("budget:growth-daily", NOW, 40)
    assert after.next_check_at == NOW  # sent at once
    (event,) = decided.events
    assert (event.kind, event.from_state, event.to_state, event.reason) == (
        "transition", State.WATCHING, State.CANCELLING, "budget:growth-daily",
    )  # fmt: skip
    assert {"rule", "credits", "config_hash"} <= set(event.detail or {})


def test_a_final_status_ends_the_job_and_releases_its_reservation_unless_unconfirmed() -> None:
    confirming = job(State.CONFIRMING, cancel_reason="max_credits", credits_at_decision=40, reserved_credits=100)
    done = transitions.finish(Change.of(confirming).set({"credits_used": 43}), "cancelled", NOW).after
    ended = (done.state, done.final_status, done.confirmed_at, done.reserved_credits)
    assert ended == (State.CANCELLED, "cancelled", NOW, None)
    unconfirmed = transitions.give_up(
        Change.of(confirming), {"remote_status": "processing"}, NOW, recheck_until=LATER, next_check_at=NOW
    ).after
    assert unconfirmed.reserved_credits == 100  # it may still be spending
    assert unconfirmed.recheck_until == LATER  # and is still polled, read-only


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


def test_a_completed_job_is_re_checked_within_its_window_and_a_failed_one_is_not() -> None:
    watching = Change.of(job(State.WATCHING))
    completed = transitions.finish(watching, "completed", NOW, recheck_until=LATER, next_check_at=NOW).after
    assert (completed.recheck_until, completed.next_check_at) == (LATER, NOW)
    failed = transitions.finish(watching, "error", NOW, recheck_until=LATER, next_check_at=NOW).after
    assert failed.recheck_until is None  # only a completed job can be continued
    assert transitions.finish(watching, "completed", NOW).after.recheck_until is None  # reopen_window = 0


def test_a_reopened_job_is_a_new_run_under_the_same_id() -> None:
    completed = job(
        State.COMPLETED, credits_used=60, cancel_reason="max_credits", cancel_requested_at=NOW - timedelta(hours=1),
        credits_at_decision=40, cancel_attempts=2, final_status="completed", confirmed_at=NOW - timedelta(minutes=50),
        would_cancel_reason="max_credits", recheck_until=LATER, remote_created_at=NOW - timedelta(hours=2),
    )  # fmt: skip
    reopened = transitions.reopen(Change.of(completed), NOW)
    after = reopened.after
    assert after.state is State.WATCHING
    assert after.credits_used == 60  # its limits apply to its whole total
    assert after.started_at == NOW  # max_runtime counts from the reopen, not from created_at
    assert (after.cancel_reason, after.final_status, after.would_cancel_reason, after.recheck_until) == (None,) * 4
    assert after.cancel_attempts == 0
    assert [e.kind for e in reopened.events] == ["transition", "reopened"]
    assert reopened.events[1].detail == {"was": "completed", "remote_status": None, "credits": 60}


@pytest.mark.parametrize(
    ("answers", "span", "polls", "grace", "lost"),
    [
        ([transitions.NOT_FOUND] * 3, timedelta(seconds=30), 3, timedelta(seconds=30), True),
        ([transitions.NOT_FOUND] * 3, timedelta(seconds=10), 3, timedelta(seconds=30), False),  # too quick
        ([transitions.NOT_FOUND] * 2, timedelta(seconds=60), 3, timedelta(seconds=30), False),  # too few
        ([transitions.FORBIDDEN] * 3, timedelta(0), 3, timedelta(0), True),
        # A 403 breaks a run of 404s (and the other way round): a run is of one answer.
        ([transitions.NOT_FOUND, transitions.FORBIDDEN, transitions.FORBIDDEN], timedelta(0), 3, timedelta(0), False),
    ],
)
def test_a_loss_is_earned_by_a_run_of_the_same_answer(
    answers: list[str], span: timedelta, polls: int, grace: timedelta, lost: bool
) -> None:
    change = Change.of(job(State.WATCHING))
    for index, kind in enumerate(answers):
        at = NOW + span * (index / max(1, len(answers) - 1))
        change = transitions.missed(change, kind, "HTTP 404", at, at + timedelta(seconds=15))
    assert transitions.loss_earned(change.after, NOW + span, polls=polls, grace=grace) is lost


def test_a_run_of_misses_records_one_poll_error_and_counts() -> None:
    change = Change.of(job(State.WATCHING))
    for second in (0, 15, 30):
        at = NOW + timedelta(seconds=second)
        change = transitions.missed(change, transitions.NOT_FOUND, "HTTP 404", at, at + timedelta(seconds=15))
    after = change.after
    assert (after.miss_kind, after.miss_count, after.miss_since) == (transitions.NOT_FOUND, 3, NOW)
    assert [e.kind for e in change.events] == ["poll_error"]


def test_an_alert_fires_once_per_job() -> None:
    change = Change.of(job(State.WATCHING))
    once = transitions.alert_once(change, transitions.UNKNOWN_STATUS, {"status": "thinking"}, NOW)
    assert [e.kind for e in once.events] == ["unknown_status"]
    assert transitions.alert_once(Change.of(once.after), transitions.UNKNOWN_STATUS, {}, NOW).events == ()


def test_a_refused_cancel_is_remembered_and_its_resend_keeps_the_decision() -> None:
    cancelling = job(State.CANCELLING, cancel_reason="max_credits", cancel_acked_at=None)
    refused = transitions.cancel_sent(Change.of(cancelling), False, "only pending", NOW, NOW, LATER).after
    assert (refused.cancel_answer, refused.cancel_resend_at, refused.cancel_acked_at) == ("refused", LATER, NOW)
    resent = transitions.resend_cancel(Change.of(refused), transitions.CANCEL_REFUSED, LATER)
    assert (resent.after.state, resent.after.cancel_reason, resent.after.next_check_at) == (
        State.CANCELLING, "max_credits", LATER,
    )  # fmt: skip
    again = transitions.cancel_sent(Change.of(resent.after), True, "ok", LATER, LATER, LATER).after
    assert again.cancel_acked_at == NOW  # confirm_timeout counts from the first answer


# ---- blind: N unreadable answers in a row, cleared by a readable one


def test_the_third_unreadable_answer_in_a_row_makes_the_job_blind_once() -> None:
    change = Change.of(job(State.WATCHING))
    kinds = []
    for answer in range(1, 6):
        change = transitions.unreadable_answer(change, transitions.NO_STATUS, {"error": "no status"}, NOW)
        kinds.append([e.kind for e in change.events])
        assert change.after.unreadable_count == answer
    assert change.after.blind_reason == transitions.NO_STATUS
    assert change.after.blind_since == NOW
    (said,) = [e for e in change.events if e.kind == transitions.JOB_BLIND]
    assert (said.reason, said.detail) == (transitions.NO_STATUS, {"error": "no status", "answers": 3})
    # A later answer of another kind does not say it again, nor change why it went blind.
    again = transitions.unreadable_answer(Change.of(change.after), transitions.FORBIDDEN, {}, NOW)
    assert again.events == () and again.after.blind_reason == transitions.NO_STATUS


def test_a_readable_answer_ends_the_run_and_clears_blind() -> None:
    two = job(State.WATCHING, unreadable_count=2, count_source="field")
    assert transitions.sighted(Change.of(two), NOW, "field").after.unreadable_count == 0
    assert transitions.sighted(Change.of(two), NOW, "field").events == ()  # not blind: nothing to say
    blind = job(State.WATCHING, unreadable_count=7, blind_reason="no_count", blind_since=NOW, count_source="field")
    cleared = transitions.sighted(Change.of(blind), LATER, "unpaged")
    assert (cleared.after.blind_reason, cleared.after.blind_since, cleared.after.unreadable_count) == (None, None, 0)
    assert [(e.kind, e.reason) for e in cleared.events] == [
        (transitions.JOB_BLIND_CLEARED, "no_count"),
        (transitions.COUNT_SOURCE, None),
    ]
    assert cleared.events[1].detail == {"source": "unpaged", "was": "field"}
    # The documented count fields on a job's first poll are not news.
    assert transitions.sighted(Change.of(job(State.WATCHING)), NOW, "field").events == ()


@pytest.mark.parametrize(("count", "due"), [(0, True), (1, False), (2, False), (3, True), (6, True), (7, False)])
def test_the_alternatives_are_tried_every_few_polls(count: int, due: bool) -> None:
    assert transitions.recovery_due(job(State.WATCHING, unreadable_count=count)) is due


def test_a_next_check_set_without_its_purpose_is_an_enforcing_one() -> None:
    # A probe scheduled by the policy, then a budget's crossing brings the check forward:
    # the claim must not queue that check behind probes.
    probed = Change.of(job(State.WATCHING)).set({"next_check_at": LATER, "check_priority": CHECK_PROBE})
    assert probed.after.check_priority == CHECK_PROBE
    assert probed.set({"next_check_at": NOW}).after.check_priority == CHECK_ENFORCE
    # values that leave the next check alone leave its purpose alone
    assert probed.set({"credits_used": 41}).after.check_priority == CHECK_PROBE
