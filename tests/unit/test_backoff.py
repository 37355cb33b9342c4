from __future__ import annotations

from datetime import timedelta

import pytest

from supervisor.core.backoff import delay, renewal_cap


@pytest.mark.parametrize(
    ("attempt", "first", "cap", "expected"),
    [
        (1, 1.0, 30.0, 1.0),  # the first failure waits `first`
        (2, 1.0, 30.0, 2.0),  # then doubles
        (5, 1.0, 30.0, 16.0),
        (6, 1.0, 30.0, 30.0),  # up to the cap
        (10_000, 0.2, 5.0, 5.0),  # a long outage neither overflows nor passes the cap
        (0, 0.5, 5.0, 0.5),  # no failure counted yet reads as the first
        (3, 10.0, 4.0, 4.0),  # a cap below `first` wins
    ],
)
def test_delay_doubles_from_first_up_to_cap(attempt: int, first: float, cap: float, expected: float) -> None:
    assert delay(attempt, first, cap) == expected


@pytest.mark.parametrize(
    ("ttl", "renewals", "expected"),
    [
        (timedelta(seconds=30), 3, 10.0),  # one renewal interval: the next renewal is still in time
        (timedelta(seconds=10), 4, 2.5),
        (timedelta(seconds=2), 4, 1.0),  # never under a second
    ],
)
def test_renewal_cap_is_one_renewal_interval_and_at_least_a_second(
    ttl: timedelta, renewals: int, expected: float
) -> None:
    assert renewal_cap(ttl, renewals) == expected
