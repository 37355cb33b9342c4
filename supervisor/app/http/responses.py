"""The admin API's answers: JSON views, RFC 9457 problem details, and where a created thing is."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from starlette.responses import JSONResponse as _StarletteJSONResponse

from supervisor.app import errors
from supervisor.app.views import ProblemView, View


class JSONResponse(_StarletteJSONResponse):
    """UTF-8 JSON; text that cannot be UTF-8 (a lone surrogate stored from a non-UTF-8
    command line) is escaped instead of failing the whole answer."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


PROBLEM_JSON = "application/problem+json"
# RFC 6750's challenge: the scheme a client must use, on every 401.
BEARER_CHALLENGE = 'Bearer realm="clado-supervisor"'


def answer(view: View, status: int = 200, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(view.to_json(), status_code=status, headers=headers)


def error_response(error: errors.SupervisorError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    extra = dict(headers or {})
    if isinstance(error, errors.Unauthorized):
        extra["WWW-Authenticate"] = BEARER_CHALLENGE
    return JSONResponse(ProblemView.of(error).to_json(), error.status, headers=extra, media_type=PROBLEM_JSON)


def created(view: View, status: int, location: str) -> JSONResponse:
    """A 201 (or an accepted 202) with the `Location` of what it made."""
    return answer(view, status, {"Location": location})


def job_location(job_id: str) -> str:
    return "/v1/jobs/" + quote(job_id, safe="")


def queue_location(submission_id: str) -> str:
    return "/v1/queue/" + quote(submission_id, safe="")
