"""A supervised job as the code sees it: one frozen, typed value read from its row.

The fields are the `jobs` table's columns, one for one (a test holds them equal), so a
renamed column fails at import and type-check time rather than as a KeyError in a poll.
A job is never changed in place: a move of the state machine returns a Change
(core.transitions), the store applies it, and the next read gives a new Job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from supervisor.core.states import State

_WHOLE_SECOND = timedelta(seconds=1)

# Which claim queue a job's next check is in (`Job.check_priority`): due jobs are claimed
# lowest first, so a poll that enforces something is never queued behind a routine re-poll
# or a rate probe while a replica has a backlog, and probes wait longest.
CHECK_ENFORCE = 0  # a deadline, a predicted limit crossing, a budget's, a confirm, a retry
CHECK_ROUTINE = 1  # the regular poll, the first look at a job, a rate re-measured
CHECK_PROBE = 2  # a probe of a rate not known yet (a pending job, one just seen running)


class Row(Protocol):
    """What a row must offer: its columns by name (a SQLAlchemy RowMapping, a dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Job:
    job_id: str
    state: State
    remote_status: str | None
    labels: Mapping[str, str]
    policy: str
    max_runtime_s: float | None  # per-job overrides of the policy (track --max-runtime …)
    max_credits: int | None
    source: str  # "track" | "submit"
    query: str | None
    result_limit: int | None
    credits_used: int
    credits_per_s: float | None  # observed rate, for polling sooner near a credit limit
    submitted_at: datetime  # when the supervisor learned of the job
    remote_created_at: datetime | None
    last_progress_at: datetime | None  # last time credits grew (stall detection)
    last_polled_at: datetime | None
    next_check_at: datetime
    check_priority: int  # CHECK_ENFORCE | CHECK_ROUTINE | CHECK_PROBE: what the next check is for
    poll_errors: int
    last_error: str | None
    warned: tuple[str, ...]  # warning thresholds already fired ("max_credits@0.8")
    cancel_reason: str | None
    cancel_detail: Mapping[str, Any] | None
    cancel_requested_at: datetime | None  # the decision, committed before the call
    credits_at_decision: int | None
    cancel_attempts: int
    cancel_sent_at: datetime | None
    cancel_acked_at: datetime | None
    reserved_credits: int | None  # held against reserving budgets while the job runs
    would_cancel_reason: str | None  # observe mode / dry run
    would_cancel_at: datetime | None
    would_cancel_credits: int | None
    final_status: str | None
    confirmed_at: datetime | None
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: datetime | None
    updated_at: datetime
    recheck_until: datetime | None  # a terminal job still looked at (read-only) until then
    reopened_at: datetime | None  # seen running again after completed/lost
    miss_kind: str | None  # "not_found" (404) | "forbidden" (403), answered miss_count polls in a row
    miss_count: int
    miss_since: datetime | None
    cancel_answer: str | None  # the last cancel call's answer: "accepted" | "refused"
    cancel_resend_at: datetime | None  # when a cancel the job does not heed is sent again
    unreadable_count: int  # status answers in a row whose spend could not be read
    blind_reason: str | None  # set once that run made the job blind (core.transitions)
    blind_since: datetime | None
    count_source: str | None  # where the last count came from: "field", "unpaged", "page_walk", …

    @classmethod
    def from_row(cls, row: Row) -> Job:
        """A job from a `jobs` row (a SQLAlchemy RowMapping or any mapping of its columns)."""
        return cls(**_typed({name: row[name] for name in FIELDS}))

    def with_values(self, values: Mapping[str, Any]) -> Job:
        """This job as it will read once `values` (column → value) are written."""
        return dataclasses.replace(self, **_typed(values))

    @property
    def started_at(self) -> datetime:
        """When the job started, for its time limits: when it was reopened (continued by
        someone: a new run, its own max_runtime), else the API's created_at, else when the
        supervisor learned of it.

        The docs show created_at in whole epoch seconds: such a value can be up to a second
        before the true start, so the latest start it allows is taken (never later than when
        the supervisor learned of the job), and a time limit is never enforced early."""
        return start_of(self.reopened_at, self.remote_created_at, self.submitted_at)


def start_of(reopened_at: datetime | None, remote_created_at: datetime | None, submitted_at: datetime) -> datetime:
    """Job.started_at from its three facts (also for reads that take only a few columns)."""
    if reopened_at is not None:
        return reopened_at
    created = remote_created_at
    if created is None:
        return submitted_at
    if created.microsecond == 0:
        return min(created + _WHOLE_SECOND, max(created, submitted_at))
    return created


def _typed(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values as the Job's field types (the state an enum, JSON columns immutable)."""
    typed = dict(values)
    if "state" in typed:
        typed["state"] = State(typed["state"])
    if "labels" in typed:
        typed["labels"] = dict(typed["labels"] or {})
    if "warned" in typed:
        typed["warned"] = tuple(typed["warned"] or ())
    if "miss_count" in typed:
        typed["miss_count"] = typed["miss_count"] or 0
    if "unreadable_count" in typed:
        typed["unreadable_count"] = typed["unreadable_count"] or 0
    return typed


FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Job))
