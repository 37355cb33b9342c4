"""The public JSON shapes, one pydantic model each: what `--json` prints, what the admin API
answers and what its OpenAPI document says (generated from these models, so it cannot drift).

Field names and forms are the contract (DESIGN.md): timestamps are ISO 8601 UTC with a `Z`,
absent values are null, every field is always present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, WithJsonSchema

from supervisor.app.errors import SupervisorError
from supervisor.config import Config, Policy
from supervisor.core.forecast import BudgetForecast, forecast_job, money, running_job
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


# The money twin of an object's credit figures (core.forecast.money): {"currency": "USD",
# "<the credit figure's key>": amount, …}, amounts rounded to 4 places, null where it is null.
Money = dict[str, Any]


class LimitsView(View):
    """The limits in force for a job: its policy with its per-job overrides."""

    max_runtime_s: float | None
    max_queued_s: float | None
    stall_timeout_s: float | None
    max_credits: int | None
    action: str
    on_blind: str  # "alert" | "cancel" (the policy's, or "cancel" from a budget covering the job)
    blind_grace_s: float | None
    money: Money

    @classmethod
    def of(cls, config: Config, policy: Policy) -> LimitsView:
        return cls(
            max_runtime_s=policy.max_runtime.total_seconds() if policy.max_runtime else None,
            max_queued_s=policy.max_queued.total_seconds() if policy.max_queued else None,
            stall_timeout_s=policy.stall_timeout.total_seconds() if policy.stall_timeout else None,
            max_credits=policy.max_credits,
            action=policy.action,
            on_blind=policy.on_blind,
            blind_grace_s=policy.blind_grace.total_seconds() if policy.blind_grace else None,
            money=money(config.billing, {"max_credits": policy.max_credits}),
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
    # Why the job's spend cannot be read (no_count | no_status | forbidden | unparseable), or
    # null: a flag on the job, whatever its state.
    blind: str | None
    blind_since: Timestamp | None
    # Where a watching job is heading (core.forecast.forecast_job; null once it is not):
    # its predicted final credits, never above what the supervisor lets it spend; when it
    # reaches its credit limit (null: not predicted to); and what that was predicted from.
    forecast_credits: int | None
    reaches_limit_at: Timestamp | None
    forecast_basis: str | None
    money: Money  # credits_used and forecast_credits


class JobView(_JobFields):
    """A job (`jobs list --json`, `GET /v1/jobs`)."""

    @classmethod
    def of(cls, config: Config, job: Job, now: datetime | None = None) -> JobView:
        return cls(**_job_fields(config, job, now))


def _job_fields(config: Config, job: Job, now: datetime | None = None) -> dict[str, Any]:
    forecast = None
    if job.state is State.WATCHING:
        forecast = forecast_job(running_job(config, job), now or datetime.now(UTC))
    forecast_credits = forecast.credits if forecast else None
    return {
        "forecast_credits": forecast_credits,
        "reaches_limit_at": forecast.reaches_limit_at if forecast else None,
        "forecast_basis": forecast.basis if forecast else None,
        "money": money(config.billing, {"credits_used": job.credits_used, "forecast_credits": forecast_credits}),
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
        "limits": LimitsView.of(config, job_policy(config, job)),
        "remote_created_at": job.remote_created_at,
        "last_polled_at": job.last_polled_at,
        "next_check_at": job.next_check_at if job.state not in TERMINAL else None,
        "cancel_detail": dict(job.cancel_detail) if job.cancel_detail is not None else None,
        "would_cancel_reason": job.would_cancel_reason,
        "would_cancel_at": job.would_cancel_at,
        "last_error": job.last_error,
        "blind": job.blind_reason,
        "blind_since": job.blind_since,
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
    def of(
        cls, config: Config, job: Job, events: Sequence[Mapping[str, Any]], now: datetime | None = None
    ) -> JobDetailView:
        return cls(**_job_fields(config, job, now), events=[EventView.of(event) for event in events])


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


class DryRunBudget(View):
    """One budget a dry-run submission matches: its forecast now, with the job's predicted
    cost added, and whether that stays within `credits`."""

    name: str
    credits: int
    forecast_credits: float
    forecast_with_job: float
    fits: bool
    forecast_action: str
    money: Money  # credits, forecast_credits, forecast_with_job

    @classmethod
    def of(cls, config: Config, outlook: Any, cost: float) -> DryRunBudget:
        forecast = outlook.forecast
        figures = {
            "credits": outlook.status.credits,
            "forecast_credits": round(forecast.without_queued, 1),
            "forecast_with_job": round(forecast.without_queued + cost, 1),
        }
        return cls(
            name=outlook.status.name, fits=figures["forecast_with_job"] <= outlook.status.credits,
            forecast_action=config.budgets[outlook.status.name].forecast_action,
            money=money(config.billing, figures), **figures,
        )  # fmt: skip


class DryRunView(View):
    """`submit --dry-run`: what the job would be granted (`limit` results, `credits` at most),
    its predicted cost, and whether it fits every budget's forecast; `refused`: why a real
    submission would be refused now (null: it would be admitted). Nothing is called or written."""

    query: str
    policy: str
    requested_limit: int
    limit: int
    clamped_by: list[str]
    credits: int
    predicted_credits: float
    fits: bool
    refused: str | None
    budgets: list[DryRunBudget]
    money: Money  # credits, predicted_credits


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
    money: Money  # reserved_credits

    @classmethod
    def of(cls, config: Config, row: Mapping[str, Any]) -> QueueItemView:
        limit = row["granted_limit"]
        holds = row["state"] in ("initiating", "orphaned") and row["admission_id"] is not None
        reserved = limit * config.api.credits_per_result if holds and limit is not None else None
        return cls(
            money=money(config.billing, {"reserved_credits": reserved}),
            id=row["id"], state=row["state"], query=row["query"], labels=dict(row["labels"] or {}),
            policy=row["policy"], priority=row["priority"], requested_limit=row["requested_limit"], limit=limit,
            reserved_credits=reserved,
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
    """A budget's period now and its forecast (`budgets --json`, `GET /v1/budgets`, each of
    `report --json`'s budgets). The forecast is of the credits the jobs submitted in this
    period will have spent in all (core.forecast.forecast_budget): `forecast_credits` the
    central figure, `forecast_low`/`forecast_high` its band, `exhausts_at` when `credits` is
    predicted to be reached (null: not predicted to), `forecast_basis` what it was built from.
    `spend_rate`: credits per second the running jobs spend now. `warnings_fired` has the
    spend warnings ("0.8") and the forecast ones ("forecast@0.8", "forecast@0.8:cleared")."""

    name: str
    period: str
    period_start: Timestamp | None  # null for a "total" budget
    period_end: Timestamp | None  # null for a "total" budget
    credits: int
    spent: int
    reserved: int
    remaining: int
    action: str
    exhausted: bool
    warnings_fired: list[str]
    spend_rate: float
    forecast_credits: float
    forecast_low: float
    forecast_high: float
    exhausts_at: Timestamp | None
    forecast_basis: str
    forecast_warn_at: list[float]
    forecast_action: str
    money: Money  # credits, spent, reserved, remaining, spend_rate and the forecast figures

    @classmethod
    def of(cls, config: Config, forecast: BudgetForecast, status: Any, warned: Sequence[str]) -> BudgetView:
        budget = config.budgets[status.name]
        figures = {
            "credits": status.credits, "spent": status.usage.spent, "reserved": status.usage.reserved,
            "remaining": status.remaining, "spend_rate": round(forecast.spend_rate, 4),
            "forecast_credits": round(forecast.central, 1), "forecast_low": round(forecast.low, 1),
            "forecast_high": round(forecast.high, 1),
        }  # fmt: skip
        return cls(
            name=status.name, period=status.period, period_start=status.period_start,
            period_end=forecast.period_end, action=status.action, exhausted=status.exhausted,
            warnings_fired=list(warned), exhausts_at=forecast.exhausts_at, forecast_basis=forecast.basis,
            forecast_warn_at=list(budget.forecast_warn_at), forecast_action=budget.forecast_action,
            money=money(config.billing, figures), **figures,
        )  # fmt: skip


class BudgetsView(View):
    """`budgets --json` (an object, as `GET /v1/budgets` answers)."""

    generated_at: Timestamp
    budgets: list[BudgetView]


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
    money: Money  # the twins of spend, its breakdowns, saved, would-have-saved and leaked


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
