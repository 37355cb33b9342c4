"""The pure budget core, by table: period windows, usage per budget, warnings, admission."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from supervisor.config import Config
from supervisor.core.budgets import (
    AdmissionRefused,
    BudgetStatus,
    Spender,
    Usage,
    grant,
    matches,
    period_start,
    predict_crossing,
    statuses,
    thresholds_crossed,
)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def config(**budgets: dict[str, Any]) -> Config:
    return Config.model_validate({"budgets": budgets})


# -- period_start -----------------------------------------------------------------------------

PERIOD_CASES = [
    # (period, timezone, now (UTC), expected start (UTC) or None)
    # UTC
    ("hour", "UTC", utc(2026, 5, 14, 13, 45, 12), utc(2026, 5, 14, 13)),
    ("hour", "UTC", utc(2026, 5, 14, 13, 0, 0), utc(2026, 5, 14, 13)),  # on the boundary
    ("day", "UTC", utc(2026, 5, 14, 13, 45, 12), utc(2026, 5, 14)),
    ("day", "UTC", utc(2026, 5, 14, 23, 59, 59), utc(2026, 5, 14)),
    ("week", "UTC", utc(2026, 5, 14, 13, 45), utc(2026, 5, 11)),  # Thursday → Monday
    ("week", "UTC", utc(2026, 5, 11, 0, 0), utc(2026, 5, 11)),  # Monday midnight itself
    ("week", "UTC", utc(2026, 5, 17, 23, 59), utc(2026, 5, 11)),  # Sunday: still that week
    ("week", "UTC", utc(2026, 1, 1, 10), utc(2025, 12, 29)),  # across a year
    ("month", "UTC", utc(2026, 5, 14, 13, 45), utc(2026, 5, 1)),
    ("month", "UTC", utc(2026, 3, 1, 0, 0), utc(2026, 3, 1)),
    ("total", "UTC", utc(2026, 5, 14, 13, 45), None),
    ("total", "Europe/Paris", utc(2026, 5, 14, 13, 45), None),
    # A zone with a half-hour offset: hours do not start on the UTC hour.
    ("hour", "Asia/Kolkata", utc(2026, 5, 14, 13, 45), utc(2026, 5, 14, 13, 30)),
    ("day", "Asia/Kolkata", utc(2026, 5, 14, 13, 45), utc(2026, 5, 13, 18, 30)),
    # Europe/Paris, spring forward on Sunday 2026-03-29 at 01:00 UTC (02:00 CET → 03:00 CEST)
    ("day", "Europe/Paris", utc(2026, 3, 28, 23, 30), utc(2026, 3, 28, 23)),  # 00:30 CET
    ("day", "Europe/Paris", utc(2026, 3, 29, 12), utc(2026, 3, 28, 23)),  # midnight was CET
    ("day", "Europe/Paris", utc(2026, 3, 29, 22, 30), utc(2026, 3, 29, 22)),  # next day, CEST
    ("hour", "Europe/Paris", utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 0)),  # 01:30 CET
    ("hour", "Europe/Paris", utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 1)),  # 03:30 CEST
    ("week", "Europe/Paris", utc(2026, 3, 29, 12), utc(2026, 3, 22, 23)),  # Sunday → Mon CET
    ("week", "Europe/Paris", utc(2026, 3, 30, 8), utc(2026, 3, 29, 22)),  # Monday, CEST
    ("week", "Europe/Paris", utc(2026, 3, 29, 22, 30), utc(2026, 3, 29, 22)),  # Mon 00:30 CEST
    ("month", "Europe/Paris", utc(2026, 3, 31, 12), utc(2026, 2, 28, 23)),  # 1 March, CET
    ("month", "Europe/Paris", utc(2026, 4, 1, 12), utc(2026, 3, 31, 22)),  # 1 April, CEST
    # Europe/Paris, fall back on Sunday 2026-10-25 at 01:00 UTC (03:00 CEST → 02:00 CET)
    ("day", "Europe/Paris", utc(2026, 10, 25, 12), utc(2026, 10, 24, 22)),  # midnight was CEST
    ("day", "Europe/Paris", utc(2026, 10, 25, 23, 30), utc(2026, 10, 25, 23)),  # a 25-hour day ended
    ("hour", "Europe/Paris", utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 0)),  # 02:30 CEST (first)
    ("hour", "Europe/Paris", utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 1)),  # 02:30 CET (second)
    ("week", "Europe/Paris", utc(2026, 10, 25, 12), utc(2026, 10, 18, 22)),  # Sunday → Mon CEST
    ("week", "Europe/Paris", utc(2026, 10, 26, 12), utc(2026, 10, 25, 23)),  # Monday, CET
    ("month", "Europe/Paris", utc(2026, 10, 31, 12), utc(2026, 9, 30, 22)),  # 1 Oct, CEST
    ("month", "Europe/Paris", utc(2026, 11, 2, 12), utc(2026, 10, 31, 23)),  # 1 Nov, CET
    # America/New_York: DST starts 2026-03-08 07:00 UTC, ends 2026-11-01 06:00 UTC
    ("day", "America/New_York", utc(2026, 3, 8, 4, 30), utc(2026, 3, 7, 5)),  # 23:30 EST, 7 Mar
    ("day", "America/New_York", utc(2026, 3, 8, 12), utc(2026, 3, 8, 5)),  # midnight was EST
    ("day", "America/New_York", utc(2026, 3, 9, 12), utc(2026, 3, 9, 4)),  # then EDT
    ("day", "America/New_York", utc(2026, 11, 1, 12), utc(2026, 11, 1, 4)),  # midnight was EDT
    ("day", "America/New_York", utc(2026, 11, 2, 12), utc(2026, 11, 2, 5)),  # then EST
    ("hour", "America/New_York", utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 5)),  # 01:30 EDT
    ("hour", "America/New_York", utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 6)),  # 01:30 EST
    ("week", "America/New_York", utc(2026, 3, 8, 12), utc(2026, 3, 2, 5)),  # Sunday → Mon EST
    ("month", "America/New_York", utc(2026, 11, 15, 12), utc(2026, 11, 1, 4)),  # 1 Nov, EDT
    # America/Santiago skips local midnight (00:00 → 01:00 on 2026-09-06): the day starts at
    # the first instant of the local date, which is the transition itself.
    ("day", "America/Santiago", utc(2026, 9, 6, 12), utc(2026, 9, 6, 4)),
]


@pytest.mark.parametrize(("period", "zone", "now", "expected"), PERIOD_CASES)
def test_period_start(period: str, zone: str, now: datetime, expected: datetime | None) -> None:
    start = period_start(period, zone, now)
    assert start == expected
    if start is not None:
        assert start.utcoffset() == timedelta(0)  # always UTC, whatever the zone


@pytest.mark.parametrize(
    "zone", ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "America/Santiago", "Australia/Lord_Howe"]
)
@pytest.mark.parametrize(
    "days", [(2026, 3, 6), (2026, 3, 27), (2026, 4, 3), (2026, 9, 4), (2026, 10, 2), (2026, 10, 23), (2026, 10, 30)]
)
def test_period_start_properties_over_dst_weeks(zone: str, days: tuple[int, int, int]) -> None:
    """Every 10 minutes over 5 days around a DST change: the window contains now, starts on a
    local boundary, and the day/week/month windows start on the local date they should."""
    tz = ZoneInfo(zone)
    now = utc(*days)
    for _ in range(5 * 24 * 6):
        local = now.astimezone(tz)
        hour = period_start("hour", zone, now)
        day = period_start("day", zone, now)
        week = period_start("week", zone, now)
        month = period_start("month", zone, now)
        assert hour is not None
        assert day is not None
        assert week is not None
        assert month is not None
        for start in (hour, day, week, month):
            assert start <= now
        # The hour is the local wall-clock hour (Lord Howe's DST shift is 30 minutes, so one
        # of its wall hours lasts 90 minutes and one starts at :30, the instant after the gap).
        assert now - hour <= timedelta(minutes=90)
        assert (hour.astimezone(tz).date(), hour.astimezone(tz).hour) == (local.date(), local.hour)
        assert now - day <= timedelta(hours=25)
        assert day.astimezone(tz).date() == local.date()
        assert week.astimezone(tz).date() == local.date() - timedelta(days=local.weekday())
        assert week.astimezone(tz).weekday() == 0  # Monday
        assert month.astimezone(tz).date() == local.date().replace(day=1)
        # The instant just before the window belongs to the previous local day.
        assert (day - timedelta(microseconds=1)).astimezone(tz).date() < local.date()
        now += timedelta(minutes=10)


def test_period_start_rejects_unknown_period() -> None:
    with pytest.raises(ValueError, match="fortnight"):
        period_start("fortnight", "UTC", utc(2026, 5, 14))


# -- matching and statuses ----------------------------------------------------------------------

NOW = utc(2026, 5, 14, 13, 45)
DAY = utc(2026, 5, 14)
WEEK = utc(2026, 5, 11)


@pytest.mark.parametrize(
    ("match", "labels", "expected"),
    [
        (None, {}, True),  # no match: every job
        (None, {"team": "growth"}, True),
        ({"team": "growth"}, {"team": "growth"}, True),
        ({"team": "growth"}, {"team": "growth", "env": "prod"}, True),  # match ⊆ labels
        ({"team": "growth"}, {"team": "search"}, False),
        ({"team": "growth"}, {}, False),
        ({"team": "growth", "env": "prod"}, {"team": "growth"}, False),
        ({"team": "growth", "env": "prod"}, {"team": "growth", "env": "prod"}, True),
    ],
)
def test_matches(match: dict[str, str] | None, labels: dict[str, str], expected: bool) -> None:
    cfg = config(b={"credits": 10, **({"match": match} if match else {})})
    assert matches(cfg.budgets["b"], labels) is expected


def test_statuses_sum_usage_of_matching_label_sets_only() -> None:
    cfg = config(
        growth={"match": {"team": "growth"}, "credits": 100, "reserve": True},
        growth_prod={"match": {"team": "growth", "env": "prod"}, "credits": 40, "action": "block"},
        everyone={"credits": 500},  # no match: every job
        weekly={"match": {"team": "search"}, "credits": 70, "period": "week"},
        forever={"credits": 1000, "period": "total"},
        nothing_yet={"match": {"team": "nobody"}, "credits": 5},
    )
    day_rows = [
        ({"team": "growth"}, Usage(10, 5)),
        ({"team": "growth", "env": "prod"}, Usage(3, 1)),
        ({"team": "search"}, Usage(7, 0)),
        ({}, Usage(2, 0)),
    ]
    usage = {
        DAY: day_rows,
        WEEK: [*day_rows, ({"team": "search"}, Usage(20, 4))],  # earlier this week
        None: [({"team": "growth"}, Usage(900, 0)), ({}, Usage(50, 0))],
    }
    result = {s.name: s for s in statuses(cfg, NOW, usage)}
    assert list(result) == ["growth", "growth_prod", "everyone", "weekly", "forever", "nothing_yet"]
    # Reservations count only for budgets that reserve; the others see actual spend.
    expected = {
        "growth": (Usage(13, 6), DAY, "cancel"),
        "growth_prod": (Usage(3, 0), DAY, "block"),
        "everyone": (Usage(22, 0), DAY, "cancel"),
        "weekly": (Usage(27, 0), WEEK, "cancel"),
        "forever": (Usage(950, 0), None, "cancel"),
        "nothing_yet": (Usage(0, 0), DAY, "cancel"),
    }
    for name, (usage_, start, action) in expected.items():
        status = result[name]
        assert (name, status.usage, status.period_start, status.action) == (name, usage_, start, action)
        assert status.credits == cfg.budgets[name].credits


def test_statuses_without_usage_for_the_period_are_zero() -> None:
    cfg = config(b={"credits": 10, "period": "month"})
    (status,) = statuses(cfg, NOW, {DAY: [({}, Usage(5, 5))]})  # only the day's usage is known
    assert status.period_start == utc(2026, 5, 1)
    assert status.usage == Usage(0, 0)


def test_statuses_use_each_budgets_own_timezone() -> None:
    cfg = config(paris={"credits": 10, "timezone": "Europe/Paris"}, utc={"credits": 10})
    paris_day = utc(2026, 5, 13, 22)  # midnight CEST
    usage = {paris_day: [({}, Usage(4, 0))], DAY: [({}, Usage(1, 0))]}
    result = {s.name: s.usage.spent for s in statuses(cfg, NOW, usage)}
    assert result == {"paris": 4, "utc": 1}


def status(spent: int, reserved: int = 0, credits: int = 100, name: str = "b", action: str = "cancel") -> BudgetStatus:
    return BudgetStatus(name, credits, "day", DAY, Usage(spent, reserved), action)


@pytest.mark.parametrize(
    ("spent", "reserved", "exhausted", "full", "remaining"),
    [
        (0, 0, False, False, 100),
        (99, 0, False, False, 1),
        (90, 10, False, True, 0),  # reservations fill it: full, but nothing is overspent
        (60, 39, False, False, 1),
        (100, 0, True, True, 0),
        (120, 5, True, True, 0),  # never negative
        (0, 100, False, True, 0),
    ],
)
def test_exhausted_is_spend_full_is_spend_plus_reservations(
    spent: int, reserved: int, exhausted: bool, full: bool, remaining: int
) -> None:
    s = status(spent, reserved)
    assert (s.exhausted, s.full, s.remaining) == (exhausted, full, remaining)
    assert s.usage.committed == spent + reserved


# -- warnings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spent", "reserved", "warn_at", "already", "expected"),
    [
        (0, 0, [0.5, 0.8], [], []),
        (49, 0, [0.5, 0.8], [], []),
        (50, 0, [0.5, 0.8], [], ["0.5"]),  # reaching the threshold counts
        (80, 0, [0.5, 0.8], [], ["0.5", "0.8"]),  # both crossed at once: both fire
        (80, 0, [0.5, 0.8], ["0.5"], ["0.8"]),
        (100, 0, [0.5, 0.8], ["0.5", "0.8"], []),
        (95, 0, [0.8, 0.95], [], ["0.8", "0.95"]),
        (10, 90, [0.5], [], []),  # reservations are not spend
        (100, 0, [], [], []),
    ],
)
def test_thresholds_crossed(
    spent: int, reserved: int, warn_at: list[float], already: list[str], expected: list[str]
) -> None:
    assert thresholds_crossed(status(spent, reserved), warn_at, already) == expected


def test_each_threshold_fires_once_as_spend_grows() -> None:
    warn_at = [0.25, 0.5, 0.95]
    fired: list[str] = []
    log = []
    for spent in (0, 10, 24, 25, 26, 49, 50, 51, 94, 95, 100, 130, 130):
        crossed = thresholds_crossed(status(spent), warn_at, fired)
        log.append((spent, crossed))
        fired += crossed
    assert fired == ["0.25", "0.5", "0.95"]
    assert [spent for spent, crossed in log if crossed] == [25, 50, 95]


# -- admission ----------------------------------------------------------------------------------

GROWTH = {"team": "growth"}


def admission_config(**budgets: dict[str, Any]) -> Config:
    return config(**{name: {"match": GROWTH, **body} for name, body in budgets.items()})


def reserving(cfg: Config, labels: dict[str, str], need: int, budget_statuses: list[BudgetStatus]) -> list[str]:
    """Admit a job asking for `need` results (1 credit each); the budgets that reserve for it."""
    return list(grant(cfg, labels, need, budget_statuses, max_credits=None).reserving)


def test_block_budget_full_refuses_with_the_numbers() -> None:
    cfg = admission_config(cap={"credits": 100, "action": "block"})
    with pytest.raises(AdmissionRefused) as refused:
        reserving(cfg, GROWTH, 10, [status(90, 10, name="cap", action="block")])
    message = str(refused.value)
    assert "'cap'" in message
    for number in ("spent 90", "reserved 10", "of 100"):
        assert number in message


def test_block_budget_with_room_admits_without_reserving() -> None:
    cfg = admission_config(cap={"credits": 100, "action": "block"})
    # Without reserve, block only refuses once the budget is full.
    assert reserving(cfg, GROWTH, 50, [status(90, 0, name="cap", action="block")]) == []


def test_reserve_budget_with_room_returns_its_name() -> None:
    cfg = admission_config(pool={"credits": 100, "action": "block", "reserve": True})
    assert reserving(cfg, GROWTH, 40, [status(20, 30, name="pool", action="block")]) == ["pool"]
    # exactly filling it is allowed
    assert reserving(cfg, GROWTH, 50, [status(20, 30, name="pool", action="block")]) == ["pool"]


@pytest.mark.parametrize("action", ["block", "cancel"])
def test_reserve_budget_grants_the_room_left_then_refuses_with_the_numbers(action: str) -> None:
    cfg = admission_config(pool={"credits": 100, "action": action, "reserve": True})
    given = grant(cfg, GROWTH, 51, [status(20, 30, name="pool", action=action)], max_credits=None)
    assert (given.results, given.clamped_by) == (50, ("budgets.pool",))
    with pytest.raises(AdmissionRefused) as refused:
        grant(cfg, GROWTH, 1, [status(20, 80, name="pool", action=action)], max_credits=None)
    message = str(refused.value)
    assert "'pool'" in message
    for number in ("spent 20", "reserved 80", "of 100"):
        assert number in message


def test_non_matching_budgets_are_ignored() -> None:
    cfg = admission_config(
        cap={"credits": 100, "action": "block"},
        pool={"credits": 100, "action": "block", "reserve": True},
    )
    full = [status(100, 0, name="cap", action="block"), status(100, 50, name="pool", action="block")]
    assert reserving(cfg, {"team": "search"}, 1000, full) == []
    assert reserving(cfg, {}, 1000, full) == []


def test_observe_budgets_never_refuse() -> None:
    cfg = admission_config(b={"credits": 100, "action": "observe", "reserve": True})
    for spent, reserved, need in ((0, 0, 1000), (100, 0, 1), (250, 50, 500)):
        assert reserving(cfg, GROWTH, need, [status(spent, reserved, action="observe")]) == []


def test_cancel_budgets_without_reserve_refuse_only_once_exhausted() -> None:
    cfg = admission_config(b={"credits": 100, "action": "cancel"})
    assert reserving(cfg, GROWTH, 1000, [status(99, 0, action="cancel")]) == []
    with pytest.raises(AdmissionRefused, match="is exhausted: spent 100 \\+ reserved 0 of 100"):
        reserving(cfg, GROWTH, 1, [status(100, 0, action="cancel")])


def test_every_matching_budget_is_checked_and_every_reserving_one_returned() -> None:
    cfg = config(
        team={"match": GROWTH, "credits": 100, "reserve": True},
        org={"credits": 1000, "reserve": True},  # every job
        other={"match": {"team": "search"}, "credits": 10, "reserve": True},
        watch={"credits": 5, "action": "observe"},
    )
    roomy = [
        status(0, 0, name="team"), status(0, 0, credits=1000, name="org"),
        status(10, 0, credits=10, name="other"), status(50, 0, credits=5, name="watch"),
    ]  # fmt: skip
    assert reserving(cfg, GROWTH, 60, roomy) == ["team", "org"]
    # the second matching budget holds it to what it has left, though the first had room…
    tight = [status(0, 0, name="team"), status(980, 0, credits=1000, name="org")]
    given = grant(cfg, GROWTH, 60, tight, max_credits=None)
    assert (given.results, given.clamped_by) == (20, ("budgets.org",))
    # …and refuses once it has nothing left
    with pytest.raises(AdmissionRefused, match="'org'"):
        reserving(cfg, GROWTH, 60, [status(0, 0, name="team"), status(1000, 0, credits=1000, name="org")])


# -- a budget's crossing, predicted as a whole ----------------------------------------------

SWEPT = utc(2026, 3, 2, 12, 0, 0)


def spender(credits: int, rate: float | None, polled_ago: float | None = 0.0) -> Spender:
    polled = None if polled_ago is None else SWEPT - timedelta(seconds=polled_ago)
    return Spender(credits, rate, polled)


@pytest.mark.parametrize(
    ("spent", "spenders", "expected_s"),
    [
        # 3 jobs at 4/s: 60 of 90 spent, 12/s together; each half a result on (1.5) -> 2.375 s
        (60, [spender(20, 4), spender(20, 4), spender(20, 4)], 28.5 / 12),
        # carried on from each job's last poll: one polled 1 s ago has spent ~4 more since
        (60, [spender(20, 4, 1.0), spender(20, 4), spender(20, 4)], 24.5 / 12),
        # jobs with no measured rate (pending, just seen) add nothing
        (60, [spender(20, 4), spender(0, None), spender(40, 0.0)], 29.5 / 4),
        # already reached, by polls or by the carry-on
        (90, [spender(90, 4)], 0.0),
        (88, [spender(88, 4, 1.0)], 0.0),
    ],
)
def test_predict_crossing(spent: int, spenders: list[Spender], expected_s: float) -> None:
    status = BudgetStatus("team", 90, "day", DAY, Usage(spent, 0), "cancel")
    at = predict_crossing(status, spenders, SWEPT)
    assert at is not None
    assert abs((at - SWEPT).total_seconds() - expected_s) < 1e-5


def test_no_crossing_is_predicted_without_a_spending_job() -> None:
    status = BudgetStatus("team", 90, "day", DAY, Usage(10, 0), "cancel")
    assert predict_crossing(status, [spender(10, None)], SWEPT) is None
    exhausted = BudgetStatus("team", 90, "day", DAY, Usage(95, 0), "cancel")
    assert predict_crossing(exhausted, [], SWEPT) == SWEPT
