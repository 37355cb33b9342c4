"""The public JSON shapes, one pydantic model each: what `--json` prints, what the admin API
answers and what its OpenAPI document says (generated from these models, so it cannot drift).

Field names and forms are the contract (DESIGN.md): timestamps are ISO 8601 UTC with a `Z`,
absent values are null, every field is always present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, WithJsonSchema

from supervisor.app.errors import SupervisorError
from supervisor.config import Config, Policy
from supervisor.core.job import Job
from supervisor.core.policy import job_policy
from supervisor.core.states import TERMINAL, State


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


Timestamp = Annotated[
    datetime,
    PlainSerializer(iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class View(BaseModel):
    # Serialized, a field with a default is still always present: the schema says required.
    model_config = ConfigDict(frozen=True, json_schema_serialization_defaults_required=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class LimitsView(View):
    """The limits in force for a job: its policy with its per-job overrides."""

    max_runtime_s: float | None
    max_queued_s: float | None
    stall_timeout_s: float | None
    max_credits: int | None
    action: str

    @classmethod
    def of(cls, policy: Policy) -> LimitsView:
        return cls(
            max_runtime_s=policy.max_runtime.total_seconds() if policy.max_runtime else None,
            max_queued_s=policy.max_queued.total_seconds() if policy.max_queued else None,
            stall_timeout_s=policy.stall_timeout.total_seconds() if policy.stall_timeout else None,
            max_credits=policy.max_credits,
            action=policy.action,
        )


class _JobFields(View):
    job_id: str
    state: State
    remote_status: str | None
    labels: dict[str, str]
    policy: str
    credits_used: int
    cancel_reason: str | None
    final_status: str | None  # the remote status confirmed final
    submitted_at: Timestamp
    cancel_requested_at: Timestamp | None
    confirmed_at: Timestamp | None
    source: str  # "track" | "submit"
    query: str | None
    limits: LimitsView
    remote_created_at: Timestamp | None
    last_polled_at: Timestamp | None
    next_check_at: Timestamp | None  # null once the job is terminal
    cancel_detail: dict[str, Any] | None
    would_cancel_reason: str | None
    would_cancel_at: Timestamp | None
    last_error: str | None


class JobView(_JobFields):
    """A job (`jobs list --json`, `GET /v1/jobs`)."""

    @classmethod
    def of(cls, config: Config, job: Job) -> JobView:
        return cls(**_job_fields(config, job))


def _job_fields(config: Config, job: Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "state": job.state,
        "remote_status": job.remote_status,
        "labels": dict(job.labels or {}),
        "policy": job.policy,
        "credits_used": job.credits_used,
        "cancel_reason": job.cancel_reason,
        "final_status": job.final_status,
        "submitted_at": job.submitted_at,
        "cancel_requested_at": job.cancel_requested_at,
        "confirmed_at": job.confirmed_at,
        "source": job.source,
        "query": job.query,
        "limits": LimitsView.of(job_policy(config, job)),
        "remote_created_at": job.remote_created_at,
        "last_polled_at": job.last_polled_at,
        "next_check_at": job.next_check_at if job.state not in TERMINAL else None,
        "cancel_detail": dict(job.cancel_detail) if job.cancel_detail is not None else None,
        "would_cancel_reason": job.would_cancel_reason,
        "would_cancel_at": job.would_cancel_at,
        "last_error": job.last_error,
    }


class EventView(View):
    """One thing that happened to a job (a transition, a warning, a poll error…)."""

    at: Timestamp
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str | None
    detail: dict[str, Any] | None

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> EventView:
        return cls(**{name: event[name] for name in cls.model_fields})


class JobDetailView(_JobFields):
    """A job with its events (`jobs show --json`, `GET /v1/jobs/{job_id}`)."""

    events: list[EventView]

    @classmethod
    def of(cls, config: Config, job: Job, events: Sequence[Mapping[str, Any]]) -> JobDetailView:
        return cls(**_job_fields(config, job), events=[EventView.of(event) for event in events])


class TrackResult(View):
    added: list[str]
    already_tracked: list[str]


class SubmitResult(View):
    """A started job. `limit` is what the API was asked for: lower than `requested_limit`
    when the job's max_credits or a reserving budget left less (`clamped_by` names them)."""

    job_id: str
    requested_limit: int
    limit: int
    clamped_by: list[str]


class QueueItemView(View):
    """A submission (`submit --queue --json` when it waits, `queue list/show --json`, the admin
    API's /v1/queue). `state`: queued (waiting: `reason` says for what, `expected_start` when
    it may start — the next budget period or rate slot — if known), initiating (the initiate
    call is being made), started (`job_id` is supervised), orphaned (the initiate's outcome
    is unknown: it may have started a job nobody supervises; never sent again; its
    reservation is kept), expired, cancelled, failed (`error`)."""

    id: str
    state: str
    query: str
    labels: dict[str, str]
    policy: str
    priority: int
    requested_limit: int
    limit: int | None  # what the API was asked for, once decided
    reserved_credits: int | None  # held against the budgets while it may still spend
    reason: str | None
    expected_start: Timestamp | None
    created_at: Timestamp
    expires_at: Timestamp | None
    initiated_at: Timestamp | None
    job_id: str | None
    error: str | None

    @classmethod
    def of(cls, config: Config, row: Mapping[str, Any]) -> QueueItemView:
        limit = row["granted_limit"]
        holds = row["state"] in ("initiating", "orphaned") and row["admission_id"] is not None
        return cls(
            id=row["id"], state=row["state"], query=row["query"], labels=dict(row["labels"] or {}),
            policy=row["policy"], priority=row["priority"], requested_limit=row["requested_limit"], limit=limit,
            reserved_credits=limit * config.api.credits_per_result if holds and limit is not None else None,
            reason=row["reason"], expected_start=row["expected_at"], created_at=row["created_at"],
            expires_at=row["expires_at"], initiated_at=row["initiating_at"], job_id=row["job_id"],
            error=row["error"],
        )  # fmt: skip


class QueuePage(View):
    """`GET /v1/queue`: the submissions, in the queue's order (priority, then age)."""

    items: list[QueueItemView]


class DeliveryAttemptView(View):
    """One attempt of a delivery: when, the receiver's HTTP status (null: no answer, see
    `error`), the error (null: delivered) and how long it took."""

    at: Timestamp
    status: int | None
    error: str | None
    duration_ms: int


class DeliveryView(View):
    """A webhook delivery from the outbox (`webhooks list/show --json`, the admin API's
    /v1/deliveries). `id` is the Standard Webhooks `webhook-id`; `hook` names the hook (its
    host and a digest of its URL); `state`: pending (due at `next_attempt_at`), delivered,
    failed (`last_error` says why: the receiver's refusal, the last attempt's error after
    notify.retry_for, or "hook removed"). `attempt_log` only in `show`."""

    id: str
    hook: str
    event: str
    subject: str
    state: str
    attempts: int
    created_at: Timestamp
    next_attempt_at: Timestamp | None
    delivered_at: Timestamp | None
    last_error: str | None
    payload: dict[str, Any]
    attempt_log: list[DeliveryAttemptView] | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> DeliveryView:
        log = row.get("attempt_log")
        return cls(
            id=row["delivery_id"], hook=row["hook"], event=row["event"], subject=row["subject"], state=row["state"],
            attempts=row["attempts"], created_at=row["created_at"],
            next_attempt_at=row["next_attempt_at"] if row["state"] == "pending" else None,
            delivered_at=row["delivered_at"], last_error=row["last_error"], payload=dict(row["payload"]),
            attempt_log=None if log is None else [
                DeliveryAttemptView(at=a["at"], status=a["status"], error=a["error"], duration_ms=a["duration_ms"])
                for a in log
            ],
        )  # fmt: skip


class DeliveryPage(View):
    """`GET /v1/deliveries`: failed first, then pending, then delivered; newest first in each."""

    items: list[DeliveryView]


class RedeliverResult(View):
    """`webhooks redeliver` / `POST /v1/deliveries/{id}/redeliver`: the deliveries queued
    again, due now, with their id kept (a receiver that has one drops the copy)."""

    redelivered: list[str]


class ContinueResult(View):
    """A completed job asked for more: `additional` results were asked of the API (fewer than
    `requested` when its max_credits or a reserving budget left less: `clamped_by`), and the
    job is supervised again (`state`: watching)."""

    job_id: str
    state: str
    requested: int
    additional: int
    clamped_by: list[str]


class JobPage(View):
    """A page of jobs (`GET /v1/jobs`), oldest first; `next_cursor` asks for the next page
    (`?cursor=…`, with the same filters) and is null on the last one."""

    jobs: list[JobView]
    next_cursor: str | None


# The problem types' URIs: absolute, stable and resolvable to nothing (RFC 9457 allows it; a
# type is an identifier first). The README lists every code.
PROBLEM_TYPE_PREFIX = "urn:clado-supervisor:problem:"


class ProblemView(View):
    """An admin API error as RFC 9457 problem details (`application/problem+json`), never a
    stack trace. `code` is the stable code (also the end of `type`); `error` is the same code
    under the name error bodies had before they were problem details, for existing clients."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    error: str

    @classmethod
    def of(cls, error: SupervisorError) -> ProblemView:
        return cls(
            type=PROBLEM_TYPE_PREFIX + error.code,
            title=error.title,
            status=error.status,
            detail=error.public,
            code=error.code,
            error=error.code,
        )


class HealthView(View):
    status: str


class ReadinessView(View):
    # Not required: `problems` is there only when the daemon is unready.
    model_config = ConfigDict(frozen=True, json_schema_serialization_defaults_required=False)

    status: str  # "ready" | "unready"
    problems: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class BudgetView(View):
    name: str
    period: str
    period_start: Timestamp | None  # null for a "total" budget
    credits: int
    spent: int
    reserved: int
    remaining: int
    action: str
    exhausted: bool
    warnings_fired: list[str]


class ReportView(View):
    """`report --json`; the figures are defined in app/report.py and the README."""

    period: str
    period_start: Timestamp | None
    generated_at: Timestamp
    budgets: list[BudgetView]
    jobs: int
    spend: int
    spend_by_policy: dict[str, int]
    spend_by_label: dict[str, int]
    cancels_by_reason: dict[str, int]
    would_cancel_by_reason: dict[str, int]
    saved_by_cancels: int
    cancelled_without_known_limit: int
    observe_would_have_saved: int
    leaked_after_decision: int
    warnings_by_limit: dict[str, int]
    # Initiates whose outcome is unknown: each may be a billed job nobody supervises.
    orphaned_submissions: list[QueueItemView]


class ConfigCheckView(View):
    """`check-config --json`: the file is valid (an invalid one is an error line, exit 2)."""

    source: str
    config_hash: str
    policies: list[str]
    budgets: list[str]

    @classmethod
    def of(cls, config: Config) -> ConfigCheckView:
        return cls(
            source=str(config.source),
            config_hash=config.config_hash,
            policies=list(config.policies),
            budgets=list(config.budgets),
        )


class HealthcheckView(View):
    """`healthcheck --json`: what the daemon's /healthz answered (status null: no answer)."""

    healthy: bool
    url: str
    status: int | None
    error: str | None


class TopView(View):
    """`top --once --json`: jobs by state (every state, 0 included) and the active jobs shown."""

    generated_at: Timestamp
    counts: dict[str, int]
    active: list[JobView]
