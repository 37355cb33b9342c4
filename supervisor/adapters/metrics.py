"""Prometheus metrics (prometheus-client), served at /metrics by the admin API.

Conventional names: `clado_supervisor_` prefix, `_total` counters, base units (seconds,
credits). Labels carry only bounded values (states, reasons, endpoints, status codes),
never job ids or secrets.

Honest by construction: a value nobody knows is absent, not 0 (the account's credits before
they are read, without an [account], and on replicas that are not the leader); what only the
leader knows (jobs by state, budgets, the account) is cleared when leadership goes, so the
replicas' series summed or maxed stay right; labelled counters start at 0 for every known
label value, so a dashboard's `rate()` has a series before the first event.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from supervisor import __version__
from supervisor.core.states import Reason, State

REGISTRY = CollectorRegistry(auto_describe=True)
_P = "clado_supervisor_"

# The process's own figures (process_cpu_seconds_total, process_resident_memory_bytes, open
# fds, start time; python_info; python_gc_*), as the default registry would have them.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

BUILD = Info(_P + "build", "The running version (value 1; the version is a label).", registry=REGISTRY)
BUILD.info({"version": __version__})


class OptionalGauge:
    """A gauge with no sample until a value is known (`clear()` makes it unknown again):
    prometheus_client's Gauge always exports one, 0 before any `set`, which reads as a fact."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self._value = float(value)

    def clear(self) -> None:
        self._value = None

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation)
        if self._value is not None:
            family.add_metric([], self._value)
        yield family


# Every metric has the prefix and lives in REGISTRY; a declaration names the rest: the
# name's tail, its help, its labels (and a histogram's buckets).


def _counter(name: str, documentation: str, *labels: str) -> Counter:
    return Counter(_P + name, documentation, labels, registry=REGISTRY)


def _gauge(name: str, documentation: str, *labels: str) -> Gauge:
    return Gauge(_P + name, documentation, labels, registry=REGISTRY)


def _histogram(name: str, documentation: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
    return Histogram(_P + name, documentation, labels, buckets=buckets, registry=REGISTRY)


JOBS = _gauge("jobs", "Supervised jobs by state.", "state")
CANCELS = _counter("cancels_total", "Cancel decisions by reason.", "reason")
WOULD_CANCEL = _counter(
    "would_cancel_total", "Cancel decisions recorded but not acted on (observe mode, dry run).", "reason"
)
WARNINGS = _counter("warnings_total", "Limit warnings fired, by limit.", "limit")
TRANSITIONS = _counter("transitions_total", "State transitions, by target state.", "state")
API_REQUESTS = _counter(
    "api_requests_total", "Clado API requests by endpoint and HTTP status (or error kind).", "endpoint", "status"
)
API_LATENCY = _histogram(
    "api_request_duration_seconds",
    "Clado API request latency.",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    "endpoint",
)
API_RETRIES = _counter("api_retries_total", "Clado API calls retried, by endpoint.", "endpoint")
API_UNKNOWN_STATUS = _counter("api_unknown_status_total", "Undocumented job statuses seen.")
JOB_ALERTS = _counter(
    "job_alerts_total",
    "Once-per-job alerts (unknown_status, unreadable_body, cancel_refused, cancel_ignored, reopened, job_blind),"
    " by kind.",
    "kind",
)
API_MISCONFIGURED = _gauge(
    "api_misconfigured", "1 while every job's status answers 404 and the credits endpoint too (a wrong base_url path)."
)
API_DRIFT = _gauge(
    "api_drift",
    "1 while job after job's status answer is unreadable (no count, no status, 403, unparseable) with none readable"
    " in between: the API's shape changed or a proxy rewrites it.",
)
JOBS_BLIND = _gauge(
    "jobs_blind", "Jobs whose spend cannot be read (blind), by reason; counted by the leader.", "reason"
)
TICK_DURATION = _histogram(
    "tick_duration_seconds",
    "Time a scheduler tick takes to claim and dispatch due jobs.",
    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
TICK_JOBS = _histogram("tick_jobs_claimed", "Jobs claimed per tick.", (0, 1, 10, 50, 100, 250, 500, 1000, 2500))
POLL_LAG = _histogram(
    "poll_lag_seconds",
    "How late a job was handled against its due time.",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 15, 60),
)
CREDIT_OVERSHOOT = _histogram(
    "credit_overshoot_credits",
    "Credits charged beyond max_credits by jobs cancelled for it.",
    (0, 1, 2, 3, 5, 10, 20, 50, 100, 500),
)
CONFIRMATION = _histogram(
    "confirmation_seconds",
    "From the cancel decision to the confirmed final state.",
    (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 600),
)
DB_WRITE_BATCH = _histogram(
    "db_write_batch_size", "Job writes applied per database transaction.", (1, 2, 5, 10, 25, 50, 100, 250, 500)
)
LEASES_LOST = _counter("lease_lost_writes_total", "Writes dropped because the job's lease was lost (fencing).")
LAST_TICK = _gauge("last_tick_timestamp_seconds", "When the last tick completed.")
WEBHOOKS = _counter(
    "webhook_deliveries_total", "Webhook deliveries by outcome (delivered, failed, dropped).", "outcome"
)
OUTBOX_PENDING = _gauge("outbox_pending", "Webhook deliveries waiting in the outbox, per hook.", "hook")
OUTBOX_OLDEST = _gauge(
    "outbox_oldest_pending_seconds", "Age of the oldest webhook delivery waiting in the outbox, per hook.", "hook"
)
WEBHOOK_DISABLED = _gauge(
    "webhook_disabled", "1 while a hook's deliveries are stopped by its receiver's 410 Gone (until a reload).", "hook"
)
BUDGET_SPENT = _gauge("budget_spent_credits", "Credits spent in the current period, per budget.", "budget")
BUDGET_RESERVED = _gauge(
    "budget_reserved_credits", "Credits reserved (not yet spent) in the current period, per budget.", "budget"
)
BUDGET_LIMIT = _gauge("budget_limit_credits", "The budget's credits per period.", "budget")
BUDGET_FORECAST = _gauge(
    "budget_forecast_credits", "The central forecast of the credits the current period's jobs will spend.", "budget"
)
BUDGET_EXHAUSTS_IN = _gauge(
    "budget_exhausts_in_seconds", "Seconds until the budget is forecast to run out (absent: it is not).", "budget"
)
ACCOUNT_CREDITS = OptionalGauge(
    _P + "account_credits",
    "Remaining account credits at the leader's last check (absent: no [account], not read yet, or not the leader).",
    registry=REGISTRY,
)
LEADER = _gauge("leader", "1 while this replica is the leader (runs the singleton chores), else 0.")
CLAIM_LIMIT = _gauge("claim_limit", "Jobs this replica lets itself hold at once (adapts to how fast it handles them).")
POLL_LAG_P99 = _gauge("poll_lag_p99_seconds", "Poll lag p99 over the last 10 s window of this replica's polls.")
FALLING_BEHIND = _gauge(
    "falling_behind",
    "1 while this replica's poll lag p99 has stayed above one poll interval (see the warning), else 0.",
)
TASK_FAILURES = _counter(
    "task_failures_total",
    "Failed runs of recurring work (claim, chores, leader renewal, lease extension), by operation.",
    "operation",
)
CONFIG_RELOADS = _counter("config_reloads_total", "Config reloads (SIGHUP) by outcome: success or failure.", "outcome")
QUEUE_DEPTH = _gauge("queue_depth", "Submissions queued (waiting for a budget, the account floor or the rate).")
QUEUE_WAIT = _histogram(
    "queue_wait_seconds",
    "Time a queued submission waited before its initiate was sent.",
    (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400),
)


_BUDGET_GAUGES = (BUDGET_SPENT, BUDGET_RESERVED, BUDGET_LIMIT, BUDGET_FORECAST, BUDGET_EXHAUSTS_IN)
_budgets_shown: set[str] = set()  # the budgets with series now


def budget_figures(name: str, spent: float, reserved: float, credits: float) -> None:
    BUDGET_SPENT.labels(name).set(spent)
    BUDGET_RESERVED.labels(name).set(reserved)
    BUDGET_LIMIT.labels(name).set(credits)
    _budgets_shown.add(name)


def budget_forecast(name: str, credits: float, exhausts_in: float | None) -> None:
    """A budget's forecast, in credits; the seconds until it runs out only while it is
    predicted to (else the series is absent, not a sentinel)."""
    BUDGET_FORECAST.labels(name).set(credits)
    if exhausts_in is None:
        with contextlib.suppress(KeyError):
            BUDGET_EXHAUSTS_IN.remove(name)
    else:
        BUDGET_EXHAUSTS_IN.labels(name).set(exhausts_in)
    _budgets_shown.add(name)


def forget_budgets(keep: set[str]) -> None:
    """Drop the series of budgets no longer configured (a reload removed them)."""
    for name in _budgets_shown - keep:
        for gauge in _BUDGET_GAUGES:
            with contextlib.suppress(KeyError):  # a series may be absent (exhausts_in, no forecast yet)
                gauge.remove(name)
        _budgets_shown.discard(name)


def clear_leader_gauges() -> None:
    """What only the leader measures, gone from a replica that does not lead (at start, and
    when it loses leadership): a stale copy would be summed or maxed with the new leader's."""
    for gauge in (JOBS, JOBS_BLIND, *_BUDGET_GAUGES):
        gauge.clear()
    _budgets_shown.clear()
    ACCOUNT_CREDITS.clear()


# -- series from the start: every label value known in advance -------------------------------

# Reasons a policy, the account floor, a person or the API ends a job for; budget reasons
# (`budget:<name>`) are added per configured budget by the budget sweep (`budget_reasons`).
_LIMITS = (Reason.MAX_RUNTIME, Reason.MAX_QUEUED, Reason.STALL_TIMEOUT, Reason.MAX_CREDITS)
_CANCEL_REASONS = (*_LIMITS, Reason.BLIND, Reason.ACCOUNT_FLOOR, Reason.MANUAL, Reason.EXTERNAL)
_ENDPOINTS = ("status", "cancel", "credits", "initiate", "continue")
_ALERT_KINDS = ("unknown_status", "unreadable_body", "cancel_refused", "cancel_ignored", "reopened", "job_blind")


def budget_reasons(names: set[str]) -> None:
    """Series at 0 for the cancels a configured budget may decide."""
    for name in names:
        CANCELS.labels(f"budget:{name}")
        WOULD_CANCEL.labels(f"budget:{name}")


def _preinitialise() -> None:
    for reason in _CANCEL_REASONS:
        CANCELS.labels(reason)
    for reason in (*_LIMITS, Reason.BLIND, Reason.ACCOUNT_FLOOR):
        WOULD_CANCEL.labels(reason)
    for limit in _LIMITS:
        WARNINGS.labels(limit)
    for state in State:
        TRANSITIONS.labels(state.value)
    for kind in _ALERT_KINDS:
        JOB_ALERTS.labels(kind)
    for endpoint in _ENDPOINTS:
        API_RETRIES.labels(endpoint)
        API_LATENCY.labels(endpoint)
        API_REQUESTS.labels(endpoint, "error")  # transport failures: the error ratio's numerator
    for outcome in ("delivered", "failed", "dropped"):
        WEBHOOKS.labels(outcome)
    for outcome in ("success", "failure"):
        CONFIG_RELOADS.labels(outcome)


_preinitialise()
