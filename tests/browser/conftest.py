"""Browser tests: Debian's headless Chromium, driven through its chromedriver (Selenium),
against the real daemon and admin listener, which supervise the simulator over loopback.

The daemon runs on an event loop of its own in a background thread, so that the test's
blocking WebDriver calls never stall it; `LiveConsole.call` runs a coroutine on that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conftest import config_text, load, running_daemon
from supervisor.app.http import AdminApi, AdminServer
from supervisor.config import Config
from supervisor.service.runtime import Daemon

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# No network of its own (updates, sync, QUIC), no GPU, no sandbox (root in a container).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
TOKEN = "adm-browser-3b7e9f1a6c2d8e45"
POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 200
warn_at = [0.8]

[policies.tight]
match = { team = "tight" }
max_credits = 12

[budgets.growth-daily]
match = { team = "growth" }
period = "day"
credits = 400
warn_at = [0.5, 0.9]
forecast_warn_at = [1.0]

[budgets.research-daily]
match = { team = "research" }
period = "day"
credits = 150
warn_at = [0.8]

[account]
min_credits = 500
check_interval = "1s"
action = "observe"
"""
T = TypeVar("T")


class LiveConsole:
    """The daemon with its admin listener (and so the console) on a thread of its own."""

    def __init__(self, config: Config, token: str) -> None:
        self._config = config
        self._token = token
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="console-daemon", daemon=True)
        self.daemon: Daemon
        self.url = ""

    async def _main(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with running_daemon(self._config) as daemon:
                server = AdminServer(AdminApi(daemon, self._token, 65536), self._config.http.listen)
                await server.start()
                self.daemon, self.url = daemon, f"http://127.0.0.1:{server.port}/ui"
                self._ready.set()
                try:
                    await self._stop.wait()
                finally:
                    await server.stop()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            raise

    def start(self) -> LiveConsole:
        self._thread.start()
        self._ready.wait(60)
        if self._failure is not None or not self.url:
            raise RuntimeError(f"the daemon did not start: {self._failure!r}")
        return self

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(60)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


@pytest.fixture
def live(tmp_path: Path, fake_server: Any, sqlite_url: str) -> Iterator[LiveConsole]:
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text(fake_server.base_url, sqlite_url, policies=POLICIES), encoding="utf-8")
    console = LiveConsole(load(path), TOKEN).start()
    try:
        yield console
    finally:
        console.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
