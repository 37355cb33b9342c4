"""The web console's pages, under /ui on the admin listener.

Every page reads through the console's use cases (queries.py) and the admin API's views;
every action goes through the same Operations as the CLI and /v1. Security, as for /v1:
without a configured admin token the console is refused. With one, a person logs in once
with it; the signed session cookie is HttpOnly, SameSite=Strict and scoped to /ui, every
POST carries a CSRF token, and every answer has a strict Content-Security-Policy (scripts
and styles from /ui/static only; no inline script, no inline style).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from supervisor.adapters.store import utcnow
from supervisor.app import errors, inputs
from supervisor.app.console import charts, queries
from supervisor.app.console.headers import SecurityHeaders
from supervisor.app.console.session import LOGIN_COOKIE, LOGIN_TTL, SESSION_COOKIE, SESSION_TTL, Session, Signer
from supervisor.app.operations import Operations
from supervisor.app.views import JobDetailView, iso
from supervisor.core.forecast import forecast_job, running_job
from supervisor.core.states import TERMINAL, State

log = structlog.get_logger("supervisor.console")

HERE = Path(__file__).parent
PREFIX = "/ui"
REFRESH_S = 5  # the overview re-reads itself this often (static/console.js)
MAX_FORM_BYTES = 64 * 1024

Page = Callable[[Request, "Visit"], Awaitable[Response]]


@dataclass(frozen=True)
class Visit:
    """A request from a logged-in person: their session, the CSRF token its forms carry and,
    for a POST, the form's fields."""

    session: Session
    csrf: str
    form: dict[str, list[str]]

    def field(self, name: str) -> str:
        return _field(self.form, name)


def _field(form: dict[str, list[str]], name: str) -> str:
    return (form.get(name) or [""])[0]


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _age(seconds: float) -> str:
    """42s, 7m, 3h, 2d: how long ago, to the unit that reads best."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _money(twin: dict[str, Any], key: str) -> str:
    """One figure of a `money` object, for a person: "5.40 USD" (4 places below a cent)."""
    amount = twin.get(key)
    if amount is None:
        return "—"
    places = 2 if amount == round(amount, 2) else 4
    return f"{amount:,.{places}f} {twin['currency']}"


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: only a console path, never another site."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"


def _csv_cell(value: str) -> str:
    # A label key or value starting with = + - @ would be a formula to a spreadsheet.
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


class Console:
    def __init__(
        self,
        token: bytes | None,
        ops: Callable[[], Operations],
        account_credits: Callable[[], int | None],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._signer = Signer(token) if token else None
        self._ops = ops
        self._account_credits = account_credits
        self._clock = clock
        self._templates = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True)
        )
        self._templates.filters["when"] = _when
        self._templates.filters["age"] = _age
        self._templates.globals.update(prefix=PREFIX, states=[s.value for s in State], quote=quote, money=_money)

    def routes(self) -> list[BaseRoute]:
        pages: list[tuple[str, Page, str]] = [
            ("/", self.overview, "GET"),
            ("/jobs", self.jobs, "GET"),
            ("/jobs/track", self.track, "POST"),
            ("/jobs/{job_id}", self.job, "GET"),
            ("/jobs/{job_id}/cancel", self.cancel, "POST"),
            ("/jobs/{job_id}/continue", self.continue_job, "POST"),
            ("/budgets/{name}", self.budget, "GET"),
            ("/queue", self.queue, "GET"),
            ("/queue/{submission_id}/cancel", self.cancel_queued, "POST"),
            ("/deliveries", self.deliveries, "GET"),
            ("/deliveries/{delivery_id}/redeliver", self.redeliver, "POST"),
            ("/report", self.report, "GET"),
            ("/report.csv", self.report_csv, "GET"),
            ("/logout", self.logout, "POST"),
        ]
        app = Starlette(
            routes=[
                Route("/login", self._guarded(self.login_form), methods=["GET"]),
                Route("/login", self._guarded(self.login), methods=["POST"]),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
                *(Route(path, self._guarded(self._logged_in(page)), methods=[method]) for path, page, method in pages),
            ],
            exception_handlers={
                404: lambda request, exc: self._error(request, errors.NotFound("no such page")),
                405: lambda request, exc: self._error(request, errors.MethodNotAllowed("method not allowed")),
            },
        )
        app.router.redirect_slashes = False
        return [
            Route(PREFIX, lambda request: RedirectResponse(f"{PREFIX}/", 308)),
            Mount(PREFIX, app=SecurityHeaders(app)),
        ]

    # -- the gate -----------------------------------------------------------------------

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            raise errors.AdminApiDisabled(
                "the console needs an admin token (http.token_env / http.token_file); none is configured"
            )
        return self._signer

    def _guarded(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Known failures as an error page with their status; anything else a logged 500."""

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # every failure becomes a page; a bug is logged
                error = errors.translate(exc)
                if error is None or isinstance(error, errors.Internal):
                    log.error("console request failed", path=request.url.path, exc_info=exc)
                    error = error or errors.Internal(type(exc).__name__)
                return self._error(request, error)

        return guarded

    def _logged_in(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def visit(request: Request) -> Response:
            signer = self.signer
            session = signer.session(request.cookies.get(SESSION_COOKIE), self._clock())
            if session is None:
                if request.method == "GET":
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", 303)
                raise errors.Unauthorized("log in first: this session is missing or has expired")
            form: dict[str, list[str]] = {}
            if request.method == "POST":
                form = await self._form(request)
                if not signer.csrf_ok(session.sid, _field(form, "csrf")):
                    raise _CsrfRefused("this form has no valid CSRF token; reload the page and try again")
            return await page(request, Visit(session, signer.csrf(session.sid), form))

        return visit

    async def _form(self, request: Request) -> dict[str, list[str]]:
        """A URL-encoded form, bounded in size (the console posts nothing else)."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                raise errors.PayloadTooLarge(f"forms are limited to {MAX_FORM_BYTES} bytes")
        if not raw:
            return {}  # no fields at all: refused by the CSRF check, not as a bad body
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise errors.BadInput("forms are posted as application/x-www-form-urlencoded")
        try:
            return parse_qs(raw.decode(), keep_blank_values=True, max_num_fields=100)
        except (UnicodeDecodeError, ValueError):
            raise errors.BadInput("the form could not be read") from None

    # -- login -------------------------------------------------------------------------

    async def login_form(
        self, request: Request, problem: str | None = None, status: int = 200, target: str | None = None
    ) -> Response:
        nonce = self.signer.login_nonce()
        response = self._render(
            request,
            "login.html",
            status=status,
            csrf=self.signer.csrf(f"login-{nonce}"),
            next=_safe_next(target or request.query_params.get("next")),
            problem=problem,
        )
        self._set_cookie(request, response, LOGIN_COOKIE, nonce, int(LOGIN_TTL.total_seconds()))
        return response

    async def login(self, request: Request) -> Response:
        signer = self.signer
        form = await self._form(request)
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or not signer.csrf_ok(f"login-{nonce}", _field(form, "csrf")):
            raise _CsrfRefused("this login form has expired or has no valid CSRF token; reload it")
        if not signer.token_matches(_field(form, "token")):
            log.warning("console login refused: wrong admin token")
            return await self.login_form(request, "That is not the admin token.", 401, _field(form, "next"))
        _, cookie = signer.new_session(self._clock())
        response = RedirectResponse(_safe_next(_field(form, "next")), 303)
        self._set_cookie(request, response, SESSION_COOKIE, cookie, int(SESSION_TTL.total_seconds()))
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        log.info("console login")
        return response

    async def logout(self, request: Request, visit: Visit) -> Response:
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    @staticmethod
    def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    # -- pages -------------------------------------------------------------------------

    async def overview(self, request: Request, visit: Visit) -> Response:
        figures = await queries.overview(self._ops(), self._account_credits(), self._clock())
        bars = {
            budget.name: charts.budget_bar(
                budget.spent, budget.reserved, budget.credits, figures.warn_at.get(budget.name, ())
            )
            for budget in figures.today.budgets
        }
        burns = {
            name: charts.burn_chart(burn, width=480, height=200)
            for name, burn in (await queries.burns(self._ops(), figures.today.budgets, self._clock())).items()
        }
        return self._render(
            request, "overview.html", visit=visit, o=figures, bars=bars, burns=burns, refresh=REFRESH_S,
            page="overview",
        )  # fmt: skip

    async def budget(self, request: Request, visit: Visit) -> Response:
        name = request.path_params["name"]
        ops = self._ops()
        now = self._clock()
        views = [b for b in (await ops.budgets()).budgets if b.name == name]
        if not views:
            return self._error(request, errors.NotFound(f"no budget {name!r} is configured"))
        (view,) = views
        burn = (await queries.burns(ops, views, now))[name]
        return self._render(
            request, "budget.html", visit=visit, b=view, chart=charts.burn_chart(burn), burn=burn, page="overview"
        )

    async def jobs(self, request: Request, visit: Visit) -> Response:
        params = request.query_params
        filters = queries.JobFilters.of(params, params.getlist("label"))
        page = await queries.jobs_page(self._ops(), filters, queries.page_number(params.get("page")))

        def link(number: int) -> str:
            kept = [(k, v) for k, v in params.multi_items() if k != "page" and v]
            return f"{PREFIX}/jobs?{urlencode([*kept, ('page', str(number))])}"

        config = self._ops().config
        return self._render(
            request,
            "jobs.html",
            visit=visit,
            result=page,
            filters=filters,
            label_text=params.get("label", ""),
            link=link,
            policies=sorted(config.policies),
            page="jobs",
        )

    async def job(self, request: Request, visit: Visit) -> Response:
        job_id = request.path_params["job_id"]
        ops = self._ops()
        try:
            job, events = await ops.job(job_id)
        except errors.JobNotTracked:
            return self._render(request, "untracked.html", status=404, visit=visit, job_id=job_id, page="jobs")
        now = self._clock()
        detail = JobDetailView.of(ops.config, job, events, now)
        story = charts.job_story(detail)
        forecast = None
        if job.state is State.WATCHING and detail.forecast_credits is not None:
            # Where its forecast ends: its credit limit's crossing, else when its rate spends the rest.
            ahead = forecast_job(running_job(ops.config, job), now)
            ends_at = ahead.reaches_limit_at or now + timedelta(seconds=ahead.done_in_s)
            forecast = charts.Point(max(ends_at, now), detail.forecast_credits)
        return self._render(
            request,
            "job.html",
            visit=visit,
            job=detail,
            chart=charts.credits_chart(story, forecast),
            story=story,
            forecast=forecast,
            cancellable=job.state is State.WATCHING,
            continuable=job.state is State.COMPLETED,
            terminal=job.state in TERMINAL,
            page="jobs",
        )

    async def track(self, request: Request, visit: Visit) -> Response:
        ids = visit.field("job_ids").split()
        labels = inputs.label_args(line.strip() for line in visit.field("labels").splitlines() if line.strip())
        await self._ops().track(ids, labels=labels, policy=visit.field("policy") or None)
        if len(ids) == 1:
            return RedirectResponse(f"{PREFIX}/jobs/{quote(ids[0])}", 303)
        return RedirectResponse(f"{PREFIX}/jobs", 303)

    async def cancel(self, request: Request, visit: Visit) -> Response:
        job_id = request.path_params["job_id"]
        # Announced, counted and logged as a cancel from the CLI or /v1 is.
        await self._ops().manual_cancel(job_id, visit.field("reason") or None)
        return RedirectResponse(f"{PREFIX}/jobs/{quote(job_id)}", 303)

    async def continue_job(self, request: Request, visit: Visit) -> Response:
        job_id = request.path_params["job_id"]
        additional = inputs.count_arg("additional", visit.field("additional") or "30")
        # Through admission, as `clado-supervisor continue` and POST /v1/jobs/{id}/continue.
        await self._ops().continue_job(job_id, additional)
        return RedirectResponse(f"{PREFIX}/jobs/{quote(job_id)}", 303)

    async def queue(self, request: Request, visit: Visit) -> Response:
        rows = await queries.queue_rows(self._ops(), self._clock())
        return self._render(request, "queue.html", visit=visit, rows=rows, page="queue")

    async def cancel_queued(self, request: Request, visit: Visit) -> Response:
        # The same operation as `clado-supervisor queue cancel` and POST /v1/queue/{id}/cancel.
        await self._ops().cancel_queued(request.path_params["submission_id"])
        return RedirectResponse(f"{PREFIX}/queue", 303)

    async def deliveries(self, request: Request, visit: Visit) -> Response:
        # Failed first (what needs a person), then pending, then delivered.
        items = await self._ops().deliveries()
        return self._render(request, "deliveries.html", visit=visit, items=items, page="deliveries")

    async def redeliver(self, request: Request, visit: Visit) -> Response:
        # The same operation as `clado-supervisor webhooks redeliver` and POST /v1/deliveries/{id}/redeliver.
        await self._ops().redeliver([request.path_params["delivery_id"]])
        return RedirectResponse(f"{PREFIX}/deliveries", 303)

    async def report(self, request: Request, visit: Visit) -> Response:
        which = queries.period(request.query_params.get("period"))
        figures = await queries.report(self._ops(), which, self._clock())
        return self._render(request, "report.html", visit=visit, r=figures, period=which, page="report")

    async def report_csv(self, request: Request, visit: Visit) -> Response:
        which = queries.period(request.query_params.get("period"))
        figures = await queries.report(self._ops(), which, self._clock())
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerows([_csv_cell(cell) for cell in row] for row in queries.report_csv_rows(figures))
        stamp = iso(figures.generated_at).replace(":", "")
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="clado-report-{which}-{stamp}.csv"'},
        )

    # -- rendering -----------------------------------------------------------------------

    def _render(self, request: Request, name: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        html = self._templates.get_template(name).render(request=request, **context)
        return HTMLResponse(html, status_code=status)

    def _error(self, request: Request, error: errors.SupervisorError) -> Response:
        return self._render(request, "error.html", status=error.status, error=error)


class _CsrfRefused(errors.SupervisorError):
    exit_code, status, code, title = 2, 403, "csrf_refused", "CSRF token refused"


def console_routes(
    token: bytes | None, ops: Callable[[], Operations], account_credits: Callable[[], int | None]
) -> list[BaseRoute]:
    """The console's routes for the admin API's app: /ui and everything under it."""
    return Console(token, ops, account_credits).routes()
