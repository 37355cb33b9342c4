"""The ``/_fake/*`` control endpoints: no auth, never faulted, for tests in another process.

Each one is a thin JSON face on a :class:`FakeClado` method of the same idea.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from supervisor.sim.fake import FakeClado

__all__ = ["CONTROL_ROUTES", "detail", "json_object"]


def detail(status: int, text: str) -> JSONResponse:
    """A FastAPI-style error body, like the real service's."""
    return JSONResponse({"detail": text}, status)


async def json_object(request: Request, *, empty_ok: bool) -> dict[str, Any]:
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


def _fake(request: Request) -> FakeClado:
    fake: FakeClado = request.app.state.fake
    return fake


async def _create(request: Request) -> Response:
    try:
        knobs = await json_object(request, empty_ok=True)
        job_id = _fake(request).create_job(**knobs)
    except (TypeError, ValueError) as exc:
        return detail(400, str(exc))
    return JSONResponse({"job_id": job_id})


async def _bulk(request: Request) -> Response:
    try:
        knobs = await json_object(request, empty_ok=False)
        count = knobs.pop("count", None)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        job_ids = _fake(request).create_jobs(count, **knobs)
    except (TypeError, ValueError) as exc:
        return detail(400, str(exc))
    return JSONResponse({"job_ids": job_ids})


async def _reshape(request: Request) -> Response:
    """Change scenario knobs of every existing job (an API whose answers change shape under
    running jobs): `{"hide_status": true}`."""
    try:
        knobs = await json_object(request, empty_ok=False)
        _fake(request).reshape(**knobs)
    except (TypeError, ValueError) as exc:
        return detail(400, str(exc))
    return JSONResponse({"reshaped": knobs})


async def _job(request: Request) -> Response:
    try:
        return JSONResponse(_fake(request).job_info(request.path_params["job_id"]))
    except KeyError:
        return detail(404, "Job not found")


async def _stats(request: Request) -> Response:
    return JSONResponse(_fake(request).stats())


async def _requests(request: Request) -> Response:
    """The request log; ``?endpoint=cancel&job_id=…`` narrows it."""
    params = request.query_params
    calls = _fake(request).requests(params.get("endpoint"), params.get("job_id"))
    return JSONResponse({"requests": calls})


async def _faults(request: Request) -> Response:
    try:
        return JSONResponse(_fake(request).set_faults(**await json_object(request, empty_ok=True)))
    except ValueError as exc:
        return detail(400, str(exc))


async def _limits(request: Request) -> Response:
    try:
        return JSONResponse(_fake(request).set_limits(**await json_object(request, empty_ok=True)))
    except ValueError as exc:
        return detail(400, str(exc))


async def _defaults(request: Request) -> Response:
    try:
        return JSONResponse(_fake(request).set_defaults(**await json_object(request, empty_ok=True)))
    except ValueError as exc:
        return detail(400, str(exc))


async def _keys(request: Request) -> Response:
    try:
        body = await json_object(request, empty_ok=False)
    except ValueError as exc:
        return detail(400, str(exc))
    keys = body.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return detail(400, "keys must be a list of strings or null")
    _fake(request).set_valid_keys(keys)
    return JSONResponse({"keys": keys})


async def _account(request: Request) -> Response:
    """``{"credits": N}`` sets the balance; ``{"top_up": N}`` adds to it and stamps last_topup_at."""
    fake = _fake(request)
    try:
        body = await json_object(request, empty_ok=False)
    except ValueError as exc:
        return detail(400, str(exc))
    if len(body) != 1 or not {"credits", "top_up"} & body.keys():
        return detail(400, 'expected exactly one of "credits" or "top_up"')
    ((name, value),) = body.items()
    if isinstance(value, bool) or not isinstance(value, int):
        return detail(400, f"{name} must be an integer, got {value!r}")
    if name == "top_up":
        fake.top_up(value)
    else:
        fake.set_account_credits(value)
    return JSONResponse(fake.credits())


async def _reset(request: Request) -> Response:
    _fake(request).reset()
    return JSONResponse({"reset": True})


CONTROL_ROUTES = [
    Route("/_fake/jobs", _create, methods=["POST"]),
    Route("/_fake/jobs/bulk", _bulk, methods=["POST"]),
    Route("/_fake/reshape", _reshape, methods=["POST"]),
    Route("/_fake/jobs/{job_id}", _job, methods=["GET"]),
    Route("/_fake/stats", _stats, methods=["GET"]),
    Route("/_fake/requests", _requests, methods=["GET"]),
    Route("/_fake/faults", _faults, methods=["POST"]),
    Route("/_fake/limits", _limits, methods=["POST"]),
    Route("/_fake/defaults", _defaults, methods=["POST"]),
    Route("/_fake/keys", _keys, methods=["POST"]),
    Route("/_fake/account", _account, methods=["POST"]),
    Route("/_fake/reset", _reset, methods=["POST"]),
]
