"""The admin API's app: its routes (endpoints.py's table) and their handlers, each a use case
of Operations behind the guards (guards.py)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from supervisor.adapters import metrics
from supervisor.app import errors, inputs
from supervisor.app.http.endpoints import ENDPOINTS, PAGE_DEFAULT, PAGE_MAX, Endpoint
from supervisor.app.http.guards import Handler, bearer_only, read_body, translated
from supervisor.app.http.openapi import openapi_document
from supervisor.app.http.responses import JSONResponse, answer, created, error_response, job_location, queue_location
from supervisor.app.inputs import CancelRequest, ContinueRequest, SubmitRequest, TrackRequest
from supervisor.app.operations import Operations
from supervisor.app.views import (
    DeliveryPage,
    HealthView,
    JobDetailView,
    JobPage,
    JobView,
    QueueItemView,
    QueuePage,
    ReadinessView,
)
from supervisor.core.job import Job

if TYPE_CHECKING:
    from supervisor.service.runtime import Daemon

log = structlog.get_logger("supervisor.http")


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
            by_path.setdefault(e.path, {})[e.method] = translated(self._handler(e))
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
        return bearer_only(handler, self._token) if endpoint.authenticated else handler

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
        body = await read_body(request, TrackRequest, self._max_body)
        result = await self.ops.track(
            body.job_ids,
            labels=body.labels,
            policy=body.policy,
            max_runtime=body.max_runtime,
            max_credits=body.max_credits,
        )
        if not result.added:
            return answer(result)
        return created(result, 201, job_location(result.added[0]))  # the first, for a batch

    async def submit(self, request: Request) -> Response:
        body = await read_body(request, SubmitRequest, self._max_body)
        result = await self.ops.submit(
            body.query, limit=body.limit, labels=body.labels, policy=body.policy, queue=body.queue,
            priority=body.priority, expires_after=body.expires_after,
        )  # fmt: skip
        if isinstance(result, QueueItemView):  # accepted: the daemon starts it when it fits
            return created(result, 202, queue_location(result.id))
        return created(result, 201, job_location(result.job_id))

    async def list_queue(self, request: Request) -> Response:
        states = request.query_params.getlist("state")
        return answer(QueuePage(items=await self.ops.queue(states or None)))

    async def list_budgets(self, request: Request) -> Response:
        return answer(await self.ops.budgets())

    async def show_queued(self, request: Request) -> Response:
        return answer(await self.ops.queue_item(request.path_params["id"]))

    async def cancel_queued(self, request: Request) -> Response:
        return answer(await self.ops.cancel_queued(request.path_params["id"]))

    async def list_deliveries(self, request: Request) -> Response:
        return answer(DeliveryPage(items=await self.ops.deliveries(request.query_params.get("state"))))

    async def show_delivery(self, request: Request) -> Response:
        return answer(await self.ops.delivery(request.path_params["delivery_id"]))

    async def redeliver(self, request: Request) -> Response:
        return answer(await self.ops.redeliver([request.path_params["delivery_id"]]))

    async def cancel(self, request: Request) -> Response:
        body = await read_body(request, CancelRequest, self._max_body, empty_ok=True)
        # Announced (outbox rows with the write), counted (from its events) and logged like any other decision.
        job = await self.ops.manual_cancel(request.path_params["job_id"], body.reason)
        return answer(JobView.of(self.daemon.config, job))

    async def continue_job(self, request: Request) -> Response:
        body = await read_body(request, ContinueRequest, self._max_body, empty_ok=True)
        return answer(await self.ops.continue_job(request.path_params["job_id"], body.additional))

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
