"""The virtual clock the precision tests stand on (tests/virtualtime.py): its time moves only
when nothing is outstanding. Each test starts real work that takes real time (a thread, a
SQLite query, an HTTP answer from a server outside the loop) beside a virtual timer due
sooner: the timer must fire after the work, with the work having taken no virtual time. On
an ordinary event loop the timer would fire first."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiosqlite
import httpx
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from virtualtime import HeldTransport, VirtualClock, VirtualTimeLoop, run, serve_fake

# Real work long enough that an unheld loop would surely jump past the timer meanwhile.
REAL_WORK = 0.2
TIMER = 0.01


async def beside_a_timer(clock: VirtualClock, work: asyncio.Future[object] | asyncio.Task[object]) -> list[str]:
    """Which ends first, `work` or a timer due in TIMER virtual seconds, and the virtual time
    the work took."""
    loop = asyncio.get_running_loop()
    start = clock.monotonic()
    order: list[str] = []
    loop.call_later(TIMER, lambda: order.append("timer"))
    await work
    order.append(f"work after {clock.monotonic() - start}s")
    await asyncio.sleep(TIMER * 2)
    return order


def test_time_stands_still_while_a_thread_works() -> None:
    async def main(clock: VirtualClock) -> list[str]:
        return await beside_a_timer(clock, asyncio.ensure_future(asyncio.to_thread(time.sleep, REAL_WORK)))

    assert run(main) == ["work after 0.0s", "timer"]


def test_time_stands_still_while_sqlite_works(tmp_path: Path) -> None:
    slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) SELECT count(*) FROM n"

    async def main(clock: VirtualClock) -> list[str]:
        async with aiosqlite.connect(tmp_path / "slow.db") as db:

            async def query() -> object:
                async with db.execute(slow) as cursor:
                    return await cursor.fetchone()

            return await beside_a_timer(clock, asyncio.ensure_future(query()))

    assert run(main) == ["work after 0.0s", "timer"]


class _SlowHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(REAL_WORK)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_time_stands_still_while_an_answer_is_on_its_way(slow_server: str) -> None:
    async def main(clock: VirtualClock) -> list[str]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        async with httpx.AsyncClient(transport=HeldTransport(httpx.AsyncHTTPTransport(), loop)) as client:

            async def get() -> object:
                return (await client.get(slow_server)).raise_for_status()

            return await beside_a_timer(clock, asyncio.ensure_future(get()))

    assert run(main) == ["work after 0.0s", "timer"]


def test_the_simulator_and_the_scheduler_read_the_virtual_clock() -> None:
    async def main(clock: VirtualClock) -> tuple[list[datetime], int]:
        fired: list[datetime] = []
        done = asyncio.Event()

        def tick() -> None:
            fired.append(clock.now())
            if len(fired) == 3:
                done.set()

        async with serve_fake(clock) as api:
            job_id = api.fake.create_job(limit=1000, rate=0.1)
            scheduler = AsyncIOScheduler(timezone="UTC")
            scheduler.add_job(tick, "interval", seconds=3600, next_run_time=clock.now())
            scheduler.start()
            await done.wait()
            scheduler.shutdown(wait=False)
            return fired, api.fake.job_info(job_id)["results"]

    fired, results = run(main)
    # Hourly, from 12:00 on the virtual epoch's day; the job ran those two hours at 0.1/s.
    assert fired == [datetime(2026, 1, 5, hour, tzinfo=UTC) for hour in (12, 13, 14)]
    assert results == 2 * 3600 // 10
