"""The input rules the CLI and the admin API share: same checks, same words."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from supervisor.app import inputs
from supervisor.app.errors import BadInput, InvalidJson
from supervisor.app.views import JobDetailView, JobView
from supervisor.config import Config
from supervisor.core.job import FIELDS, Job
from supervisor.core.states import State

# The public job fields of DESIGN.md and the README, in the order `jobs list --json` prints them.
JOB_FIELDS = [
    "job_id", "state", "remote_status", "labels", "policy", "credits_used", "cancel_reason", "final_status",
    "submitted_at", "cancel_requested_at", "confirmed_at", "source", "query", "limits", "remote_created_at",
    "last_polled_at", "next_check_at", "cancel_detail", "would_cancel_reason", "would_cancel_at", "last_error",
    "blind", "blind_since",
    "forecast_credits", "reaches_limit_at", "forecast_basis", "money",
]  # fmt: skip


def problem(rule: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(BadInput) as caught:
        rule(*args, **kwargs)  # type: ignore[operator]
    return str(caught.value)


def test_labels_are_checked_with_one_message() -> None:
    assert inputs.labels({"team": "growth"}) == {"team": "growth"}
    assert problem(inputs.labels, {"bad key!": "x"}).startswith("labels: invalid label key 'bad key!'")
    assert problem(inputs.labels, {"k": "a\x00"}).startswith("labels: invalid value for label 'k'")
    assert inputs.label_args(["team=growth", "env=prod"]) == {"team": "growth", "env": "prod"}
    assert "must look like KEY=VALUE" in problem(inputs.label_args, ["novalue"])


def test_durations_take_a_unit_or_seconds_as_a_number_or_digits() -> None:
    assert inputs.duration("max_runtime", "90s") == timedelta(seconds=90)
    assert inputs.duration("max_runtime", 90) == inputs.duration("max_runtime", "90") == timedelta(seconds=90)
    assert inputs.duration("max_runtime", None) is None
    assert problem(inputs.duration, "max_runtime", "soon").startswith("max_runtime: invalid duration 'soon'")
    assert "positive" in problem(inputs.duration, "max_runtime", "-5m")


def test_counts_are_whole_numbers_in_bounds() -> None:
    assert inputs.count("limit", 30, 1, 1000) == 30
    for bad in (0, 1001, True):
        assert problem(inputs.count, "limit", bad, 1, 1000) == "limit: must be a whole number from 1 to 1000"


def test_free_text_has_no_control_characters_and_a_query_is_not_blank() -> None:
    assert inputs.text("query", "tab\tand newline\n", max_length=100, required=True) == "tab\tand newline\n"
    assert problem(inputs.text, "query", "  ", max_length=100, required=True) == "query: must not be blank"
    assert problem(inputs.text, "reason", "a\x00b", max_length=100) == "reason: control characters are not allowed"
    assert problem(inputs.text, "reason", "x" * 6, max_length=5) == "reason: at most 5 characters"
    assert inputs.text("reason", None, max_length=5) is None


def test_filters() -> None:
    assert inputs.state("watching") is State.WATCHING
    assert problem(inputs.state, "running") == "unknown state 'running'"
    assert inputs.label_filter(["team=growth"]) == {"team": "growth"}
    assert problem(inputs.label_filter, ["team"]) == "label filters look like label=KEY=VALUE"
    assert inputs.state_of("delivery", "failed", ("pending", "delivered", "failed")) == "failed"
    assert problem(inputs.state_of, "submission", "running", ("queued", "expired")) == (
        "state: unknown submission state 'running' (known: queued, expired)"
    )


def test_request_bodies_name_the_first_problem() -> None:
    assert problem(inputs.body, inputs.TrackRequest, {"job_ids": ["a"], "colour": "blue"}) == "colour: unknown field"
    assert problem(inputs.body, inputs.SubmitRequest, {"query": "q", "limit": "30"}).startswith("limit: ")
    assert problem(inputs.body, inputs.TrackRequest, ["a"]).startswith("body: ")
    with pytest.raises(InvalidJson):
        inputs.json_body(b"{")
    with pytest.raises(InvalidJson):
        inputs.json_body(b'{"k": "\\ud800"}')


def job(**values: object) -> Job:
    now = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)
    row: dict[str, object] = dict.fromkeys(FIELDS)
    row.update(job_id="j1", state="watching", labels={"team": "a"}, policy="default", source="track",
               credits_used=3, submitted_at=now, next_check_at=now, poll_errors=0, warned=None,
               cancel_attempts=0, updated_at=now)  # fmt: skip
    row.update(values)
    return Job.from_row(row)


def test_a_job_view_has_every_public_field_in_its_public_form() -> None:
    config = Config()
    shown = JobView.of(config, job(max_credits=7)).to_json()
    assert list(shown) == JOB_FIELDS
    assert shown["state"] == "watching"
    assert shown["submitted_at"] == "2026-01-01T12:30:00Z"
    assert shown["next_check_at"] == "2026-01-01T12:30:00Z"
    assert shown["limits"]["max_credits"] == 7
    assert shown["limits"]["money"] == {"currency": "USD", "max_credits": 0.07}
    # Watching, no rate yet: its forecast is its cap, and says so; in money too.
    assert (shown["forecast_credits"], shown["forecast_basis"]) == (7, "limits (no rate yet)")
    assert shown["money"] == {"currency": "USD", "credits_used": 0.03, "forecast_credits": 0.07}
    assert shown["cancel_requested_at"] is None
    # A terminal job has no next check.
    assert JobView.of(config, job(state="cancelled")).to_json()["next_check_at"] is None
    event = {"id": 1, "job_id": "j1", "at": datetime(2026, 1, 1, tzinfo=UTC), "kind": "tracked",
             "from_state": None, "to_state": "watching", "reason": None, "detail": None}  # fmt: skip
    detail = JobDetailView.of(config, job(), [event]).to_json()
    assert list(detail) == [*JOB_FIELDS, "events"]
    assert detail["events"] == [{"at": "2026-01-01T00:00:00Z", "kind": "tracked", "from_state": None,
                                 "to_state": "watching", "reason": None, "detail": None}]  # fmt: skip
