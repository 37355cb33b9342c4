"""The web console (/ui) over real loopback HTTP, in front of a daemon supervising the simulator.

httpx plays the browser: it keeps the session cookie and posts the forms the pages carry.
The browser itself (JavaScript, the CSP as Chromium enforces it) is tests/browser/.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from conftest import API_KEY, config_text, load, running_daemon, wait_until
from fakeserver import FakeServer
from supervisor.adapters.store import NewJob, utcnow
from supervisor.adapters.tables import outbox
from supervisor.app.console.queries import PAGE_SIZE
from supervisor.app.http import AdminApi, AdminServer
from supervisor.app.operations import Operations
from supervisor.app.report import build_report
from supervisor.app.views import QueueItemView, SubmitResult
from supervisor.config import Config
from supervisor.core.budgets import next_period_start
from supervisor.core.notify import Notice
from supervisor.core.states import TERMINAL, State
from supervisor.service.runtime import Daemon

TOKEN = "adm-console-5e8a1f3c9d7b2e40"
POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 200

[policies.tight]
match = { team = "tight" }
max_credits = 3

[budgets.growth-daily]
match = { team = "growth" }
period = "day"
credits = 1000
warn_at = [0.5, 0.9]
"""
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Console:
    daemon: Daemon
    http: httpx.AsyncClient

    async def login(self) -> None:
        form = await self.http.get("/ui/login")
        answer = await self.http.post(
            "/ui/login", data={"csrf": csrf_of(form.text), "token": TOKEN, "next": "/ui/jobs"}
        )
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/ui/jobs"

    async def page(self, path: str, **params: Any) -> httpx.Response:
        answer = await self.http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer

    async def post_form(self, page: str, action: str, **fields: str) -> httpx.Response:
        """Post a form as the page at `page` carries it (with that page's CSRF token)."""
        csrf = csrf_of((await self.http.get(page)).text)
        return await self.http.post(action, data={"csrf": csrf, **fields})


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def make_config(tmp_path: Path, base_url: str, db_url: str) -> Config:
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(base_url, db_url, policies=POLICIES), encoding="utf-8")
    return load(path)


@asynccontextmanager
async def console_of(config: Config, token: str | None) -> AsyncIterator[Console]:
    async with running_daemon(config) as daemon:
        server = AdminServer(AdminApi(daemon, token, config.http.max_body_bytes), config.http.listen)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
                yield Console(daemon, http)
        finally:
            await server.stop()


@pytest.fixture
async def console(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> AsyncIterator[Console]:
    async with console_of(make_config(tmp_path, fake_server.base_url, sqlite_url), TOKEN) as c:
        yield c


async def job_state(daemon: Daemon, job_id: str) -> State | None:
    job = await daemon.store.get_job(job_id)
    return job.state if job else None


# -- security ------------------------------------------------------------------------------


async def test_refused_without_a_configured_token(tmp_path: Path, fake_server: FakeServer, sqlite_url: str) -> None:
    async with console_of(make_config(tmp_path, fake_server.base_url, sqlite_url), None) as c:
        for path in ("/ui/", "/ui/login", "/ui/jobs"):
            answer = await c.http.get(path)
            assert answer.status_code == 403
            assert "admin token" in answer.text
        refused = await c.http.post("/ui/login", data={"token": ""})
        assert refused.status_code == 403


async def test_pages_need_a_session(console: Console, fake_server: FakeServer) -> None:
    job_id = fake_server.fake.create_job(rate=0.1)
    await console.daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())
    for path in ("/ui/", f"/ui/jobs/{job_id}", "/ui/report", "/ui/report.csv"):
        answer = await console.http.get(path)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/ui/login?next=")
        assert job_id not in answer.text
    # A forged or tampered cookie is no session either.
    console.http.cookies.set("clado_console", "eyJzaWQiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.forged", path="/ui")
    assert (await console.http.get("/ui/jobs")).status_code == 303
    refused = await console.http.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": "x"})
    assert refused.status_code == 401
    assert await job_state(console.daemon, job_id) is State.WATCHING


async def test_login_sets_a_strict_http_only_session_and_never_shows_a_secret(console: Console) -> None:
    form = await console.http.get("/ui/login")
    wrong = await console.http.post("/ui/login", data={"csrf": csrf_of(form.text), "token": "nope"})
    assert wrong.status_code == 401
    assert "clado_console=" not in wrong.headers.get("set-cookie", "")

    form = await console.http.get("/ui/login")
    answer = await console.http.post("/ui/login", data={"csrf": csrf_of(form.text), "token": TOKEN})
    assert answer.status_code == 303
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("clado_console="))
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/ui" in cookie
    assert TOKEN not in cookie

    for path in ("/ui/", "/ui/jobs", "/ui/report", "/ui/report.csv"):
        page = await console.page(path)
        assert TOKEN not in page.text
        assert API_KEY not in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["x-frame-options"] == "DENY"
        # No inline script and no inline style anywhere: the CSP would block them.
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
        assert " style=" not in page.text


async def test_a_login_post_without_its_form_is_refused(console: Console) -> None:
    # No login-form cookie and no CSRF token: a cross-site login attempt.
    answer = await console.http.post("/ui/login", data={"token": TOKEN})
    assert answer.status_code == 403
    assert "clado_console=" not in answer.headers.get("set-cookie", "")


async def test_a_post_without_the_csrf_token_changes_nothing(console: Console, fake_server: FakeServer) -> None:
    job_id = fake_server.fake.create_job(rate=0.1)
    await console.daemon.store.add_jobs([NewJob(job_id, "default")], utcnow())
    await console.login()
    for data in ({}, {"csrf": "not-the-token"}):
        answer = await console.http.post(f"/ui/jobs/{job_id}/cancel", data=data)
        assert answer.status_code == 403
        assert "CSRF" in answer.text
    assert await job_state(console.daemon, job_id) is State.WATCHING
    assert fake_server.fake.request_count("cancel") == 0

    done = await console.post_form(f"/ui/jobs/{job_id}", f"/ui/jobs/{job_id}/cancel", reason="from the console")
    assert done.status_code == 303
    job = await console.daemon.store.get_job(job_id)
    assert job is not None
    assert job.cancel_reason == "manual"
    assert job.cancel_detail is not None
    assert job.cancel_detail["note"] == "from the console"


# -- pages ---------------------------------------------------------------------------------


async def test_track_from_an_untracked_jobs_page(console: Console, fake_server: FakeServer) -> None:
    job_id = fake_server.fake.create_job(rate=0.1)
    await console.login()
    page = await console.http.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 404
    assert 'id="track"' in page.text
    answer = await console.post_form(f"/ui/jobs/{job_id}", "/ui/jobs/track", job_ids=job_id, labels="team=growth")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/ui/jobs/{job_id}"
    job = await console.daemon.store.get_job(job_id)
    assert job is not None
    assert job.labels == {"team": "growth"}
    shown = await console.page(f"/ui/jobs/{job_id}")
    assert "team=growth" in shown.text
    bad = await console.post_form("/ui/jobs", "/ui/jobs/track", job_ids="not a valid id!")
    assert bad.status_code == 422


async def test_a_cancelled_jobs_page_tells_its_story(console: Console, fake_server: FakeServer) -> None:
    job_id = fake_server.fake.create_job(rate=5)
    await console.login()
    await console.post_form("/ui/jobs", "/ui/jobs/track", job_ids=job_id, labels="team=tight")

    async def final() -> bool:
        return await job_state(console.daemon, job_id) in TERMINAL

    await wait_until(console.daemon, final, what="the tight job to end")
    job = await console.daemon.store.get_job(job_id)
    assert job is not None
    assert job.state is State.CANCELLED
    assert job.cancel_reason == "max_credits"
    page = (await console.page(f"/ui/jobs/{job_id}")).text
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert "limit 3" in svg
    assert 'class="decision"' in svg
    assert f"decided at {job.credits_at_decision}" in svg
    assert 'class="cancel-call"' in svg
    assert f"final {job.credits_used}" in svg
    assert 'id="cancel"' in page
    assert "disabled" in page[page.index('id="cancel"') :].split(">")[0]
    # A cancelled job cannot be continued (only a completed one): the button says why.
    assert "only a completed job can be continued" in page[page.index('id="continue"') :].split(">")[0]
    for kind in ("tracked", "transition"):
        assert f"kind-{kind}" in page


async def test_jobs_filters_and_search(console: Console) -> None:
    now = utcnow()
    jobs = [
        NewJob("alpha-1", "default", {"team": "growth"}, query="engineers in Paris"),
        NewJob("alpha-2", "tight", {"team": "tight"}, query="designers in Lyon"),
        NewJob("beta-3", "default", {"team": "research"}, source="submit", query="PARIS data people"),
    ]
    await console.daemon.store.add_jobs(jobs, now)
    await console.login()

    async def shown(**params: str) -> set[str]:
        text = (await console.page("/ui/jobs", **params)).text
        return set(re.findall(r'href="/ui/jobs/([a-z0-9-]+)"', text)) & {"alpha-1", "alpha-2", "beta-3"}

    assert await shown() == {"alpha-1", "alpha-2", "beta-3"}
    assert await shown(label="team=growth") == {"alpha-1"}
    assert await shown(policy="tight") == {"alpha-2"}
    assert await shown(q="paris") == {"alpha-1", "beta-3"}
    assert await shown(q="ALPHA") == {"alpha-1", "alpha-2"}
    assert await shown(state="cancelled") == set()
    assert await shown(state="watching", q="beta") == {"beta-3"}
    assert (await console.http.get("/ui/jobs", params={"state": "sleeping"})).status_code == 422
    assert (await console.http.get("/ui/jobs", params={"page": "0"})).status_code == 422


async def test_ten_thousand_jobs_a_page_at_a_time(console: Console) -> None:
    """The jobs page reads one page with a bounded number of statements, however many jobs."""
    start = utcnow() - timedelta(hours=1)
    for batch in range(10):
        await console.daemon.store.add_jobs(
            [NewJob(f"bulk-{batch * 1000 + i:05d}", "default", {"team": "growth"}) for i in range(1000)],
            start + timedelta(seconds=batch),
        )
    await console.login()
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "jobs" in statement:
            statements.append(statement)

    engine = console.daemon.store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        first = await console.page("/ui/jobs")
        first_statements = len(statements)
        last = await console.page("/ui/jobs", page="200")
    finally:
        event.remove(engine, "before_cursor_execute", count)
    # A page and a count, whatever the daemon did meanwhile (its ticks touch `jobs` too).
    # (The daemon's claims page too, by next_check_at; its gauges count with GROUP BY.)
    page_reads = [
        s for s in statements
        if "ORDER BY jobs.submitted_at DESC" in s or ("count(*)" in s.lower() and "group by" not in s.lower())
    ]  # fmt: skip
    assert len(page_reads) == 4
    assert first_statements < 20
    rows = re.findall(r'href="/ui/jobs/(bulk-\d+)"', first.text)
    assert len(rows) == PAGE_SIZE
    assert rows[0] == "bulk-09999"  # newest first
    assert "10000 matching" in first.text
    assert "page 1 of 200" in first.text
    assert len(first.content) < 200_000
    assert re.findall(r'href="/ui/jobs/(bulk-\d+)"', last.text)[-1] == "bulk-00000"


async def test_overview_and_report_agree_with_the_report_command(console: Console, fake_server: FakeServer) -> None:
    tight = fake_server.fake.create_job(rate=5)
    growth = fake_server.fake.create_job(rate=2)
    await console.login()
    await console.post_form("/ui/jobs", "/ui/jobs/track", job_ids=tight, labels="team=tight")
    await console.post_form("/ui/jobs", "/ui/jobs/track", job_ids=growth, labels="team=growth")

    async def cancelled() -> bool:
        return await job_state(console.daemon, tight) is State.CANCELLED

    await wait_until(console.daemon, cancelled, what="the tight job to be cancelled")
    overview = (await console.page("/ui/")).text
    assert re.search(r'id="count-cancelled">\s*1<', overview)
    assert re.search(r'id="cancels-max_credits">\s*1<', overview)
    assert 'id="budget-growth-daily"' in overview
    assert overview.count('class="threshold"') == 2  # the budget's two warning thresholds
    assert 'data-refresh="5"' in overview

    expected = await build_report(console.daemon.store, console.daemon.config, "day", utcnow())
    report = (await console.page("/ui/report")).text
    assert re.search(rf'id="r-jobs">\s*{expected["jobs"]}<', report)
    download = await console.page("/ui/report.csv", period="day")
    assert download.headers["content-type"].startswith("text/csv")
    assert "attachment" in download.headers["content-disposition"]
    rows = {(section, key): value for section, key, value in csv.reader(io.StringIO(download.text))}
    assert rows[("total", "jobs")] == str(expected["jobs"])
    assert rows[("cancels_by_reason", "max_credits")] == "1"
    assert rows[("budget:growth-daily", "credits")] == "1000"
    assert (await console.http.get("/ui/report", params={"period": "year"})).status_code == 422


async def test_csv_cells_are_never_formulas(console: Console) -> None:
    await console.daemon.store.add_jobs([NewJob("formula-1", "default", {"=cmd": "@SUM(A1)"})], utcnow())
    await console.login()
    text = (await console.page("/ui/report.csv")).text
    assert "'=cmd=@SUM(A1)" in text
    assert "\n=cmd" not in text


# -- the queue -----------------------------------------------------------------------------

QUEUE_BUDGET = """
[budgets.queued-monthly]
match = { team = "queued" }
period = "month"
credits = 10
action = "block"
reserve = true
"""


def queue_row(html: str, submission_id: str) -> str:
    match = re.search(rf'<tr id="submission-{submission_id}">(.*?)</tr>', html, re.DOTALL)
    assert match, f"submission {submission_id} is not on the queue page"
    return " ".join(match.group(1).split())


async def test_the_queue_page_shows_why_each_waits_and_cancels_a_queued_one(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, sqlite_url, policies=POLICIES + QUEUE_BUDGET), encoding="utf-8")
    config = load(path)
    async with console_of(config, TOKEN) as console:
        ops = Operations(config, console.daemon.store, console.daemon.client)
        team = {"team": "queued"}
        # The month's whole budget reserved by a slow job: the next submission waits for next month.
        holder = await ops.submit("holders fake:rate=0.1", limit=10, labels=team)
        assert isinstance(holder, SubmitResult)
        waiting = await ops.submit("engineers in Porto", limit=5, labels=team, queue=True, priority=3)
        assert isinstance(waiting, QueueItemView)
        assert waiting.state == "queued"

        await console.login()
        page = await console.page("/ui/queue")
        assert 'href="/ui/queue" aria-current="page"' in page.text
        row = queue_row(page.text, waiting.id)
        assert "engineers in Porto" in row
        assert "queued" in row
        assert '<td class="num">3</td>' in row  # its priority
        assert "team=queued" in row
        assert "budget queued-monthly: its next period" in row
        next_month = next_period_start("month", "UTC", utcnow())
        assert next_month is not None
        assert next_month.strftime("%Y-%m-%d %H:%M:%S UTC") in row  # the expected start
        assert re.search(r'<td class="num" title="submitted [^"]+">\d+s</td>', row)  # its age
        assert f'action="/ui/queue/{waiting.id}/cancel"' in row

        # A cancel without the page's CSRF token changes nothing.
        refused = await console.http.post(f"/ui/queue/{waiting.id}/cancel", data={"csrf": "forged"})
        assert refused.status_code == 403
        assert (await ops.queue_item(waiting.id)).state == "queued"

        done = await console.post_form("/ui/queue", f"/ui/queue/{waiting.id}/cancel")
        assert done.status_code == 303
        assert done.headers["location"] == "/ui/queue"
        assert (await ops.queue_item(waiting.id)).state == "cancelled"  # as `queue cancel` leaves it
        row = queue_row((await console.page("/ui/queue")).text, waiting.id)
        assert "cancelled" in row
        assert "/cancel" not in row  # only a queued submission can be cancelled

        # Cancelling it again (a stale page) is idempotent, as `queue cancel` is.
        again = await console.post_form("/ui/queue", f"/ui/queue/{waiting.id}/cancel")
        assert again.status_code == 303
        assert (await ops.queue_item(waiting.id)).state == "cancelled"

        # A started one is refused with the reason, as `queue cancel` refuses it.
        started = [item for item in await ops.queue(["started"]) if item.job_id == holder.job_id]
        assert len(started) == 1
        refused = await console.post_form("/ui/queue", f"/ui/queue/{started[0].id}/cancel")
        assert refused.status_code == 409
        assert "only a queued or orphaned one can be cancelled" in refused.text


async def test_the_deliveries_page_lists_failed_first_and_redelivers(
    tmp_path: Path, fake_server: FakeServer, sqlite_url: str
) -> None:
    path = tmp_path / "supervisor.toml"
    hook = '\n[[notify.webhooks]]\nurl = "http://127.0.0.1:9/hook"\nevents = ["budget_warning"]\ntimeout = "1s"\n'
    path.write_text(config_text(fake_server.base_url, sqlite_url, policies=POLICIES) + hook, encoding="utf-8")
    config = load(path)
    async with console_of(config, TOKEN) as console:
        store = console.daemon.store
        now = utcnow()
        for name in ("first", "second"):
            await store.record_notices([Notice("budget_warning", now, f"budget:{name}", {"budget": name})], now)
        rows = await store.list_deliveries()
        failed_id = next(row["delivery_id"] for row in rows if row["subject"] == "budget:first")
        # A delivery given up on (as after notify.retry_for): the one a person must look at.
        await console.daemon.webhooks.close()  # the worker's own attempts would race the page below
        async with store.engine.begin() as conn:
            await conn.execute(
                outbox.update().where(outbox.c.delivery_id == failed_id).values(state="failed", last_error="HTTP 503")
            )

        await console.login()
        page = await console.page("/ui/deliveries")
        assert 'href="/ui/deliveries" aria-current="page"' in page.text
        ids = re.findall(r'<tr id="delivery-(msg_[0-9a-f]+)">', page.text)
        assert ids[0] == failed_id and len(ids) == 2  # failed first
        assert "HTTP 503" in page.text
        action = f"/ui/deliveries/{failed_id}/redeliver"
        assert page.text.count("/redeliver") == 1  # only the failed one: the pending one is on its way

        refused = await console.http.post(action, data={"csrf": "forged"})
        assert refused.status_code == 403
        assert (await store.get_delivery(failed_id) or {})["state"] == "failed"

        done = await console.post_form("/ui/deliveries", action)
        assert (done.status_code, done.headers["location"]) == (303, "/ui/deliveries")
        again = await store.get_delivery(failed_id)
        assert again is not None and (again["state"], again["attempts"]) == ("pending", 0)
