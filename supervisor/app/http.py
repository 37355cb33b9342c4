"""The admin API, on the daemon's own event loop (starlette + uvicorn).

/v1 routes need `Authorization: Bearer <token>` (compared in constant time); with no
token configured they are refused, not open. Health, readiness, metrics and the OpenAPI
document are public: they reveal no job data and no secret. Errors are JSON with a
stable `error` code and a message, never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Route

from supervisor.adapters import metrics
from supervisor.app.operations import Operations, event_json, job_json
from supervisor.core.budgets import AdmissionRefused
from supervisor.adapters.clado import ApiKeyRejected, ApiUnavailable, CladoError, InvalidJobId, OutOfCredits, RequestRejected
from supervisor.config import ConfigError, check_labels, parse_duration, split_address
from supervisor.core.states import Reason, State
from supervisor.adapters.store import utcnow

if TYPE_CHECKING:
    from supervisor.service.runtime import Daemon

log = structlog.get_logger("supervisor.http")

Handler = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class JSONResponse(_StarletteJSONResponse):
    """UTF-8 JSON; text that cannot be UTF-8 (a lone surrogate stored from a non-UTF-8
    command line) is escaped instead of failing the whole answer."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


# -- request bodies (unknown fields are rejected) ------------------------------------------

Labels = Annotated[dict[str, str], Field(default_factory=dict)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# The largest value an INTEGER column holds on every supported database (PostgreSQL int4).
MAX_DB_INT = 2**31 - 1

# What `clado.validate_job_id` accepts. The API checks ids with it (for its clearer message);
# the pattern is published in the OpenAPI document.
JOB_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"  # as clado.validate_job_id


class TrackRequest(_Body):
    job_ids: list[str] = Field(
        min_length=1, max_length=10_000,
        json_schema_extra={"items": {"type": "string", "pattern": JOB_ID_PATTERN}},
    )
    labels: Labels
    policy: str | None = None
    max_runtime: str | int | None = Field(default=None, description='A duration: "90s", "15m", "2h" or seconds.')
    max_credits: int | None = Field(default=None, gt=0, le=MAX_DB_INT)


class SubmitRequest(_Body):
    query: str = Field(min_length=1, max_length=10_000, description="Not blank; no control characters.")
    limit: int = Field(default=30, ge=1, le=1000)
    labels: Labels
    policy: str | None = None


class CancelRequest(_Body):
    reason: str | None = Field(default=None, max_length=500, description="No control characters.")


def _check_text(value: str, name: str) -> None:
    """Free text that goes to the database and the API: no control characters (PostgreSQL
    refuses NUL in text, and a query is sent upstream before it is stored)."""
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value):
        raise ApiError(422, "invalid_request", f"{name}: control characters are not allowed")


# -- the app ----------------------------------------------------------------------------------


class AdminApi:
    def __init__(self, daemon: Daemon, token: str | None, max_body_bytes: int) -> None:
        self.daemon = daemon
        self._token = token.encode() if token else None
        self._max_body = max_body_bytes

    @property
    def auth_enabled(self) -> bool:
        return self._token is not None

    def app(self) -> Starlette:
        routes = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics_page),
            Route("/openapi.json", self.openapi),
            Route("/v1/jobs", self._v1(self.list_jobs), methods=["GET"]),
            Route("/v1/jobs", self._v1(self.track), methods=["POST"]),
            Route("/v1/jobs/{job_id}", self._v1(self.show_job), methods=["GET"]),
            Route("/v1/jobs/{job_id}/cancel", self._v1(self.cancel), methods=["POST"]),
            Route("/v1/submit", self._v1(self.submit), methods=["POST"]),
        ]
        app = Starlette(
            routes=routes,
            exception_handlers={
                404: lambda request, exc: _error(404, "not_found", "no such route"),
                405: lambda request, exc: _error(405, "method_not_allowed", "method not allowed"),
                Exception: self._internal_error,
            },
        )
        # No unauthenticated redirects built from the Host header: an odd path is a 404.
        app.router.redirect_slashes = False
        return app

    @property
    def ops(self) -> Operations:
        # The daemon's current config: a SIGHUP reload applies to the API at once.
        return Operations(self.daemon.config, self.daemon.store, self.daemon.client, self.daemon.effects)

    # -- public endpoints -----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        if not self.daemon.scheduler_running:
            return _error(503, "scheduler_stopped", "the scheduler is not running")
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        problems = []
        try:
            async with asyncio.timeout(2):
                await self.daemon.store.ping()
        except Exception as exc:
            problems.append(f"database: {type(exc).__name__}")
        last_tick = self.daemon.last_tick_at
        window = self.daemon.config.supervisor.poll_interval * 3
        if last_tick is None or self.daemon.clock() - last_tick > window:
            problems.append(f"no tick completed in the last {window.total_seconds():g} s")
        if problems:
            return JSONResponse({"status": "unready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # -- /v1 -----------------------------------------------------------------------------

    def _v1(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if self._token is None:
                return _error(403, "admin_api_disabled", "no admin token is configured (http.token_env / http.token_file)")
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
                return _error(401, "unauthorized", "a valid bearer token is required")
            try:
                return await handler(request)
            except ApiError as exc:
                return _error(exc.status, exc.code, exc.message)
            except (ConfigError, InvalidJobId) as exc:
                return _error(422, "invalid_request", str(exc))
            except AdmissionRefused as exc:
                return _error(409, "admission_refused", str(exc))
            except ApiKeyRejected:
                return _error(502, "api_key_rejected", "the Clado API rejected the API key")
            except OutOfCredits as exc:
                return _error(402, "out_of_credits", str(exc))
            except RequestRejected as exc:  # the API refused this request (4xx): not a gateway fault
                return _error(422, "request_rejected", f"the Clado API rejected the request: {exc}")
            except (ApiUnavailable, CladoError) as exc:
                return _error(502, "api_unavailable", str(exc))
            except (OperationalError, InterfaceError, PoolTimeout) as exc:
                log.warning("admin API request failed: database unavailable", path=request.url.path,
                            error=type(exc).__name__)
                return _error(503, "database_unavailable", "the database is not reachable; try again later")

        return guarded

    async def list_jobs(self, request: Request) -> Response:
        state = request.query_params.get("state")
        if state is not None and state not in {s.value for s in State}:
            raise ApiError(422, "invalid_request", f"unknown state {state!r}")
        wanted = {}
        for label in request.query_params.getlist("label"):
            key, sep, value = label.partition("=")
            if not sep:
                raise ApiError(422, "invalid_request", "label filters look like label=KEY=VALUE")
            wanted[key] = value
        jobs = await self.ops.jobs(state)
        rows = [
            job_json(self.daemon.config, job)
            for job in jobs
            if all((job.labels or {}).get(k) == v for k, v in wanted.items())
        ]
        return JSONResponse(rows)

    async def show_job(self, request: Request) -> Response:
        job, events = await self.ops.job(request.path_params["job_id"])
        if job is None:
            raise ApiError(404, "job_not_found", "this job is not tracked")
        return JSONResponse({**job_json(self.daemon.config, job), "events": [event_json(e) for e in events]})

    async def track(self, request: Request) -> Response:
        body = await self._body(request, TrackRequest)
        try:
            check_labels(body.labels)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", f"labels: {exc}") from None
        try:
            max_runtime = parse_duration(body.max_runtime) if body.max_runtime is not None else None
        except ValueError as exc:
            raise ApiError(422, "invalid_request", f"max_runtime: {exc}") from None
        added, existing = await self.ops.track(
            body.job_ids, labels=body.labels, policy=body.policy,
            max_runtime=max_runtime, max_credits=body.max_credits,
        )
        return JSONResponse({"added": added, "already_tracked": existing}, status_code=201 if added else 200)

    async def submit(self, request: Request) -> Response:
        body = await self._body(request, SubmitRequest)
        try:
            check_labels(body.labels)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", f"labels: {exc}") from None
        if not body.query.strip():
            raise ApiError(422, "invalid_request", "query: must not be blank")
        _check_text(body.query, "query")
        job_id = await self.ops.submit(body.query, limit=body.limit, labels=body.labels, policy=body.policy)
        return JSONResponse({"job_id": job_id}, status_code=201)

    async def cancel(self, request: Request) -> Response:
        body = await self._body(request, CancelRequest, empty_ok=True)
        if body.reason is not None:
            _check_text(body.reason, "reason")
        # Counted, logged and announced by the daemon's effects, like any other decision.
        job = await self.ops.cancel(request.path_params["job_id"], body.reason)
        if job is None:
            raise ApiError(404, "job_not_found", "this job is not tracked")
        return JSONResponse(job_json(self.daemon.config, job))

    async def _body(self, request: Request, model: type[_Body], empty_ok: bool = False) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
            raise ApiError(413, "payload_too_large", f"request bodies are limited to {self._max_body} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self._max_body:
                raise ApiError(413, "payload_too_large", f"request bodies are limited to {self._max_body} bytes")
        if not raw.strip() and empty_ok:
            return model()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        try:
            # A lone surrogate ("\ud800") parses, but no database or JSON answer can hold it.
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_json", "the body holds text that is not valid Unicode") from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise ApiError(422, "invalid_request", f"{where}: {message}") from None

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("admin API request failed", path=request.url.path)
        return _error(500, "internal_error", "the request failed; see the supervisor's log")


# -- serving it -------------------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    def __init__(self, api: AdminApi, listen: str) -> None:
        self._api = api
        self._listen = listen
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        host, port = split_address(self._listen)
        # Bind here, so "address in use" is our clear error, not uvicorn's exit.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # The explicit IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets
        # whose proto says TCP; without it every response waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"admin API cannot listen on {self._listen}: {exc.strerror}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._api.app(), log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("admin API stopped during startup")
            await asyncio.sleep(0.01)
        log.info("admin API listening", address=f"{host}:{self.port}", auth=self._api.auth_enabled)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=10)
        self._server = self._task = None


# -- OpenAPI --------------------------------------------------------------------------------

_JOB = {
    "type": "object",
    "required": [
        "job_id", "state", "remote_status", "labels", "policy", "credits_used", "cancel_reason",
        "final_status", "submitted_at", "cancel_requested_at", "confirmed_at",
    ],
    "properties": {
        "job_id": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in State]},
        "remote_status": {"type": ["string", "null"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "policy": {"type": "string"},
        "credits_used": {"type": "integer"},
        "cancel_reason": {"type": ["string", "null"]},
        "final_status": {"type": ["string", "null"]},
        "submitted_at": {"type": "string", "format": "date-time"},
        "cancel_requested_at": {"type": ["string", "null"], "format": "date-time"},
        "confirmed_at": {"type": ["string", "null"], "format": "date-time"},
    },
}  # fmt: skip
_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: dict[str, Any], *codes: int, ok_code: str = "200") -> dict[str, Any]:
    described = {ok_code: {"description": "OK", **_json(ok)}}
    for code in codes:
        described[str(code)] = {"description": "error", **_json({"$ref": "#/components/schemas/Error"})}
    return described


def openapi_document() -> dict[str, Any]:
    job_ref = {"$ref": "#/components/schemas/Job"}
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}
    auth = [{"bearer": []}]

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, **_json(model.model_json_schema())}

    return {
        "openapi": "3.1.0",
        "info": {"title": "clado-supervisor admin API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Job": _JOB, "Error": _ERROR},
        },
        "paths": {
            "/healthz": {"get": {"responses": _responses({"type": "object"}, 503)}},
            "/readyz": {"get": {"responses": _responses({"type": "object"}, 503)}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format"}}}},
            "/v1/jobs": {
                "get": {
                    "security": auth,
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string", "enum": [s.value for s in State]}},
                        {
                            "name": "label", "in": "query", "style": "form", "explode": True,
                            "schema": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}},
                            "description": "KEY=VALUE; repeat it to require several labels",
                        },
                    ],
                    "responses": _responses({"type": "array", "items": job_ref}, 401, 403, 422, 503),
                },
                "post": {
                    "security": auth,
                    "requestBody": body(TrackRequest),
                    "responses": {
                        **_responses({"type": "object"}, 400, 401, 403, 413, 422, 503, ok_code="201"),
                        "200": {"description": "all already tracked", **_json({"type": "object"})},
                    },
                },
            },
            "/v1/jobs/{job_id}": {
                "get": {"security": auth, "parameters": [job_id], "responses": _responses(job_ref, 401, 403, 404, 422, 503)},
            },
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "security": auth,
                    "parameters": [job_id],
                    "requestBody": {**body(CancelRequest), "required": False},
                    "responses": _responses(job_ref, 400, 401, 403, 404, 413, 422, 502, 503),
                },
            },
            "/v1/submit": {
                "post": {
                    "security": auth,
                    "requestBody": body(SubmitRequest),
                    "responses": _responses({"type": "object"}, 400, 401, 402, 403, 409, 413, 422, 502, 503, ok_code="201"),
                },
            },
        },
    }
