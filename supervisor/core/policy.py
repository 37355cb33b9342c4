"""The pure policy core: given what is known of a running job, its policy and the time,
decide whether it breaches a limit, which warnings fire, and when to look at it next.

No I/O, no clock: `now` is an argument, so every rule is tested by a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from supervisor.config import Config, Policy
from supervisor.core.job import CHECK_ENFORCE, CHECK_PROBE, CHECK_ROUTINE
from supervisor.core.states import Reason

# Never poll one job more often than this, however close it is to its credit limit.
MIN_POLL_GAP = timedelta(milliseconds=50)
# While a job is pending or its rate is unknown it is probed at gaps that double from when it
# was first seen (pending) or first seen running: 0.25 s, 0.5 s, 1 s, then every second, so a
# job that starts between two polls has its rate measured within a second or two of its first
# results. A job pending for long is looked at less often (a tenth of its age, up to the poll
# interval): its first results are then seen at most that late.
PROBE_FIRST = timedelta(milliseconds=250)
PROBE_CAP = timedelta(seconds=1)
# Results may come in steps (5 at once, every half second): a poll that sees no growth only
# lowers the rate once the pause is longer than a step this big would explain.
STEP_CREDITS = 10
# The regular poll comes up to this share of the poll interval early, at random (`jitter`),
# so that jobs tracked together do not stay in phase and come due in bunches. Only ever
# earlier: a regular poll is never later than the poll interval, and no deadline moves.
ROUTINE_JITTER = 0.1
# Under load probes are shed first: while polls run `lag` late, a probe's gap is at least
# lag / PROBE_SHARE (up to the poll interval). A replica that lags by L seconds has at most
# about a PROBE_SHARE of its polls go to probes of a job, whatever their own gaps asked.
PROBE_SHARE = 0.5


# A blind job is cancelled (on_blind = "cancel") once blind this many poll intervals, unless
# its policy sets blind_grace.
BLIND_GRACE_POLLS = 2


class Overridden(Protocol):
    """What a job's policy is resolved from: its policy's name, its labels (a budget covering
    them may say on_blind = "cancel") and its per-job overrides."""

    @property
    def policy(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def max_runtime_s(self) -> float | None: ...
    @property
    def max_credits(self) -> int | None: ...


def job_policy(config: Config, job: Overridden) -> Policy:
    """The job's policy from the current config, with its per-job overrides; its blind_grace
    resolved, and on_blind = "cancel" when a budget that covers the job says so."""
    policy = config.resolve_policy(job.policy)
    overrides: dict[str, object] = {}
    if job.max_runtime_s is not None:
        overrides["max_runtime"] = timedelta(seconds=job.max_runtime_s)
    if job.max_credits is not None:
        overrides["max_credits"] = job.max_credits
    if policy.blind_grace is None:
        overrides["blind_grace"] = config.supervisor.poll_interval * BLIND_GRACE_POLLS
    if policy.on_blind != "cancel" and any(
        config.budgets[name].on_blind == "cancel" for name in config.budgets_for(dict(job.labels))
    ):
        overrides["on_blind"] = "cancel"
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
    credits_per_s: float | None  # observed rate; None until two polls of it running saw it grow
    warned: frozenset[str] = frozenset()
    first_seen_at: datetime | None = None  # when the supervisor learned of it (else started_at)
    # The last answer told no count (or no answer was had): the credits are the last known,
    # so no credit prediction and no stall can be judged from them.
    unread: bool = False
    blind_since: datetime | None = None  # see core.transitions.unreadable_answer
    # The most the API lets the job spend (its `limit` × credits per result), if it has one:
    # at or under max_credits the API itself caps the job, so its rate need not be probed.
    api_cap: int | None = None


@dataclass(frozen=True)
class Breach:
    reason: str
    limit: str
    value: float  # seconds or credits
    threshold: float
    predicted: float | None = None  # credits predicted within the cancel lead (cancel_lead only)

    def detail(self) -> dict[str, float | str]:
        detail: dict[str, float | str] = {
            "limit": self.limit,
            "value": round(self.value, 3),
            "threshold": self.threshold,
        }
        if self.predicted is not None:
            detail["predicted"] = round(self.predicted, 3)
        return detail


@dataclass(frozen=True)
class Warning:
    key: str  # "<limit>@<fraction>", stored so each fires once per job
    limit: str
    fraction: float
    value: float
    threshold: float


@dataclass(frozen=True)
class NextCheck:
    at: datetime
    priority: int  # core.job CHECK_*: what the check is for (claims take enforcing ones first)


@dataclass(frozen=True)
class Evaluation:
    breach: Breach | None
    warnings: tuple[Warning, ...]
    next_check: NextCheck


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
    if policy.stall_timeout is not None and obs.remote_status != "pending" and not obs.unread:
        idle = (now - obs.last_progress_at).total_seconds()
        measures.append((Reason.STALL_TIMEOUT, idle, policy.stall_timeout.total_seconds()))
    if policy.on_blind == "cancel" and obs.blind_since is not None and policy.blind_grace is not None:
        blind = (now - obs.blind_since).total_seconds()
        measures.append((Reason.BLIND, blind, policy.blind_grace.total_seconds()))
    return measures


def evaluate(
    obs: Observation,
    policy: Policy,
    now: datetime,
    *,
    poll_interval: timedelta,
    min_gap: timedelta = MIN_POLL_GAP,
    lag: timedelta = timedelta(0),
    jitter: float = 0.0,
) -> Evaluation:
    measures = _measures(obs, policy, now)
    # A limit is breached once the value reaches it ("credits reach the limit").
    breach = next(
        (Breach(name, name, value, limit) for name, value, limit in measures if value >= limit),
        None,
    )
    if breach is None:
        breach = _led_breach(obs, policy)
    warnings = tuple(
        Warning(f"{name}@{fraction:g}", name, fraction, value, limit)
        for name, value, limit in measures
        if name != Reason.BLIND  # blind has its own alert (job_blind)
        for fraction in policy.warn_at
        if value >= fraction * limit and f"{name}@{fraction:g}" not in obs.warned
    )
    return Evaluation(breach, warnings, next_check(obs, policy, now, poll_interval, min_gap, lag=lag, jitter=jitter))


def _led_breach(obs: Observation, policy: Policy) -> Breach | None:
    """cancel_lead: the credit limit counts as reached once the observed rate says it will
    be within the lead, so that the cancel lands when the limit does."""
    lead, limit, rate = policy.cancel_lead, policy.max_credits, obs.credits_per_s
    if not lead or limit is None or not rate or obs.remote_status == "pending" or obs.unread:
        return None
    predicted = obs.credits + rate * lead.total_seconds()
    if predicted < limit:
        return None
    return Breach(Reason.MAX_CREDITS, Reason.MAX_CREDITS, obs.credits, limit, predicted=predicted)


def next_deadline(obs: Observation, policy: Policy, now: datetime) -> datetime | None:
    """The next limit that needs no count: the end of max_runtime, of max_queued (pending),
    of blind_grace (on_blind = "cancel"); None when none is ahead. What keeps a lost job
    looked at until then (its cancel is attempted at it)."""
    ends = []
    if policy.max_runtime is not None:
        ends.append(obs.started_at + policy.max_runtime)
    if policy.max_queued is not None and obs.remote_status == "pending":
        ends.append(obs.started_at + policy.max_queued)
    if policy.on_blind == "cancel" and obs.blind_since is not None and policy.blind_grace is not None:
        ends.append(obs.blind_since + policy.blind_grace)
    ahead = [end for end in ends if end > now]
    return min(ahead) if ahead else None


def probe_gap(age: timedelta, poll_interval: timedelta, lag: timedelta = timedelta(0)) -> timedelta:
    """The next gap of a job probed for its rate, `age` after the probing began (PROBE_FIRST),
    widened while polls run `lag` late (PROBE_SHARE: probes are shed first under load)."""
    cap = max(PROBE_CAP, age / 10)
    return min(poll_interval, max(PROBE_FIRST, min(age, cap), lag / PROBE_SHARE))


def next_check(
    obs: Observation,
    policy: Policy,
    now: datetime,
    poll_interval: timedelta,
    min_gap: timedelta = MIN_POLL_GAP,
    *,
    lag: timedelta = timedelta(0),
    jitter: float = 0.0,
) -> NextCheck:
    """The regular poll, pulled earlier to the next deadline so limits do not wait for it.

    Time limits are exact deadlines. The credit limit is predicted from the observed rate:
    the job is polled when it should reach the limit (earlier by `cancel_lead`, if set), so
    the overshoot is about one result's worth of time rather than a whole poll interval's.
    Until the rate is known (a pending job, one just seen running) the job is probed, unless
    the API itself caps it at or under the limit (`api_cap`).

    What the check is for (its priority) is that of the candidate that won: a deadline or a
    predicted crossing enforces; the regular poll and a rate re-measure are routine; a probe
    is a probe. `jitter` (0..1, the caller's random draw) brings the regular poll up to
    ROUTINE_JITTER of the interval earlier; `lag` (how late polls run now) widens probes.
    """
    candidates = [(now + poll_interval * (1 - ROUTINE_JITTER * jitter), CHECK_ROUTINE)]
    # Each limit is looked at when it is reached, and when each warning still to fire is.
    limits = (Reason.MAX_RUNTIME, Reason.MAX_QUEUED, Reason.STALL_TIMEOUT, Reason.MAX_CREDITS)
    fractions = {name: [1.0, *(f for f in policy.warn_at if f"{name}@{f:g}" not in obs.warned)] for name in limits}
    pending = obs.remote_status == "pending"
    deadlines: list[datetime] = []
    if policy.max_runtime is not None:
        deadlines += [obs.started_at + policy.max_runtime * f for f in fractions[Reason.MAX_RUNTIME]]
    if policy.max_queued is not None and pending:
        deadlines += [obs.started_at + policy.max_queued * f for f in fractions[Reason.MAX_QUEUED]]
    if policy.stall_timeout is not None and not pending and not obs.unread:
        deadlines += [obs.last_progress_at + policy.stall_timeout * f for f in fractions[Reason.STALL_TIMEOUT]]
    if policy.on_blind == "cancel" and obs.blind_since is not None and policy.blind_grace is not None:
        deadlines.append(obs.blind_since + policy.blind_grace)
    # An unread count is no rate to predict from, nor a reason to probe faster than the poll:
    # a drift that blinds every job must not raise the request rate.
    if policy.max_credits is not None and not obs.unread:
        if obs.credits_per_s and not pending:
            lead = policy.cancel_lead.total_seconds() if policy.cancel_lead else 0.0
            regular = poll_interval.total_seconds()
            # Only a check sooner than the regular poll can be the next one; and a huge limit
            # at a slow rate would be past the last date a datetime can hold.
            for f in fractions[Reason.MAX_CREDITS]:
                seconds = credits_crossing(obs.credits, obs.credits_per_s, policy.max_credits * f) - lead * (f == 1.0)
                if seconds < regular:
                    deadlines.append(now + timedelta(seconds=seconds))
            # A rate measured over a few results is rough (one result more or less in a
            # quarter second is 4/s): the job is looked at again by the time it should have
            # doubled its count, so the rate is re-measured over ever longer windows before
            # the limit is predicted from it.
            doubled = max(PROBE_CAP.total_seconds(), obs.credits / obs.credits_per_s)
            if doubled < regular:
                candidates.append((now + timedelta(seconds=doubled), CHECK_ROUTINE))
        elif obs.api_cap is None or obs.api_cap > policy.max_credits:
            # Pending: probed from when it was first seen; running at a rate not known yet:
            # from when it was seen running (its first progress).
            since = (obs.first_seen_at or obs.started_at) if pending else obs.last_progress_at
            gap = probe_gap(max(now - since, timedelta(0)), poll_interval, lag)
            candidates.append((now + gap, CHECK_PROBE))
    candidates += [(at, CHECK_ENFORCE) for at in deadlines]
    # A deadline already behind us (a breach being observed, not acted on) must not
    # make the job be polled in a tight loop. At a tie the enforcing candidate wins.
    upcoming = [(at, priority) for at, priority in candidates if at > now]
    at, priority = min(upcoming)
    return NextCheck(max(at, now + min_gap), priority)


def credits_crossing(credits: float, rate: float, target: float) -> float:
    """Seconds from a poll that saw `credits`, at `rate` credits/s, until `target` is reached:
    when polls are timed for a credit limit (next_check_at) and when a job's forecast says it
    reaches it (core.forecast)."""
    return (target - credits) / rate


def observed_rate(
    previous_credits: int,
    previous_progress_at: datetime | None,
    credits: int,
    now: datetime,
    previous_rate: float | None,
    *,
    running: bool,
) -> float | None:
    """Credits per second of a running job, measured between the polls that saw its count
    grow (not between two polls of one step of results), from the second look at it running
    (`running`: the previous look saw it running too; a window that began while it was
    pending would understate it). Quick to go up, half-way down, so a burst is polled for
    early rather than missed; a long pause lowers it (see STEP_CREDITS)."""
    if not running:
        return None
    if previous_progress_at is None:
        return previous_rate
    seconds = (now - previous_progress_at).total_seconds()
    if seconds <= 0:
        return previous_rate
    if credits <= previous_credits:
        return None if previous_rate is None else min(previous_rate, STEP_CREDITS / seconds)
    rate = (credits - previous_credits) / seconds
    if previous_rate is None or rate >= previous_rate:
        return rate
    return 0.5 * rate + 0.5 * previous_rate
