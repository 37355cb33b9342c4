"""A local simulator of the Clado deep research API: the ASGI app, `serve`, `ThreadedFakeApi`.

It serves the real endpoints (initiate, status, cancel, continue / more, credits) in the shapes
the public docs (docs.clado.ai) give, by default: integer epoch-seconds ``created_at``, both
``total_results`` and ``final_results_count``, ``pagination`` only when ``page`` is given,
``page_size`` 25 by default, every result when ``page`` is left out, cancel's ``{success,
message}`` with ``success: false`` for a job already final, 429s with ``{"error", "retry_after"}``
in the body and no Retry-After header, ``/api/credits`` with ``last_topup_at``. Where the docs
are silent it picks what is harder on a client: a 502/503 from "the gateway" is HTML, not JSON.

Knobs shape everything else (see :class:`Scenario` for a job's, :meth:`FakeClado.set_defaults`,
``set_limits`` and ``set_faults`` for the server's). A client that can only submit a query can
still pick a job's knobs with a ``fake:key=value,key=value`` token inside the query text, e.g.
``"engineers in SF fake:rate=5,stall_after=10"``. Unauthenticated ``/_fake/*`` endpoints expose
the same controls to tests that run the simulator in another process.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from supervisor.sim.control import CONTROL_ROUTES, detail, json_object
from supervisor.sim.fake import FakeClado
from supervisor.sim.faults import FaultInjector, FaultPlan, HideInjectedDrops, rate_limited
from supervisor.sim.model import (
    DEFAULT_ADDITIONAL,
    DEFAULT_PAGE_SIZE,
    MAX_LIMIT,
    MAX_PAGE_SIZE,
    PENDING,
    Scenario,
    job_request,
)

__all__ = ["FakeClado", "Scenario", "ThreadedFakeApi", "create_app", "loopback_socket", "serve"]

JOBS_PREFIX = "/api/search/deep_research"
_JOB_ACTIONS = {"cancel", "continue", "more"}  # POST {JOBS_PREFIX}/{job_id}/<action>


def endpoint_of(scope: Scope) -> tuple[str, str | None] | None:
    """(endpoint, job id from the path) of a request to a real endpoint, else None."""
    path, method = scope["path"], scope["method"]
    if path == "/api/credits":
        return ("credits", None) if method == "GET" else None
    if path == JOBS_PREFIX:
        return ("initiate", None) if method == "POST" else None
    if not path.startswith(JOBS_PREFIX + "/"):
        return None
    job_id, _, action = path[len(JOBS_PREFIX) + 1 :].partition("/")
    if not job_id or "/" in action:
        return None
    if method == "POST" and action in _JOB_ACTIONS:
        return action, job_id
    if method == "GET" and not action:
        return "status", job_id
    return None


def _admitter(fake: FakeClado) -> Callable[[Scope], tuple[FaultPlan, Callable[[int], None]] | None]:
    def admit(scope: Scope) -> tuple[FaultPlan, Callable[[int], None]] | None:
        found = endpoint_of(scope)
        if found is None:
            return None
        plan, call = fake.admit(*found)
        scope.setdefault("state", {})["sim_call"] = call  # the initiate handler names its new job

        def answered(status: int) -> None:
            call.status = status

        return plan, answered

    return admit


def _fake(request: Request) -> FakeClado:
    fake: FakeClado = request.app.state.fake
    return fake


def _refused(request: Request, limit_group: str | None = None) -> Response | None:
    """401 without a valid key, 429 over the rate limit of `limit_group`, else None."""
    fake = _fake(request)
    key = fake.authorized(request.headers.get("authorization"))
    if key is None:
        return detail(401, "Invalid or missing API key")
    if limit_group is not None and (wait := fake.rate_limited(limit_group, key)) is not None:
        return rate_limited(wait, header=fake.retry_after_header)
    return None


def _query_int(request: Request, name: str, low: int, high: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


async def _initiate(request: Request) -> Response:
    if (refusal := _refused(request, "initiate")) is not None:
        return refusal
    fake = _fake(request)
    try:
        body = await json_object(request, empty_ok=False)
        query, limit, company_urls = job_request(
            body.get("query"), body.get("limit", 30), body.get("hard_filter_company_urls")
        )
        scenario = fake.scenario_for(query)
    except ValueError as exc:
        return detail(400, str(exc))
    job_id = fake.initiate(query, limit, company_urls, scenario)
    if job_id is None:
        return detail(402, "Insufficient credits")
    request.state.sim_call.job_id = job_id
    return JSONResponse({"job_id": job_id, "status": PENDING, "message": "Deep research job initiated"})


async def _status(request: Request) -> Response:
    if (refusal := _refused(request)) is not None:
        return refusal
    try:
        page = _query_int(request, "page", 1, None)
        page_size = _query_int(request, "page_size", 1, MAX_PAGE_SIZE)
    except ValueError as exc:
        return detail(400, str(exc))
    code, body = _fake(request).status(request.path_params["job_id"], page, page_size or DEFAULT_PAGE_SIZE)
    if isinstance(body, bytes):
        return Response(body, code, media_type="application/json")
    return JSONResponse(body, code)


async def _cancel(request: Request) -> Response:
    # The docs: "No rate limiting applied".
    if (refusal := _refused(request)) is not None:
        return refusal
    code, body = _fake(request).cancel(request.path_params["job_id"])
    return JSONResponse(body, code)


def _continuing(field: str) -> Callable[[Request], Any]:
    """A continue handler reading the additional count from `field`: the two endpoints' docs
    spell it differently, and a misspelt field is ignored (so the default applies), as it would be."""

    async def handler(request: Request) -> Response:
        if (refusal := _refused(request, "continue")) is not None:
            return refusal
        try:
            additional = (await json_object(request, empty_ok=True)).get(field, DEFAULT_ADDITIONAL)
        except ValueError as exc:
            return detail(400, str(exc))
        if isinstance(additional, bool) or not isinstance(additional, int) or not 1 <= additional <= MAX_LIMIT:
            return detail(400, f"{field} must be an integer between 1 and {MAX_LIMIT}, got {additional!r}")
        code, body = _fake(request).continue_job(request.path_params["job_id"], additional)
        return JSONResponse(body, code)

    return handler


async def _credits(request: Request) -> Response:
    if (refusal := _refused(request)) is not None:
        return refusal
    return JSONResponse(_fake(request).credits())


async def _http_error(request: Request, exc: Exception) -> Response:
    # FastAPI-style JSON bodies for unknown routes and methods, like the real service.
    if not isinstance(exc, HTTPException):
        raise exc
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


def create_app(fake: FakeClado | None = None) -> Starlette:
    """The ASGI app serving `fake` (a fresh FakeClado when omitted) as ``app.state.fake``."""
    fake = fake if fake is not None else FakeClado()
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HideInjectedDrops) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(HideInjectedDrops())
    app = Starlette(
        routes=[
            Route(JOBS_PREFIX, _initiate, methods=["POST"]),
            Route(JOBS_PREFIX + "/{job_id}", _status, methods=["GET"]),
            Route(JOBS_PREFIX + "/{job_id}/cancel", _cancel, methods=["POST"]),
            Route(JOBS_PREFIX + "/{job_id}/continue", _continuing("additionalLimit"), methods=["POST"]),
            Route(JOBS_PREFIX + "/{job_id}/more", _continuing("additional_limit"), methods=["POST"]),
            Route("/api/credits", _credits, methods=["GET"]),
            *CONTROL_ROUTES,
        ],
        middleware=[Middleware(FaultInjector, admit=_admitter(fake))],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.fake = fake
    return app


def serve(host: str = "127.0.0.1", port: int = 8900, *, log_level: str = "warning") -> None:
    """Run the simulator in the foreground until interrupted."""
    sys.stderr.write(f"fake Clado API listening on http://{host}:{port}\n")
    sys.stderr.flush()
    uvicorn.run(create_app(), host=host, port=port, log_level=log_level)


def loopback_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a free port of `host`, for uvicorn to serve on.

    Binding port 0 ourselves and handing uvicorn the socket leaves no window in which
    another process could take the port between choosing and binding it. The explicit
    IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets whose proto says TCP, and
    without it every response waits ~40 ms for a delayed ACK (Nagle)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, 0))
    return sock


class ThreadedFakeApi:
    """``with ThreadedFakeApi(fake) as server:`` serves `fake` on ``server.base_url`` from a
    background thread of this process until exit (tests and the demo).

    `log_config` is uvicorn's: its default gives uvicorn its own stderr handlers; None leaves
    uvicorn's loggers to propagate to the root logger (the demo sends them to its log file).
    """

    def __init__(
        self,
        fake: FakeClado | None = None,
        *,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        log_config: dict[str, Any] | None = uvicorn.config.LOGGING_CONFIG,
    ) -> None:
        self.fake = fake if fake is not None else FakeClado()
        self.host = host
        self.port = 0
        self._timeout = timeout
        self._log_config = log_config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url

    def start(self) -> Self:
        sock = loopback_socket(self.host)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.fake),
            log_level="warning",
            log_config=self._log_config,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-clado-api", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self._timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError(f"fake Clado API did not start on {self.base_url}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(self._timeout)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
