"""Exponential backoff: the one rule for how long to wait before trying again."""

from __future__ import annotations

from datetime import timedelta

# 2 ** 30 times the first delay is past any cap in use; bounding the exponent keeps a long
# outage's attempt count from overflowing a float.
_MAX_DOUBLINGS = 30


def delay(attempt: int, first: float, cap: float) -> float:
    """Seconds to wait after the `attempt`-th consecutive failure (1 for the first): `first`,
    doubling with each further failure, never more than `cap`."""
    doublings = min(max(attempt, 1) - 1, _MAX_DOUBLINGS)
    return min(cap, first * 2.0**doublings)


def renewal_cap(ttl: timedelta, renewals: int) -> float:
    """The longest wait after failing to renew something that lasts `ttl` and is renewed
    `renewals` times within it (a lease, leadership): one renewal interval, so the first
    renewal after the database is back comes before the ttl runs out; at least a second."""
    return max(1.0, ttl.total_seconds() / renewals)
