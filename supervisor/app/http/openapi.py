"""The OpenAPI document, generated from the route table and the models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from supervisor.app.http.endpoints import ENDPOINTS, path_parameters
from supervisor.app.http.responses import BEARER_CHALLENGE, PROBLEM_JSON
from supervisor.app.views import ProblemView

# What the Location header of a created (201) or accepted (202) answer names.
_LOCATIONS = {201: "the created job: /v1/jobs/{job_id}", 202: "the queued submission: /v1/queue/{id}"}


@functools.cache  # the routes and models are fixed at import: build it once (callers only read it)
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document: request bodies as validated, answers as serialized, every
    model once under components/schemas (3.1 schemas are JSON Schema 2020-12, as pydantic's)."""
    requests = {e.body for e in ENDPOINTS if e.body is not None}
    answers = {model for e in ENDPOINTS for model in e.answers.values()} | {ProblemView}
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in sorted(requests, key=lambda m: m.__name__)),
        *((model, "serialization") for model in sorted(answers, key=lambda m: m.__name__)),
    ]
    refs, top = models_json_schema(wanted, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {
        "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format"}}}},
    }
    for e in ENDPOINTS:
        operation: dict[str, Any] = {"operationId": e.handler, "responses": {}}
        if e.authenticated:
            operation["security"] = [{"bearer": []}]
        parameters = [*path_parameters(e.path), *e.parameters]
        if parameters:
            operation["parameters"] = parameters
        if e.body is not None:
            operation["requestBody"] = {"required": e.body_required, **_json(refs[(e.body, "validation")])}
        for status, model in e.answers.items():
            response = {"description": model.__doc__ or model.__name__, **_json(refs[(model, "serialization")])}
            if status in _LOCATIONS:
                response["headers"] = {"Location": _header(_LOCATIONS[status])}
            operation["responses"][str(status)] = response
        problem = _json(refs[(ProblemView, "serialization")], PROBLEM_JSON)
        for status in e.error_statuses:
            response = {"description": "problem details (RFC 9457)", **problem}
            if status == 401:
                response["headers"] = {"WWW-Authenticate": _header(BEARER_CHALLENGE)}
            operation["responses"][str(status)] = response
        paths.setdefault(e.path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "clado-supervisor admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": top["$defs"],
        },
        "paths": paths,
    }


def _json(schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {"content": {media_type: {"schema": schema}}}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}
