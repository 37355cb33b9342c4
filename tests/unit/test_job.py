"""The typed Job is the jobs table, column for column: a renamed column cannot drift."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from supervisor.adapters.tables import jobs
from supervisor.core.job import FIELDS, Job
from supervisor.core.states import State


def test_job_fields_are_the_jobs_table_columns() -> None:
    assert list(FIELDS) == [column.name for column in jobs.columns]


def row(**values: object) -> dict[str, object]:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    base: dict[str, object] = dict.fromkeys(FIELDS)
    base.update(
        job_id="j1",
        state="watching",
        labels=None,
        policy="default",
        source="track",
        credits_used=0,
        submitted_at=now,
        next_check_at=now,
        poll_errors=0,
        warned=None,
        cancel_attempts=0,
        updated_at=now,
    )
    base.update(values)
    return base


def test_a_row_reads_as_a_typed_job() -> None:
    job = Job.from_row(row(state="cancelling", labels={"team": "growth"}, warned=["max_credits@0.8"]))
    assert job.state is State.CANCELLING
    assert job.labels == {"team": "growth"}
    assert job.warned == ("max_credits@0.8",)


def test_with_values_gives_a_new_job_and_leaves_the_old_one() -> None:
    job = Job.from_row(row())
    later = job.with_values({"state": "confirming", "credits_used": 7, "warned": ["max_credits@0.5"]})
    assert (later.state, later.credits_used, later.warned) == (State.CONFIRMING, 7, ("max_credits@0.5",))
    assert (job.state, job.credits_used) == (State.WATCHING, 0)


def test_started_at_is_the_api_s_created_at_when_known() -> None:
    learned = datetime(2026, 1, 1, 12, tzinfo=UTC)
    created = datetime(2026, 1, 1, 10, 0, 0, 250_000, tzinfo=UTC)
    assert Job.from_row(row(submitted_at=learned)).started_at == learned
    assert Job.from_row(row(submitted_at=learned, remote_created_at=created)).started_at == created


def test_a_whole_second_created_at_is_read_as_the_latest_start_it_allows() -> None:
    # The docs' created_at is epoch seconds: the job started somewhere in that second.
    second = datetime(2026, 1, 1, 10, tzinfo=UTC)
    tracked_later = Job.from_row(row(submitted_at=second + timedelta(hours=2), remote_created_at=second))
    assert tracked_later.started_at == second + timedelta(seconds=1)
    # Learned of within that same second (submit): no later than that.
    submitted = Job.from_row(row(submitted_at=second + timedelta(milliseconds=300), remote_created_at=second))
    assert submitted.started_at == second + timedelta(milliseconds=300)
