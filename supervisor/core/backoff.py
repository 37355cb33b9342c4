"""Exponential backoff: the one rule for how long to wait before trying again."""

from __future__ import annotations

# 2 ** 30 times the first delay is past any cap in use; bounding the exponent keeps a long
# outage's attempt count from overflowing a float.
_MAX_DOUBLINGS = 30


def delay(attempt: int, first: float, cap: float) -> float:
    """Seconds to wait after the `attempt`-th consecutive failure (1 for the first): `first`,
    doubling with each further failure, never more than `cap`."""
    doublings = min(max(attempt, 1) - 1, _MAX_DOUBLINGS)
    return min(cap, first * 2.0**doublings)
