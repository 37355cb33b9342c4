"""The pure policy core: given what is known of a running job, its policy and the time,
decide whether it breaches a limit, which warnings fire, and when to look at it next.

No I/O, no clock: `now` is an argument, so every rule is tested by a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from supervisor.config import Config, Policy
from supervisor.core.job import Job
from supervisor.core.states import Reason

# Never poll one job more often than this, however close it is to its credit limit.
MIN_POLL_GAP = timedelta(milliseconds=50)
PROBE_GAP = timedelta(seconds=1)


def job_policy(config: Config, job: Job) -> Policy:
    """The job's policy from the current config, with its per-job overrides."""
    policy = config.resolve_policy(job.policy)
    overrides: dict[str, object] = {}
    if job.max_runtime_s is not None:
        overrides["max_runtime"] = timedelta(seconds=job.max_runtime_s)
    if job.max_credits is not None:
        overrides["max_credits"] = job.max_credits
    return policy.model_copy(update=overrides) if overrides else policy


@dataclass(frozen=True)
class Observation:
    """A running job as the last status poll showed it."""

    # pending | searching | processing, or a status outside the documented list: a running
    # job all the same (only `pending` is queued; every other running status can stall)
    remote_status: str
    credits: int
    started_at: datetime  # the API's created_at, else when the supervisor learned of the job
    last_progress_at: datetime  # last time the highest count seen grew (or the job started running)
    credits_per_s: float | None  # observed rate; None until two polls saw it
    warned: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Breach:
    reason: str
    limit: str
    value: float  # seconds or credits
    threshold: float

    def detail(self) -> dict[str, float | str]:
        return {"limit": self.limit, "value": round(self.value, 3), "threshold": self.threshold}


@dataclass(frozen=True)
class Warning:
    key: str  # "<limit>@<fraction>", stored so each fires once per job
    limit: str
    fraction: float
    value: float
    threshold: float


@dataclass(frozen=True)
class Evaluation:
    breach: Breach | None
    warnings: tuple[Warning, ...]
    next_check_at: datetime


def _measures(obs: Observation, policy: Policy, now: datetime) -> list[tuple[str, float, float]]:
    """(limit name, current value, limit) for every limit that applies to this job now."""
    measures: list[tuple[str, float, float]] = []
    if policy.max_credits is not None:
        measures.append((Reason.MAX_CREDITS, obs.credits, policy.max_credits))
    elapsed = (now - obs.started_at).total_seconds()
    if policy.max_runtime is not None:
        measures.append((Reason.MAX_RUNTIME, elapsed, policy.max_runtime.total_seconds()))
    if policy.max_queued is not None and obs.remote_status == "pending":
        measures.append((Reason.MAX_QUEUED, elapsed, policy.max_queued.total_seconds()))
    if policy.stall_timeout is not None and obs.remote_status != "pending":
        idle = (now - obs.last_progress_at).total_seconds()
        measures.append((Reason.STALL_TIMEOUT, idle, policy.stall_timeout.total_seconds()))
    return measures


def evaluate(
    obs: Observation,
    policy: Policy,
    now: datetime,
    *,
    poll_interval: timedelta,
    min_gap: timedelta = MIN_POLL_GAP,
) -> Evaluation:
    measures = _measures(obs, policy, now)
    # A limit is breached once the value reaches it ("credits reach the limit").
    breach = next(
        (Breach(name, name, value, limit) for name, value, limit in measures if value >= limit),
        None,
    )
    warnings = tuple(
        Warning(f"{name}@{fraction:g}", name, fraction, value, limit)
        for name, value, limit in measures
        for fraction in policy.warn_at
        if value >= fraction * limit and f"{name}@{fraction:g}" not in obs.warned
    )
    return Evaluation(breach, warnings, next_check_at(obs, policy, now, poll_interval, min_gap))


def next_check_at(
    obs: Observation,
    policy: Policy,
    now: datetime,
    poll_interval: timedelta,
    min_gap: timedelta = MIN_POLL_GAP,
) -> datetime:
    """The regular poll, pulled earlier to the next deadline so limits do not wait for it.

    Time limits are exact deadlines. The credit limit is predicted from the observed rate:
    the job is polled when it should reach the limit, so the overshoot is about one
    result's worth of time rather than a whole poll interval's.
    """
    candidates = [now + poll_interval]
    # Each limit is looked at when it is reached, and when each warning still to fire is.
    limits = (Reason.MAX_RUNTIME, Reason.MAX_QUEUED, Reason.STALL_TIMEOUT, Reason.MAX_CREDITS)
    fractions = {name: [1.0, *(f for f in policy.warn_at if f"{name}@{f:g}" not in obs.warned)] for name in limits}
    if policy.max_runtime is not None:
        candidates += [obs.started_at + policy.max_runtime * f for f in fractions[Reason.MAX_RUNTIME]]
    if policy.max_queued is not None and obs.remote_status == "pending":
        candidates += [obs.started_at + policy.max_queued * f for f in fractions[Reason.MAX_QUEUED]]
    if policy.stall_timeout is not None and obs.remote_status != "pending":
        candidates += [obs.last_progress_at + policy.stall_timeout * f for f in fractions[Reason.STALL_TIMEOUT]]
    if policy.max_credits is not None and obs.remote_status != "pending":
        if obs.credits_per_s:
            for f in fractions[Reason.MAX_CREDITS]:
                seconds = (policy.max_credits * f - obs.credits) / obs.credits_per_s
                # Only one sooner than the regular poll can be the next check; a huge limit
                # at a slow rate would be past the last date a datetime can hold.
                if seconds < poll_interval.total_seconds():
                    candidates.append(now + timedelta(seconds=seconds))
        else:
            # Rate not known yet: probe at doubling gaps (1 s, 2 s, 4 s … since the start)
            # so a fast job is measured before it can run far past its limit.
            candidates.append(now + max(PROBE_GAP, now - obs.started_at))
    # A deadline already behind us (a breach being observed, not acted on) must not
    # make the job be polled in a tight loop.
    upcoming = [at for at in candidates if at > now]
    return max(min(upcoming), now + min_gap)


def observed_rate(
    previous_credits: int,
    previous_at: datetime | None,
    credits: int,
    now: datetime,
    previous_rate: float | None,
) -> float | None:
    """Credits per second between two polls, smoothed so one burst does not dominate."""
    if previous_at is None:
        return previous_rate
    seconds = (now - previous_at).total_seconds()
    if seconds <= 0 or credits < previous_credits:
        return previous_rate
    rate = (credits - previous_credits) / seconds
    if previous_rate is None:
        return rate
    return 0.5 * rate + 0.5 * previous_rate
