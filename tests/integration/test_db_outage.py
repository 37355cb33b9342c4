"""The database goes away mid-run and comes back: the daemon logs, backs off, carries on,
and loses nothing.

The daemon reaches PostgreSQL through a loopback TCP proxy the test controls: "cut" closes
every connection and refuses new ones (as a server restart or failover does), "restore"
accepts again. Needs CLADO_SUPERVISOR_TEST_PG_URL (skipped with that reason otherwise).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from conftest import config_text, eventually, load, running_daemon
from fakeserver import FakeServer
from supervisor.adapters import migrate
from supervisor.adapters.store import JobWrite, NewJob, Store, database_unavailable, utcnow
from supervisor.adapters.writer import BatchWriter
from supervisor.app.http import AdminApi
from supervisor.core import transitions
from supervisor.core.states import TERMINAL
from supervisor.core.transitions import Change

pytestmark = pytest.mark.timeout(120)


class TcpProxy:
    """127.0.0.1:<port> → target, on its own thread and event loop (so that nothing the
    daemon's loop does, blocking or not, can stall the proxy)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pg-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    def __enter__(self) -> TcpProxy:  # noqa: PYI034
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def restore(self) -> None:
        """Accept connections again (on the same port)."""
        self._call(self._listen())

    def cut(self) -> None:
        """Refuse new connections and close every open one, both ways."""
        self._call(self._cut())

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        self._writers -= {client_writer, server_writer}


class RecordingNotifier:
    """Stands in for the systemd notifier: counts watchdog pings, keeps status lines."""

    def __init__(self) -> None:
        self.pings = 0
        self.statuses: list[str] = []

    def watchdog(self) -> None:
        self.pings += 1

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def ready(self, status: str = "") -> None: ...

    def stopping(self) -> None: ...


POLICIES = """
[policies.default]
max_runtime = "5m"
max_credits = 20
"""


async def test_daemon_survives_a_database_outage_and_loses_nothing(
    tmp_path: Path, fake_server: FakeServer, pg_url: str
) -> None:
    migrate.upgrade(pg_url)
    direct = make_url(pg_url)
    fake = fake_server.fake
    outage = 6.0
    with TcpProxy(direct.host or "127.0.0.1", direct.port or 5432) as proxy:
        proxied = direct.set(port=proxy.port).render_as_string(hide_password=False)
        path = tmp_path / "supervisor.toml"
        path.write_text(
            config_text(
                fake_server.base_url,
                proxied,
                policies=POLICIES,
                supervisor={"lease_ttl": '"3s"', "leader_ttl": '"3s"'},
            )
        )
        config = load(path)
        observer = Store(pg_url)  # straight to the server, not through the proxy
        early_runaways = fake.create_jobs(5, limit=300, rate=10)
        early_good = fake.create_jobs(5, limit=15, rate=5)
        with capture_logs() as logs:
            async with running_daemon(config) as daemon:
                admin = AdminApi(daemon, None, 65536)
                http = httpx.AsyncClient(transport=httpx.ASGITransport(app=admin.app()), base_url="http://admin")

                notifier = RecordingNotifier()
                daemon.notifier = notifier  # type: ignore[assignment]

                async def ready() -> int:
                    return (await http.get("/readyz")).status_code

                try:
                    await daemon.store.add_jobs([NewJob(j, "default") for j in early_runaways + early_good], utcnow())
                    # Running normally: the early runaways are cancelled.
                    await eventually(
                        lambda: _states(observer, early_runaways, {"cancelled"}),
                        timeout=20,
                        what="early cancels",
                        every=0.1,
                    )
                    assert await ready() == 200
                    # Then jobs that will run away while the database is gone (queued 1.5 s,
                    # then 10 results a second: over 20 credits ~3.6 s from now) and jobs that
                    # complete meanwhile.
                    late_runaways = fake.create_jobs(20, limit=300, rate=10, queue_for=1.5)
                    late_good = fake.create_jobs(20, limit=15, rate=5)
                    await daemon.store.add_jobs([NewJob(j, "default") for j in late_runaways + late_good], utcnow())

                    proxy.cut()
                    cut_at = time.monotonic()
                    pings_before = notifier.pings
                    await eventually(
                        lambda: _status_is(ready, 503), timeout=5, what="/readyz to report the outage", every=0.1
                    )
                    while time.monotonic() - cut_at < outage:
                        # Unready throughout, and no cancel goes out: no decision can be
                        # committed, and none is acted on uncommitted.
                        assert await ready() == 503
                        assert all(fake.job_info(j)["cancel_calls"] == 0 for j in late_runaways)
                        await asyncio.sleep(0.25)
                    # The loop stayed alive (systemd's watchdog kept being fed) and said why
                    # it was not supervising.
                    assert notifier.pings - pings_before >= outage / config.supervisor.tick_interval.total_seconds() / 2
                    assert any(status.startswith("database unavailable") for status in notifier.statuses)
                    # Every late runaway breached while the database was away.
                    assert all(fake.job_info(j)["results"] > 20 for j in late_runaways)
                    assert daemon.scheduler_running

                    proxy.restore()
                    restored_at, restored_wall = time.monotonic(), utcnow()
                    await eventually(lambda: _status_is(ready, 200), timeout=15, what="/readyz to recover", every=0.1)
                    ready_after = time.monotonic() - restored_at
                    everyone = early_runaways + early_good + late_runaways + late_good
                    await eventually(
                        lambda: _states(observer, everyone, TERMINAL), timeout=30, what="every job terminal", every=0.1
                    )
                    settled_after = time.monotonic() - restored_at
                finally:
                    await http.aclose()
                assert daemon.scheduler_running  # never stopped, never exited
        jobs = {job.job_id: job for job in await observer.list_jobs()}
        await observer.close()

    for job_id in early_runaways + late_runaways:
        assert (jobs[job_id].state, jobs[job_id].cancel_reason) == ("cancelled", "max_credits")
        assert jobs[job_id].confirmed_at is not None
    for job_id in early_runaways:
        assert fake.job_info(job_id)["cancel_calls"] == 1
    for job_id in late_runaways:  # decided once the database was back, never before
        assert jobs[job_id].cancel_requested_at >= restored_wall
        assert fake.job_info(job_id)["cancel_calls"] == 1
    for job_id in early_good + late_good:
        assert jobs[job_id].state == "completed"
        assert fake.job_info(job_id)["cancel_calls"] == 0

    # The outage was logged, sparsely (backoff), and so was the recovery.
    claim_failures = [e for e in logs if e["event"] in ("claim failed; backing off", "claim still failing")]
    ticks_in_outage = outage / config.supervisor.tick_interval.total_seconds()
    assert 1 <= len(claim_failures) <= 3, claim_failures
    assert ticks_in_outage >= 30
    assert any(e["event"] == "claim recovered" for e in logs)
    print(Counter(e["event"] for e in logs if e["log_level"] in ("warning", "error")))
    print(f"\nready {ready_after:.2f}s and all terminal {settled_after:.2f}s after the database came back")


async def _states(store: Store, ids: list[str], states: object) -> bool:
    wanted = set(ids)
    rows = [job for job in await store.list_jobs() if job.job_id in wanted]
    return len(rows) == len(wanted) and all(job.state in states for job in rows)  # type: ignore[operator]


async def _status_is(ready: object, code: int) -> bool:
    return await ready() == code  # type: ignore[operator]


async def test_batch_writer_fails_its_waiters_while_the_database_is_away_then_recovers(pg_url: str) -> None:
    """A write during an outage raises to its handler (which therefore sends nothing) and
    leaves the row as it was; the same writer applies the next write once the database is
    back: it neither dies nor needs a restart."""
    migrate.upgrade(pg_url)
    direct = make_url(pg_url)
    with TcpProxy(direct.host or "127.0.0.1", direct.port or 5432) as proxy:
        store = Store(direct.set(port=proxy.port).render_as_string(hide_password=False))
        observer = Store(pg_url)
        writer = BatchWriter(store, timeout=5, retry_delay=0.05)
        writer.start()
        try:
            await store.add_jobs([NewJob("job-1", "default")], utcnow())
            [job] = await store.claim_due(utcnow(), horizon=timedelta(0), limit=1, lease_ttl=timedelta(seconds=30))
            decided = transitions.decide_cancel(Change.of(job), "max_credits", {"rule": "test"}, utcnow())
            decision = JobWrite(decided, job.lease_token, release=False)
            before = await observer.get_job("job-1")

            proxy.cut()
            with capture_logs() as logs, pytest.raises(Exception) as raised:  # noqa: PT011 - checked just below
                await writer.write(decision)
            assert database_unavailable(raised.value), raised.value
            assert [e["event"] for e in logs if e["log_level"] == "error"] == ["database write failed"]
            assert await observer.get_job("job-1") == before

            proxy.restore()
            assert await writer.write(decision) is True
            assert (await observer.get_job("job-1")).state == "cancelling"
        finally:
            await writer.close()
            await store.close()
            await observer.close()
