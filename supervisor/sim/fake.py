"""All of the simulator's state: jobs, the account's credits, keys, limits, faults, the request log.

The HTTP layer (server.py) parses and answers; everything it decides with lives here, behind one
lock, so test code may read and change it while a server thread runs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.sim.faults import FaultPlan, Faults
from supervisor.sim.limits import Limits, RateLimiter
from supervisor.sim.model import (
    ALREADY,
    COMPLETED,
    FINAL_STATUSES,
    PENDING,
    Job,
    Scenario,
    iso_utc,
    job_request,
    knobs_from_query,
    status_body,
)

__all__ = ["Call", "Clock", "FakeClado"]

Clock = Callable[[], float]
Answer = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)

NOT_FOUND: Answer = (404, {"detail": "Job not found"})
FORBIDDEN: Answer = (403, {"detail": "not authorized to access this job"})
NO_CREDITS: Answer = (402, {"detail": "Insufficient credits"})


def _cannot_cancel(why: str) -> dict[str, Any]:
    # The docs' wording: "Cannot cancel job: already completed".
    return {"success": False, "message": f"Cannot cancel job: {why}"}


@dataclass(slots=True)
class Call:
    """One request to a real endpoint, faulted or not, as the request log keeps it."""

    at: float  # simulator clock
    endpoint: str  # initiate, status, cancel, continue, more, credits
    job_id: str | None  # from the path; for initiate, the job it created
    status: int | None = None  # the HTTP status it was answered with (None: no answer yet)


class FakeClado:
    """The simulated Clado account. Safe to use from test code while a server thread runs.

    `defaults` are scenario knobs every new job starts from (a job's query tokens and explicit
    knobs override them); `request_log_size` bounds the request log (the oldest calls go first).
    """

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        seed: int | None = None,
        account_credits: int = 1_000_000,
        valid_keys: set[str] | None = None,
        limits: Limits | None = None,
        defaults: Mapping[str, object] | None = None,
        request_log_size: int = 100_000,
    ) -> None:
        self._clock = clock
        self._seed = seed
        self._initial_credits = account_credits
        self._initial_keys = valid_keys
        self._initial_limits = limits if limits is not None else Limits()
        Scenario.from_knobs(defaults or {})  # fail here, not at the first job
        self._initial_defaults = dict(defaults or {})
        self._log_size = request_log_size
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._jobs: dict[str, Job] = {}
        # Billing: jobs still able to produce results live in `_running`; once a job is final its
        # count moves into `_charged_final` (and back out if it is continued), so a credits check
        # only looks at live jobs.
        self._running: dict[str, Job] = {}
        self._charged_final = 0
        # What the last full count saw, to bound the charges since then without a full count:
        # each job's count grows by at most its unused fraction of a result plus rate * time.
        self._counted_at: float | None = None
        self._counted = 0
        self._counted_slack = 0.0  # sum of the fractional results the counted jobs had accrued
        self._counted_rate = 0.0  # sum of the rates of jobs that may still grow
        self._account_credits = self._initial_credits
        self._last_topup: float | None = None
        self._valid_keys = None if self._initial_keys is None else set(self._initial_keys)
        self._limits = self._initial_limits
        self._limiter = RateLimiter()
        self._defaults = dict(self._initial_defaults)
        self._faults = Faults()
        self._fault_rng = random.Random(self._seed)  # noqa: S311  # simulated faults, not secrets
        # A separate stream so that injected faults do not change the ids a seed produces.
        self._id_rng = None if self._seed is None else random.Random(self._seed)  # noqa: S311  # reproducible ids
        self._log: deque[Call] = deque(maxlen=self._log_size)
        self._stats = dict.fromkeys(
            ("initiate", "status", "cancel", "continue", "more", "credits", "faults_injected", "rate_limited",
             "bytes_sent_status"),
            0,
        )  # fmt: skip

    # ---- public helpers for tests, the demo and benchmarks

    def create_job(self, query: str = "fake job", limit: int = 30, **scenario: object) -> str:
        """Create a job as POST initiate would (without the credit check); knobs override tokens.

        An extra ``hard_filter_company_urls`` keyword is stored like the API field.
        """
        return self.create_jobs(1, query, limit, **scenario)[0]

    def create_jobs(self, count: int, query: str = "fake job", limit: int = 30, **scenario: object) -> list[str]:
        """`count` jobs with the same query and knobs, under one lock acquisition."""
        query, limit, company_urls = job_request(query, limit, scenario.pop("hard_filter_company_urls", None))
        parsed = self.scenario_for(query, scenario)
        with self._lock:
            return [self._add_job(query, limit, company_urls, parsed) for _ in range(count)]

    def scenario_for(self, query: str, knobs: Mapping[str, object] | None = None) -> Scenario:
        """A new job's scenario: the server's defaults, then the query's tokens, then `knobs`."""
        with self._lock:
            defaults = dict(self._defaults)
        return Scenario.from_knobs({**defaults, **knobs_from_query(query), **(knobs or {})})

    def job_info(self, job_id: str) -> dict[str, Any]:
        """The internal view of a job, vanished or not. KeyError if it never existed."""
        with self._lock:
            job = self._jobs[job_id]
            now = self._clock()
            status, results, gone = self._observe(job, now)
            return {
                "job_id": job.job_id,
                "query": job.query,
                "limit": job.limit,
                "hard_filter_company_urls": job.company_urls,
                "scenario": dataclasses.asdict(job.scenario),
                "status": status,
                "results": results,
                "vanished": gone,
                "rounds": job.rounds,
                "created_at": job.created_at_iso,
                "created_at_ts": job.created_at,
                "status_calls": job.status_calls,
                "cancel_calls": job.cancel_calls,
                "continue_calls": job.continue_calls,
                "cancel_call_times": list(job.cancel_call_times),
                "cancel_requested_at": job.cancel_requested_at,
            }

    def stats(self) -> dict[str, int]:
        """Requests per real endpoint (faulted ones included), faults injected, 429s from the
        rate limits, status bytes sent, jobs, credits charged."""
        with self._lock:
            return {**self._stats, "jobs": len(self._jobs), "credits_charged": self._charged(self._clock())}

    def requests(self, endpoint: str | None = None, job_id: str | None = None) -> list[dict[str, Any]]:
        """The request log, oldest first, optionally only one endpoint's and/or one job's calls."""
        with self._lock:
            calls = [c for c in self._log if endpoint in (None, c.endpoint) and job_id in (None, c.job_id)]
        return [dataclasses.asdict(c) for c in calls]

    def request_count(self, endpoint: str | None = None, job_id: str | None = None) -> int:
        """How many logged requests match (see `requests`)."""
        return len(self.requests(endpoint, job_id))

    def set_faults(self, **knobs: object) -> dict[str, Any]:
        """Change the given fault knobs (others keep their value); returns the whole set.

        ``seed`` re-seeds the fault generator.
        """
        knobs = dict(knobs)
        reseed = "seed" in knobs
        seed = knobs.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or null, got {seed!r}")
        with self._lock:
            self._faults = self._faults.updated(knobs)
            if reseed:
                self._fault_rng = random.Random(seed)  # noqa: S311
            return dataclasses.asdict(self._faults)

    def reshape(self, job_ids: Iterable[str] | None = None, **knobs: object) -> None:
        """Change the given scenario knobs of existing jobs (all of them by default), as an
        API whose answers change shape under running jobs (a proxy rewriting bodies, a new
        version): `reshape(hide_status=True)`. Their progress so far is kept."""
        parsed = Scenario.from_knobs(knobs)
        changed = {name: getattr(parsed, name) for name in knobs}
        with self._lock:
            for job_id in self._jobs if job_ids is None else job_ids:
                job = self._jobs[job_id]
                job.scenario = dataclasses.replace(job.scenario, **changed)

    def set_limits(self, **knobs: object) -> dict[str, Any]:
        """Change the rate limits (see :class:`Limits`; ``tier="paid_50"`` names one); returns all."""
        with self._lock:
            self._limits = self._limits.updated(knobs)
            return dataclasses.asdict(self._limits)

    def set_defaults(self, **knobs: object) -> dict[str, Any]:
        """Change the scenario knobs new jobs start from (a null knob removes one); returns them."""
        with self._lock:
            merged = {**self._defaults, **knobs}
            merged = {name: value for name, value in merged.items() if value is not None}
            Scenario.from_knobs(merged)
            self._defaults = merged
            return dict(merged)

    def set_valid_keys(self, keys: Iterable[str] | None) -> None:
        """Accept exactly these bearer keys; None accepts any key starting with ``lk_``."""
        with self._lock:
            self._valid_keys = None if keys is None else set(keys)

    def set_account_credits(self, credits: int) -> None:
        """Make the account hold `credits` from now on; running jobs keep charging against it."""
        with self._lock:
            self._account_credits = credits + self._charged(self._clock())

    def top_up(self, credits: int) -> None:
        """Add `credits` to the account now, as a purchase would: `last_topup_at` becomes now."""
        with self._lock:
            self._account_credits += credits
            self._last_topup = self._clock()

    def reset(self) -> None:
        """Forget every job, zero the counters, clear faults, restore the constructor's settings."""
        with self._lock:
            self._reset()

    # ---- internals; every method below expects the lock to be held

    def _add_job(self, query: str, limit: int, company_urls: list[str] | None, scenario: Scenario) -> str:
        if self._id_rng is None:
            job_id = str(uuid.uuid4())
        else:
            job_id = str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))
        job = Job(job_id, query, limit, company_urls, scenario, created_at=self._clock())
        self._jobs[job_id] = job
        self._running[job_id] = job
        self._counted_rate += scenario.rate
        return job_id

    def _observe(self, job: Job, now: float) -> tuple[str, int, bool]:
        """(status, results, vanished) now, moving the job's charge to the final sum once final."""
        elapsed = job.elapsed(now)
        status, results = job.state_at(elapsed)
        gone = job.vanished(elapsed)
        if (gone or status in FINAL_STATUSES) and self._running.pop(job.job_id, None) is not None:
            self._charged_final += results
        return status, results, gone

    def _charged(self, now: float) -> int:
        """Credits charged so far across all jobs: O(jobs still running)."""
        running, slack, rate = 0, 0.0, 0.0
        for job in list(self._running.values()):
            status, results, gone = self._observe(job, now)
            if gone or status in FINAL_STATUSES:
                continue
            running += results
            if results < job.cap:
                rate += job.scenario.rate
                searched = job.searched_for(job.elapsed(now))
                if searched > 0:
                    slack += searched * job.scenario.rate - (results - job.base)
        charged = self._charged_final + running
        self._counted_at, self._counted = now, charged
        self._counted_slack, self._counted_rate = slack, rate
        return charged

    def _charged_at_most(self, now: float) -> float:
        """An O(1) upper bound of `_charged(now)`, from the last full count."""
        if self._counted_at is None or now < self._counted_at:
            return math.inf
        growth = self._counted_slack + self._counted_rate * (now - self._counted_at)
        return self._counted + growth + 1  # + 1 absorbs float rounding

    def _has_credit(self, now: float) -> bool:
        # The full count is O(running jobs): only needed when the cheap bound is too close.
        return (
            self._account_credits - self._charged_at_most(now) >= 1 or self._account_credits - self._charged(now) >= 1
        )

    # ---- the endpoints' logic, called by the HTTP layer

    def authorized(self, header: str | None) -> str | None:
        """The bearer key of an acceptable Authorization header, else None."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        keys = self._valid_keys  # replaced whole, never mutated: safe to read without the lock
        ok = token.startswith("lk_") if keys is None else token in keys
        return token if ok else None

    def admit(self, endpoint: str, job_id: str | None) -> tuple[FaultPlan, Call]:
        """Log a request to a real endpoint and decide which fault, if any, it gets."""
        with self._lock:
            self._stats[endpoint] += 1
            call = Call(self._clock(), endpoint, job_id)
            self._log.append(call)
            plan = self._faults.plan(self._fault_rng, retry_after_header=self._limits.retry_after_header)
            self._stats["faults_injected"] += plan.injected
            return plan, call

    def rate_limited(self, group: str, key: str) -> int | None:
        """Count a request against its per-minute limit: None if allowed, else seconds to wait."""
        with self._lock:
            per_minute = self._limits.initiate_per_minute if group == "initiate" else self._limits.continue_per_minute
            wait = self._limiter.hit(group, key, per_minute, self._clock())
            self._stats["rate_limited"] += wait is not None
            return wait

    @property
    def retry_after_header(self) -> bool:
        return self._limits.retry_after_header

    def initiate(self, query: str, limit: int, company_urls: list[str] | None, scenario: Scenario) -> str | None:
        """The new job's id, or None when the account has no credit left."""
        with self._lock:
            if not self._has_credit(self._clock()):
                return None
            return self._add_job(query, limit, company_urls, scenario)

    def status(self, job_id: str, page: int | None, page_size: int) -> tuple[int, bytes | dict[str, Any]]:
        """(200, the status body) or an error answer."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return NOT_FOUND
            job.status_calls += 1
            now = self._clock()
            status, results, gone = self._observe(job, now)
        if gone:
            return NOT_FOUND
        if job.forbidden(job.elapsed(now)):
            return FORBIDDEN
        if page is None and not job.scenario.unpaged:
            return 400, {"detail": "page is required"}
        if page is not None and page_size > job.scenario.max_page_size:
            return 400, {"detail": f"page_size must be at most {job.scenario.max_page_size}"}
        if job.scenario.flicker and results and job.status_calls % 2 == 0:
            results -= 1  # what is shown, not what is billed
        # Built outside the lock: an unpaged body of a large job is the one expensive thing here.
        body = status_body(job, status, results, page, page_size)
        with self._lock:
            self._stats["bytes_sent_status"] += len(body)
        return 200, body

    def cancel(self, job_id: str) -> Answer:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return NOT_FOUND
            now = self._clock()
            job.cancel_calls += 1
            job.cancel_call_times.append(now)
            status, results, gone = self._observe(job, now)
            s = job.scenario
            if gone:
                return NOT_FOUND
            if status in FINAL_STATUSES:
                return s.refuse_status, _cannot_cancel(f"already {ALREADY[status]}")
            if s.cancel_only_pending and status != PENDING:
                return s.refuse_status, _cannot_cancel("only pending jobs can be cancelled")
            if job.cancel_at is None:  # a repeated call while a cancel propagates changes nothing
                if s.race:
                    job.forced = (COMPLETED, results)
                    self._observe(job, now)
                    return s.refuse_status, _cannot_cancel("already completed")
                if job.cancel_requested_at is None:
                    job.cancel_requested_at = now
                if not s.cancel_ignored:
                    # Measured without the epsilon, which `state_at` compares against.
                    job.cancel_at = now - job.created_at + s.cancel_delay
                    self._observe(job, now)  # without a delay the job is final right away
            return s.accept_status, {"success": True, "message": "Deep research job cancelled successfully"}

    def continue_job(self, job_id: str, additional: int) -> Answer:
        """Send a completed job back to `pending` to find up to `additional` more results."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return NOT_FOUND
            now = self._clock()
            job.continue_calls += 1
            status, results, gone = self._observe(job, now)
            if gone:
                return NOT_FOUND
            if status != COMPLETED:
                return 409, {"detail": f"Only a completed job can be continued; this one is {status}"}
            if job.room(results) == 0:
                return 409, {"detail": "No more results can be found for this job"}
            if not self._has_credit(now):
                return NO_CREDITS
            job.reopen(now, results, min(additional, job.room(results)))
            # Back among the jobs that charge: its results so far leave the final sum with it,
            # and its rate joins the bound of `_charged_at_most` (whose last count had it final).
            self._running[job_id] = job
            self._charged_final -= results
            self._counted_rate += job.scenario.rate
            return 200, {"job_id": job_id, "status": PENDING, "message": "Deep research job continued"}

    def credits(self) -> dict[str, Any]:
        # May go below zero: like the docs, the simulator never stops a job for lack of credits.
        with self._lock:
            remaining = self._account_credits - self._charged(self._clock())
            topup = self._last_topup
        return {"credits": remaining, "last_topup_at": None if topup is None else iso_utc(topup)}
