"""Reading the Clado API's answers, pure: no I/O, no clock (the caller passes the time).

It reads every shape the public docs show (they are of different ages and disagree):
`created_at` as epoch seconds, epoch milliseconds, a digit string or ISO 8601; the result
count from the largest of `final_results_count`, `total_results`, `pagination.total_results`
and `total`; statuses in any case, with an unofficial SDK's spellings mapped to the documented
names and unknown ones kept as running jobs; any 2xx to a cancel. Server text is cleaned of
control characters and bounded before it reaches a log line or an error message.
"""

from __future__ import annotations

import json as jsonlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from supervisor.adapters.clado.errors import InvalidJobId, NoStatus, unreadable
from supervisor.core.states import FINAL_STATUSES, REMOTE_STATUSES, normalize_status

# UUIDs and similar opaque ids: ASCII letters, digits, '-' and '_', 1 to 128 characters.
# Starts with a letter or digit, so an id is never mistaken for a command-line option.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", re.ASCII)
# A hold-off asked for by the API is capped: a broken header must not park the client for a day.
HOLD_OFF_MAX = 300.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# The count fields of a status body, in every version of the docs (`total` is the oldest).
COUNT_FIELDS = ("final_results_count", "total_results", "pagination.total_results", "total")
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
# created_at outside [the API's launch, now + clock skew] is a broken value, not a job's age.
_API_EPOCH = datetime(2023, 1, 1, tzinfo=UTC).timestamp()
_CLOCK_SKEW = 300.0
_EPOCH_MS_FROM = 1e11  # as seconds that is the year 5138: a larger number is milliseconds
_STATUS_MAX = 16  # the remote_status column is String(16)


def validate_job_id(job_id: str) -> str:
    """Reject anything that is not a plain id before it can touch a URL path."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        shown = job_id if isinstance(job_id, str) and len(job_id) <= 40 else f"{str(job_id)[:40]}…"
        raise InvalidJobId(
            f"invalid job id {shown!r}: use 1-128 ASCII letters, digits, '-' or '_', starting with a letter or digit"
        )
    return job_id


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str  # pending | searching | processing | completed | error | cancelled | (unknown)
    # None when the answer told no count and no alternative found one (see
    # CladoClient.status): the job keeps its last credits, and may turn blind.
    result_count: int | None
    created_at: datetime | None
    message: str = ""
    # False for a status outside the documented list (aliases included): `status` is then
    # the API's own word (lowercased, at most 16 characters) and the job counts as running.
    recognized: bool = True
    # Where the count came from: "field" (the documented count fields), "probe" (pages of one
    # result, for an answer with `pagination` but no count), "unpaged", "page_walk", or
    # "field:<name>" (a count field of another form); None with no count.
    count_source: str | None = "field"

    @property
    def is_final(self) -> bool:
        return self.recognized and self.status in FINAL_STATUSES


@dataclass(frozen=True)
class CancelResult:
    accepted: bool  # any 2xx: the API took the cancel; False: refused (success false) or 409
    message: str


@dataclass(frozen=True)
class Credits:
    credits: int
    last_topup_at: datetime | None


def remote_status(body: dict[str, Any]) -> tuple[str, bool]:
    """(status, recognized). An unknown status is kept (cleaned, bounded) for a running job,
    not garbage; a missing one is."""
    raw = body.get("status")
    if not isinstance(raw, str) or not raw.strip():
        raise unreadable(f"status body has no status (got {shown(raw)})", NoStatus)
    name = normalize_status(raw)
    if name in REMOTE_STATUSES:
        return name, True
    return clean(name, _STATUS_MAX), False


def _count_value(value: Any) -> int | None:
    """A count: a non-negative integer, a whole float or a digit string ("302")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, int) and value >= 0:
        return value
    return None


def field_count(body: dict[str, Any]) -> int | None:
    """The largest count the body carries in any of its count fields (the largest is what is
    billed), or None when none of them is readable."""
    pagination = body.get("pagination")
    paged = pagination.get("total_results") if isinstance(pagination, dict) else None
    values = (body.get("final_results_count"), body.get("total_results"), paged, body.get("total"))
    counts = [count for value in values if (count := _count_value(value)) is not None]
    return max(counts) if counts else None


# Other forms a count field has taken in APIs of this kind: a name with one of these words.
_COUNT_WORDS = re.compile(r"count|total", re.IGNORECASE)
_KNOWN_COUNTS = frozenset({"final_results_count", "total_results", "total"})


def other_count(body: dict[str, Any]) -> tuple[str, int] | None:
    """(name, value) of the largest count in a field of another form than the documented
    ones (`results_count`, `totalCount`, `meta.total` …), top level or one object down; None
    when there is none. The last resort of a body with no documented count field."""
    found: list[tuple[int, str]] = []
    for key, value in body.items():
        if isinstance(value, dict):
            for inner, nested in value.items():
                count = _count_value(nested) if _COUNT_WORDS.search(str(inner)) else None
                if count is not None and not (key == "pagination" and inner == "total_results"):
                    found.append((count, f"{key}.{inner}"))
        elif key not in _KNOWN_COUNTS and _COUNT_WORDS.search(str(key)):
            count = _count_value(value)
            if count is not None:
                found.append((count, str(key)))
    if not found:
        return None
    count, name = max(found)
    return clean(name, 40), count


_DECODER = jsonlib.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def leading_fields(prefix: bytes) -> dict[str, Any]:
    """The top-level fields of a JSON object cut short (a body over the bound), in order, up
    to the first one the prefix does not hold whole (usually `results`): an oversized answer
    whose counts come first is still read, without ever holding more than the prefix."""
    text = prefix.decode("utf-8", "ignore")  # the cut may fall inside a character
    fields: dict[str, Any] = {}
    at = _SPACE.match(text).end()  # type: ignore[union-attr]  # the pattern matches empty text
    if text[at : at + 1] != "{":
        return fields
    at += 1
    while True:
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        if text[at : at + 1] != '"':
            return fields
        try:
            key, at = _DECODER.raw_decode(text, at)
            at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
            if text[at : at + 1] != ":":
                return fields
            value, at = _DECODER.raw_decode(text, _SPACE.match(text, at + 1).end())  # type: ignore[union-attr]
        except (ValueError, RecursionError):
            return fields  # the field the prefix cuts: everything before it is whole
        fields[key] = value
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        if text[at : at + 1] != ",":
            return fields
        at += 1


def page_is_partial(body: dict[str, Any], page_size: int) -> bool:
    """True when `results` is one page of several: its length is not the job's count."""
    pagination = body.get("pagination")
    results = body.get("results")
    if not isinstance(pagination, dict) or not isinstance(results, list):
        return False
    has_next = pagination.get("has_next")
    if has_next is True:
        return True
    # No word on a next page and a full page: there may well be more.
    return has_next is not False and len(results) >= page_size


# The largest page the status endpoint serves (page_size 1-100): reading a job's results
# takes the fewest requests at it.
RESULTS_PAGE_SIZE = 100


@dataclass(frozen=True)
class ResultsPage:
    """One page of a job's results, as `results_page` read it."""

    status: str
    recognized: bool
    results: list[Any]  # the API's result objects, as they came: the customer's data
    count: int | None  # the job's result count, when the body says it
    more: bool  # a later page may hold more results

    @property
    def is_final(self) -> bool:
        return self.recognized and self.status in FINAL_STATUSES


def results_page(body: dict[str, Any], page_size: int) -> ResultsPage:
    """A status body asked for with `page` and `page_size`, read as a page of results.

    A page with more results than asked for is an API that ignores `page_size`: it is every
    result, and no later page is asked for (it would repeat them). A body without
    `pagination` (the docs promise it with `page`) and a full page may have a next one."""
    status, recognized = remote_status(body)
    results = body.get("results")
    if not isinstance(results, list):
        raise unreadable("status body has no results list")
    if len(results) > page_size:
        more = False
    elif isinstance(body.get("pagination"), dict):
        more = page_is_partial(body, page_size)
    else:
        more = len(results) == page_size
    return ResultsPage(status=status, recognized=recognized, results=results, count=field_count(body), more=more)


def _epoch_seconds(value: Any) -> float | None:
    """Seconds since the epoch from an instant in any shape the docs show, or None.

    Integers (or digit strings) above 1e11 are milliseconds. ISO 8601 without an offset is
    UTC. Absurd magnitudes come back clamped (still absurd), never as an overflow.
    """
    if isinstance(value, str):
        text = value.strip()
        if _DIGITS.fullmatch(text):
            value = int(text)
        elif len(text) > 64:
            return None
        else:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            # Aware subtraction, not astimezone: 0001-01-01T00:00:00+01:00 must not overflow.
            return (parsed - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    number = max(-1e15, min(1e15, value))  # far outside any plausible window either way
    return number / 1000 if number > _EPOCH_MS_FROM else float(number)


def instant(value: Any) -> datetime | None:
    """An instant read with no sanity window (for informational fields)."""
    seconds = _epoch_seconds(value)
    try:
        return datetime.fromtimestamp(seconds, UTC) if seconds is not None else None
    except (OverflowError, OSError, ValueError):
        return None


def created_at(value: Any, now: float) -> tuple[datetime | None, str | None]:
    """(when the job was created, None), or (None, why the value is ignored) for nonsense,
    or (None, None) when the body does not say. `now` is the wall clock's epoch seconds."""
    if value is None or value == "":
        return None, None  # the newer docs show no created_at at all
    seconds = _epoch_seconds(value)
    if seconds is None:
        return None, "unreadable"
    if seconds < _API_EPOCH:
        return None, "before the API existed (2023-01-01)"
    if seconds > now + _CLOCK_SKEW:
        return None, "in the future"
    return datetime.fromtimestamp(seconds, UTC), None


def _seconds(value: Any) -> float | None:
    """A non-negative finite number of seconds (a number or a numeric string), else None;
    an infinite one is the cap."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, HOLD_OFF_MAX)


def retry_after_header(headers: httpx.Headers, now: float) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (`now`: the wall clock's epoch seconds)."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _seconds(max(0.0, when.timestamp() - now))


def retry_after_body(content: bytes) -> float | None:
    """`retry_after` from a 429 body: `{"error": "Rate limit exceeded", "retry_after": 60}`."""
    body = json_or_none(content)
    return _seconds(body.get("retry_after")) if isinstance(body, dict) else None


def clean(text: str, limit: int) -> str:
    """Server text fit for a log line: no control characters (no forged lines), bounded."""
    return _CONTROL.sub(" ", text)[:limit]


def shown(value: Any) -> str:
    """A server value, bounded and clean, for a log line or an error message."""
    return clean(repr(value)[:40], 40)


def json_or_none(content: bytes) -> Any:
    """The parsed body, or None when it is not JSON (or is JSON null).

    Returns rather than raises, so the decode error (whose `doc` holds the whole body) is
    never chained to the exception the caller raises.
    """
    try:
        return jsonlib.loads(content)
    except (ValueError, RecursionError):
        return None


def error_message(content: bytes, secret: str = "") -> str:
    """The error's text for an exception message, without the key (some servers echo it)."""
    body = json_or_none(content)
    if body is None:
        text = content.decode("utf-8", "replace")
    elif isinstance(body, dict):
        text = str(body.get("detail") or body.get("message") or body.get("error") or "")
    else:
        return ""
    if secret:
        text = text.replace(secret, "[REDACTED]")
    return clean(text, 200)
