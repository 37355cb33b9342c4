"""The pure policy core, by table: breach, warnings and the next check time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from supervisor.config import Policy
from supervisor.core.job import CHECK_ENFORCE, CHECK_PROBE, CHECK_ROUTINE
from supervisor.core.policy import (
    MIN_POLL_GAP,
    PROBE_SHARE,
    ROUTINE_JITTER,
    NextCheck,
    Observation,
    evaluate,
    next_check,
    next_deadline,
    observed_rate,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLL = timedelta(seconds=15)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def obs(
    status: str = "searching",
    credits: int = 0,
    started: float = 0,
    progress: float | None = None,
    rate: float | None = None,
    warned: frozenset[str] = frozenset(),
) -> Observation:
    return Observation(
        remote_status=status,
        credits=credits,
        started_at=T0 + s(started),
        last_progress_at=T0 + s(started if progress is None else progress),
        credits_per_s=rate,
        warned=warned,
    )


FULL = Policy(
    name="p",
    max_runtime=s(1800),
    max_queued=s(600),
    stall_timeout=s(300),
    max_credits=200,
)


@pytest.mark.parametrize(
    ("observation", "at", "reason"),
    [
        # nothing reached
        (obs(credits=199, progress=1700), 1799, None),
        # credits: breached once they reach the limit, not only beyond it
        (obs(credits=200), 10, "max_credits"),
        (obs(credits=350), 10, "max_credits"),
        # runtime counts from the start, whatever the status
        (obs(status="pending"), 1800, "max_runtime"),
        (obs(status="processing", progress=1790), 1800.5, "max_runtime"),
        # queued: only while pending
        (obs(status="pending"), 599, None),
        (obs(status="pending"), 600, "max_queued"),
        (obs(status="searching", progress=500), 700, None),
        # stall: no progress for stall_timeout while searching or processing
        (obs(status="searching", progress=100), 399, None),
        (obs(status="searching", progress=100), 400, "stall_timeout"),
        (obs(status="processing", progress=100), 400, "stall_timeout"),
        (obs(status="pending", progress=0), 400, None),
        # credits win over time limits when both are reached
        (obs(credits=200), 1900, "max_credits"),
    ],
)
def test_breach(observation: Observation, at: float, reason: str | None) -> None:
    verdict = evaluate(observation, FULL, T0 + s(at), poll_interval=POLL)
    assert (verdict.breach.reason if verdict.breach else None) == reason


def test_breach_detail_names_the_limit_and_values() -> None:
    verdict = evaluate(obs(credits=205), FULL, T0 + s(60), poll_interval=POLL)
    assert verdict.breach is not None
    assert verdict.breach.detail() == {"limit": "max_credits", "value": 205, "threshold": 200}


def test_no_limits_no_breach() -> None:
    verdict = evaluate(obs(credits=10_000), Policy(name="open"), T0 + s(86400), poll_interval=POLL)
    assert verdict.breach is None
    assert verdict.next_check.at == T0 + s(86400) + POLL


@pytest.mark.parametrize(
    ("observation", "at", "warn_at", "fired"),
    [
        (obs(credits=159), 10, (0.8,), []),
        (obs(credits=160), 10, (0.8,), ["max_credits@0.8"]),
        (obs(credits=189), 10, (0.8, 0.95), ["max_credits@0.8"]),
        (obs(credits=195), 10, (0.8, 0.95), ["max_credits@0.8", "max_credits@0.95"]),
        # a threshold already fired does not fire again (it is stored on the job)
        (obs(credits=195, warned=frozenset({"max_credits@0.8"})), 10, (0.8, 0.95), ["max_credits@0.95"]),
        # runtime warnings
        (obs(), 1440, (0.8,), ["max_runtime@0.8"]),
    ],
)
def test_warnings(observation: Observation, at: float, warn_at: tuple[float, ...], fired: list[str]) -> None:
    policy = Policy(name="w", max_runtime=s(1800), max_credits=200, warn_at=warn_at)
    verdict = evaluate(observation, policy, T0 + s(at), poll_interval=POLL)
    assert [warning.key for warning in verdict.warnings] == fired


@pytest.mark.parametrize(
    ("policy", "observation", "at", "expected"),
    [
        # the regular poll when no deadline is nearer
        (Policy(name="p", max_runtime=s(1800)), obs(), 0, 15),
        # a runtime deadline nearer than the poll interval is the next check, exactly
        (Policy(name="p", max_runtime=s(20)), obs(), 10, 20),
        # queued deadline only while pending
        (Policy(name="p", max_queued=s(12)), obs(status="pending"), 5, 12),
        (Policy(name="p", max_queued=s(12)), obs(status="searching", rate=1), 5, 20),
        # stall deadline from the last progress
        (Policy(name="p", stall_timeout=s(30)), obs(progress=10), 35, 40),
        # credits: polled when the observed rate says the limit is reached
        (Policy(name="p", max_credits=100), obs(credits=50, rate=10), 7, 12),
        (Policy(name="p", max_credits=100), obs(credits=99, rate=10), 7, 7.1),
        # rate unknown while running: probed at doubling gaps from when it was seen running
        # (its first progress): 0.25 s, 0.5 s, 1 s, then every second
        (Policy(name="p", max_credits=100), obs(credits=0), 0, 0.25),
        (Policy(name="p", max_credits=100), obs(credits=3, progress=4), 4.25, 4.5),
        (Policy(name="p", max_credits=100), obs(credits=3, progress=4), 4.5, 5),
        (Policy(name="p", max_credits=100), obs(credits=3, progress=4), 9, 10),
        # pending: probed the same way from when it was first seen, a tenth of its age once
        # it has been pending for long, never less often than the regular poll
        (Policy(name="p", max_credits=100), obs(status="pending"), 0, 0.25),
        (Policy(name="p", max_credits=100), obs(status="pending"), 0.5, 1),
        (Policy(name="p", max_credits=100), obs(status="pending"), 6, 7),
        (Policy(name="p", max_credits=100), obs(status="pending"), 40, 44),
        (Policy(name="p", max_credits=100), obs(status="pending"), 400, 415),
        # no credit limit: nothing to probe for
        (Policy(name="p", max_runtime=s(1800)), obs(status="pending"), 0, 15),
        # a rate measured over few results is re-measured by the time the count should double
        (Policy(name="p", max_credits=100), obs(credits=2, rate=4), 1, 2),
        (Policy(name="p", max_credits=100), obs(credits=20, rate=4), 1, 6),
        # cancel_lead: the limit's check comes the lead earlier
        (Policy(name="p", max_credits=100, cancel_lead=s(0.5)), obs(credits=50, rate=10), 7, 11.5),
        # a deadline already passed (observe mode) does not cause a tight loop
        (Policy(name="p", max_runtime=s(10)), obs(), 60, 75),
        # a warning still to fire is a deadline of its own; once fired it is not
        (Policy(name="p", max_runtime=s(20), warn_at=(0.5,)), obs(), 5, 10),
        (Policy(name="p", max_runtime=s(20), warn_at=(0.5,)), obs(warned=frozenset({"max_runtime@0.5"})), 5, 20),
        (Policy(name="p", max_credits=100, warn_at=(0.8,)), obs(credits=50, rate=10), 0, 3),
        (Policy(name="p", stall_timeout=s(10), warn_at=(0.8,)), obs(progress=0), 1, 8),
    ],
)
def test_next_check(policy: Policy, observation: Observation, at: float, expected: float) -> None:
    assert next_check(observation, policy, T0 + s(at), POLL).at == T0 + s(expected)


def test_a_credit_limit_centuries_away_is_the_regular_poll() -> None:
    # 1e9 credits at one result per 1,000 s: 31,000 years, past datetime's last year.
    policy = Policy(name="p", max_credits=1_000_000_000)
    assert next_check(obs(credits=3, rate=0.001), policy, T0, POLL).at == T0 + POLL


def test_next_check_is_never_closer_than_the_minimum_gap() -> None:
    policy = Policy(name="p", max_credits=100)
    now = T0 + s(5)
    assert next_check(obs(credits=99, rate=1000), policy, now, POLL).at == now + MIN_POLL_GAP


@pytest.mark.parametrize(
    ("previous", "progress_at", "credits", "at", "previous_rate", "running", "expected"),
    [
        (0, 0, 10, 5, None, False, None),  # first look at it running: no rate yet
        (0, None, 10, 5, 2.0, True, 2.0),
        (0, 0, 10, 5, None, True, 2.0),  # measured from the last look that saw it grow
        (10, 5, 30, 10, 2.0, True, 4.0),  # faster: taken at once
        (10, 5, 20, 10, 4.0, True, 3.0),  # slower: half-way down
        (10, 5, 10, 5, 2.0, True, 2.0),  # no time passed: keep the old rate
        (10, 5, 4, 10, 2.0, True, 2.0),  # a count that went down is no progress; a short pause keeps it
        (10, 5, 10, 5.4, 10.0, True, 10.0),  # between two steps of results: the rate stands
        (10, 5, 10, 25, 10.0, True, 0.5),  # a long pause lowers it (STEP_CREDITS over the pause)
        (10, 5, 10, 25, None, True, None),
    ],
)
def test_observed_rate(
    previous: int,
    progress_at: float | None,
    credits: int,
    at: float,
    previous_rate: float | None,
    running: bool,
    expected: float | None,
) -> None:
    when = None if progress_at is None else T0 + s(progress_at)
    assert observed_rate(previous, when, credits, T0 + s(at), previous_rate, running=running) == expected


def test_a_rate_over_steps_is_the_rate_of_the_steps() -> None:
    """5 results at once every half second (10/s), looked at every 0.2 s: the rate is measured
    between the looks that saw a step, never between two looks within one."""
    rate, credits, progress_at = None, 5, T0
    for tick in range(1, 16):
        now = T0 + s(0.2 * tick)
        seen = 5 + 5 * int(0.2 * tick / 0.5)
        rate = observed_rate(credits, progress_at, seen, now, rate, running=True)
        if seen > credits:
            credits, progress_at = seen, now
    assert rate is not None
    assert 8 <= rate <= 13


def test_cancel_lead_breaches_when_the_limit_is_due_within_it() -> None:
    policy = Policy(name="p", max_credits=100, cancel_lead=s(0.5))
    verdict = evaluate(obs(credits=96, rate=10), policy, T0 + s(10), poll_interval=POLL)
    assert verdict.breach is not None
    assert verdict.breach.reason == "max_credits"
    assert verdict.breach.detail()["predicted"] == 101
    assert evaluate(obs(credits=94, rate=10), policy, T0 + s(10), poll_interval=POLL).breach is None
    # off by default: the limit itself
    assert evaluate(obs(credits=96, rate=10), Policy(name="p", max_credits=100), T0, poll_interval=POLL).breach is None


@pytest.mark.parametrize(
    ("status", "at", "reason"),
    [
        # A status outside the documented list is a running job: stall and credits apply to it,
        # max_queued (pending only) does not.
        ("in_progress_v2", 301, "stall_timeout"),
        ("in_progress_v2", 299, None),
        ("pending", 601, "max_queued"),
        ("pending", 350, None),  # a queued job does not stall
        ("processing", 301, "stall_timeout"),
    ],
)
def test_an_unknown_status_is_running_for_stall_and_not_queued(status: str, at: float, reason: str | None) -> None:
    verdict = evaluate(obs(status=status, credits=10), FULL, T0 + s(at), poll_interval=POLL)
    assert (verdict.breach.reason if verdict.breach else None) == reason


def test_an_unknown_status_is_cancelled_at_max_credits() -> None:
    verdict = evaluate(obs(status="thinking", credits=200), FULL, T0 + s(5), poll_interval=POLL)
    assert verdict.breach is not None
    assert verdict.breach.reason == "max_credits"


def test_an_unknown_status_is_looked_at_when_it_would_stall() -> None:
    at = next_check(obs(status="thinking", credits=10, rate=None), Policy(name="p", stall_timeout=s(20)), T0, POLL).at
    assert at == T0 + s(15)  # the regular poll
    soon = next_check(obs(status="thinking", progress=-10), Policy(name="p", stall_timeout=s(20)), T0, POLL).at
    assert soon == T0 + s(10)  # its stall deadline, sooner than the poll


# ---- blind jobs: what needs no count, and on_blind


BLIND_CANCEL = FULL.model_copy(update={"on_blind": "cancel", "blind_grace": s(30)})


def unread(blind_since: float | None = None, **values: object) -> Observation:
    base = obs(**values)  # type: ignore[arg-type]
    since = None if blind_since is None else T0 + s(blind_since)
    return Observation(**{**base.__dict__, "unread": True, "blind_since": since})


@pytest.mark.parametrize(
    ("observation", "policy", "at", "reason"),
    [
        # An unread count is no stall: the last progress is old only because nothing was read.
        (unread(progress=0), FULL, 1000, None),
        (obs(progress=0), FULL, 1000, "stall_timeout"),
        # The deadlines that need no count still fire.
        (unread(), FULL, 1800, "max_runtime"),
        (unread(status="pending"), FULL, 600, "max_queued"),
        # on_blind = "alert" (the default) never cancels for blindness.
        (unread(blind_since=0), FULL, 1000, None),
        # on_blind = "cancel": once blind for blind_grace, not before.
        (unread(blind_since=100), BLIND_CANCEL, 129.9, None),
        (unread(blind_since=100), BLIND_CANCEL, 130, "blind"),
        # Not blind yet (unread answers, fewer than BLIND_AFTER): nothing to cancel for.
        (unread(), BLIND_CANCEL, 1000, None),
        # A count read again: blind_since is cleared, so no blind breach.
        (obs(credits=10, progress=990), BLIND_CANCEL, 1000, None),
    ],
)
def test_blind_breaches(observation: Observation, policy: Policy, at: float, reason: str | None) -> None:
    verdict = evaluate(observation, policy, T0 + s(at), poll_interval=POLL)
    assert (verdict.breach.reason if verdict.breach else None) == reason


@pytest.mark.parametrize(
    ("observation", "policy", "at", "expected"),
    [
        # Unread: no probing for a rate (a drift must not raise the request rate): the poll.
        (unread(progress=5), FULL, 10, 25),
        # The blind grace's end is a deadline like the others.
        (unread(blind_since=100, progress=5), BLIND_CANCEL, 110, 125),
        (unread(blind_since=100, progress=5), BLIND_CANCEL, 125, 130),
        # The runtime deadline still pulls the next look earlier.
        (unread(progress=5), FULL, 1795, 1800),
    ],
)
def test_blind_next_check(observation: Observation, policy: Policy, at: float, expected: float) -> None:
    assert next_check(observation, policy, T0 + s(at), POLL).at == T0 + s(expected)


@pytest.mark.parametrize(
    ("observation", "policy", "at", "expected"),
    [
        (unread(), FULL, 100, 1800),  # max_runtime's end
        (unread(status="pending"), FULL, 100, 600),  # max_queued's, while pending
        (unread(blind_since=100), BLIND_CANCEL, 110, 130),  # blind_grace's, with on_blind = "cancel"
        (unread(blind_since=100), FULL, 110, 1800),  # on_blind = "alert": no blind deadline
        (unread(), FULL, 1800, None),  # all behind
        (unread(), Policy(name="p", max_credits=5), 10, None),  # no time limit at all
    ],
)
def test_next_deadline(observation: Observation, policy: Policy, at: float, expected: float | None) -> None:
    found = next_deadline(observation, policy, T0 + s(at))
    assert found == (None if expected is None else T0 + s(expected))


@pytest.mark.parametrize(
    ("policy", "observation", "at", "expected", "priority"),
    [
        # the regular poll is routine; a deadline that wins enforces
        (Policy(name="p", max_runtime=s(1800)), obs(), 0, 15, CHECK_ROUTINE),
        (Policy(name="p", max_runtime=s(20)), obs(), 10, 20, CHECK_ENFORCE),
        (Policy(name="p", max_queued=s(12)), obs(status="pending"), 5, 12, CHECK_ENFORCE),
        (Policy(name="p", stall_timeout=s(30)), obs(progress=10), 35, 40, CHECK_ENFORCE),
        # a predicted crossing (or a warning's) enforces; a rate re-measured is routine
        (Policy(name="p", max_credits=100), obs(credits=50, rate=10), 7, 12, CHECK_ENFORCE),
        (Policy(name="p", max_credits=100, warn_at=(0.8,)), obs(credits=50, rate=10), 0, 3, CHECK_ENFORCE),
        (Policy(name="p", max_credits=100), obs(credits=2, rate=4), 1, 2, CHECK_ROUTINE),
        # a rate not known yet is probed
        (Policy(name="p", max_credits=100), obs(credits=0), 0, 0.25, CHECK_PROBE),
        (Policy(name="p", max_credits=100), obs(status="pending"), 6, 7, CHECK_PROBE),
        # a probe never hides a deadline due before it
        (Policy(name="p", max_credits=100, max_queued=s(6.5)), obs(status="pending"), 6, 6.5, CHECK_ENFORCE),
        # a deadline exactly at the probe's time: the enforcing check wins the tie
        (Policy(name="p", max_credits=100, max_queued=s(7)), obs(status="pending"), 6, 7, CHECK_ENFORCE),
    ],
)
def test_what_the_next_check_is_for(
    policy: Policy, observation: Observation, at: float, expected: float, priority: int
) -> None:
    check = next_check(observation, policy, T0 + s(at), POLL)
    assert (check.at, check.priority) == (T0 + s(expected), priority)


def test_a_job_the_api_caps_under_its_credit_limit_is_not_probed() -> None:
    policy = Policy(name="p", max_credits=100)
    capped = replace(obs(credits=0), api_cap=100)
    assert next_check(capped, policy, T0, POLL) == NextCheck(T0 + POLL, CHECK_ROUTINE)
    # a cap above the limit leaves the limit to the supervisor: probed as before
    above = replace(obs(credits=0), api_cap=101)
    assert next_check(above, policy, T0, POLL) == NextCheck(T0 + s(0.25), CHECK_PROBE)


@pytest.mark.parametrize(
    ("lag", "expected"),
    [
        (0, 1),  # on time: the probe's own gap (a second, 6 s after it was first seen)
        (0.4, 1),  # polls a little late: a gap twice the lag is still under the probe's own
        (2, 4),  # 2 s late: probes at lag / PROBE_SHARE
        (30, 15),  # never further apart than the regular poll
    ],
)
def test_probes_are_shed_first_as_polls_run_late(lag: float, expected: float) -> None:
    assert PROBE_SHARE == 0.5
    policy = Policy(name="p", max_credits=100)
    now = T0 + s(6)
    assert next_check(obs(status="pending"), policy, now, POLL, lag=s(lag)).at == now + s(expected)


def test_the_regular_poll_is_jittered_earlier_only_and_deadlines_not_at_all() -> None:
    regular = Policy(name="p", max_runtime=s(1800))
    assert next_check(obs(), regular, T0, POLL, jitter=0.0).at == T0 + POLL
    assert next_check(obs(), regular, T0, POLL, jitter=0.5).at == T0 + POLL * (1 - ROUTINE_JITTER / 2)
    assert next_check(obs(), regular, T0, POLL, jitter=0.999).at > T0 + POLL * (1 - ROUTINE_JITTER)
    deadline = Policy(name="p", max_runtime=s(20))
    assert next_check(obs(), deadline, T0 + s(10), POLL, jitter=0.999).at == T0 + s(20)
