"""The API's documented rate limits: requests per minute per key, on initiate and continue.

Docs: initiate 5 / 5 / 50 / 100 a minute for the free / >$0 / $50 / $250 paid tiers, continue 5.
The simulator leaves initiate unlimited unless told (tests, the demo and the benchmarks initiate
far faster than any tier allows); continue is limited as documented.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

from supervisor.sim.model import count, flag

__all__ = ["TIERS", "Limits", "RateLimiter"]

TIERS = {"free": 5, "paid": 5, "paid_50": 50, "paid_250": 100}
WINDOW = 60.0  # seconds: every documented limit is per minute


@dataclass(frozen=True, slots=True)
class Limits:
    initiate_per_minute: int | None = None  # None: unlimited (not the API's behaviour: see above)
    continue_per_minute: int | None = 5  # shared by /continue and /more
    retry_after_header: bool = False  # 429s also carry Retry-After (undocumented; the body has it)

    def updated(self, knobs: dict[str, object]) -> Limits:
        """These limits with the given knobs changed; ``tier`` sets initiate_per_minute by name."""
        knobs = dict(knobs)
        changes: dict[str, object] = {}
        if "tier" in knobs:
            tier = knobs.pop("tier")
            if tier not in TIERS:
                raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
            changes["initiate_per_minute"] = TIERS[str(tier)]
        for name, value in knobs.items():
            if name in ("initiate_per_minute", "continue_per_minute"):
                changes[name] = None if value is None else count(name, value)
            elif name == "retry_after_header":
                changes[name] = flag(name, value)
            else:
                known = ", ".join(f.name for f in dataclasses.fields(self))
                raise ValueError(f"unknown limit knob {name!r}; known: tier, {known}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]  # checked above


class RateLimiter:
    """A sliding one-minute window per (endpoint group, key). Not thread-safe: hold a lock."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], deque[float]] = {}

    def hit(self, group: str, key: str, per_minute: int | None, now: float) -> int | None:
        """Count a request now; None when it is allowed, else the seconds until one would be."""
        if per_minute is None:
            return None
        seen = self._seen.setdefault((group, key), deque())
        while seen and seen[0] <= now - WINDOW:
            seen.popleft()
        if len(seen) >= per_minute:
            wait = seen[0] + WINDOW - now if seen else WINDOW
            return max(1, math.ceil(wait))
        seen.append(now)
        return None
