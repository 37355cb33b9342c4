"""Virtual time for tests that assert an overshoot or a lateness: the daemon and the simulator
run on one event loop whose clock moves only when both are idle.

Why: on the wall clock such a test measures the machine as much as the rule. A loaded 2-core
machine answers a poll late and the job's results grow meanwhile (CI saw overshoots
[0, 0, 0, 4, 0, 1] against a bound of 3). Wall-clock precision is a figure for
`bench precision`; the suite checks the rule, which is the same on any machine.

How it works:
- `VirtualTimeLoop` is an asyncio selector loop whose `time()` is virtual. When the loop has no
  ready callback and no file descriptor is ready, and nothing is *held* (see below), it jumps
  its time to the next timer instead of sleeping. While something is held it waits for real,
  without moving its time: a poll, a database write, a thread's work take no virtual time.
- Held is any work the loop waits on outside itself: every `run_in_executor` future
  (`asyncio.to_thread`, getaddrinfo), every aiosqlite call (its worker thread's queue), and
  every HTTP request the daemon's client has sent until its response is closed. All of them
  end in a file descriptor becoming ready (the loop's self-pipe for threads, the socket for
  HTTP), so no real-time window is guessed: time cannot jump while an answer is on its way.
- The simulator is served over real loopback HTTP by uvicorn *on the same loop*, so its
  request handling is loop work too; its `FakeClado` reads `VirtualClock.epoch`.
- The daemon reads `VirtualClock.now` (Daemon(clock=...)), its client `VirtualClock.monotonic`
  and `.epoch`; APScheduler's own `datetime.now()` reads, and the daemon's first-run times
  given in APScheduler's terms (`runtime.scheduler_now`), are pointed at the same clock for
  the run (the `virtual_time` patches).

Every run starts at the same virtual instant (LOOP_START, EPOCH_START). What a run leaves
open is the order of things that happen at one instant, which real time still decides: a job
tracked at the very instant of a tick is claimed by that tick or by the next one. A bound a
test asserts must hold for either order (the precision tests' do: an overshoot of 0 or 1).

Limits: a simulator handler that sleeps while a request is in flight (an injected fault's
`delay`) would hold time still for ever (the test hangs until pytest's timeout), so these
tests use no such faults; the database is SQLite (aiosqlite is what is held; a PostgreSQL
driver's socket is not).

Use: `run(main)` runs `main(clock)` on a fresh loop; `serve_fake(clock)` serves a FakeClado
on it; `conftest.running_daemon(config, clock=clock)` builds the daemon on that clock.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, tzinfo
from queue import SimpleQueue
from typing import Any, TypeVar

import aiosqlite.core
import apscheduler.executors.base
import apscheduler.schedulers.base
import apscheduler.triggers.interval
import httpx
import uvicorn

from supervisor.service import runtime
from supervisor.sim.fake import FakeClado
from supervisor.sim.server import create_app, loopback_socket

T = TypeVar("T")

# Where virtual time starts, the same every run, so that a run repeats: the loop's clock (a
# monotonic reading well past zero, as a real one is) and the epoch it stands for, a Monday
# noon, far from the end of a day, week or month (no budget period turns during a test), on
# a whole second (the simulator's created_at is whole seconds, truncated).
LOOP_START = 1_000_000.0
EPOCH_START = datetime(2026, 1, 5, 12, tzinfo=UTC).timestamp()

# While work is held the loop waits for real in slices this long (a finished thread or an
# answer wakes it at once through a file descriptor; the slice only bounds a re-check).
_HELD_SLICE = 0.05


class _JumpingSelector(selectors.DefaultSelector):
    """The loop's selector: where asyncio would sleep until its next timer, it moves the
    virtual time there instead, once nothing is ready and nothing is held."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or timeout == 0 or self.loop is None:
            return events
        while self.loop.held:
            events = super().select(_HELD_SLICE)
            if events:
                return events
        if timeout is None:
            return super().select(None)  # no timer at all: only I/O can move the loop on
        self.loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when it is idle (see the module's docstring)."""

    def __init__(self) -> None:
        self._now = LOOP_START
        self._held: set[asyncio.Future[Any]] = set()
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def hold(self, future: asyncio.Future[Any]) -> None:
        """Keep time still until `future` is done: work the loop waits on outside itself."""
        if not future.done():
            self._held.add(future)
            future.add_done_callback(self._held.discard)

    @property
    def held(self) -> bool:
        return any(not future.done() for future in self._held)

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.hold(future)
        return future


class VirtualClock:
    """The one time the daemon, its client and the simulator read, in each one's terms."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.time()

    def epoch(self) -> float:
        return EPOCH_START + (self._loop.time() - LOOP_START)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.epoch(), UTC)


class _HeldQueue(SimpleQueue[tuple[asyncio.Future[Any] | None, Callable[[], Any]]]):
    """aiosqlite's queue to its worker thread: each call's future is held on its loop."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future = item[0]
        if future is not None and isinstance(loop := future.get_loop(), VirtualTimeLoop):
            loop.hold(future)
        super().put_nowait(item)


def _scheduler_datetime(clock: VirtualClock) -> type[datetime]:
    class SchedulerDatetime(datetime):
        """APScheduler's `datetime`, whose now() is the virtual clock's."""

        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return clock.now().astimezone(tz) if tz is not None else clock.now().astimezone().replace(tzinfo=None)

    return SchedulerDatetime


_SCHEDULER_MODULES = (apscheduler.schedulers.base, apscheduler.triggers.interval, apscheduler.executors.base)


@contextmanager
def virtual_time(clock: VirtualClock) -> Iterator[None]:
    """Point the libraries that read time or hand work to threads by themselves at the loop:
    aiosqlite's connections (created within) hold their calls, APScheduler reads the clock,
    and so does the daemon where it speaks APScheduler's time (`runtime.scheduler_now`)."""
    saved = aiosqlite.core.SimpleQueue, [module.datetime for module in _SCHEDULER_MODULES], runtime.scheduler_now
    aiosqlite.core.SimpleQueue = _HeldQueue  # type: ignore[misc]
    for module in _SCHEDULER_MODULES:
        module.datetime = _scheduler_datetime(clock)  # type: ignore[misc]
    runtime.scheduler_now = clock.now
    try:
        yield
    finally:
        aiosqlite.core.SimpleQueue = saved[0]  # type: ignore[misc]
        runtime.scheduler_now = saved[2]
        for module, original in zip(_SCHEDULER_MODULES, saved[1], strict=True):
            module.datetime = original  # type: ignore[misc]


def run(main: Callable[[VirtualClock], Awaitable[T]]) -> T:
    """Run `main(clock)` to its end on a fresh VirtualTimeLoop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, VirtualTimeLoop)
        clock = VirtualClock(loop)
        with virtual_time(clock):

            async def main_on_clock() -> T:
                return await main(clock)

            return runner.run(main_on_clock())


class HeldTransport(httpx.AsyncBaseTransport):
    """The client's transport, each request held on the loop from before it is sent until
    its response is closed (so time cannot jump while an answer is on its way)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, loop: VirtualTimeLoop) -> None:
        self.inner = inner
        self._loop = loop

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answered = self._loop.create_future()
        self._loop.hold(answered)
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            answered.set_result(None)
            raise
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, answered),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, answered: asyncio.Future[None]) -> None:
        self._inner = inner
        self._answered = answered

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._answered.done():
                self._answered.set_result(None)


class FakeOnLoop:
    """A FakeClado on the virtual clock, served over loopback by uvicorn on the same loop."""

    def __init__(self, fake: FakeClado, base_url: str) -> None:
        self.fake = fake
        self.base_url = base_url


@asynccontextmanager
async def serve_fake(clock: VirtualClock) -> AsyncIterator[FakeOnLoop]:
    fake = FakeClado(clock=clock.epoch)
    sock = loopback_socket()
    host, port = sock.getsockname()[:2]
    # Keep-alive long enough that the server never closes a connection the client is about
    # to reuse (that race would cost a retry, not time, but it is noise).
    config = uvicorn.Config(
        create_app(fake), log_level="warning", lifespan="off", timeout_keep_alive=3600, timeout_graceful_shutdown=5
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    try:
        yield FakeOnLoop(fake, f"http://{host}:{port}")
    finally:
        await server.shutdown(sockets=[sock])
