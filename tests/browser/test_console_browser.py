"""The web console in a real headless Chromium, as the person who owns the budget uses it.

Waits are WebDriverWait on what the page shows (bounded), never a fixed sleep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from supervisor.adapters.store import NewJob, utcnow
from supervisor.app.operations import Operations
from supervisor.app.views import QueueItemView
from supervisor.core.states import State

from .conftest import TOKEN, LiveConsole

WAIT_S = 30


def wait(browser: Any) -> WebDriverWait[Any]:
    # A figure console.js swapped in place between being found and being read: read again.
    return WebDriverWait(browser, WAIT_S, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))


def log_in(browser: Any, live: LiveConsole, path: str = "/") -> None:
    browser.get(live.url + path)
    wait(browser).until(expected_conditions.presence_of_element_located((By.ID, "token")))
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait(browser).until(lambda b: "/ui/login" not in b.current_url)


def track(live: LiveConsole, job_id: str, **labels: str) -> None:
    policy = "tight" if labels.get("team") == "tight" else "default"
    live.call(live.daemon.store.add_jobs([NewJob(job_id, policy, labels)], utcnow()))


def state_of(live: LiveConsole, job_id: str) -> State | None:
    job = live.call(live.daemon.store.get_job(job_id))
    return job.state if job else None


def csp_violations(browser: Any) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]


def text(browser: Any, element_id: str) -> str:
    """The element's text as the page shows it now. console.js swaps the figures in place:
    an element found just before a swap is stale when read, so it is found again."""
    for _ in range(5):
        try:
            return str(browser.find_element(By.ID, element_id).text.strip())
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"#{element_id} was replaced five times in a row while being read")


def test_without_a_session_the_console_asks_for_the_token(browser: Any, live: LiveConsole, fake_server: Any) -> None:
    job_id = fake_server.fake.create_job(rate=0.1)
    track(live, job_id)
    browser.get(f"{live.url}/jobs/{job_id}")
    assert "/ui/login" in browser.current_url
    assert not browser.find_elements(By.ID, "job-state")  # nothing of the job is shown
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login").click()
    # The refusal is the login page again: wait for the new page, the old one is still shown.
    wait(browser).until(lambda b: "That is not the admin token." in b.page_source)
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait(browser).until(lambda b: b.current_url.endswith(f"/ui/jobs/{job_id}"))  # back where it was going
    assert text(browser, "job-state") == "watching"
    # The session cookie is out of the page's scripts' reach.
    assert browser.execute_script("return document.cookie") == ""
    assert browser.get_cookie("clado_console")["httpOnly"] is True
    assert csp_violations(browser) == []


def test_the_overview_updates_itself_as_a_job_is_cancelled(browser: Any, live: LiveConsole, fake_server: Any) -> None:
    log_in(browser, live)
    assert text(browser, "count-cancelled") == "0"
    browser.execute_script("window.sameDocument = true")  # gone if the page were reloaded
    job_id = fake_server.fake.create_job(rate=20)
    track(live, job_id, team="tight")
    wait(browser).until(lambda b: text(b, "count-cancelled") == "1")
    wait(browser).until(lambda b: b.find_elements(By.ID, "cancels-max_credits"))
    assert text(browser, "cancels-max_credits") == "1"
    assert browser.execute_script("return window.sameDocument") is True  # swapped in place by console.js
    assert state_of(live, job_id) is State.CANCELLED
    assert csp_violations(browser) == []


def test_a_job_cancelled_from_its_page(browser: Any, live: LiveConsole, fake_server: Any) -> None:
    job_id = fake_server.fake.create_job(rate=0.5)
    track(live, job_id, team="growth")
    log_in(browser, live, f"/jobs/{job_id}")
    assert text(browser, "job-state") == "watching"
    assert browser.find_element(By.ID, "continue").get_attribute("disabled") is not None
    browser.find_element(By.NAME, "reason").send_keys("not needed any more")
    browser.find_element(By.ID, "cancel").click()
    wait(browser).until(expected_conditions.alert_is_present()).accept()  # "Cancel job … now?"

    def cancelled(b: Any) -> bool:
        if text(b, "job-state") != "cancelled":
            b.refresh()
            return False
        return True

    wait(browser).until(cancelled)
    assert fake_server.fake.request_count("cancel", job_id) >= 1
    assert text(browser, "reason") == "manual"
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    for part in ("limit", "decision", "cancel-call", "final"):
        assert chart.find_elements(By.CSS_SELECTOR, f"g.{part}"), f"the chart has no {part}"
    assert "limit 200" in chart.text
    assert "not needed any more" in browser.page_source
    assert csp_violations(browser) == []


def test_a_post_without_the_csrf_token_is_rejected(browser: Any, live: LiveConsole, fake_server: Any) -> None:
    job_id = fake_server.fake.create_job(rate=0.1)
    track(live, job_id)
    log_in(browser, live, f"/jobs/{job_id}")
    # What a forged form from another site looks like: the same fields, without the token.
    browser.execute_script("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())")
    browser.find_element(By.ID, "cancel").click()
    wait(browser).until(expected_conditions.alert_is_present()).accept()
    wait(browser).until(lambda b: "csrf_refused" in b.page_source)
    assert "403" in browser.title
    assert state_of(live, job_id) is State.WATCHING
    assert fake_server.fake.request_count("cancel", job_id) == 0


def test_screenshots(browser: Any, live: LiveConsole, fake_server: Any, tmp_path: Path) -> None:
    """The README's pictures (`make screenshots` writes them to docs/): a busy overview and
    one job cancelled at its credit limit."""
    out = Path(os.environ.get("CLADO_CONSOLE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    fake = fake_server.fake
    runaway = fake.create_job("senior Rust engineers in Berlin", limit=200, rate=4)
    track(live, runaway, team="tight")
    for query, rate, team in (
        ("data engineers in Lisbon", 2, "growth"),
        ("product designers in Austin", 1.5, "growth"),
        ("ML researchers in Montreal", 3, "research"),
        ("SRE leads in Dublin", 0.5, "research"),
    ):
        track(live, fake.create_job(query, rate=rate), team=team)
    track(live, fake.create_job("quick check", rate=10, max_results=8), team="growth")
    log_in(browser, live)
    wait(browser).until(lambda b: text(b, "count-cancelled") == "1" and text(b, "count-completed") == "1")
    wait(browser).until(lambda b: text(b, "account") not in ("", "— credits"))
    browser.save_screenshot(str(out / "console-overview.png"))
    browser.get(f"{live.url}/jobs/{runaway}")
    wait(browser).until(lambda b: b.find_elements(By.CSS_SELECTOR, "svg.chart g.final"))
    browser.save_screenshot(str(out / "console-job.png"))
    for name in ("console-overview.png", "console-job.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert csp_violations(browser) == []


def test_a_queued_submission_cancelled_from_the_queue_page(browser: Any, live: LiveConsole, fake_server: Any) -> None:
    ops = Operations(live.daemon.config, live.daemon.store, live.daemon.client)
    # A minute's worth of initiates (initiate_per_minute 5): the next submission waits for a slot.
    for n in range(5):
        live.call(ops.submit(f"holders {n} fake:rate=0.1", limit=5, labels={}, queue=False))
    waiting = live.call(ops.submit("engineers in Porto", limit=5, labels={"team": "growth"}, queue=True, priority=2))
    assert isinstance(waiting, QueueItemView)
    assert (waiting.state, waiting.reason) == ("queued", "initiate_rate")

    log_in(browser, live, "/queue")
    row = browser.find_element(By.ID, f"submission-{waiting.id}")
    assert "the initiate rate: its next slot" in row.text
    assert "team=growth" in row.text
    assert "engineers in Porto" in row.text
    row.find_element(By.CSS_SELECTOR, "button.cancel-queued").click()
    wait(browser).until(expected_conditions.alert_is_present()).accept()  # "Cancel queued submission …?"
    wait(browser).until(lambda b: "cancelled" in b.find_element(By.ID, f"submission-{waiting.id}").text)
    assert not browser.find_element(By.ID, f"submission-{waiting.id}").find_elements(By.CSS_SELECTOR, "button")
    assert live.call(ops.queue_item(waiting.id)).state == "cancelled"
    assert len(fake_server.fake.requests("initiate")) == 5  # it never started
    assert csp_violations(browser) == []


def test_the_burn_chart_shows_spend_the_forecast_to_the_period_end_and_the_limit(
    browser: Any, live: LiveConsole, fake_server: Any
) -> None:
    """Two growth jobs on track for 400 of the budget's 400: the budget's page draws what was
    spent, the forecast line and band to the period's end, its credits and its thresholds;
    the overview draws the same chart small; a job's page draws its own forecast line."""
    jobs = [fake_server.fake.create_job(limit=200, rate=5) for _ in range(2)]
    for job_id in jobs:
        track(live, job_id, team="growth")
    log_in(browser, live, "/budgets/growth-daily")

    def rated(_: Any) -> bool:
        found = [live.call(live.daemon.store.get_job(job_id)) for job_id in jobs]
        return all(job is not None and job.credits_per_s for job in found)

    wait(browser).until(rated)
    browser.refresh()
    chart = wait(browser).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#burn-chart svg.burn"))
    )
    for part in ("polyline.credits", ".forecast line", "polygon.band", ".limit line", ".warn-at line", "line.now"):
        assert chart.find_elements(By.CSS_SELECTOR, part), part
    labels = [t.text for t in chart.find_elements(By.CSS_SELECTOR, ".warn-at text")]
    assert labels == ["warn 0.5", "warn 0.9", "forecast warn 1"]  # at 200, 360 and 400 credits
    assert "credits 400" in chart.find_element(By.CSS_SELECTOR, ".limit text").text
    forecast = int(chart.find_element(By.CSS_SELECTOR, ".forecast text").text.removeprefix("forecast "))
    assert forecast >= 300  # each job is going to its limit of 200
    # The forecast line runs from the spend so far to the period's end: the chart's right edge.
    line = chart.find_element(By.CSS_SELECTOR, ".forecast line")
    right_edge = max(float(t.get_attribute("x")) for t in chart.find_elements(By.CSS_SELECTOR, "text.axis"))
    assert float(line.get_attribute("x2")) == right_edge
    assert float(line.get_attribute("x1")) < float(line.get_attribute("x2"))
    figures = text(browser, "budget-figures")
    assert "USD" in figures and "forecast" in figures
    assert text(browser, "exhausts-at") != ""

    browser.get(live.url + "/")
    small = wait(browser).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#burn-growth-daily svg.burn"))
    )
    assert small.find_elements(By.CSS_SELECTOR, ".forecast line")
    assert "USD" in text(browser, "spend-money")

    browser.get(f"{live.url}/jobs/{jobs[0]}")
    job_chart = wait(browser).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "svg.chart")))
    assert job_chart.find_elements(By.CSS_SELECTOR, ".forecast line")
    assert "USD" in text(browser, "job-forecast")
    assert csp_violations(browser) == []
