"""A local simulator of the Clado deep research API.

It serves the four real endpoints the supervisor uses (initiate, status, cancel, credits) with the
documented bodies and error codes, plus unauthenticated ``/_fake/*`` control endpoints for tests
that run it in another process. It is built for load as well as for tests: a job is a handful of
numbers, its progress is computed from the clock when someone looks, and its results are generated
from ``job_id`` and index on demand, so a status poll costs the same with 10 or 10,000 jobs.

Scenario knobs shape a job's life (see :class:`Scenario`). A client that can only submit a query
can still pick them with a ``fake:key=value,key=value`` token inside the query text, e.g.
``"engineers in SF fake:rate=5,stall_after=10"``.

It follows the public docs (docs.clado.ai) where they are specific: ``page_size`` defaults to 25,
the ``pagination`` object only appears when ``page`` is given, a status call without ``page``
returns every result, initiate answers "Deep research job initiated". Where they are silent it
picks the behaviour that is harder on a client: a 502/503 from "the gateway" is HTML, not JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import re
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["FakeClado", "Scenario", "ThreadedFakeApi", "create_app", "serve"]

Clock = Callable[[], float]

PENDING = "pending"
SEARCHING = "searching"
PROCESSING = "processing"
COMPLETED = "completed"
ERROR = "error"
CANCELLED = "cancelled"
FINAL_STATUSES = frozenset({COMPLETED, ERROR, CANCELLED})

_MESSAGES = {
    PENDING: "Deep research job is queued",
    SEARCHING: "Searching for matching profiles",
    PROCESSING: "Validating and processing found profiles",
    COMPLETED: "Deep research completed successfully",
    ERROR: "Deep research job failed",
    CANCELLED: "Deep research job was cancelled",
}
# The cancel endpoint's 409 wording for each final status.
_ALREADY = {COMPLETED: "completed", CANCELLED: "cancelled", ERROR: "failed"}

MAX_LIMIT = 1000
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 25  # the documented default when `page` is given
COUNT_FIELDS = ("total_results", "final_results_count_only", "pagination_only", "results_only")

# Added to every elapsed time so that a test clock set exactly on a boundary (say the instant the
# 10th result is due) lands on its far side despite float rounding in `elapsed * rate`.
_EPSILON = 1e-6


# --------------------------------------------------------------------------------------------
# Scenario knobs


def _number(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]  # str from a query token, or a number
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _count(name: str, value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _count_field(name: str, value: object) -> str:
    if value in COUNT_FIELDS:
        return str(value)
    raise ValueError(f"{name} must be one of {', '.join(COUNT_FIELDS)}; got {value!r}")


_KNOB_PARSERS: dict[str, Callable[[str, object], object]] = {
    "rate": _number,
    "queue_for": _number,
    "process_for": _number,
    "stall_after": _count,
    "fail_after": _number,
    "external_cancel_after": _number,
    "cancel_delay": _number,
    "race": _flag,
    "vanish_after": _number,
    "hide_created_at": _flag,
    "count_field": _count_field,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """How one job behaves. Times are seconds since the job was created unless noted."""

    rate: float = 1.0  # results per second once searching
    queue_for: float = 0.0  # time in `pending` before `searching`
    process_for: float = 0.0  # time in `processing` after the last result, before `completed`
    stall_after: int | None = None  # results stop growing at this count; stays `searching`
    fail_after: float | None = None  # becomes `error`, results frozen
    external_cancel_after: float | None = None  # cancelled by someone else, results frozen
    cancel_delay: float = 0.0  # an accepted cancel takes effect this long after the call
    race: bool = False  # the first cancel call loses to completion (409, `completed`)
    vanish_after: float | None = None  # the job is forgotten: 404 everywhere
    hide_created_at: bool = False  # status bodies omit `created_at`
    count_field: str = "total_results"  # which field carries the result count (COUNT_FIELDS)

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, object]) -> Scenario:
        """Validate knobs given as native values or as strings; a null knob means its default."""
        unknown = sorted(set(knobs) - _KNOB_PARSERS.keys())
        if unknown:
            raise ValueError(
                f"unknown scenario knob(s): {', '.join(unknown)}; "
                f"known knobs: {', '.join(sorted(_KNOB_PARSERS))}"
            )
        parsed: dict[str, Any] = {
            name: _KNOB_PARSERS[name](name, value)
            for name, value in knobs.items()
            if value is not None
        }
        return cls(**parsed)


_QUERY_TOKEN = re.compile(r"(?:^|\s)fake:(\S+)")


def _knobs_from_query(query: str) -> dict[str, str]:
    """The scenario knobs embedded in a query as ``fake:key=value,key=value`` tokens."""
    knobs: dict[str, str] = {}
    for match in _QUERY_TOKEN.finditer(query):
        for pair in match.group(1).split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(
                    f"bad scenario token {pair!r} in query: expected fake:key=value,key=value"
                )
            knobs[key] = value
    return knobs


def _job_request(
    query: object, limit: object, company_urls: object
) -> tuple[str, int, list[str] | None]:
    """Validate the initiate fields, as typed values."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query is required and must be a non-empty string")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit!r}")
    if company_urls is None:
        return query, limit, None
    if not (isinstance(company_urls, list) and all(isinstance(u, str) for u in company_urls)):
        raise ValueError("hard_filter_company_urls must be a list of strings")
    return query, limit, company_urls


# --------------------------------------------------------------------------------------------
# Jobs


@dataclass(slots=True, eq=False)
class _Job:
    job_id: str
    query: str
    limit: int
    company_urls: list[str] | None
    scenario: Scenario
    created_at: float  # clock time
    created_at_iso: str
    cap: int  # the most results this job can ever produce
    done_at: float  # elapsed time of natural completion; inf when it never completes
    cancel_at: float | None = None  # elapsed time an accepted cancel takes effect
    cancel_requested_at: float | None = None  # clock time of the first accepted cancel
    forced: tuple[str, int] | None = None  # (status, results) fixed by a lost cancel race
    status_calls: int = 0
    cancel_calls: int = 0
    cancel_call_times: list[float] = field(default_factory=list)

    def elapsed(self, now: float) -> float:
        return now - self.created_at + _EPSILON

    def vanished(self, elapsed: float) -> bool:
        vanish_after = self.scenario.vanish_after
        return vanish_after is not None and elapsed >= vanish_after

    def count_at(self, elapsed: float) -> int:
        searching_for = elapsed - self.scenario.queue_for
        if searching_for <= 0:
            return 0
        return min(self.cap, int(searching_for * self.scenario.rate))

    def state_at(self, elapsed: float) -> tuple[str, int]:
        """(status, results so far) at `elapsed` seconds after creation."""
        if self.forced is not None:
            return self.forced
        s = self.scenario
        if s.vanish_after is not None:
            # A forgotten job stops where it was: hidden from the API, still billed.
            elapsed = min(elapsed, s.vanish_after)
        stop_status, stop_at = "", math.inf
        for status, at in (
            (ERROR, s.fail_after),
            (CANCELLED, s.external_cancel_after),
            (CANCELLED, self.cancel_at),
        ):
            if at is not None and at < stop_at:
                stop_status, stop_at = status, at
        # An interruption only matters if it comes before the job finished on its own.
        if stop_at <= elapsed and stop_at < self.done_at:
            return stop_status, self.count_at(stop_at)
        if elapsed < s.queue_for:
            return PENDING, 0
        if elapsed >= self.done_at:
            return COMPLETED, self.limit
        results = self.count_at(elapsed)
        return (SEARCHING if results < self.limit else PROCESSING), results


def _new_job(
    job_id: str,
    query: str,
    limit: int,
    company_urls: list[str] | None,
    scenario: Scenario,
    now: float,
) -> _Job:
    cap = limit if scenario.stall_after is None else min(limit, scenario.stall_after)
    if cap < limit or scenario.rate == 0:
        done_at = math.inf
    else:
        done_at = scenario.queue_for + limit / scenario.rate + scenario.process_for
    created = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds")
    return _Job(
        job_id=job_id,
        query=query,
        limit=limit,
        company_urls=company_urls,
        scenario=scenario,
        created_at=now,
        created_at_iso=created.replace("+00:00", "Z"),
        cap=cap,
        done_at=done_at,
    )


_FIRST = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro",
          "Ines", "Jamal", "Kira", "Luca", "Maya", "Noah", "Olu", "Priya")  # fmt: skip
_LAST = ("Adams", "Brooks", "Chen", "Diaz", "Eze", "Fischer", "Garcia", "Haddad",
         "Ito", "Jones", "Kim", "Lopez", "Mensah", "Novak", "Okafor", "Patel")  # fmt: skip
_TITLES = ("Software Engineer", "Senior Software Engineer", "Staff Engineer", "Data Scientist",
           "Engineering Manager", "ML Engineer", "Product Manager", "CTO")  # fmt: skip
_COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries",
              "Wayne Enterprises", "Soylent")  # fmt: skip


def _person(job_id: str, index: int) -> dict[str, str]:
    """Result `index` of a job: the same every time, never stored."""
    h = zlib.crc32(f"{job_id}:{index}".encode())
    first, last = _FIRST[h & 15], _LAST[(h >> 4) & 15]
    return {
        "name": f"{first} {last}",
        "title": _TITLES[(h >> 8) & 7],
        "company": _COMPANIES[(h >> 11) & 7],
        "linkedin_url": f"https://www.linkedin.com/in/{first}-{last}-{job_id[:8]}-{index}".lower(),
    }


def _status_body(job: _Job, status: str, results: int, page: int | None, page_size: int) -> bytes:
    """The status endpoint's JSON body; which count fields appear follows `count_field`."""
    count_field = job.scenario.count_field
    body: dict[str, Any] = {"job_id": job.job_id, "status": status, "message": _MESSAGES[status]}
    if count_field == "total_results":
        body["total_results"] = results
    if count_field == "final_results_count_only" or (
        count_field == "total_results" and status in FINAL_STATUSES
    ):
        body["final_results_count"] = results
    start = 0 if page is None else (page - 1) * page_size
    stop = results if page is None else min(results, start + page_size)
    body["results"] = [_person(job.job_id, i) for i in range(start, stop)]
    if page is not None:
        pagination: dict[str, Any] = {"page": page, "page_size": page_size}
        if count_field in ("total_results", "pagination_only"):
            pagination["total_results"] = results
            pagination["total_pages"] = math.ceil(results / page_size)
        pagination["has_next"] = start + page_size < results
        pagination["has_prev"] = page > 1
        body["pagination"] = pagination
    if not job.scenario.hide_created_at:
        body["created_at"] = job.created_at_iso
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Faults


@dataclass(slots=True)
class _Faults:
    error_rate: float = 0.0  # answered 500/502/503 without being handled
    throttle_rate: float = 0.0  # answered 429 with Retry-After
    retry_after: int = 1
    slow_rate: float = 0.0  # delayed by slow_seconds, then handled (or faulted) as usual
    slow_seconds: float = 0.0
    garbage_rate: float = 0.0  # answered 200 with a body that is not valid JSON
    drop_rate: float = 0.0  # handled, then the connection is cut mid-response
    fail_next: int = 0  # the next N requests are answered 503, deterministically

    def is_random(self) -> bool:
        return any((self.error_rate, self.throttle_rate, self.slow_rate,
                    self.garbage_rate, self.drop_rate))  # fmt: skip

    def updated(self, knobs: Mapping[str, object]) -> _Faults:
        unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown fault knob(s): {', '.join(unknown)}")
        changes: dict[str, Any] = {}
        for name, value in knobs.items():
            if name in ("retry_after", "fail_next"):
                changes[name] = _count(name, value)
            else:
                changes[name] = _number(name, value)
                if name.endswith("_rate") and changes[name] > 1:
                    raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        f = dataclasses.replace(self, **changes)
        if f.error_rate + f.throttle_rate + f.garbage_rate + f.drop_rate > 1:
            raise ValueError("error_rate + throttle_rate + garbage_rate + drop_rate must be <= 1")
        return f


@dataclass(frozen=True, slots=True)
class _FaultPlan:
    delay: float = 0.0
    response: Response | None = None  # sent instead of handling the request
    drop: bool = False  # handle the request, then cut the connection before the answer arrives


_NO_FAULT = _FaultPlan()

_GATEWAY_PAGES = {
    502: b"<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>",
    503: b"<html><head><title>503 Service Unavailable</title></head><body>Try later</body></html>",
}


# 200 bodies a client cannot parse: a captive portal's page, or JSON cut short.
_GARBAGE = (
    (b"<html><body>oops</body></html>", "text/html"),
    (b'{"job_id": "', "application/json"),
)


def _server_error(status: int) -> Response:
    # Only the application answers JSON; a proxy in front of it answers HTML.
    if status in _GATEWAY_PAGES:
        return Response(_GATEWAY_PAGES[status], status, media_type="text/html")
    return JSONResponse({"detail": "Internal server error"}, status)


class _InjectedDrop(Exception):
    """Raised once a response has started, so that uvicorn closes the connection mid-response."""


class _HideInjectedDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every drop we inject on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _InjectedDrop))


# --------------------------------------------------------------------------------------------
# The simulator's state


class FakeClado:
    """All of the simulator's state. Safe to use from test code while a server thread runs."""

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        seed: int | None = None,
        account_credits: int = 1_000_000,
        valid_keys: set[str] | None = None,
    ) -> None:
        self._clock = clock
        self._seed = seed
        self._initial_credits = account_credits
        self._initial_keys = valid_keys
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._jobs: dict[str, _Job] = {}
        # Billing: jobs still able to produce results live in `_running`; once a job is final its
        # count moves into `_charged_final` for good, so a credits check only looks at live jobs.
        self._running: dict[str, _Job] = {}
        self._charged_final = 0
        # What the last full count saw, to bound the charges since then without a full count:
        # each job's count grows by at most its unused fraction of a result plus rate * time.
        self._counted_at: float | None = None
        self._counted = 0
        self._counted_slack = 0.0  # sum of the fractional results the counted jobs had accrued
        self._counted_rate = 0.0  # sum of the rates of jobs that may still grow
        self._account_credits = self._initial_credits
        self._valid_keys = None if self._initial_keys is None else set(self._initial_keys)
        self._faults = _Faults()
        self._fault_rng = random.Random(self._seed)
        # A separate stream so that injected faults do not change the ids a seed produces.
        self._id_rng = None if self._seed is None else random.Random(self._seed)
        self._stats = dict.fromkeys(
            ("initiate", "status", "cancel", "credits", "faults_injected", "bytes_sent_status"), 0
        )

    # ---- public helpers for tests, the demo and benchmarks

    def create_job(self, query: str = "fake job", limit: int = 30, **scenario: object) -> str:
        """Create a job as POST initiate would (without the credit check); knobs override tokens.

        An extra ``hard_filter_company_urls`` keyword is stored like the API field.
        """
        return self.create_jobs(1, query, limit, **scenario)[0]

    def create_jobs(
        self, count: int, query: str = "fake job", limit: int = 30, **scenario: object
    ) -> list[str]:
        """`count` jobs with the same query and knobs, under one lock acquisition."""
        query, limit, company_urls = _job_request(
            query, limit, scenario.pop("hard_filter_company_urls", None)
        )
        parsed = Scenario.from_knobs({**_knobs_from_query(query), **scenario})
        with self._lock:
            return [self._add_job(query, limit, company_urls, parsed) for _ in range(count)]

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
                "created_at": job.created_at_iso,
                "created_at_ts": job.created_at,
                "status_calls": job.status_calls,
                "cancel_calls": job.cancel_calls,
                "cancel_call_times": list(job.cancel_call_times),
                "cancel_requested_at": job.cancel_requested_at,
            }

    def stats(self) -> dict[str, int]:
        """Request counts per real endpoint, faults injected, status bytes sent, credits charged."""
        with self._lock:
            return {
                **self._stats,
                "jobs": len(self._jobs),
                "credits_charged": self._charged(self._clock()),
            }

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
                self._fault_rng = random.Random(seed)
            return dataclasses.asdict(self._faults)

    def set_valid_keys(self, keys: Iterable[str] | None) -> None:
        """Accept exactly these bearer keys; None accepts any key starting with ``lk_``."""
        with self._lock:
            self._valid_keys = None if keys is None else set(keys)

    def set_account_credits(self, credits: int) -> None:
        """Make the account hold `credits` from now on; running jobs keep charging against it."""
        with self._lock:
            self._account_credits = credits + self._charged(self._clock())

    def reset(self) -> None:
        """Forget every job, zero the counters, clear faults, restore the constructor's settings."""
        with self._lock:
            self._reset()

    # ---- internals; every method below expects the lock to be held

    def _add_job(
        self, query: str, limit: int, company_urls: list[str] | None, scenario: Scenario
    ) -> str:
        if self._id_rng is None:
            job_id = str(uuid.uuid4())
        else:
            job_id = str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))
        job = _new_job(job_id, query, limit, company_urls, scenario, self._clock())
        self._jobs[job_id] = job
        self._running[job_id] = job
        self._counted_rate += scenario.rate
        return job_id

    def _observe(self, job: _Job, now: float) -> tuple[str, int, bool]:
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
                searched = job.elapsed(now) - job.scenario.queue_for
                if searched > 0:
                    slack += searched * job.scenario.rate - results
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

    # ---- the endpoints' logic, called by the HTTP handlers

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        keys = self._valid_keys  # replaced whole, never mutated: safe to read without the lock
        return token.startswith("lk_") if keys is None else token in keys

    def _admit(self, endpoint: str) -> _FaultPlan:
        """Count a request to a real endpoint and decide which fault, if any, it gets."""
        with self._lock:
            self._stats[endpoint] += 1
            faults = self._faults
            if faults.fail_next:
                faults.fail_next -= 1
                self._stats["faults_injected"] += 1
                return _FaultPlan(response=_server_error(503))
            if not faults.is_random():
                return _NO_FAULT
            rng = self._fault_rng
            delay = faults.slow_seconds if rng.random() < faults.slow_rate else 0.0
            # One draw over adjacent bands, so each rate is the fraction of requests it gets.
            draw = rng.random()
            response: Response | None = None
            drop = False
            if draw < faults.error_rate:
                response = _server_error(rng.choice((500, 502, 503)))
            elif (draw := draw - faults.error_rate) < faults.throttle_rate:
                response = JSONResponse(
                    {"detail": "Rate limit exceeded"},
                    429,
                    headers={"Retry-After": str(faults.retry_after)},
                )
            elif (draw := draw - faults.throttle_rate) < faults.garbage_rate:
                body, media_type = rng.choice(_GARBAGE)
                response = Response(body, media_type=media_type)
            elif draw - faults.garbage_rate < faults.drop_rate:
                drop = True
            self._stats["faults_injected"] += int(delay > 0) + int(response is not None or drop)
            return _FaultPlan(delay=delay, response=response, drop=drop)

    def _initiate(
        self, query: str, limit: int, company_urls: list[str] | None, scenario: Scenario
    ) -> str | None:
        """The new job's id, or None when the account has no credit left."""
        with self._lock:
            now = self._clock()
            # The full count is O(running jobs): only needed when the cheap bound is too close.
            if self._account_credits - self._charged_at_most(now) < 1 and (
                self._account_credits - self._charged(now) < 1
            ):
                return None
            return self._add_job(query, limit, company_urls, scenario)

    def _status(self, job_id: str, page: int | None, page_size: int) -> bytes | None:
        """The status body, or None for an unknown or vanished job."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job.status_calls += 1
            status, results, gone = self._observe(job, self._clock())
        if gone:
            return None
        # Built outside the lock: an unpaged body of a large job is the one expensive thing here.
        body = _status_body(job, status, results, page, page_size)
        with self._lock:
            self._stats["bytes_sent_status"] += len(body)
        return body

    def _cancel(self, job_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return 404, {"detail": "Job not found"}
            now = self._clock()
            job.cancel_calls += 1
            job.cancel_call_times.append(now)
            status, results, gone = self._observe(job, now)
            if gone:
                return 404, {"detail": "Job not found"}
            if status in FINAL_STATUSES:
                return 409, _cannot_cancel(status)
            if job.cancel_at is None:  # a repeated call while a cancel propagates changes nothing
                if job.scenario.race:
                    job.forced = (COMPLETED, results)
                    self._observe(job, now)
                    return 409, _cannot_cancel(COMPLETED)
                # Measured without the epsilon, which `state_at` compares against.
                job.cancel_at = now - job.created_at + job.scenario.cancel_delay
                job.cancel_requested_at = now
                self._observe(job, now)  # without a delay the job is final right away
            return 200, {"success": True, "message": "Deep research job cancelled successfully"}

    def _remaining_credits(self) -> int:
        # May go below zero: like the docs, the simulator never stops a job for lack of credits.
        with self._lock:
            return self._account_credits - self._charged(self._clock())


def _cannot_cancel(status: str) -> dict[str, Any]:
    return {"success": False, "message": f"Cannot cancel job: already {_ALREADY[status]}"}


# --------------------------------------------------------------------------------------------
# HTTP


_JOBS_PREFIX = "/api/search/deep_research"


def _endpoint(scope: Scope) -> str | None:
    """Which real endpoint a request is for (the stats key), or None."""
    path, method = scope["path"], scope["method"]
    if path == "/api/credits":
        return "credits" if method == "GET" else None
    if path == _JOBS_PREFIX:
        return "initiate" if method == "POST" else None
    if not path.startswith(_JOBS_PREFIX + "/"):
        return None
    rest = path[len(_JOBS_PREFIX) + 1 :]
    if method == "POST" and rest.endswith("/cancel") and rest.count("/") == 1:
        return "cancel"
    if method == "GET" and rest and "/" not in rest:
        return "status"
    return None


class _FaultInjector:
    """Raw ASGI middleware: counts real-endpoint requests and injects the planned faults."""

    def __init__(self, app: ASGIApp, fake: FakeClado) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = _endpoint(scope) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        plan = self.fake._admit(endpoint)
        if plan.delay:
            await asyncio.sleep(plan.delay)
        if plan.response is not None:
            await plan.response(scope, receive, send)
        elif plan.drop:
            await self.app(scope, receive, _discard)
            # uvicorn answers 500 to an exception raised before the response starts, but closes
            # the connection when one is raised after: the client sees a truncated response.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
                }
            )
            raise _InjectedDrop(f"injected connection drop on {scope['path']}")
        else:
            await self.app(scope, receive, send)


async def _discard(message: Message) -> None:
    """An ASGI send that loses the response."""


def _detail(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status)


def _unauthorized() -> JSONResponse:
    return _detail(401, "Invalid or missing API key")


async def _json_object(request: Request, *, empty_ok: bool) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValueError("request body must be valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def _query_int(params: Mapping[str, str], name: str, low: int, high: int | None) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


async def _initiate(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    if not fake._authorized(request.headers.get("authorization")):
        return _unauthorized()
    try:
        body = await _json_object(request, empty_ok=False)
        query, limit, company_urls = _job_request(
            body.get("query"), body.get("limit", 30), body.get("hard_filter_company_urls")
        )
        scenario = Scenario.from_knobs(_knobs_from_query(query))
    except ValueError as exc:
        return _detail(400, str(exc))
    job_id = fake._initiate(query, limit, company_urls, scenario)
    if job_id is None:
        return _detail(402, "Insufficient credits")
    return JSONResponse(
        {"job_id": job_id, "status": PENDING, "message": "Deep research job initiated"}
    )


async def _status(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    if not fake._authorized(request.headers.get("authorization")):
        return _unauthorized()
    try:
        page = _query_int(request.query_params, "page", 1, None)
        page_size = _query_int(request.query_params, "page_size", 1, MAX_PAGE_SIZE)
    except ValueError as exc:
        return _detail(400, str(exc))
    body = fake._status(request.path_params["job_id"], page, page_size or DEFAULT_PAGE_SIZE)
    if body is None:
        return _detail(404, "Job not found")
    return Response(body, media_type="application/json")


async def _cancel(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    if not fake._authorized(request.headers.get("authorization")):
        return _unauthorized()
    status, body = fake._cancel(request.path_params["job_id"])
    return JSONResponse(body, status)


async def _credits(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    if not fake._authorized(request.headers.get("authorization")):
        return _unauthorized()
    return JSONResponse({"credits": fake._remaining_credits()})


# ---- control endpoints: no auth, never faulted


async def _control_create(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    try:
        knobs = await _json_object(request, empty_ok=True)
        job_id = fake.create_job(**knobs)
    except (TypeError, ValueError) as exc:
        return _detail(400, str(exc))
    return JSONResponse({"job_id": job_id})


async def _control_bulk(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    try:
        knobs = await _json_object(request, empty_ok=False)
        count = knobs.pop("count", None)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        job_ids = fake.create_jobs(count, **knobs)
    except (TypeError, ValueError) as exc:
        return _detail(400, str(exc))
    return JSONResponse({"job_ids": job_ids})


async def _control_job(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    try:
        return JSONResponse(fake.job_info(request.path_params["job_id"]))
    except KeyError:
        return _detail(404, "Job not found")


async def _control_stats(request: Request) -> Response:
    return JSONResponse(request.app.state.fake.stats())


async def _control_faults(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    try:
        return JSONResponse(fake.set_faults(**await _json_object(request, empty_ok=True)))
    except ValueError as exc:
        return _detail(400, str(exc))


async def _control_keys(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    try:
        body = await _json_object(request, empty_ok=False)
    except ValueError as exc:
        return _detail(400, str(exc))
    keys = body.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return _detail(400, "keys must be a list of strings or null")
    fake.set_valid_keys(keys)
    return JSONResponse({"keys": keys})


async def _control_account(request: Request) -> Response:
    fake: FakeClado = request.app.state.fake
    try:
        body = await _json_object(request, empty_ok=False)
    except ValueError as exc:
        return _detail(400, str(exc))
    credits = body.get("credits")
    if isinstance(credits, bool) or not isinstance(credits, int):
        return _detail(400, f"credits must be an integer, got {credits!r}")
    fake.set_account_credits(credits)
    return JSONResponse({"credits": fake._remaining_credits()})


async def _control_reset(request: Request) -> Response:
    request.app.state.fake.reset()
    return JSONResponse({"reset": True})


async def _http_error(request: Request, exc: Exception) -> Response:
    # FastAPI-style JSON bodies for unknown routes and methods, like the real service.
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


def create_app(fake: FakeClado | None = None) -> Starlette:
    """The ASGI app serving `fake` (a fresh FakeClado when omitted) as ``app.state.fake``."""
    fake = fake if fake is not None else FakeClado()
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideInjectedDrops) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_HideInjectedDrops())
    app = Starlette(
        routes=[
            Route(_JOBS_PREFIX, _initiate, methods=["POST"]),
            Route(_JOBS_PREFIX + "/{job_id}", _status, methods=["GET"]),
            Route(_JOBS_PREFIX + "/{job_id}/cancel", _cancel, methods=["POST"]),
            Route("/api/credits", _credits, methods=["GET"]),
            Route("/_fake/jobs", _control_create, methods=["POST"]),
            Route("/_fake/jobs/bulk", _control_bulk, methods=["POST"]),
            Route("/_fake/jobs/{job_id}", _control_job, methods=["GET"]),
            Route("/_fake/stats", _control_stats, methods=["GET"]),
            Route("/_fake/faults", _control_faults, methods=["POST"]),
            Route("/_fake/keys", _control_keys, methods=["POST"]),
            Route("/_fake/account", _control_account, methods=["POST"]),
            Route("/_fake/reset", _control_reset, methods=["POST"]),
        ],
        middleware=[Middleware(_FaultInjector, fake=fake)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.fake = fake
    return app


def serve(host: str = "127.0.0.1", port: int = 8900, *, log_level: str = "warning") -> None:
    """Run the simulator in the foreground until interrupted."""
    print(f"fake Clado API listening on http://{host}:{port}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(), host=host, port=port, log_level=log_level)


class ThreadedFakeApi:
    """``with ThreadedFakeApi(fake) as server:`` serves `fake` on ``server.base_url`` from a
    background thread of this process until exit (tests and the demo).

    `log_config` is uvicorn's: its default gives uvicorn its own stderr handlers; None leaves
    uvicorn's loggers to propagate to the root logger (the demo sends them to its log file).
    """

    def __init__(
        self,
        fake: FakeClado | None = None,
        *,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        log_config: dict[str, Any] | None = uvicorn.config.LOGGING_CONFIG,
    ) -> None:
        self.fake = fake if fake is not None else FakeClado()
        self.host = host
        self.port = 0
        self._timeout = timeout
        self._log_config = log_config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url

    def start(self) -> ThreadedFakeApi:
        # Binding port 0 ourselves and handing uvicorn the socket leaves no window in which
        # another process could take the port between choosing and binding it. The explicit
        # IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
        # without it every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.fake),
            log_level="warning",
            log_config=self._log_config,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-clado-api", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self._timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"fake Clado API did not start on {self.base_url}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(self._timeout)
        self._server = self._thread = None

    def __enter__(self) -> ThreadedFakeApi:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
