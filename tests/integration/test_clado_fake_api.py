"""The Clado client against the simulator over real loopback HTTP (faults injected by the fake),
every test on both transports (api.transport: aiohttp, the default, and httpx's own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from fakeserver import FakeServer, ManualClock
from supervisor.adapters.clado import (
    MAX_BODY,
    ApiKeyRejected,
    ApiUnavailable,
    CancelResult,
    CladoClient,
    JobNotFound,
    OutOfCredits,
    RateLimited,
    RequestRejected,
    TransportName,
    UnreadableBody,
    make_transport,
    validate_job_id,
)
from supervisor.sim.server import FakeClado

KEY = "lk_integration_5be0c7a1d9"
MAX_RETRIES = 3
UNKNOWN_JOB = "00000000-0000-4000-8000-000000000000"
# The transport of the test being run (set by the `transport` fixture below, for every test).
TRANSPORT: TransportName = "aiohttp"


class Clock:
    """The client's clock for the 401 backoff and the rate-limit hold-off."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["aiohttp", "httpx"], autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[TransportName]:
    global TRANSPORT
    TRANSPORT = request.param
    yield request.param
    TRANSPORT = "aiohttp"


@pytest.fixture(scope="module")
def fake_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def server(fake_clock: ManualClock) -> Iterator[FakeServer]:
    # One server for the module (starting uvicorn costs time); each test starts from a reset.
    with FakeServer(FakeClado(clock=fake_clock, seed=11, account_credits=100_000)) as srv:
        yield srv


@pytest.fixture
def fake(server: FakeServer) -> FakeClado:
    server.fake.reset()
    return server.fake


@pytest.fixture
def clock(fake_clock: ManualClock) -> ManualClock:
    return fake_clock


def make_client(server: FakeServer, **kwargs: Any) -> CladoClient:
    options: dict[str, Any] = {
        "timeout": 2.0,
        "max_retries": MAX_RETRIES,
        "backoff_initial": 0.001,
        "backoff_max": 0.01,
    }
    options.update(kwargs)
    options.setdefault("transport", TRANSPORT)
    return CladoClient(server.base_url, KEY, **options)


@pytest.fixture
async def client(server: FakeServer, fake: FakeClado) -> AsyncIterator[CladoClient]:
    async with make_client(server) as api:
        yield api


def sleep_that(
    action: Callable[[], None], delays: list[float], clock: Clock | None = None
) -> Callable[[float], Awaitable[None]]:
    """A retry wait that records its delay and changes the fake instead of sleeping (moving
    the client's `clock` on by the delay, as a real sleep would)."""

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if clock is not None:
            clock.now += delay
        action()

    return sleep


# ---- the count, whichever field the simulator puts it in


@pytest.mark.parametrize(
    "count_field", ["total_results", "final_results_count_only", "pagination_only", "results_only"]
)
async def test_result_count_from_each_body_shape(
    client: CladoClient, fake: FakeClado, clock: ManualClock, count_field: str
) -> None:
    job_id = fake.create_job(limit=30, rate=1, count_field=count_field)
    status = await client.status(job_id)
    assert (status.status, status.result_count) == ("searching", 0)
    clock.advance(7)
    status = await client.status(job_id)
    assert (status.job_id, status.status, status.result_count) == (job_id, "searching", 7)
    assert status.created_at is not None
    clock.advance(100)
    status = await client.status(job_id)
    assert (status.status, status.result_count, status.is_final) == ("completed", 30, True)
    assert client.retries == 0


async def test_results_only_count_is_found_with_one_result_pages(
    client: CladoClient, fake: FakeClado, clock: ManualClock
) -> None:
    job_id = fake.create_job(limit=1000, rate=1000, count_field="results_only")
    clock.advance(0.5)
    before = fake.stats()
    assert (await client.status(job_id)).result_count == 500
    after = fake.stats()
    polls = after["status"] - before["status"]
    assert 1 < polls <= 2 * 10 + 2  # O(log n) probes
    # Every probe is a one-result page: far less than one unpaged body of 500 people.
    assert after["bytes_sent_status"] - before["bytes_sent_status"] < polls * 600


async def test_status_bytes_per_poll_do_not_grow_with_the_result_count(
    client: CladoClient, fake: FakeClado, clock: ManualClock
) -> None:
    small = fake.create_job(limit=10, rate=1000)
    large = fake.create_job(limit=1000, rate=1000)
    clock.advance(5)
    sizes = {}
    for job_id, expected in ((small, 10), (large, 1000)):
        before = fake.stats()["bytes_sent_status"]
        status = await client.status(job_id)
        assert (status.status, status.result_count) == ("completed", expected)
        sizes[expected] = fake.stats()["bytes_sent_status"] - before
    assert sizes[10] < 600
    assert sizes[1000] < 600
    assert abs(sizes[1000] - sizes[10]) < 60  # a few digits and a name, not 990 more people


# ---- retries


async def test_fail_next_recovers_with_retries_counted(client: CladoClient, fake: FakeClado) -> None:
    job_id = fake.create_job(limit=30)
    fake.set_faults(fail_next=2)
    status = await client.status(job_id)
    assert status.status in ("searching", "pending")
    assert client.retries == 2
    stats = fake.stats()
    assert (stats["status"], stats["faults_injected"]) == (3, 2)


async def test_fail_next_beyond_the_retries_is_api_unavailable(client: CladoClient, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(fail_next=MAX_RETRIES + 1)
    with pytest.raises(ApiUnavailable, match="503"):
        await client.status(job_id)
    assert fake.stats()["status"] == MAX_RETRIES + 1
    assert client.retries == MAX_RETRIES
    assert (await client.status(job_id)).job_id == job_id  # the faults are used up


async def test_initiate_is_retried_on_503(client: CladoClient, fake: FakeClado) -> None:
    fake.set_faults(fail_next=2)
    job_id = await client.initiate("engineers in SF", 20)
    assert validate_job_id(job_id) == job_id
    stats = fake.stats()
    assert (stats["initiate"], stats["jobs"]) == (3, 1)
    info = fake.job_info(job_id)
    assert (info["query"], info["limit"]) == ("engineers in SF", 20)


async def test_a_garbage_body_is_retried(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(garbage_rate=1.0, seed=3)
    delays: list[float] = []
    async with make_client(server, sleep=sleep_that(lambda: fake.set_faults(garbage_rate=0), delays)) as client:
        assert (await client.status(job_id)).job_id == job_id
        assert client.retries == 1
    assert fake.stats()["status"] == 2


async def test_garbage_bodies_every_time_end_as_api_unavailable(client: CladoClient, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(garbage_rate=1.0, seed=5)
    for call in (client.status(job_id), client.cancel(job_id), client.credits()):
        with pytest.raises(ApiUnavailable):
            await call
    stats = fake.stats()
    assert (stats["status"], stats["cancel"], stats["credits"]) == (MAX_RETRIES + 1,) * 3


async def test_a_garbage_answer_to_initiate_is_not_retried(client: CladoClient, fake: FakeClado) -> None:
    fake.set_faults(garbage_rate=1.0, seed=5)
    with pytest.raises(ApiUnavailable, match="not retried"):
        await client.initiate("q")
    assert fake.stats()["initiate"] == 1


async def test_a_dropped_connection_is_retried_for_status(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(drop_rate=1.0, seed=1)
    delays: list[float] = []
    async with make_client(server, sleep=sleep_that(lambda: fake.set_faults(drop_rate=0), delays)) as client:
        assert (await client.status(job_id)).job_id == job_id
        assert client.retries == 1
    assert fake.stats()["status"] == 2


async def test_dropped_connections_every_time_end_as_api_unavailable(client: CladoClient, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(drop_rate=1.0, seed=1)
    with pytest.raises(ApiUnavailable):
        await client.status(job_id)
    assert fake.stats()["status"] == MAX_RETRIES + 1
    assert client.retries == MAX_RETRIES


async def test_a_dropped_initiate_is_not_retried_and_starts_no_second_job(client: CladoClient, fake: FakeClado) -> None:
    fake.set_faults(drop_rate=1.0, seed=1)
    with pytest.raises(ApiUnavailable, match="not retried"):
        await client.initiate("q", 10)
    stats = fake.stats()
    # The simulator did start the job before cutting the connection: a retry would have
    # started (and billed) a second one.
    assert (stats["initiate"], stats["jobs"]) == (1, 1)
    assert client.retries == 0


async def test_429_retry_after_is_honoured(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(throttle_rate=1.0, retry_after=7, seed=2)
    delays: list[float] = []
    clock = Clock()
    sleep = sleep_that(lambda: fake.set_faults(throttle_rate=0), delays, clock)
    async with make_client(server, clock=clock, sleep=sleep) as client:
        assert (await client.status(job_id)).job_id == job_id
        assert client.retries == 1
    assert delays == [7.0]  # not the 0.001-0.01 s exponential backoff
    assert fake.stats()["status"] == 2


async def test_429_on_initiate_is_retried_after_retry_after(server: FakeServer, fake: FakeClado) -> None:
    fake.set_faults(throttle_rate=1.0, retry_after=3, seed=2)
    delays: list[float] = []
    clock = Clock()
    sleep = sleep_that(lambda: fake.set_faults(throttle_rate=0), delays, clock)
    async with make_client(server, clock=clock, sleep=sleep, max_retries=0) as client:
        await client.initiate("q")  # max_retries does not bound waiting out a 429
    assert delays == [3.0]
    stats = fake.stats()
    assert (stats["initiate"], stats["jobs"]) == (2, 1)


async def test_a_429_holds_off_every_request_of_the_client(server: FakeServer, fake: FakeClado) -> None:
    job_ids = [fake.create_job() for _ in range(3)]
    fake.set_faults(throttle_rate=1.0, retry_after=60, seed=2)
    clock = Clock()
    gate = asyncio.Event()
    waiting: list[float] = []

    async def sleep(delay: float) -> None:
        waiting.append(delay)
        await gate.wait()

    async with make_client(server, clock=clock, sleep=sleep) as client:
        first = asyncio.create_task(client.status(job_ids[0]))
        while not waiting:
            assert not first.done()
            await asyncio.sleep(0)
        assert fake.stats()["status"] == 1
        polls = [asyncio.create_task(client.status(job_ids[i % 3])) for i in range(20)]
        while len(waiting) < 21:
            assert not all(p.done() for p in polls)
            await asyncio.sleep(0)
        assert fake.stats()["status"] == 1  # twenty polls during the hold-off, no request
        assert waiting == [60.0] * 21
        fake.set_faults(throttle_rate=0)
        clock.now += 60
        gate.set()
        results = await asyncio.gather(first, *polls)
    assert [r.job_id for r in results] == [job_ids[0]] + [job_ids[i % 3] for i in range(20)]
    assert fake.stats()["status"] == 22


async def test_a_hold_off_too_long_for_a_poll_fails_fast(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(throttle_rate=1.0, retry_after=100_000, seed=2)
    async with make_client(server, clock=Clock()) as client:
        for _ in range(5):
            with pytest.raises(RateLimited, match="held off"):
                await client.status(job_id)
    fake.set_faults(throttle_rate=0)
    assert fake.stats()["status"] == 1


async def test_timeouts_are_retried_for_status_but_not_for_initiate(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_faults(slow_rate=1.0, slow_seconds=0.3, seed=4)
    async with make_client(server, timeout=0.05, max_retries=1) as client:
        with pytest.raises(ApiUnavailable, match="timed out"):
            await client.status(job_id)
        assert fake.stats()["status"] == 2
        with pytest.raises(ApiUnavailable, match="not retried"):
            await client.initiate("q")
        assert fake.stats()["initiate"] == 1
    fake.set_faults(slow_rate=0)


async def test_a_connection_refused_is_retried_then_api_unavailable(fake: FakeClado) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    async with CladoClient(
        f"http://127.0.0.1:{port}",
        KEY,
        timeout=1,
        max_retries=2,
        backoff_initial=0.001,
        backoff_max=0.01,
        transport=TRANSPORT,
    ) as client:
        with pytest.raises(ApiUnavailable, match="cannot connect"):
            await client.initiate("q")  # safe to retry: nothing was sent
        assert client.retries == 2


# ---- cancel


async def test_cancel_200_409_404(client: CladoClient, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1)
    clock.advance(5)
    assert await client.cancel(job_id) == CancelResult(True, "Deep research job cancelled successfully")
    status = await client.status(job_id)
    assert (status.status, status.result_count) == ("cancelled", 5)
    assert await client.cancel(job_id) == CancelResult(False, "Cannot cancel job: already cancelled")
    with pytest.raises(JobNotFound):
        await client.cancel(UNKNOWN_JOB)
    with pytest.raises(JobNotFound):
        await client.status(UNKNOWN_JOB)
    assert fake.job_info(job_id)["cancel_calls"] == 2
    assert client.retries == 0


async def test_cancel_of_a_completed_job_is_409(client: CladoClient, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=5, rate=10)
    clock.advance(5)
    result = await client.cancel(job_id)
    assert result == CancelResult(False, "Cannot cancel job: already completed")
    assert (await client.status(job_id)).status == "completed"


async def test_cancel_race_lost_to_completion(client: CladoClient, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(limit=30, rate=1, race=True)
    clock.advance(3)
    assert not (await client.cancel(job_id)).accepted
    assert (await client.status(job_id)).status == "completed"


async def test_a_vanished_job_is_not_found(client: CladoClient, fake: FakeClado, clock: ManualClock) -> None:
    job_id = fake.create_job(vanish_after=2)
    clock.advance(3)
    with pytest.raises(JobNotFound):
        await client.status(job_id)


async def test_invalid_ids_never_reach_the_server(client: CladoClient, fake: FakeClado) -> None:
    for job_id in ("../credits", "a b", "j\u043eb", "%2e%2e", "a/cancel", ""):
        for call in (client.status, client.cancel):
            with pytest.raises(ValueError, match="invalid job id"):
                await call(job_id)
    stats = fake.stats()
    assert stats["status"] == stats["cancel"] == 0


# ---- initiate, credits and the account


async def test_initiate_then_status(client: CladoClient, fake: FakeClado, clock: ManualClock) -> None:
    job_id = await client.initiate("people fake:rate=2", 10, ["https://acme.com"])
    clock.advance(2)
    status = await client.status(job_id)
    assert (status.status, status.result_count) == ("searching", 4)
    assert fake.job_info(job_id)["hard_filter_company_urls"] == ["https://acme.com"]


async def test_credits_and_out_of_credits(client: CladoClient, fake: FakeClado) -> None:
    assert await client.credits() == 100_000
    fake.set_account_credits(0)
    assert await client.credits() == 0
    with pytest.raises(OutOfCredits):
        await client.initiate("q")
    assert fake.stats()["initiate"] == 1


async def test_a_bad_initiate_is_rejected_without_retry(client: CladoClient, fake: FakeClado) -> None:
    with pytest.raises(RequestRejected) as caught:
        await client.initiate("q", limit=5000)
    assert caught.value.status_code == 400
    assert fake.stats()["initiate"] == 1


# ---- a rejected key


async def test_a_rejected_key_backs_off_and_recovers(server: FakeServer, fake: FakeClado) -> None:
    job_id = fake.create_job()
    fake.set_valid_keys(["lk_someone_else"])
    clock = Clock()
    with capture_logs() as logs:
        async with make_client(server, clock=clock) as client:
            results = await asyncio.gather(*(client.status(job_id) for _ in range(10)), return_exceptions=True)
            assert all(isinstance(r, ApiKeyRejected) for r in results)
            sent = fake.stats()["status"]
            for _ in range(5):
                with pytest.raises(ApiKeyRejected, match="backing off"):
                    await client.status(job_id)
            assert fake.stats()["status"] == sent  # failing fast: no requests
            clock.now += 30
            with pytest.raises(ApiKeyRejected, match="HTTP 401"):
                await client.credits()
            clock.now += 30
            assert client.api_key_rejected  # 60 s this time
            fake.set_valid_keys(None)
            clock.now += 30
            assert (await client.status(job_id)).job_id == job_id
            assert not client.api_key_rejected
            await client.credits()
    api_key_events = [(e["event"], e["log_level"]) for e in logs if "API key" in e["event"]]
    assert api_key_events == [("API key rejected", "error"), ("API key accepted again", "info")]
    for entry in logs:
        assert KEY not in repr(entry)


# ---- bounded concurrency over a real connection pool


class CountingTransport(httpx.AsyncBaseTransport):
    """The test's transport, counting the requests in flight through it."""

    def __init__(self, max_concurrency: int) -> None:
        self._inner = make_transport(TRANSPORT, max_concurrency) or httpx.AsyncHTTPTransport()
        self.in_flight = 0
        self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            response = await self._inner.handle_async_request(request)
            await response.aread()
            return response
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_concurrency_is_bounded_against_the_simulator(server: FakeServer, fake: FakeClado) -> None:
    job_ids = [fake.create_job() for _ in range(5)]
    fake.set_faults(slow_rate=1.0, slow_seconds=0.02, seed=9)
    transport = CountingTransport(4)
    async with make_client(server, max_concurrency=4, transport=transport) as client:
        results = await asyncio.gather(*(client.status(job_ids[i % 5]) for i in range(24)))
    fake.set_faults(slow_rate=0)
    assert len(results) == 24
    assert transport.peak == 4
    assert fake.stats()["status"] == 24


# ---- bounded bodies over a real socket


async def test_a_50_mb_answer_is_refused_after_reading_about_a_megabyte() -> None:
    """A raw HTTP server that would stream 50 MB: the client stops at the bound and hangs up."""
    written = 0
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        try:
            while written < 50_000_000:
                writer.write(frame)
                await writer.drain()  # blocks once the client stops reading
                written += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            done.set()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with CladoClient(
            f"http://127.0.0.1:{port}", KEY, timeout=5, max_retries=0, transport=TRANSPORT
        ) as client:
            with pytest.raises(UnreadableBody, match="body over"):
                await client.status("550e8400-e29b-41d4-a716-446655440000")
        await done.wait()
    finally:
        listener.close()
        await listener.wait_closed()
    # What it read plus what the socket buffers took: nowhere near 50 MB.
    assert MAX_BODY <= written < 50_000_000 // 2
