"""Shared test fixtures: the fake API over loopback, config files, an in-process daemon.

A test that asserts an overshoot or a lateness runs on virtual time instead of the
`fake_server` fixture: `virtualtime.run`, `virtualtime.serve_fake` and
`running_daemon(config, clock=...)` (virtualtime.py says how and why)."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast, get_args

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

sys.path.insert(0, str(Path(__file__).parent))

from fakeserver import FakeServer
from supervisor.adapters import migrate
from supervisor.adapters.clado import CladoClient, TransportName
from supervisor.adapters.store import Store
from supervisor.config import Config, load_config
from supervisor.service.runtime import Daemon
from virtualtime import HeldTransport, VirtualClock, VirtualTimeLoop

API_KEY = "lk_test_4f1c2e9a7b"
REPO = Path(__file__).resolve().parents[1]

# The API transport every config the harness builds names ([api] transport), so one switch
# runs the daemon's suites on either: `make test-httpx` sets it (see the Makefile).
TRANSPORT_ENV = "CLADO_SUPERVISOR_TEST_TRANSPORT"
TRANSPORTS: tuple[TransportName, ...] = get_args(TransportName)


def chosen_transport() -> TransportName:
    """The transport chosen for this session: $CLADO_SUPERVISOR_TEST_TRANSPORT, else the default."""
    name = os.environ.get(TRANSPORT_ENV, "aiohttp")
    if name not in TRANSPORTS:
        raise pytest.UsageError(f"{TRANSPORT_ENV}={name!r}: use one of {', '.join(TRANSPORTS)}")
    return cast(TransportName, name)


def pytest_configure(config: pytest.Config) -> None:
    chosen_transport()  # an unknown name stops the session before any test runs


def pytest_report_header(config: pytest.Config) -> str:
    return f"API transport under test: {chosen_transport()} (${TRANSPORT_ENV})"


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLADO_API_KEY", API_KEY)
    monkeypatch.delenv("CLADO_SUPERVISOR_CONFIG", raising=False)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


TEST_SUPERVISOR = {
    "poll_interval": '"1s"',
    "tick_interval": '"200ms"',
    "confirm_interval": '"200ms"',
    "confirm_timeout": '"5s"',
    "lease_ttl": '"10s"',
    "shutdown_timeout": '"5s"',
}


def config_text(
    base_url: str,
    db_url: str,
    *,
    supervisor: dict[str, str] | None = None,
    policies: str = "",
    extra: str = "",
) -> str:
    """A fast test config: short intervals so scenarios play out in seconds.
    `supervisor` overrides [supervisor] keys with TOML literals."""
    settings = "\n".join(f"{k} = {v}" for k, v in {**TEST_SUPERVISOR, **(supervisor or {})}.items())
    default_policy = '[policies.default]\nmax_runtime = "30m"\nmax_credits = 200'
    return f"""
[api]
base_url = "{base_url}"
timeout = "2s"
max_retries = 2
transport = "{chosen_transport()}"

[database]
url = "{db_url}"

[supervisor]
{settings}

{policies or default_policy}

[http]
listen = "127.0.0.1:0"

[logging]
format = "json"
level = "info"
{extra}
"""


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'supervisor.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test (skipped, with the reason, when not configured)."""
    base = os.environ.get("CLADO_SUPERVISOR_TEST_PG_URL")
    if not base:
        pytest.skip("CLADO_SUPERVISOR_TEST_PG_URL is not set (PostgreSQL tests need it)")
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    name = f"cs_test_{uuid.uuid4().hex[:12]}"
    admin = make_url(base).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load(path: Path) -> Config:
    return load_config(path)


@asynccontextmanager
async def running_daemon(config: Config, *, clock: VirtualClock | None = None) -> AsyncIterator[Daemon]:
    """The daemon on the test's event loop, stopped (gracefully) at the end. With `clock`
    (on a virtualtime.run loop) the daemon and its client read that clock, and every request
    the client sends holds the loop's time until its answer is in (virtualtime.py)."""
    await asyncio.to_thread(migrate.upgrade, config.database.url)
    store = Store(config.database.url)
    clocks = {} if clock is None else {"clock": clock.monotonic, "wall_clock": clock.epoch}
    client = CladoClient(
        config.api.base_url,
        API_KEY,
        timeout=config.api.timeout.total_seconds(),
        max_concurrency=config.api.max_concurrency,
        max_retries=config.api.max_retries,
        backoff_initial=0.05,
        backoff_max=0.5,
        transport=config.api.transport,
        **clocks,
    )
    assert_on_transport(client, config.api.transport)
    if clock is None:
        daemon = Daemon(config, store, client)
    else:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop), "a virtual clock needs virtualtime.run's loop"
        client._http._transport = HeldTransport(client._http._transport, loop)
        daemon = Daemon(config, store, client, clock=clock.now)
    daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
        await client.aclose()
        await store.close()


def assert_on_transport(client: CladoClient, name: TransportName) -> None:
    """The client really sends through `name` (httpx's own transport is an AsyncHTTPTransport,
    httpx-aiohttp's an AiohttpTransport): a harness that sets the switch but a daemon that does
    not follow it fails here, not silently on the default."""
    kind = {"aiohttp": AiohttpTransport, "httpx": httpx.AsyncHTTPTransport}[name]
    under = client._http._transport
    assert isinstance(under, kind), f"the client sends through {type(under).__name__}, not the {name} transport"


def wait_for(predicate: Any, *, timeout: float = 30, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll another process's observable state until `predicate()` is truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until(
    daemon: Daemon,
    predicate: Callable[[], Awaitable[Any]],
    *,
    timeout: float = 30.0,
    what: str = "condition",
) -> Any:
    """Re-check `predicate` after each batch the daemon writes, until it holds (bounded).

    The waiter for the next flush is in place before the predicate runs, so a flush that
    lands while the predicate awaits its reads still wakes us (were it the daemon's last
    write, every job terminal, the wait would otherwise time out)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                flushed = asyncio.ensure_future(daemon.writer.next_flush())
                await asyncio.sleep(0)  # the waiter takes hold of the current flush event
                try:
                    result = await predicate()
                    if result:
                        return result
                    await flushed
                finally:
                    flushed.cancel()
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def eventually(
    check: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition", every: float = 0.02
) -> Any:
    """Re-ask a condition that no daemon write signals (webhook deliveries, metrics,
    readiness), sync or async, until it holds (bounded)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
