"""SQL tables. Timestamps are UTC-aware on every backend (SQLite stores them naive)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so Alembic batch migrations on SQLite can find them later.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out — SQLite drops the zone otherwise."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
EventId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(128), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("remote_status", String(16)),
    Column("labels", JSON, nullable=False, default=dict),
    Column("policy", String(64), nullable=False),
    # Per-job overrides of the policy (track --max-runtime / --max-credits).
    Column("max_runtime_s", Float),
    Column("max_credits", Integer),
    Column("source", String(8), nullable=False),  # "track" | "submit"
    Column("query", Text),
    Column("result_limit", Integer),
    Column("credits_used", Integer, nullable=False, default=0),
    Column("credits_per_s", Float),  # observed rate, for polling sooner near a credit limit
    Column("submitted_at", UTCDateTime, nullable=False),  # when the supervisor learned of it
    Column("remote_created_at", UTCDateTime),
    Column("last_progress_at", UTCDateTime),  # last time credits grew (stall detection)
    Column("last_polled_at", UTCDateTime),
    Column("next_check_at", UTCDateTime, nullable=False),
    # What the next check is for (core.job CHECK_*): claims take the enforcing ones first.
    Column("check_priority", SmallInteger, nullable=False, default=0),
    Column("poll_errors", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("warned", JSON, nullable=False, default=list),  # thresholds already fired
    Column("cancel_reason", String(80)),
    Column("cancel_detail", JSON),
    Column("cancel_requested_at", UTCDateTime),  # the decision, committed before the call
    Column("credits_at_decision", Integer),
    Column("cancel_attempts", Integer, nullable=False, default=0),
    Column("cancel_sent_at", UTCDateTime),
    Column("cancel_acked_at", UTCDateTime),
    # Credits held against reserving budgets while the job runs (submit with reserve = true).
    Column("reserved_credits", Integer),
    Column("would_cancel_reason", String(80)),  # observe mode / dry run
    Column("would_cancel_at", UTCDateTime),
    Column("would_cancel_credits", Integer),
    Column("final_status", String(16)),
    Column("confirmed_at", UTCDateTime),
    # Lease: whoever holds the token may write the job; every write checks it (fencing).
    Column("lease_owner", String(128)),
    Column("lease_token", String(36)),
    Column("lease_expires_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    # A terminal job still looked at (read-only) until then: a completed job may be continued
    # by anyone holding the key, a lost one may come back, an unconfirmed one may still spend.
    Column("recheck_until", UTCDateTime),
    Column("reopened_at", UTCDateTime),  # seen running again after completed/lost: limits count from here
    # Consecutive status answers saying the job is not there (404) or not ours (403).
    Column("miss_kind", String(16)),  # "not_found" | "forbidden"
    Column("miss_count", Integer, nullable=False, default=0),
    Column("miss_since", UTCDateTime),
    Column("cancel_answer", String(16)),  # the last cancel call's answer: "accepted" | "refused"
    Column("cancel_resend_at", UTCDateTime),  # when a cancel the job ignores is sent again
    # Status answers in a row whose spend could not be read, and, once that made the job
    # blind, why and since when (see core.transitions.unreadable_answer).
    Column("unreadable_count", Integer, nullable=False, default=0),
    Column("blind_reason", String(16)),  # "no_count" | "no_status" | "forbidden" | "unparseable"
    Column("blind_since", UTCDateTime),
    Column("count_source", String(32)),  # where the last count came from: "field", "unpaged", …
    Index("ix_jobs_state_next_check_at", "state", "next_check_at"),
    # Claims of re-checked jobs scan only them (see migration 0004).
    Index(
        "ix_jobs_recheck_next_check_at",
        "next_check_at",
        sqlite_where=text("recheck_until IS NOT NULL"),
        postgresql_where=text("recheck_until IS NOT NULL"),
    ),
    Index("ix_jobs_submitted_at", "submitted_at"),
    # Retention prunes terminal jobs by age.
    Index("ix_jobs_state_updated_at", "state", "updated_at"),
)

job_events = Table(
    "job_events",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column(
        "job_id",
        String(128),
        ForeignKey("jobs.job_id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("reason", String(80)),
    Column("detail", JSON),
)


# A cancelled job whose results the daemon wrote to its policy's keep_results directory:
# written after the file is (a crash between the two rewrites nothing: the file is continued
# where it ends), so a restarted daemon writes exactly the ones not yet written.
kept_results = Table(
    "kept_results",
    metadata,
    Column("job_id", String(128), ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("kept_at", UTCDateTime, nullable=False),
    Column("path", Text, nullable=False),
    Column("results", Integer, nullable=False),
)


# A submission between its admission check and its job row: its reservation counts against
# the budgets until the job is recorded (or the admission expires, if the submitter died).
admissions = Table(
    "admissions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("labels", JSON, nullable=False),
    Column("credits", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

# Per budget and period: which warnings fired and when it was exhausted, so each fires once.
budget_periods = Table(
    "budget_periods",
    metadata,
    Column("budget", String(64), primary_key=True),
    Column("period_start", String(32), primary_key=True),  # ISO UTC, or "total"
    Column("warned", JSON, nullable=False, default=list),
    Column("exhausted_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
)


# Leadership for singleton chores (budget sweeps, the account floor, retention, the totals
# gauges): one row per role; its holder renews `expires_at` (database time on PostgreSQL)
# and anyone may take the row over once it has expired (River's river_leader).
leaders = Table(
    "leaders",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)


# Every submission, from the moment its intent is committed (before the initiate call: the
# API has no idempotency key, so a call whose answer is lost must leave a trace) to its job
# row, or to an end without one (expired, cancelled, failed). Its reservation, if a budget
# reserves, is an admission row (`admission_id`): budget usage counts admissions in one place.
submissions = Table(
    "submissions",
    metadata,
    Column("id", String(36), primary_key=True),
    # queued | initiating | started | orphaned | expired | cancelled | failed
    Column("state", String(16), nullable=False),
    Column("query", Text, nullable=False),
    Column("labels", JSON, nullable=False, default=dict),
    Column("policy", String(64), nullable=False),
    Column("requested_limit", Integer, nullable=False),
    Column("granted_limit", Integer),  # what the API was (or is being) asked for
    Column("clamped_by", JSON),
    Column("priority", Integer, nullable=False, default=0),
    Column("reason", String(80)),  # why it waits (queued) or why its outcome is unknown (orphaned)
    Column("expected_at", UTCDateTime),  # when it may start: the next budget period or rate slot
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),  # a queued submission not started by then is expired
    Column("initiating_at", UTCDateTime),  # the initiate call's start: also what paces the next ones
    Column("owner", String(128)),  # host:pid:… of the process making the call
    Column("admission_id", String(36)),
    Column("job_id", String(128)),
    Column("error", Text),
    Column("announced", String(16)),  # the state whose webhook was sent (queued, orphaned, expired)
    Index("ix_submissions_state_priority_created_at", "state", "priority", "created_at"),
    Index("ix_submissions_initiating_at", "initiating_at"),
)


# The transactional outbox: one row per (webhook event, hook), inserted in the transaction
# that records the event's cause, delivered by the daemon (core.notify, adapters.webhooks).
# `delivery_id` is the Standard Webhooks `webhook-id`, the same on every attempt; `subject`
# (job:…, submission:…, budget:…) is the unit within which deliveries keep commit order.
outbox = Table(
    "outbox",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), nullable=False, unique=True),
    Column("hook", String(80), nullable=False),
    Column("event", String(40), nullable=False),
    Column("subject", String(160), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", UTCDateTime),
    Column("last_error", Text),
    Column("delivered_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    # The worker's claim: a hook's pending rows, oldest first, heads of their subject only.
    Index("ix_outbox_hook_state_id", "hook", "state", "id"),
    Index("ix_outbox_hook_subject_state", "hook", "subject", "state"),
    # Retention prunes delivered rows by age.
    Index("ix_outbox_state_updated_at", "state", "updated_at"),
)

# Each attempt of a delivery (webhooks show ID): when, the answer or the error, how long.
outbox_attempts = Table(
    "outbox_attempts",
    metadata,
    Column("id", EventId, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), nullable=False, index=True),
    Column("at", UTCDateTime, nullable=False),
    Column("status", Integer),  # the HTTP status, or null for a transport error
    Column("error", Text),  # null once delivered
    Column("duration_ms", Integer, nullable=False),
    Column("owner", String(128)),
)
