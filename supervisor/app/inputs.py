"""The input rules of the use cases, one place for the CLI and the admin API alike.

Each rule returns the value as the use case wants it or raises BadInput naming the field,
with the same words whichever door the input came through. The request bodies of the admin
API are here too: their bounds are these constants, so the OpenAPI document states them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from supervisor.app.errors import BadInput, InvalidJson
from supervisor.config import check_labels, parse_duration, parse_label
from supervisor.core.states import State

# The largest value an INTEGER column holds on every supported database (PostgreSQL int4).
MAX_DB_INT = 2**31 - 1
MIN_LIMIT, MAX_LIMIT = 1, 1000  # results asked of one submission (the API's own bound)
MAX_QUERY = 10_000
MAX_REASON = 500
MAX_TRACK_IDS = 10_000
# What `clado.validate_job_id` accepts, published in the OpenAPI document. Requests are
# checked by validate_job_id itself, for its clearer message.
JOB_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
MAX_PRIORITY = 1000  # a submission's priority: -1000 to 1000, higher first
SUBMISSION_ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def labels(value: Mapping[str, str]) -> dict[str, str]:
    try:
        return check_labels(dict(value))
    except ValueError as exc:
        raise BadInput(str(exc), field="labels") from None


def label_args(texts: Iterable[str]) -> dict[str, str]:
    """`["team=growth", …]` (the CLI's --label) → a labels mapping."""
    parsed: dict[str, str] = {}
    for text in texts:
        try:
            key, value = parse_label(text)
        except ValueError as exc:
            raise BadInput(str(exc), field="label") from None
        parsed[key] = value
    return parsed


def label_filter(texts: Iterable[str]) -> dict[str, str]:
    """`label=KEY=VALUE` query filters; any key, as a filter that matches nothing is harmless."""
    wanted: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep:
            raise BadInput("label filters look like label=KEY=VALUE")
        wanted[key] = value
    return wanted


def duration(field: str, value: str | int | timedelta | None) -> timedelta | None:
    """A duration with a unit ("90s", "2h") or seconds, as a number or as digits."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise BadInput(str(exc), field=field) from None


def count(field: str, value: int | None, low: int, high: int) -> int | None:
    # bool is an int to Python, but `true` for a credit limit is a mistake, not 1.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise BadInput(f"must be a whole number from {low} to {high}", field=field)
    return value


def count_arg(field: str, text: str) -> int:
    """A whole number typed by a person (a form field), as `count` checks it later."""
    if not text.strip().isdigit():
        raise BadInput("must be a whole number", field=field)
    return int(text)


def text(field: str, value: str | None, *, max_length: int, required: bool = False) -> str | None:
    """Free text that goes to the database and the API: no control characters (PostgreSQL
    refuses NUL in text, and a query is sent upstream before it is stored)."""
    if value is None:
        if required:
            raise BadInput("is required", field=field)
        return None
    if required and not value.strip():
        raise BadInput("must not be blank", field=field)
    if len(value) > max_length:
        raise BadInput(f"at most {max_length} characters", field=field)
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value):
        raise BadInput("control characters are not allowed", field=field)
    return value


def state(value: str | None) -> State | None:
    if value is None:
        return None
    try:
        return State(value)
    except ValueError:
        raise BadInput(f"unknown state {value!r}") from None


def submission_id(value: str) -> str:
    """A queue id (a UUID), checked before it reaches the database."""
    if not isinstance(value, str) or not re.fullmatch(SUBMISSION_ID_PATTERN, value):
        raise BadInput("a queue id is a UUID, as `submit --queue` printed it", field="id")
    return value


def state_of(what: str, value: str, known: Iterable[str]) -> str:
    """A submission's or a delivery's state filter (`what`), one of `known`."""
    if value not in known:
        raise BadInput(f"unknown {what} state {value!r} (known: {', '.join(known)})", field="state")
    return value


DELIVERY_ID_PATTERN = r"^msg_[0-9a-f]{32}$"


def delivery_id(value: str) -> str:
    """A webhook delivery id (`msg_` and 32 hex digits), checked before the database."""
    if not isinstance(value, str) or not re.fullmatch(DELIVERY_ID_PATTERN, value):
        raise BadInput("a delivery id is msg_ and 32 hex digits, as `webhooks list` shows it", field="id")
    return value


# -- the admin API's request bodies (unknown fields are rejected) ------------------------------

Labels = Annotated[dict[str, str], Field(default_factory=dict)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TrackRequest(Body):
    job_ids: list[str] = Field(
        min_length=1,
        max_length=MAX_TRACK_IDS,
        json_schema_extra={"items": {"type": "string", "pattern": JOB_ID_PATTERN}},
    )
    labels: Labels
    policy: str | None = None
    max_runtime: str | int | None = Field(default=None, description='A duration: "90s", "15m", "2h" or seconds.')
    max_credits: int | None = Field(default=None, ge=1, le=MAX_DB_INT)


class SubmitRequest(Body):
    query: str = Field(min_length=1, max_length=MAX_QUERY, description="Not blank; no control characters.")
    limit: int = Field(default=30, ge=MIN_LIMIT, le=MAX_LIMIT)
    labels: Labels
    policy: str | None = None
    queue: bool | None = Field(default=None, description="Queue it when it does not fit now (default: [scheduler]).")
    priority: int = Field(default=0, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="Higher starts first.")
    expires_after: str | int | None = Field(default=None, description='Queued no longer than this: "2h" or seconds.')


class CancelRequest(Body):
    reason: str | None = Field(default=None, max_length=MAX_REASON, description="No control characters.")


class ContinueRequest(Body):
    additional: int = Field(default=30, ge=MIN_LIMIT, le=MAX_LIMIT, description="More results to ask for.")


B = TypeVar("B", bound=Body)


def body(model: type[B], data: Any) -> B:
    """A request body from parsed JSON; the first problem as `field: message`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadInput(message, field=where) from None


def json_body(raw: bytes) -> Any:
    """Parsed JSON that every database and answer can hold."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise InvalidJson("the body is not valid JSON") from None
    try:
        # A lone surrogate ("\ud800") parses, but no database or JSON answer can hold it.
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidJson("the body holds text that is not valid Unicode") from None
    return data
