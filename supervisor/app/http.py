"""The admin API, on the daemon's own event loop (starlette + uvicorn).

/v1 routes need `Authorization: Bearer <token>` (compared in constant time); with no
token configured they are refused, not open. Health, readiness, metrics and the OpenAPI
document are public: they reveal no job data and no secret.

The conventions an HTTP client expects: errors are RFC 9457 problem details
(`application/problem+json`, with the stable `code`), never a stack trace; a 401 says
`WWW-Authenticate: Bearer`, a 405 `Allow`, a 201 the `Location` of what it created; request
bodies must say they are JSON (415 otherwise); `GET /v1/jobs` is paginated by an opaque
cursor (`limit`, `cursor`; the answer's `next_cursor`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import json
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import h11
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from supervisor.adapters import limits, metrics
from supervisor.app import errors, inputs
from supervisor.app.inputs import Body, CancelRequest, ContinueRequest, SubmitRequest, TrackRequest
from supervisor.app.operations import Operations
from supervisor.app.views import (
    ContinueResult,
    HealthView,
    JobDetailView,
    JobPage,
    JobView,
    ProblemView,
    QueueItemView,
    QueuePage,
    ReadinessView,
    SubmitResult,
    TrackResult,
    View,
)
from supervisor.config import split_address
from supervisor.core.job import Job
from supervisor.core.states import State
from supervisor.service.queue import STATES as SUBMISSION_STATES

if TYPE_CHECKING:
    from supervisor.service.runtime import Daemon

log = structlog.get_logger("supervisor.http")

Handler = Callable[[Request], Awaitable[Response]]
B = TypeVar("B", bound=Body)


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


def _created(location: str) -> dict[str, str]:
    return {"Location": location}


def job_location(job_id: str) -> str:
    return "/v1/jobs/" + quote(job_id, safe="")


# -- the routes, one table for the app and its OpenAPI document ---------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: str  # the AdminApi method
    answers: Mapping[int, type[View]]  # status → the body's view
    error_statuses: tuple[int, ...] = ()  # statuses answered with problem details
    body: type[Body] | None = None
    body_required: bool = True
    parameters: tuple[dict[str, Any], ...] = field(default=())
    authenticated: bool = True


_JOB_ID_PARAMETER = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": inputs.JOB_ID_PATTERN},
}
_LIST_PARAMETERS = (
    {"name": "state", "in": "query", "schema": {"type": "string", "enum": [s.value for s in State]}},
    {
        "name": "label",
        "in": "query",
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+=.*$"}},
        "description": "KEY=VALUE; repeat it to require several labels",
    },
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
        "description": "jobs per page",
    },
    {
        "name": "cursor",
        "in": "query",
        "schema": {"type": "string"},
        "description": "the `next_cursor` of the previous page (with the same state and label filters)",
    },
)
_QUEUE_ID_PARAMETER = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": inputs.SUBMISSION_ID_PATTERN},
}
_QUEUE_PARAMETERS = (
    {
        "name": "state",
        "in": "query",
        "style": "form",
        "explode": True,
        "schema": {"type": "array", "items": {"type": "string", "enum": list(SUBMISSION_STATES)}},
        "description": "repeat it for several states; all submissions without it",
    },
)
PAGE_DEFAULT, PAGE_MAX = 100, 1000
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
    Endpoint("GET", "/v1/queue/{id}", "show_queued", {200: QueueItemView}, (401, 403, 404, 422, 503)),
    Endpoint("POST", "/v1/queue/{id}/cancel", "cancel_queued", {200: QueueItemView}, (401, 403, 404, 409, 422, 503)),
)


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
        from supervisor.app.console.routes import console_routes  # the web console, under /ui

        # One route per path with all its methods, so that a 405's Allow lists every one.
        by_path: dict[str, dict[str, Handler]] = {}
        for e in ENDPOINTS:
            by_path.setdefault(e.path, {})[e.method] = self._guarded(self._handler(e))
        routes = [
            Route("/metrics", self.metrics_page),
            Route("/openapi.json", self.openapi),
            *(Route(path, _by_method(handlers), methods=list(handlers)) for path, handlers in by_path.items()),
            *console_routes(self._token, lambda: self.ops, lambda: self.daemon.enforcer.account_credits),
        ]
        app = Starlette(
            routes=routes,
            exception_handlers={
                404: lambda request, exc: error_response(errors.NotFound("no such route")),
                405: lambda request, exc: error_response(errors.MethodNotAllowed("method not allowed"), exc.headers),
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
            raise errors.SchedulerStopped("the scheduler is not running")
        return answer(HealthView(status="ok"))

    async def readyz(self, request: Request) -> Response:
        problems = []
        try:
            async with asyncio.timeout(2):
                await self.daemon.store.ping()
        except Exception as exc:  # noqa: BLE001 - whatever the database does, the answer is "unready"
            problems.append(f"database: {type(exc).__name__}")
        last_tick = self.daemon.last_tick_at
        window = self.daemon.config.supervisor.poll_interval * 3
        if last_tick is None or self.daemon.clock() - last_tick > window:
            problems.append(f"no tick completed in the last {window.total_seconds():g} s")
        problems += self.daemon.problems()
        if problems:
            return answer(ReadinessView(status="unready", problems=problems), 503)
        return answer(ReadinessView(status="ready"))

    async def metrics_page(self, request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # -- /v1 -----------------------------------------------------------------------------

    def _handler(self, endpoint: Endpoint) -> Handler:
        """The endpoint's method, behind the bearer token if it is a /v1 one."""
        handler: Handler = getattr(self, endpoint.handler)
        if not endpoint.authenticated:
            return handler

        async def authenticated(request: Request) -> Response:
            if self._token is None:
                raise errors.AdminApiDisabled("no admin token is configured (http.token_env / http.token_file)")
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
                raise errors.Unauthorized("a valid bearer token is required")
            return await handler(request)

        return authenticated

    def _guarded(self, handler: Handler) -> Handler:
        """Known failures as their JSON error (app/errors.py); anything else is a 500."""

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = errors.translate(exc)
                if error is None:
                    raise
                if isinstance(error, errors.DatabaseUnavailable):
                    log.warning(
                        "admin API request failed: database unavailable",
                        path=request.url.path,
                        error=type(exc).__name__,
                    )
                elif isinstance(error, errors.Internal):
                    log.error("admin API request failed", path=request.url.path, exc_info=exc)
                return error_response(error)

        return guarded

    async def list_jobs(self, request: Request) -> Response:
        query = request.query_params
        wanted = inputs.label_filter(query.getlist("label"))
        limit = _page_limit(query.get("limit"))
        after = _cursor_key(query["cursor"]) if "cursor" in query else None
        jobs = await self.ops.jobs(query.get("state"), labels=wanted)  # oldest first, ties by id
        if after is not None:
            jobs = [job for job in jobs if (job.submitted_at.isoformat(), job.job_id) > after]
        page, more = jobs[:limit], len(jobs) > limit
        views = [JobView.of(self.daemon.config, job) for job in page]
        return answer(JobPage(jobs=views, next_cursor=_cursor(page[-1]) if more else None))

    async def show_job(self, request: Request) -> Response:
        job, events = await self.ops.job(request.path_params["job_id"])
        return answer(JobDetailView.of(self.daemon.config, job, events))

    async def track(self, request: Request) -> Response:
        body = await self._body(request, TrackRequest)
        result = await self.ops.track(
            body.job_ids,
            labels=body.labels,
            policy=body.policy,
            max_runtime=body.max_runtime,
            max_credits=body.max_credits,
        )
        if not result.added:
            return answer(result)
        return answer(result, 201, _created(job_location(result.added[0])))  # the first, for a batch

    async def submit(self, request: Request) -> Response:
        body = await self._body(request, SubmitRequest)
        result = await self.ops.submit(
            body.query, limit=body.limit, labels=body.labels, policy=body.policy, queue=body.queue,
            priority=body.priority, expires_after=body.expires_after,
        )  # fmt: skip
        if isinstance(result, QueueItemView):  # accepted: the daemon starts it when it fits
            return answer(result, 202, _created("/v1/queue/" + quote(result.id, safe="")))
        return answer(result, 201, _created(job_location(result.job_id)))

    async def list_queue(self, request: Request) -> Response:
        states = request.query_params.getlist("state")
        return answer(QueuePage(items=await self.ops.queue(states or None)))

    async def show_queued(self, request: Request) -> Response:
        return answer(await self.ops.queue_item(request.path_params["id"]))

    async def cancel_queued(self, request: Request) -> Response:
        return answer(await self.ops.cancel_queued(request.path_params["id"]))

    async def cancel(self, request: Request) -> Response:
        body = await self._body(request, CancelRequest, empty_ok=True)
        # Counted, logged and announced by the daemon's effects, like any other decision.
        job = await self.ops.manual_cancel(request.path_params["job_id"], body.reason)
        return answer(JobView.of(self.daemon.config, job))

    async def continue_job(self, request: Request) -> Response:
        body = await self._body(request, ContinueRequest, empty_ok=True)
        return answer(await self.ops.continue_job(request.path_params["job_id"], body.additional))

    async def _body(self, request: Request, model: type[B], empty_ok: bool = False) -> B:
        too_large = errors.PayloadTooLarge(f"request bodies are limited to {self._max_body} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self._max_body:
                raise too_large
        if not raw.strip() and empty_ok:
            return model()
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise errors.UnsupportedMediaType(
                f"send the body as JSON (Content-Type: application/json), not {media_type or 'without a type'}"
            )
        return inputs.body(model, inputs.json_body(bytes(raw)))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("admin API request failed", path=request.url.path, exc_info=exc)
        return error_response(errors.Internal(type(exc).__name__))


def _by_method(handlers: Mapping[str, Handler]) -> Handler:
    async def dispatch(request: Request) -> Response:
        # HEAD is answered as GET (Starlette adds it to a GET route and drops the body).
        return await (handlers.get(request.method) or handlers["GET"])(request)

    return dispatch


# -- the jobs list's pages ----------------------------------------------------------------------
# A cursor is the sort key of the last job of a page (submitted_at, job_id): the next page is
# what sorts after it, so jobs tracked meanwhile are neither skipped nor repeated. Opaque to
# clients (base64url of JSON), so its form may change.


def _cursor(job: Job) -> str:
    key = json.dumps([job.submitted_at.isoformat(), job.job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _cursor_key(cursor: str) -> tuple[str, str]:
    try:
        at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(at, str) and isinstance(job_id, str):
            return at, job_id
    except (ValueError, TypeError, binascii.Error):
        pass
    raise errors.BadInput("is not a cursor this API gave (use the next_cursor of a page)", field="cursor")


def _page_limit(value: str | None) -> int:
    if value is None:
        return PAGE_DEFAULT
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= PAGE_MAX):
        raise errors.BadInput(f"must be a whole number from 1 to {PAGE_MAX}", field="limit")
    return int(value)


# -- serving it -------------------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# Slow clients must not hold the admin API's connections (file descriptors the daemon needs
# to enforce): a request's head must arrive within HEAD_TIMEOUT of the connection opening or
# of the previous answer, and its body within BODY_TIMEOUT of its head. An idle keep-alive
# connection is closed after KEEP_ALIVE. Heads are bounded in size (h11's incomplete-event
# bound), bodies by http.max_body_bytes.
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
KEEP_ALIVE = 5
MAX_HEAD_BYTES = 16 * 1024


def _plain_answer(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
    return (head + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_REFUSED = _plain_answer(503, "Service Unavailable", "too many connections to the admin API")
_HEAD_TIMED_OUT = _plain_answer(408, "Request Timeout", "the request did not arrive in time")


def _guarded_protocol(max_connections: int, head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with two guards it lacks: connections beyond `max_connections`
    are answered 503 and closed at once (uvicorn's own limit only answers complete requests,
    so idle connections could pile up without bound), and a request head that is not whole
    within `head_timeout` closes its connection (uvicorn has no header timeout)."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("admin API connection refused: too many connections", limit=max_connections)
                transport.write(_REFUSED)
                transport.close()
                return
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request on this connection gets its own

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request being answered: its body has BodyDeadline
            # IDLE: no whole request head yet (a slow loris, a half-open connection);
            # SEND_BODY: the rest of a body that was answered without being read.
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                return
            log.warning("admin API connection closed: no complete request in time", timeout_s=head_timeout)
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_HEAD_TIMED_OUT)
            self.transport.close()

    return GuardedH11Protocol


class _BodyTimedOut(BaseException):
    """Raised out of `receive` past the body deadline. A BaseException, so that no handler's
    `except Exception` (the API's error translation, starlette's 500 page) takes it for a bug."""


class RequestTimeout(errors.BadInput):
    """A body too slow to arrive (the admin server's own answer, not a use case's)."""

    status, code, title = 408, "request_timeout", "Request timeout"


class BodyDeadline:
    """ASGI middleware: a request body that is not whole within `seconds` of its head is
    answered 408 (problem details) and its connection closed."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self._app = app
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self._seconds
        body_done = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # later receives wait for a disconnect: not the client's reading
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimedOut from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, timed_receive, tracked_send)
        except _BodyTimedOut:
            log.warning("admin API request closed: body not received in time", timeout_s=self._seconds)
            if not started:
                timed_out = error_response(RequestTimeout(f"send the body within {self._seconds:g} s"))
                timed_out.headers["connection"] = "close"
                await timed_out(scope, receive, send)


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
        # A share of the file descriptors (adapters/limits.py): the rest stay enforcement's.
        max_connections = limits.admin_connection_bound()
        config = uvicorn.Config(
            BodyDeadline(self._api.app(), BODY_TIMEOUT),
            http=_guarded_protocol(max_connections, HEAD_TIMEOUT),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            limit_concurrency=max_connections,  # requests beyond it: 503
            # asyncio accepts up to `backlog` sockets in one go before any is looked at: this
            # bounds the descriptors a burst of connections can take at once.
            backlog=max_connections,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError("admin API stopped during startup")
            await asyncio.sleep(0.01)
        log.info(
            "admin API listening",
            address=f"{host}:{self.port}",
            auth=self._api.auth_enabled,
            max_connections=max_connections,
        )

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=10)
        self._server = self._task = None


# -- OpenAPI, generated from the route table and the models ---------------------------------------


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
        parameters = [_JOB_ID_PARAMETER] if "{job_id}" in e.path else [_QUEUE_ID_PARAMETER] if "{id}" in e.path else []
        if parameters or e.parameters:
            operation["parameters"] = [*parameters, *e.parameters]
        if e.body is not None:
            operation["requestBody"] = {"required": e.body_required, **_json(refs[(e.body, "validation")])}
        for status, model in e.answers.items():
            response = {"description": model.__doc__ or model.__name__, **_json(refs[(model, "serialization")])}
            if status == 201:
                response["headers"] = {"Location": _header("the created job: /v1/jobs/{job_id}")}
            if status == 202:
                response["headers"] = {"Location": _header("the queued submission: /v1/queue/{id}")}
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
