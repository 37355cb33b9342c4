"""The simulator's job model: scenario knobs, a job's life as a function of time, its status body.

A job is a handful of numbers. Its status and result count are computed from the clock when
someone looks (never advanced by a timer), and its results are generated from ``job_id`` and
index on demand, so looking at a job costs the same with 10 or 10,000 of them.

A job lives in rounds: the first starts at creation; a continue (``/continue`` or ``/more``) on a
completed job starts another from that moment, with the same id, from the results it already has.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PENDING = "pending"
SEARCHING = "searching"
PROCESSING = "processing"
COMPLETED = "completed"
ERROR = "error"
CANCELLED = "cancelled"
FINAL_STATUSES = frozenset({COMPLETED, ERROR, CANCELLED})

MESSAGES = {
    PENDING: "Deep research job is queued",
    SEARCHING: "Searching for matching profiles",
    PROCESSING: "Validating and processing found profiles",
    COMPLETED: "Deep research completed successfully",
    ERROR: "Deep research job failed",
    CANCELLED: "Deep research job was cancelled",
}
# How the cancel endpoint words each final status ("Cannot cancel job: already completed").
ALREADY = {COMPLETED: "completed", CANCELLED: "cancelled", ERROR: "failed"}

MAX_LIMIT = 1000  # the most an initiate or a continue may ask for
MAX_RESULTS_PER_JOB = 1000  # the docs: continues append "up to about 1,000" results per job
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 25  # the documented default when `page` is given
DEFAULT_ADDITIONAL = 30  # the documented default of additionalLimit / additional_limit

# Where a status body carries the result count. `total_results` (the default) is what the newer
# docs show: `total_results` and `final_results_count`, and `pagination.total_results` when paged.
# `total` is the older docs' single field; `string` is the default shape with digit strings;
# `results_only` has no count at all (the client must count `results`).
# `none` is an API that drifted: no count field and no `pagination` either (`results` holds the
# asked-for rows only, so its length is one page's, never the job's count).
COUNT_FIELDS = (
    "total_results", "final_results_count_only", "pagination_only", "results_only", "total", "string", "none",
)  # fmt: skip
# How a status body carries `created_at`. The older docs show integer epoch seconds (1678886400),
# the newer ones none at all; the rest are shapes a client is told to accept.
CREATED_AT_FORMATS = ("epoch_s", "epoch_ms", "epoch_s_string", "iso", "absent")

# Added to every elapsed time so that a test clock set exactly on a boundary (say the instant the
# 10th result is due) lands on its far side despite float rounding in `elapsed * rate`.
_EPSILON = 1e-6


# --------------------------------------------------------------------------------------------
# Scenario knobs: each parser accepts a native value or the string form a query token carries


def number(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        result = float(value)  # type: ignore[arg-type]  # str from a query token, or a number
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return result


def count(name: str, value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(name: str, value: object) -> str:
        if value in choices:
            return str(value)
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    return parse


def _http_code(choices: tuple[int, ...]) -> Callable[[str, object], int]:
    def parse(name: str, value: object) -> int:
        code = count(name, value)
        if code in choices:
            return code
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")

    return parse


def _status_name(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or value in MESSAGES:
        raise ValueError(f"{name} must be a status name outside {', '.join(MESSAGES)}; got {value!r}")
    return value


def _literal(name: str, value: object) -> object:
    # Served verbatim, so it must survive JSON: no NaN or infinities.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be JSON-serializable, got {value!r}")
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"{name} must be a string, a number or a boolean, got {value!r}")
    return value


_KNOB_PARSERS: dict[str, Callable[[str, object], object]] = {
    "rate": number,
    "step": count,
    "queue_for": number,
    "process_for": number,
    "stall_after": count,
    "max_results": count,
    "fail_after": number,
    "external_cancel_after": number,
    "vanish_after": number,
    "forbidden_after": number,
    "cancel_delay": number,
    "race": flag,
    "cancel_only_pending": flag,
    "cancel_ignored": flag,
    "accept_status": _http_code((200, 202)),
    "refuse_status": _http_code((200, 409)),
    "hide_created_at": flag,
    "created_at": _one_of(CREATED_AT_FORMATS),
    "created_at_value": _literal,
    "count_field": _one_of(COUNT_FIELDS),
    "running_status": _status_name,
    "bloat_mb": number,
    "flicker": flag,
    "hide_status": flag,
    "unpaged": flag,
    "max_page_size": count,
}
KNOBS = frozenset(_KNOB_PARSERS)


@dataclass(frozen=True, slots=True)
class Scenario:
    """How one job behaves. Times are seconds since the job was created unless noted."""

    # -- progress
    rate: float = 1.0  # results per second once searching
    step: int = 1  # results arrive this many at once (5: five every 5 / rate seconds)
    queue_for: float = 0.0  # time in `pending` before `searching`, at the start of every round
    process_for: float = 0.0  # time in `processing` after the last result, before `completed`
    stall_after: int | None = None  # results stop growing at this count; stays `searching`
    max_results: int = MAX_RESULTS_PER_JOB  # all this search can find; then `completed` early
    # -- interruptions
    fail_after: float | None = None  # becomes `error`, results frozen
    external_cancel_after: float | None = None  # cancelled by someone else, results frozen
    vanish_after: float | None = None  # the job is forgotten: 404 everywhere
    forbidden_after: float | None = None  # status answers 403 "not authorized to access this job"
    # -- the cancel endpoint
    cancel_delay: float = 0.0  # an accepted cancel takes effect this long after the call
    race: bool = False  # the first cancel call loses to completion ("already completed")
    cancel_only_pending: bool = False  # the docs' "only pending jobs can be cancelled": refused later
    cancel_ignored: bool = False  # accepted (success: true) and then never applied
    accept_status: int = 200  # the HTTP code of an accepted cancel: 200 or 202
    refuse_status: int = 200  # a refused cancel: 200 {success: false} (the docs' example) or 409
    # -- the status body's shape
    hide_created_at: bool = False  # the same as created_at=absent
    created_at: str = "epoch_s"  # CREATED_AT_FORMATS
    created_at_value: object = None  # when set, served as `created_at` verbatim (a hostile value)
    count_field: str = "total_results"  # COUNT_FIELDS
    running_status: str | None = None  # e.g. "in_progress": said instead of searching/processing
    bloat_mb: float = 0.0  # pads every status body to about this many MiB
    flicker: bool = False  # every other status answer shows one result fewer (a count that goes down)
    hide_status: bool = False  # no `status` field in the status body (an API that drifted)
    # -- what the status endpoint still allows (an answer with no count is counted by them)
    unpaged: bool = True  # False: a status call without `page` is answered 400 "page is required"
    max_page_size: int = MAX_PAGE_SIZE  # a larger page_size is answered 400

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, object]) -> Scenario:
        """Validate knobs given as native values or as strings; a null knob means its default."""
        unknown = sorted(set(knobs) - KNOBS)
        if unknown:
            raise ValueError(f"unknown scenario knob(s): {', '.join(unknown)}; known knobs: {', '.join(sorted(KNOBS))}")
        parsed: dict[str, Any] = {
            name: _KNOB_PARSERS[name](name, value) for name, value in knobs.items() if value is not None
        }
        return cls(**parsed)


_QUERY_TOKEN = re.compile(r"(?:^|\s)fake:(\S+)")


def knobs_from_query(query: str) -> dict[str, str]:
    """The scenario knobs embedded in a query as ``fake:key=value,key=value`` tokens."""
    knobs: dict[str, str] = {}
    for match in _QUERY_TOKEN.finditer(query):
        for pair in match.group(1).split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"bad scenario token {pair!r} in query: expected fake:key=value,key=value")
            knobs[key] = value
    return knobs


def job_request(query: object, limit: object, company_urls: object) -> tuple[str, int, list[str] | None]:
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


def iso_utc(timestamp: float) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, e.g. 2023-11-14T22:13:20.750Z."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Jobs


@dataclass(slots=True, eq=False)
class Job:
    """One job. Elapsed times are seconds since creation, as `elapsed(now)` measures them."""

    job_id: str
    query: str
    limit: int  # the results asked for so far: the initiate's limit plus every continue's
    company_urls: list[str] | None
    scenario: Scenario
    created_at: float  # clock time
    round_start: float = 0.0  # elapsed time the current round began (0: the initiate's round)
    base: int = 0  # results the job had when the current round began
    rounds: int = 1
    cap: int = 0  # the most results the current round can reach
    done_at: float = math.inf  # elapsed time the current round completes on its own
    cancel_at: float | None = None  # elapsed time an accepted cancel takes effect
    cancel_requested_at: float | None = None  # clock time of the first accepted cancel
    forced: tuple[str, int] | None = None  # (status, results) fixed by a lost cancel race
    status_calls: int = 0  # requests handled (not faulted), per endpoint
    cancel_calls: int = 0
    continue_calls: int = 0
    cancel_call_times: list[float] = field(default_factory=list)  # clock times of the handled ones

    def __post_init__(self) -> None:
        self._schedule()

    @property
    def created_at_iso(self) -> str:
        return iso_utc(self.created_at)

    def _schedule(self) -> None:
        s = self.scenario
        target = min(self.limit, s.max_results)
        self.cap = target if s.stall_after is None else min(target, s.stall_after)
        if self.cap < target or s.rate == 0:
            self.done_at = math.inf  # a stalled job never completes
        else:
            self.done_at = self.round_start + s.queue_for + (self.cap - self.base) / s.rate + s.process_for

    def elapsed(self, now: float) -> float:
        return now - self.created_at + _EPSILON

    def vanished(self, elapsed: float) -> bool:
        vanish_after = self.scenario.vanish_after
        return vanish_after is not None and elapsed >= vanish_after

    def forbidden(self, elapsed: float) -> bool:
        forbidden_after = self.scenario.forbidden_after
        return forbidden_after is not None and elapsed >= forbidden_after

    def searched_for(self, elapsed: float) -> float:
        """Seconds the current round has been searching (<= 0 while pending)."""
        return elapsed - self.round_start - self.scenario.queue_for

    def count_at(self, elapsed: float) -> int:
        searching_for = self.searched_for(elapsed)
        if searching_for <= 0:
            return self.base
        found = int(searching_for * self.scenario.rate)
        step = max(1, self.scenario.step)
        return min(self.cap, self.base + found // step * step)

    def state_at(self, elapsed: float) -> tuple[str, int]:
        """(status, results so far) at `elapsed` seconds after creation."""
        if self.forced is not None:
            return self.forced
        s = self.scenario
        if s.vanish_after is not None:
            # A forgotten job stops where it was: hidden from the API, still billed.
            elapsed = min(elapsed, s.vanish_after)
        stop_status, stop_at = "", math.inf
        for status, at in ((ERROR, s.fail_after), (CANCELLED, s.external_cancel_after), (CANCELLED, self.cancel_at)):
            # One that came while the job sat completed between rounds changed nothing.
            if at is not None and self.round_start <= at < stop_at:
                stop_status, stop_at = status, at
        # An interruption only matters if it comes before the job finished on its own.
        if stop_at <= elapsed and stop_at < self.done_at:
            return stop_status, self.count_at(stop_at)
        if self.searched_for(elapsed) < 0:
            return PENDING, self.base
        if elapsed >= self.done_at:
            return COMPLETED, self.cap
        results = self.count_at(elapsed)
        return (SEARCHING if results < min(self.limit, s.max_results) else PROCESSING), results

    def room(self, results: int) -> int:
        """How many more results a continue could still find."""
        return max(0, min(MAX_RESULTS_PER_JOB, self.scenario.max_results) - results)

    def reopen(self, now: float, results: int, additional: int) -> None:
        """A continue: the same job goes back to `pending` and then appends up to `additional`."""
        self.forced = None
        self.cancel_at = None  # a cancel still propagating when the last round completed is moot
        self.round_start = now - self.created_at  # without the epsilon, which `elapsed` adds
        self.base = results
        self.limit = results + additional
        self.rounds += 1
        self._schedule()


# --------------------------------------------------------------------------------------------
# The status body

_FIRST = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro",
          "Ines", "Jamal", "Kira", "Luca", "Maya", "Noah", "Olu", "Priya")  # fmt: skip
_LAST = ("Adams", "Brooks", "Chen", "Diaz", "Eze", "Fischer", "Garcia", "Haddad",
         "Ito", "Jones", "Kim", "Lopez", "Mensah", "Novak", "Okafor", "Patel")  # fmt: skip
_TITLES = ("Software Engineer", "Senior Software Engineer", "Staff Engineer", "Data Scientist",
           "Engineering Manager", "ML Engineer", "Product Manager", "CTO")  # fmt: skip
_COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries",
              "Wayne Enterprises", "Soylent")  # fmt: skip


def person(job_id: str, index: int) -> dict[str, str]:
    """Result `index` of a job: the same every time, never stored."""
    h = zlib.crc32(f"{job_id}:{index}".encode())
    first, last = _FIRST[h & 15], _LAST[(h >> 4) & 15]
    return {
        "name": f"{first} {last}",
        "title": _TITLES[(h >> 8) & 7],
        "company": _COMPANIES[(h >> 11) & 7],
        "linkedin_url": f"https://www.linkedin.com/in/{first}-{last}-{job_id[:8]}-{index}".lower(),
    }


def _created_at(job: Job) -> object:
    """The `created_at` value the scenario asks for, or None to leave the field out."""
    s = job.scenario
    if s.created_at_value is not None:
        return s.created_at_value
    shape = "absent" if s.hide_created_at else s.created_at
    if shape == "epoch_s":
        return int(job.created_at)  # whole seconds, truncated like int(time.time())
    if shape == "epoch_ms":
        return int(job.created_at * 1000)
    if shape == "epoch_s_string":
        return str(int(job.created_at))
    if shape == "iso":
        return job.created_at_iso
    return None


def status_body(job: Job, status: str, results: int, page: int | None, page_size: int) -> bytes:
    """The status endpoint's JSON body, shaped by the job's scenario."""
    s = job.scenario
    shown = s.running_status if s.running_status and status in (SEARCHING, PROCESSING) else status
    body: dict[str, Any] = {"job_id": job.job_id, "status": shown, "message": MESSAGES[status]}
    if s.hide_status:
        del body["status"]
    counted: int | str = str(results) if s.count_field == "string" else results
    if s.count_field in ("total_results", "string"):
        body["total_results"] = counted
    if s.count_field in ("total_results", "string", "final_results_count_only"):
        body["final_results_count"] = counted
    if s.count_field == "total":
        body["total"] = counted
    start = 0 if page is None else (page - 1) * page_size
    stop = results if page is None else min(results, start + page_size)
    body["results"] = [person(job.job_id, i) for i in range(start, stop)]
    if page is not None and s.count_field != "none":
        pagination: dict[str, Any] = {"page": page, "page_size": page_size}
        if s.count_field in ("total_results", "string", "pagination_only"):
            pagination["total_results"] = counted
            pagination["total_pages"] = math.ceil(results / page_size)
        pagination["has_next"] = start + page_size < results
        pagination["has_prev"] = page > 1
        body["pagination"] = pagination
    created_at = _created_at(job)
    if created_at is not None:
        body["created_at"] = created_at
    encoded = json.dumps(body, separators=(",", ":")).encode()
    if s.bloat_mb:
        # Valid JSON of the asked size: a client must bound what it reads, not parse it all.
        padding = max(0, int(s.bloat_mb * 2**20) - len(encoded) - len(',"debug":""'))
        encoded = encoded[:-1] + b',"debug":"' + b"x" * padding + b'"}'
    return encoded
