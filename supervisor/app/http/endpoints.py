"""The admin API's routes, one table for the app and its OpenAPI document."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.adapters.store import DELIVERY_STATES
from supervisor.app import inputs
from supervisor.app.inputs import Body, CancelRequest, ContinueRequest, SubmitRequest, TrackRequest
from supervisor.app.views import (
    BudgetsView,
    ContinueResult,
    DeliveryPage,
    DeliveryView,
    HealthView,
    JobDetailView,
    JobPage,
    JobView,
    QueueItemView,
    QueuePage,
    ReadinessView,
    RedeliverResult,
    SubmitResult,
    TrackResult,
    View,
)
from supervisor.core.states import State
from supervisor.service.queue import STATES as SUBMISSION_STATES


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: str  # the AdminApi method
    answers: Mapping[int, type[View]]  # status → the body's view
    error_statuses: tuple[int, ...] = ()  # statuses answered with problem details
    body: type[Body] | None = None
    body_required: bool = True
    parameters: tuple[dict[str, Any], ...] = field(default=())  # the query's
    authenticated: bool = True


# The pattern of each `{name}` a path has.
_PATH_PATTERNS = {
    "job_id": inputs.JOB_ID_PATTERN,
    "id": inputs.SUBMISSION_ID_PATTERN,
    "delivery_id": inputs.DELIVERY_ID_PATTERN,
}


def path_parameters(path: str) -> list[dict[str, Any]]:
    """The OpenAPI parameters of the `{name}`s in `path`."""
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": _PATH_PATTERNS[name]}}
        for name in re.findall(r"\{(\w+)\}", path)
    ]


def _repeatable(name: str, items: dict[str, Any], description: str) -> dict[str, Any]:
    """A query parameter given once per value (`?state=a&state=b`)."""
    schema = {"type": "array", "items": {"type": "string", **items}}
    return {"name": name, "in": "query", "style": "form", "explode": True, "schema": schema, "description": description}


PAGE_DEFAULT, PAGE_MAX = 100, 1000
_LIST_PARAMETERS = (
    {"name": "state", "in": "query", "schema": {"type": "string", "enum": [s.value for s in State]}},
    _repeatable("label", {"pattern": "^[^=]+=.*$"}, "KEY=VALUE; repeat it to require several labels"),
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": PAGE_DEFAULT},
        "description": "jobs per page",
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "the `next_cursor` of the previous page (with the same state and label filters)",
    },
)
_QUEUE_PARAMETERS = (
    _repeatable("state", {"enum": list(SUBMISSION_STATES)}, "repeat it for several states; all submissions without it"),
)
_DELIVERY_PARAMETERS = ({"name": "state", "in": "query", "schema": {"type": "string", "enum": list(DELIVERY_STATES)}},)
BODY_ERRORS = (400, 401, 403, 413, 415, 422)

ENDPOINTS = (
    Endpoint("GET", "/healthz", "healthz", {200: HealthView}, (503,), authenticated=False),
    Endpoint("GET", "/readyz", "readyz", {200: ReadinessView, 503: ReadinessView}, authenticated=False),
    Endpoint("GET", "/v1/jobs", "list_jobs", {200: JobPage}, (401, 403, 422, 503), parameters=_LIST_PARAMETERS),
    Endpoint("POST", "/v1/jobs", "track", {201: TrackResult, 200: TrackResult}, (*BODY_ERRORS, 503), TrackRequest),
    Endpoint("GET", "/v1/jobs/{job_id}", "show_job", {200: JobDetailView}, (401, 403, 404, 422, 503)),
    Endpoint(
        "POST",
        "/v1/jobs/{job_id}/cancel",
        "cancel",
        {200: JobView},
        (*BODY_ERRORS, 404, 502, 503),
        body=CancelRequest,
        body_required=False,  # an empty body is a cancel without a reason
    ),
    Endpoint(
        "POST",
        "/v1/jobs/{job_id}/continue",
        "continue_job",
        {200: ContinueResult},
        (*BODY_ERRORS, 402, 404, 409, 502, 503),
        body=ContinueRequest,
        body_required=False,  # an empty body asks for the default 30 more
    ),
    Endpoint(
        "POST",
        "/v1/submit",
        "submit",
        {201: SubmitResult, 202: QueueItemView},
        (*BODY_ERRORS, 402, 409, 502, 503),
        SubmitRequest,
    ),
    Endpoint("GET", "/v1/queue", "list_queue", {200: QueuePage}, (401, 403, 422, 503), parameters=_QUEUE_PARAMETERS),
    Endpoint("GET", "/v1/budgets", "list_budgets", {200: BudgetsView}, (401, 403, 503)),
    Endpoint("GET", "/v1/queue/{id}", "show_queued", {200: QueueItemView}, (401, 403, 404, 422, 503)),
    Endpoint("POST", "/v1/queue/{id}/cancel", "cancel_queued", {200: QueueItemView}, (401, 403, 404, 409, 422, 503)),
    Endpoint(
        "GET", "/v1/deliveries", "list_deliveries", {200: DeliveryPage}, (401, 403, 422, 503),
        parameters=_DELIVERY_PARAMETERS,
    ),
    Endpoint("GET", "/v1/deliveries/{delivery_id}", "show_delivery", {200: DeliveryView}, (401, 403, 404, 422, 503)),
    Endpoint(
        "POST", "/v1/deliveries/{delivery_id}/redeliver", "redeliver", {200: RedeliverResult},
        (401, 403, 404, 422, 503),
    ),
)  # fmt: skip
