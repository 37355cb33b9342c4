"""Prometheus metrics (prometheus-client), served at /metrics by the admin API.

Conventional names: `clado_supervisor_` prefix, `_total` counters, base units (seconds,
credits). Labels carry only bounded values (states, reasons, endpoints, status codes),
never job ids or secrets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
_P = "clado_supervisor_"

JOBS = Gauge(_P + "jobs", "Supervised jobs by state.", ["state"], registry=REGISTRY)
CANCELS = Counter(_P + "cancels_total", "Cancel decisions by reason.", ["reason"], registry=REGISTRY)
WOULD_CANCEL = Counter(
    _P + "would_cancel_total",
    "Cancel decisions recorded but not acted on (observe mode, dry run).",
    ["reason"],
    registry=REGISTRY,
)
WARNINGS = Counter(_P + "warnings_total", "Limit warnings fired, by limit.", ["limit"], registry=REGISTRY)
TRANSITIONS = Counter(_P + "transitions_total", "State transitions, by target state.", ["state"], registry=REGISTRY)
API_REQUESTS = Counter(
    _P + "api_requests_total",
    "Clado API requests by endpoint and HTTP status (or error kind).",
    ["endpoint", "status"],
    registry=REGISTRY,
)
API_LATENCY = Histogram(
    _P + "api_request_duration_seconds",
    "Clado API request latency.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
API_RETRIES = Counter(
    _P + "api_retries_total", "Clado API calls retried, by endpoint.", ["endpoint"], registry=REGISTRY
)
API_UNKNOWN_STATUS = Counter(_P + "api_unknown_status_total", "Undocumented job statuses seen.", registry=REGISTRY)
JOB_ALERTS = Counter(
    _P + "job_alerts_total",
    "Once-per-job alerts (unknown_status, unreadable_body, cancel_refused, cancel_ignored, reopened), by kind.",
    ["kind"],
    registry=REGISTRY,
)
API_MISCONFIGURED = Gauge(
    _P + "api_misconfigured",
    "1 while every job's status answers 404 and the credits endpoint too (a wrong base_url path).",
    registry=REGISTRY,
)
TICK_DURATION = Histogram(
    _P + "tick_duration_seconds",
    "Time a scheduler tick takes to claim and dispatch due jobs.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
TICK_JOBS = Histogram(
    _P + "tick_jobs_claimed",
    "Jobs claimed per tick.",
    buckets=(0, 1, 10, 50, 100, 250, 500, 1000, 2500),
    registry=REGISTRY,
)
POLL_LAG = Histogram(
    _P + "poll_lag_seconds",
    "How late a job was handled against its due time.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 15, 60),
    registry=REGISTRY,
)
CREDIT_OVERSHOOT = Histogram(
    _P + "credit_overshoot_credits",
    "Credits charged beyond max_credits by jobs cancelled for it.",
    buckets=(0, 1, 2, 3, 5, 10, 20, 50, 100, 500),
    registry=REGISTRY,
)
CONFIRMATION = Histogram(
    _P + "confirmation_seconds",
    "From the cancel decision to the confirmed final state.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600),
    registry=REGISTRY,
)
DB_WRITE_BATCH = Histogram(
    _P + "db_write_batch_size",
    "Job writes applied per database transaction.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
    registry=REGISTRY,
)
LEASES_LOST = Counter(
    _P + "lease_lost_writes_total",
    "Writes dropped because the job's lease was lost (fencing).",
    registry=REGISTRY,
)
LAST_TICK = Gauge(_P + "last_tick_timestamp_seconds", "When the last tick completed.", registry=REGISTRY)
WEBHOOKS = Counter(
    _P + "webhook_deliveries_total",
    "Webhook deliveries by outcome (delivered, failed, dropped).",
    ["outcome"],
    registry=REGISTRY,
)
BUDGET_SPENT = Gauge(
    _P + "budget_spent_credits", "Credits spent in the current period, per budget.", ["budget"], registry=REGISTRY
)
BUDGET_RESERVED = Gauge(
    _P + "budget_reserved_credits",
    "Credits reserved (not yet spent) in the current period, per budget.",
    ["budget"],
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(_P + "budget_limit_credits", "The budget's credits per period.", ["budget"], registry=REGISTRY)
ACCOUNT_CREDITS = Gauge(_P + "account_credits", "Remaining account credits at the last check.", registry=REGISTRY)
LEADER = Gauge(
    _P + "leader", "1 while this replica is the leader (runs the singleton chores), else 0.", registry=REGISTRY
)
CLAIM_LIMIT = Gauge(
    _P + "claim_limit",
    "Jobs this replica lets itself hold at once (adapts to how fast it handles them).",
    registry=REGISTRY,
)
POLL_LAG_P99 = Gauge(
    _P + "poll_lag_p99_seconds", "Poll lag p99 over the last 10 s window of this replica's polls.", registry=REGISTRY
)
FALLING_BEHIND = Gauge(
    _P + "falling_behind",
    "1 while this replica's poll lag p99 has stayed above one poll interval (see the warning), else 0.",
    registry=REGISTRY,
)
TASK_FAILURES = Counter(
    _P + "task_failures_total",
    "Failed runs of recurring work (claim, chores, leader renewal, lease extension), by operation.",
    ["operation"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    _P + "config_reloads_total",
    "Config reloads (SIGHUP) by outcome: success or failure.",
    ["outcome"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    _P + "queue_depth", "Submissions queued (waiting for a budget, the account floor or the rate).", registry=REGISTRY
)
QUEUE_WAIT = Histogram(
    _P + "queue_wait_seconds",
    "Time a queued submission waited before its initiate was sent.",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400),
    registry=REGISTRY,
)
