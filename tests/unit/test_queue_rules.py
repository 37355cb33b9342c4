"""The scheduler's pure rules (core/queueing.py), by table: which queued submission starts
now, and why each of the others waits and until when."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from supervisor.config import Config
from supervisor.core.budgets import AdmissionRefused, Usage, next_period_start, period_start
from supervisor.core.queueing import new_submission, plan

NOW = datetime(2026, 5, 14, 13, 45, 12, tzinfo=UTC)
NEXT_HOUR = datetime(2026, 5, 14, 14, tzinfo=UTC)
TOMORROW = datetime(2026, 5, 15, tzinfo=UTC)
TEAM = {"team": "growth"}

HOURLY = {"team-hourly": {"match": TEAM, "period": "hour", "credits": 30, "action": "block", "reserve": True}}
DAILY = {"team-daily": {"match": TEAM, "period": "day", "credits": 100, "reserve": True}}
FLOOR = {"account": {"min_credits": 1_000}}


def row(submission_id: str, limit: int = 10, labels: Mapping[str, str] = TEAM, **fields: Any) -> dict[str, Any]:
    """A queued submission as the store hands it to `plan` (queue order is the list's order)."""
    return {"id": submission_id, "requested_limit": limit, "labels": dict(labels), "policy": "default", **fields}


def spent(credits: int, reserved: int = 0, labels: Mapping[str, str] = TEAM) -> list[tuple[dict[str, str], Usage]]:
    return [(dict(labels), Usage(credits, reserved))]


@dataclass(frozen=True)
class Case:
    name: str
    settings: Mapping[str, Any]  # the config (budgets, account, api)
    queued: list[dict[str, Any]]
    # usage by period start: the hour's and the day's, as the store reads them
    hour_usage: list[tuple[dict[str, str], Usage]] = field(default_factory=list)
    day_usage: list[tuple[dict[str, str], Usage]] = field(default_factory=list)
    initiates: list[datetime] = field(default_factory=list)  # initiates already sent
    options: Mapping[str, Any] = field(default_factory=dict)  # plan's keyword arguments
    chosen: str | None = None
    results: int = 0  # asked of the API for the chosen one
    waiting: Mapping[str, tuple[str, datetime | None]] = field(default_factory=dict)
    refused: str | None = None  # AdmissionRefused, with these words


CASES = [
    Case("fits: started with its whole limit, reserved", {"budgets": HOURLY}, [row("a", 10)], spent(5),
         chosen="a", results=10),
    Case("budget blocked for this period: waits until the next period starts", {"budgets": HOURLY},
         [row("a", 10)], spent(30), waiting={"a": ("budget:team-hourly", NEXT_HOUR)}),
    Case("a reservation that does not fit: waits, never clamped to what is left", {"budgets": HOURLY},
         [row("a", 10)], spent(15, reserved=10), waiting={"a": ("budget:team-hourly", NEXT_HOUR)}),
    Case("a daily budget: its next period is tomorrow", {"budgets": DAILY}, [row("a", 50)],
         day_usage=spent(60), waiting={"a": ("budget:team-daily", TOMORROW)}),
    Case("another team's spend does not hold it", {"budgets": HOURLY}, [row("a", 10)],
         spent(30, labels={"team": "research"}), chosen="a", results=10),
    Case("first come, first served within a budget: a later, smaller one waits behind", {"budgets": HOURLY},
         [row("big", 20), row("small", 5)], spent(15),
         waiting={"big": ("budget:team-hourly", NEXT_HOUR), "small": ("budget:team-hourly", NEXT_HOUR)}),
    Case("priority then FIFO: the first in queue order that fits starts, the rest wait", {"budgets": HOURLY},
         [row("urgent", 10, priority=5), row("older", 10), row("newer", 10)], spent(0),
         chosen="urgent", results=10),
    Case("a budget that holds one back does not hold another team's", {"budgets": HOURLY},
         [row("a", 20), row("b", 5, labels={"team": "research"})], spent(15),
         chosen="b", results=5, waiting={"a": ("budget:team-hourly", NEXT_HOUR)}),
    Case("the account floor: waits, with no known start", FLOOR, [row("a", 10)],
         options={"account_credits": 1_005}, waiting={"a": ("account_floor", None)}),
    Case("above the floor: started", FLOOR, [row("a", 10)], options={"account_credits": 1_010},
         chosen="a", results=10),
    Case("the initiate rate: every one waits for the next rate slot", {"api": {"initiate_per_minute": 2}},
         [row("a"), row("b")], initiates=[NOW - timedelta(seconds=50), NOW - timedelta(seconds=20)],
         waiting={"a": ("initiate_rate", NOW + timedelta(seconds=10)),
                  "b": ("initiate_rate", NOW + timedelta(seconds=10))}),
    Case("initiates older than a minute do not count", {"api": {"initiate_per_minute": 2}}, [row("a")],
         initiates=[NOW - timedelta(seconds=90), NOW - timedelta(seconds=20)], chosen="a", results=10),
    Case("a 429's retry_after holds the queue past the rate slot", {}, [row("a")],
         options={"held_until": NOW + timedelta(seconds=42)},
         waiting={"a": ("initiate_rate", NOW + timedelta(seconds=42))}),
    Case("the policy caps it at the source: asked for what max_credits allows", {}, [row("a", 500)],
         chosen="a", results=200),
    Case("larger than the budget's whole period, in the queue: never fits, holds no one back",
         {"budgets": HOURLY}, [row("huge", 40), row("a", 10)], chosen="a", results=10,
         waiting={"huge": ("never_fits", None)}),
    Case("larger than the budget's whole period, submitted now: refused with the numbers", {"budgets": HOURLY},
         [row("huge", 40)], options={"only": "huge"},
         refused="budget 'team-hourly' holds 30 credits a hour; this job may use 40 (limit 40): it would never fit"),
    Case("submitted now while an earlier one fits: the drain starts the earlier first", {"budgets": HOURLY},
         [row("earlier", 10), row("fresh", 10)], options={"only": "fresh"},
         waiting={"fresh": ("behind_earlier", NOW)}),
    Case("not queued (plain submit): clamped to what the budget has left", {"budgets": HOURLY},
         [row("a", 20)], spent(20), options={"only": "a", "queue": False}, chosen="a", results=10),
    Case("not queued, budget full: refused at once", {"budgets": HOURLY}, [row("a", 10)], spent(30),
         options={"only": "a", "queue": False}, refused="budget 'team-hourly' is exhausted"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan(case: Case) -> None:
    config = Config.model_validate(case.settings)
    usage = {period_start("hour", "UTC", NOW): case.hour_usage, period_start("day", "UTC", NOW): case.day_usage}

    def decide() -> Any:
        return plan(config, case.queued, usage, case.initiates, NOW, **case.options)

    if case.refused is not None:
        with pytest.raises(AdmissionRefused, match=case.refused.replace("(", r"\(").replace(")", r"\)")):
            decide()
        return
    decision = decide()
    assert decision.chosen == case.chosen
    assert decision.results == case.results
    waiting = {key: (wait.reason, wait.expected_at) for key, wait in decision.waiting.items()}
    assert waiting == case.waiting


NEXT_PERIOD_CASES = [
    # (period, timezone, now, the next period's start)
    ("hour", "UTC", NOW, NEXT_HOUR),
    ("hour", "UTC", NEXT_HOUR, NEXT_HOUR + timedelta(hours=1)),  # on the boundary: the one after
    ("day", "UTC", NOW, TOMORROW),
    ("week", "UTC", NOW, datetime(2026, 5, 18, tzinfo=UTC)),  # Thursday → Monday
    ("month", "UTC", datetime(2026, 1, 31, 12, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)),
    ("month", "UTC", datetime(2026, 2, 28, 12, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
    # Europe/Paris springs forward on 2026-03-29: that day has 23 hours.
    ("day", "Europe/Paris", datetime(2026, 3, 29, 12, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC)),
    # ... and falls back on 2026-10-25: 25 hours.
    ("day", "Europe/Paris", datetime(2026, 10, 25, 12, tzinfo=UTC), datetime(2026, 10, 25, 23, tzinfo=UTC)),
    ("total", "UTC", NOW, None),  # never resets
]


@pytest.mark.parametrize(("period", "timezone", "now", "expected"), NEXT_PERIOD_CASES)
def test_next_period_start(period: str, timezone: str, now: datetime, expected: datetime | None) -> None:
    assert next_period_start(period, timezone, now) == expected


EXPIRY_CASES = [
    # ([scheduler] expires_after, the submission's own, when it expires)
    (None, None, NOW + timedelta(days=1)),  # the default: a day
    ("2h", None, NOW + timedelta(hours=2)),
    ("2h", timedelta(minutes=5), NOW + timedelta(minutes=5)),  # its own wins
]


@pytest.mark.parametrize(("configured", "own", "expected"), EXPIRY_CASES)
def test_expiry(configured: str | None, own: timedelta | None, expected: datetime) -> None:
    config = Config.model_validate({"scheduler": {"expires_after": configured}} if configured else {})
    fresh = new_submission(
        config, "engineers", labels=TEAM, policy="default", limit=10, priority=0, expires_after=own, now=NOW
    )
    assert (fresh["state"], fresh["expires_at"]) == ("queued", expected)
