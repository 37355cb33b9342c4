"""The demo's script: the jobs and how each is built to behave, the config the daemon runs
under, and the clock they share. Durations are at speed 1 and scaled by the demo's speed."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from supervisor.core.states import Reason, State

# Scenario knobs that are durations (divided by the speed); `rate` is multiplied by it.
_TIME_KNOBS = frozenset({"queue_for", "process_for", "fail_after", "external_cancel_after", "cancel_delay"})

# The policies' limits at speed 1 (see config_text); team=growth jobs get the bulk policy.
DEFAULT_LIMITS = {"max_runtime": 25, "stall_timeout": 8, "max_credits": 60}
BULK_LIMITS = {"max_runtime": 40, "max_credits": 150}
GROWTH = {"team": "growth"}
RESEARCH = {"team": "research"}  # under a team budget that runs out mid-demo
SHADOW = {"team": "shadow"}  # under an observe-mode rule: recorded, never cancelled
OPS = {"team": "ops"}  # under an hourly budget that a submission queues behind
RESEARCH_BUDGET = {"name": "research-daily", "credits": 90}
OPS_BUDGET = "ops-hourly"
OPS_BUDGET_CREDITS = 30
SHADOW_MAX_CREDITS = 20
# When the demo's clock turns the hour (and the ops budget's period with it), at speed 1:
# after the ops job has spent the budget, before the slowest jobs end.
HOUR_TURNS_AT_S = 18.0


@dataclass(frozen=True)
class DemoJob:
    kind: str
    query: str
    limit: int  # results asked for: what the job bills if it runs to the end
    knobs: Mapping[str, float | int | bool]
    expect_state: State
    expect_reason: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Started by someone else's script and only tracked: nothing capped it at submit time.
    started_elsewhere: bool = False
    # Once it has completed, someone else holding the key asks it for this many more results
    # (the API's `continue`): the same job id runs and bills again.
    continued_by_someone: int = 0

    def scaled_query(self, speed: float) -> str:
        knobs = []
        for name, value in self.knobs.items():
            if isinstance(value, bool):
                text = str(value).lower()
            elif name in _TIME_KNOBS:
                text = f"{value / speed:.4g}"
            elif name == "rate":
                text = f"{value * speed:.4g}"
            else:
                text = str(value)
            knobs.append(f"{name}={text}")
        return f"{self.query} fake:{','.join(knobs)}"


# Spends the ops team's whole hourly budget...
HOURS_BUDGET_JOB = DemoJob("hour's budget", "SREs in Dublin", OPS_BUDGET_CREDITS, {"rate": 10}, State.COMPLETED,
                           None, OPS)  # fmt: skip
# Times and rates at speed 1.
JOBS: tuple[DemoJob, ...] = (
    DemoJob("well-behaved", "founding engineers in Lisbon", 25,
            {"rate": 2.5, "process_for": 2}, State.COMPLETED),
    DemoJob("bulk export", "account executives in fintech", 120,
            {"rate": 10}, State.COMPLETED, labels=GROWTH),
    # Submitted through the supervisor with limit 500 under max_credits 60: the API is asked
    # for 60, so the job is capped at the source and needs no cancel.
    DemoJob("clamped submit", "every recruiter in Europe", 500,
            {"rate": 8}, State.COMPLETED),
    DemoJob("credit runaway", "every engineer in California", 500,
            {"rate": 8}, State.CANCELLED, Reason.MAX_CREDITS, started_elsewhere=True),
    DemoJob("runtime runaway", "rare COBOL experts", 300,
            {"rate": 1}, State.CANCELLED, Reason.MAX_RUNTIME),
    DemoJob("stalled", "quantum sommeliers", 40,
            {"rate": 2, "stall_after": 8}, State.CANCELLED, Reason.STALL_TIMEOUT),
    DemoJob("slow to cancel", "sales leads in retail", 600,
            {"rate": 10, "cancel_delay": 3}, State.CANCELLED, Reason.MAX_CREDITS, GROWTH, started_elsewhere=True),
    DemoJob("fails", "designers who code", 30,
            {"rate": 1, "fail_after": 6}, State.FAILED),
    # Completes at 20, then someone continues it for 200 more: the supervisor sees it running
    # again at its next re-check, reopens it and cancels it at its limit.
    DemoJob("continued elsewhere", "growth marketers in Madrid", 20,
            {"rate": 10}, State.CANCELLED, Reason.MAX_CREDITS, started_elsewhere=True, continued_by_someone=200),
    DemoJob("external cancel", "nurses in Ohio", 50,
            {"rate": 2, "external_cancel_after": 7}, State.CANCELLED, Reason.EXTERNAL),
    # It reaches the credit limit moments before finishing on its own: the cancel arrives too
    # late (the API answers success: false, "already completed"), which the supervisor must
    # record as completed.
    DemoJob("finishes first", "data engineers in Austin", 80,
            {"rate": 6, "race": True}, State.COMPLETED, Reason.MAX_CREDITS, started_elsewhere=True),
    # Each is within its own limits; together they exhaust the team's daily budget.
    DemoJob("team budget", "ML researchers in Zurich", 300,
            {"rate": 4}, State.CANCELLED, f"budget:{RESEARCH_BUDGET['name']}", RESEARCH),
    DemoJob("team budget", "robotics PhDs in Boston", 300,
            {"rate": 4}, State.CANCELLED, f"budget:{RESEARCH_BUDGET['name']}", RESEARCH),
    # A rule being tried out: it would cancel at 20 credits, but only records that.
    DemoJob("observe rule", "recruiters in Berlin", 45,
            {"rate": 3}, State.COMPLETED, None, SHADOW),
    HOURS_BUDGET_JOB,
)  # fmt: skip
# ... so this one, submitted with queue=True once that job has completed, waits for the next
# hour; the daemon starts it when the demo's clock turns the hour.
QUEUED_JOB = DemoJob("queued for the hour", "on-call engineers in Oslo", 20, {"rate": 10}, State.COMPLETED, None, OPS)


class DemoClock:
    """The time the daemon, its operations and the simulator all read: real time, moved so
    that the hour turns `turn_after` seconds from now. The turn is at noon UTC, never the
    end of a day, week or month, so only the hourly budget starts a new period. Durations
    are untouched: only the reading is moved, never its pace."""

    def __init__(self, turn_after: float) -> None:
        real = datetime.now(UTC)
        noon = real.replace(hour=12, minute=0, second=0, microsecond=0)
        self.hour_turns_at = noon
        self._offset = noon - (real + timedelta(seconds=turn_after))

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def epoch(self) -> float:
        """The same time in the simulator's terms: seconds since the epoch."""
        return self.now().timestamp()


def write_config(workdir: Path, base_url: str, speed: float) -> Path:
    """A real supervisor.toml, so the daemon loads, validates and hashes it as in production.

    The API key is the demo's own, in a file: a real CLADO_API_KEY in the environment is never
    read, let alone sent anywhere."""
    key_file = workdir / "api-key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"lk_demo_{os.urandom(12).hex()}\n")
    path = workdir / "supervisor.toml"
    path.write_text(config_text(base_url, key_file, workdir / "supervisor.db", speed), encoding="utf-8")
    return path


def config_text(base_url: str, key_file: Path, db_file: Path, speed: float) -> str:
    def duration(seconds: float) -> str:
        return json.dumps(f"{seconds / speed:.3f}s")

    def string(value: object) -> str:
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string

    return f"""\
# Written by `clado-supervisor demo` (speed {speed:g}): the durations that shape the jobs'
# lives are divided by the speed.
[api]
base_url = {string(base_url)}
api_key_file = {string(key_file)}
timeout = "5s"
# A higher tier's initiate limit: the demo's burst of submissions starts at once.
initiate_per_minute = 100

[database]
url = {string(f"sqlite:///{db_file}")}

[supervisor]
poll_interval = {duration(2)}
# Not scaled: the tick only claims jobs, each is then handled at its own due time.
tick_interval = "200ms"
confirm_interval = {duration(0.3)}
confirm_timeout = {duration(20)}
shutdown_timeout = "5s"

[policies.default]
max_runtime = {duration(DEFAULT_LIMITS["max_runtime"])}
stall_timeout = {duration(DEFAULT_LIMITS["stall_timeout"])}
max_credits = {DEFAULT_LIMITS["max_credits"]}
warn_at = [0.8]

[policies.bulk]
match = {{ team = "growth" }}
max_runtime = {duration(BULK_LIMITS["max_runtime"])}
max_credits = {BULK_LIMITS["max_credits"]}

[policies.research]
match = {{ team = "research" }}
max_runtime = {duration(BULK_LIMITS["max_runtime"])}
max_credits = 400

# A rule under trial: it decides and records "would cancel", and never cancels.
[policies.shadow]
match = {{ team = "shadow" }}
max_credits = {SHADOW_MAX_CREDITS}
action = "observe"

[budgets.{RESEARCH_BUDGET["name"]}]
match = {{ team = "research" }}
period = "day"
credits = {RESEARCH_BUDGET["credits"]}
warn_at = [0.5]
action = "cancel"

# Reserving and blocking: a submission that does not fit waits (queued) for the next hour.
[budgets.{OPS_BUDGET}]
match = {{ team = "ops" }}
period = "hour"
credits = {OPS_BUDGET_CREDITS}
action = "block"
reserve = true
"""
