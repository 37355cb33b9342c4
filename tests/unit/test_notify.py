"""core.notify: which webhook events a Change sends, which counters an event row adds to,
and when a failed delivery is tried again (table tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from supervisor.core import transitions
from supervisor.core.job import FIELDS, Job
from supervisor.core.notify import counts, next_attempt, notices
from supervisor.core.states import State
from supervisor.core.transitions import Change, Event

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def job(state: State = State.WATCHING, **values: object) -> Job:
    row: dict[str, object] = dict.fromkeys(FIELDS)
    row.update(job_id="j1", state=state.value, labels={}, policy="default", source="track", credits_used=42,
               submitted_at=NOW, next_check_at=NOW, poll_errors=0, warned=[], cancel_attempts=0,
               updated_at=NOW)  # fmt: skip
    row.update(values)
    return Job.from_row(row)


def change(*events: Event, state: State = State.WATCHING, **values: object) -> Change:
    return Change(job(state, **values), {}, events)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event("warning", NOW, reason="max_credits"), "warning"),
        (Event("transition", NOW, State.WATCHING, State.CANCELLING, "max_credits"), "cancel_requested"),
        (Event("transition", NOW, State.CONFIRMING, State.CANCELLING, "max_credits"), None),  # a resend
        (Event("transition", NOW, State.CONFIRMING, State.CANCELLED, "confirmed"), "cancelled"),
        (Event("transition", NOW, State.CONFIRMING, State.UNCONFIRMED), "unconfirmed"),
        (Event("transition", NOW, State.WATCHING, State.LOST), "lost"),
        (Event("transition", NOW, State.WATCHING, State.COMPLETED), None),
        (Event("transition", NOW, State.CANCELLING, State.CONFIRMING), None),
        (Event(transitions.CANCEL_REFUSED, NOW), "cancel_refused"),
        (Event(transitions.CANCEL_IGNORED, NOW), "cancel_ignored"),
        (Event("reopened", NOW), "reopened"),
        (Event(transitions.UNKNOWN_STATUS, NOW), None),
        (Event("would_cancel", NOW, reason="max_credits"), None),
        (Event("poll_error", NOW), None),
    ],
)
def test_which_event_a_change_announces(event: Event, expected: str | None) -> None:
    found = notices(change(event))
    assert [notice.event for notice in found] == ([expected] if expected else [])
    for notice in found:
        assert (notice.subject, notice.at, notice.fields["job_id"], notice.fields["policy"]) == (
            "job:j1", NOW, "j1", "default",
        )  # fmt: skip
        assert notice.fields["credits"] == 42


def test_a_changes_notices_keep_the_order_of_its_events() -> None:
    found = notices(
        change(
            Event("warning", NOW, reason="max_credits"),
            Event("transition", NOW, State.WATCHING, State.CANCELLING, "max_credits", {"rule": "r"}),
        )
    )
    assert [(n.event, n.fields["reason"]) for n in found] == [
        ("warning", "max_credits"),
        ("cancel_requested", "max_credits"),
    ]
    assert found[1].fields["detail"] == {"rule": "r"} and found[1].fields["state"] == "cancelling"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (("transition", "watching", "cancelling", "manual"), [("transitions", "cancelling"), ("cancels", "manual")]),
        (("transition", "confirming", "cancelling", "manual"), [("transitions", "cancelling")]),  # resent
        (("transition", "confirming", "cancelled", "confirmed"), [("transitions", "cancelled")]),
        (("warning", None, None, "max_credits"), [("warnings", "max_credits")]),
        (("would_cancel", None, None, "max_runtime"), [("would_cancel", "max_runtime")]),
        (("reopened", None, None, None), [("job_alerts", "reopened")]),
        (("cancel_refused", None, None, None), [("job_alerts", "cancel_refused")]),
        (("tracked", None, "watching", None), []),
        (("poll_error", None, None, None), []),
    ],
)
def test_which_counters_an_event_row_adds_to(
    row: tuple[str, str | None, str | None, str | None], expected: list[tuple[str, str]]
) -> None:
    assert counts(*row) == expected


DAY = timedelta(hours=24)


@pytest.mark.parametrize(
    ("attempts", "jitter", "retry_after", "expected_s"),
    [
        (1, 0.0, None, 2.5),
        (1, 0.999, None, 4.9975),
        (2, 0.0, None, 5.0),
        (3, 0.0, None, 10.0),
        (20, 0.0, None, 1800.0),  # capped at an hour, its lower half
        (20, 0.999, None, 3598.2),
        (1, 0.0, 120.0, 120.0),  # the receiver's Retry-After is a floor
        (5, 0.0, 1.0, 40.0),  # … never a shortcut
    ],
)
def test_the_next_attempt_grows_with_jitter_and_honours_retry_after(
    attempts: int, jitter: float, retry_after: float | None, expected_s: float
) -> None:
    when = next_attempt(attempts, NOW, NOW, DAY, retry_after=retry_after, jitter=jitter)
    assert when is not None
    assert (when - NOW).total_seconds() == pytest.approx(expected_s)


def test_no_attempt_after_retry_for() -> None:
    created = NOW - DAY + timedelta(seconds=3)
    assert next_attempt(1, created, NOW, DAY, retry_after=None, jitter=0.0) == NOW + timedelta(seconds=2.5)
    assert next_attempt(2, created, NOW, DAY, retry_after=None, jitter=0.0) is None
    assert next_attempt(1, created, NOW, DAY, retry_after=60.0, jitter=0.0) is None
