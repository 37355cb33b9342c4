"""The outbox's delivery worker against a real local receiver and a real (SQLite) database.

Rows are recorded as the daemon's transactions record them (Store.record_notices); the
worker posts them with Standard Webhooks headers, which a receiver verifies with the
`standardwebhooks` package. Time between attempts is the worker's injected clock, advanced
by the test (never slept); jitter is fixed at 0, so each backoff step is its lower bound."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from structlog.testing import capture_logs

from conftest import config_text, eventually, load
from supervisor.adapters import metrics, migrate
from supervisor.adapters.store import Store
from supervisor.adapters.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Webhooks,
    retry_after,
    sign,
)
from supervisor.config import Config
from supervisor.core.notify import Notice

Answer = tuple[int, dict[str, str]]
START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class Receiver:
    """A webhook receiver on 127.0.0.1:0 answering each POST with the next scripted answer
    of its path (204 once the script is used up, or 503 while `down`); it records every
    request. `/hang` never answers in time, `/huge` answers 200 with a 10 MB body."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.scripts: dict[str, list[Answer]] = {}
        self.down = False
        self._lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "json": json.loads(body)}
                    )
                    script = receiver.scripts.get(self.path) or []
                    status, headers = script.pop(0) if script else ((503, {}) if receiver.down else (204, {}))
                    receiver.requests[-1]["status"] = status
                if self.path == "/hang":
                    receiver.release.wait(10)
                if self.path == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 * 1024 * 1024))
                    self.end_headers()
                    try:
                        for _ in range(10):
                            self.wfile.write(b"x" * 1024 * 1024)
                    except OSError:
                        pass  # the sender hung up without reading: what the test wants
                    return
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def at(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [request for request in self.requests if request["path"] == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    await asyncio.to_thread(migrate.upgrade, sqlite_url)
    store = Store(sqlite_url)
    try:
        yield store
    finally:
        await store.close()


def hooks_config(tmp_path: Path, *hooks: str, notify: str = "") -> Config:
    body = "".join(f'\n[[notify.webhooks]]\ntimeout = "1s"\n{hook}\n' for hook in hooks)
    path = tmp_path / "supervisor.toml"
    path.write_text(
        config_text("http://127.0.0.1:9", "sqlite:///s.db") + (f"\n[notify]\n{notify}\n" if notify else "") + body,
        encoding="utf-8",
    )
    return load(path)


def hook(url: str, *extra: str) -> str:
    return "\n".join([f'url = "{url}"', *extra])


async def started(config: Config, store: Store, clock: Clock) -> Webhooks:
    hooks = Webhooks(config, store, clock=clock, jitter=lambda: 0.0)
    hooks.start()
    return hooks


async def record(store: Store, clock: Clock, *events: tuple[str, str]) -> None:
    """(event, job id) pairs, one transaction each, in this order."""
    for event, job_id in events:
        await store.record_notices([Notice(event, clock(), f"job:{job_id}", {"job_id": job_id})], clock())


async def delivery(store: Store, state: str) -> dict[str, Any]:
    rows = await store.list_deliveries(state)
    return rows[0] if rows else {}


async def test_standard_signatures_verify_with_the_standardwebhooks_package(
    tmp_path: Path, store: Store, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    whsec = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    monkeypatch.setenv("HOOK_A", whsec)
    monkeypatch.setenv("HOOK_B", "a plain string secret")
    config = hooks_config(
        tmp_path,
        hook(receiver.url("/a"), 'secret_env = "HOOK_A"'),
        hook(receiver.url("/b"), 'secret_env = "HOOK_B"'),
        hook(receiver.url("/legacy"), 'secret_env = "HOOK_B"', 'signature = "legacy"'),
    )
    clock = Clock()
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"))
    await eventually(lambda: all(receiver.at(p) for p in ("/a", "/b", "/legacy")), what="three deliveries")
    await hooks.close()

    (a,), (b,), (legacy,) = receiver.at("/a"), receiver.at("/b"), receiver.at("/legacy")
    # As a receiver would: the library checks the id, the timestamp (within 5 minutes of
    # now) and the signature, and returns the payload.
    assert standardwebhooks.Webhook(whsec).verify(a["body"], a["headers"])["job_id"] == "job-1"
    assert standardwebhooks.Webhook(b"a plain string secret").verify(b["body"], b["headers"])["event"] == (
        "cancel_requested"
    )
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(whsec).verify(b["body"], b["headers"])
    assert a["headers"]["webhook-id"].startswith("msg_") and a["headers"]["webhook-id"] != b["headers"]["webhook-id"]
    # legacy: the headers of the previous release, and none of the new ones
    headers = {key.lower(): value for key, value in legacy["headers"].items()}
    assert "webhook-signature" not in headers
    assert headers[SIGNATURE_HEADER.lower()] == sign(
        b"a plain string secret", headers[TIMESTAMP_HEADER.lower()], legacy["body"]
    )
    assert headers[DELIVERY_HEADER.lower()].startswith("msg_")


async def test_retry_after_is_honoured_and_the_delivery_id_is_stable(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    receiver.scripts["/hook"] = [(503, {"Retry-After": "120"})]
    config = hooks_config(tmp_path, hook(receiver.url("/hook")))
    clock = Clock()
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"))
    await eventually(lambda: receiver.at("/hook"), what="the first attempt")
    row = await eventually(lambda: store.list_deliveries("pending"), what="the attempt recorded")
    await eventually(
        lambda: _attempts(store, row[0]["delivery_id"]), what="the attempt recorded"
    )  # the worker records after the POST
    (pending,) = await store.list_deliveries("pending")
    assert pending["next_attempt_at"] == START + timedelta(seconds=120)  # the receiver's wish, over 5 s
    clock.advance(119)
    hooks.wake()
    await asyncio.sleep(0.3)
    assert len(receiver.at("/hook")) == 1  # not due yet
    clock.advance(1)
    hooks.wake()
    done = await eventually(lambda: delivery(store, "delivered"), what="the retry delivered")
    await hooks.close()
    first, second = receiver.at("/hook")
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == done["delivery_id"]
    shown = await store.get_delivery(done["delivery_id"])
    assert shown is not None
    assert [(a["status"], a["error"]) for a in shown["attempt_log"]] == [(503, "HTTP 503"), (204, None)]
    assert shown["attempts"] == 2


async def _attempts(store: Store, delivery_id: str) -> list[dict[str, Any]]:
    shown = await store.get_delivery(delivery_id)
    return shown["attempt_log"] if shown else []


async def test_a_refusal_fails_at_once_with_its_error(tmp_path: Path, store: Store, receiver: Receiver) -> None:
    receiver.scripts["/hook"] = [(400, {})]
    config = hooks_config(tmp_path, hook(receiver.url("/hook")))
    clock = Clock()
    failed_before = metrics.WEBHOOKS.labels("failed")._value.get()
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"))
    failed = await eventually(lambda: delivery(store, "failed"), what="the refused delivery failed")
    clock.advance(3600)
    hooks.wake()
    await asyncio.sleep(0.3)
    await hooks.close()
    assert (failed["last_error"], failed["attempts"]) == ("HTTP 400", 1)
    assert len(receiver.at("/hook")) == 1
    assert metrics.WEBHOOKS.labels("failed")._value.get() == failed_before + 1


async def test_retries_grow_and_end_after_retry_for(tmp_path: Path, store: Store, receiver: Receiver) -> None:
    receiver.down = True
    config = hooks_config(tmp_path, hook(receiver.url("/hook")), notify='retry_for = "2m"')
    clock = Clock()
    with capture_logs() as logs:
        await _fail_for_good(store, receiver, config, clock)
    # One line when the receiver starts failing, one when the delivery is given up on: not
    # one per attempt.
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == [
        "webhook receiver failing; its deliveries wait and are retried",
        "webhook delivery failed",
    ]
    failed = await delivery(store, "failed")
    assert failed["last_error"] == "HTTP 503"
    shown = await store.get_delivery(failed["delivery_id"])
    assert shown is not None
    times = [attempt["at"] for attempt in shown["attempt_log"]]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps == [2.5, 5.0, 10.0, 20.0, 40.0]  # 5 s doubling, jitter 0 → the lower half's edge
    assert times[-1] <= START + timedelta(minutes=2)


async def _fail_for_good(store: Store, receiver: Receiver, config: Config, clock: Clock) -> None:
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"))
    for _ in range(12):
        count = len(receiver.at("/hook"))
        await eventually(lambda c=count: _settled(store, c), what="the attempt recorded")
        if await delivery(store, "failed"):
            break
        (row,) = await store.list_deliveries("pending")
        clock.now = row["next_attempt_at"]
        hooks.wake()
        await eventually(lambda c=count: len(receiver.at("/hook")) > c, what="the next attempt")
    await hooks.close()


async def _settled(store: Store, attempts: int) -> bool:
    rows = await store.list_deliveries()
    return bool(rows) and rows[0]["attempts"] >= attempts and rows[0]["lease_owner"] is None


async def test_a_receiver_down_for_ten_minutes_gets_every_event_once_in_commit_order(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    receiver.down = True
    config = hooks_config(tmp_path, hook(receiver.url("/hook")))
    clock = Clock()
    hooks = await started(config, store, clock)
    events = ["warning", "cancel_requested", "cancel_refused", "cancelled"]
    committed = [(event, f"job-{n}") for event in events for n in range(5)]
    for second in range(0, 600, 30):  # events keep coming while it is down
        clock.now = START + timedelta(seconds=second)
        if committed:
            await record(store, clock, *committed[:2])
            committed = committed[2:]
        hooks.wake()
        await asyncio.sleep(0.05)
    clock.now = START + timedelta(minutes=10)
    receiver.down = False
    # Back up: within one backoff step (the longest any row waits now), everything arrives.
    pending = await store.list_deliveries("pending")
    assert len(pending) == 20
    longest = max(row["next_attempt_at"] for row in pending)
    assert longest - clock.now <= timedelta(seconds=320)  # the step after ~7 failed attempts
    clock.now = longest
    for _ in range(5):  # a job's later rows follow its earlier one, one claim round each
        hooks.wake()
        await asyncio.sleep(0.2)
    await eventually(lambda: _all_delivered(store, 20), what="every event delivered")
    await hooks.close()

    # Each delivery id reached the receiver with one 2xx answer: the receiver recorded the
    # attempts it refused (503) and then exactly one it took.
    taken = [r["headers"]["webhook-id"] for r in receiver.at("/hook") if r["status"] < 300]
    assert sorted(taken) == sorted(await _ids(store)) and len(taken) == 20
    # Per job, the successful deliveries came in commit order, once each.
    rows = {row["delivery_id"]: row for row in await store.list_deliveries("delivered")}
    for n in range(5):
        job = f"job-{n}"
        mine = sorted((r for r in rows.values() if r["subject"] == f"job:{job}"), key=lambda r: r["id"])
        assert [r["event"] for r in mine] == events
        assert [r["delivered_at"] for r in mine] == sorted(r["delivered_at"] for r in mine)


async def _all_delivered(store: Store, count: int) -> bool:
    return len(await store.list_deliveries("delivered")) == count


async def _ids(store: Store) -> list[str]:
    return [row["delivery_id"] for row in await store.list_deliveries()]


async def test_410_gone_stops_the_hook_until_a_reload(tmp_path: Path, store: Store, receiver: Receiver) -> None:
    receiver.scripts["/gone"] = [(410, {})]
    config = hooks_config(tmp_path, hook(receiver.url("/gone")), hook(receiver.url("/ok")))
    key = config.notify.webhooks[0].key
    clock = Clock()
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"), ("cancelled", "job-1"))
    await eventually(lambda: len(receiver.at("/ok")) == 2, what="the other hook's deliveries")
    await eventually(lambda: metrics.WEBHOOK_DISABLED.labels(key)._value.get() == 1, what="the hook disabled")
    clock.advance(3600)
    hooks.wake()
    await asyncio.sleep(0.3)
    assert len(receiver.at("/gone")) == 1  # nothing more is sent to it
    assert len([r for r in await store.list_deliveries("pending") if r["hook"] == key]) == 2
    await hooks.reload(config)  # a reload: the hook delivers again
    await eventually(lambda: len(receiver.at("/gone")) == 3, what="the hook's rows after the reload")
    await hooks.close()
    assert [r["json"]["event"] for r in receiver.at("/gone")] == ["cancel_requested", "cancel_requested", "cancelled"]


async def test_a_hanging_or_flooding_receiver_is_bounded(tmp_path: Path, store: Store, receiver: Receiver) -> None:
    config = hooks_config(tmp_path, hook(receiver.url("/hang")), hook(receiver.url("/huge")))
    hang_key = config.notify.webhooks[0].key
    clock = Clock()
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"))
    # The 10 MB answer is not read: a 200 is delivered.
    huge = await eventually(lambda: delivery(store, "delivered"), what="the flooding receiver's delivery")
    assert huge["hook"] == config.notify.webhooks[1].key
    # The hanging one times out (timeout = "1s") and is retried later.
    await eventually(lambda: _attempted(store, hang_key), what="the hanging attempt recorded")
    (pending,) = await store.list_deliveries("pending")
    await hooks.close()
    assert pending["hook"] == hang_key and pending["last_error"] in ("ReadTimeout", "TimeoutError")


async def _attempted(store: Store, hook_key: str) -> bool:
    rows = [r for r in await store.list_deliveries("pending") if r["hook"] == hook_key]
    return bool(rows) and rows[0]["attempts"] == 1


async def test_a_hook_removed_by_a_reload_leaves_its_rows_failed(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    receiver.down = True
    config = hooks_config(tmp_path, hook(receiver.url("/old")), hook(receiver.url("/kept")))
    clock = Clock()
    hooks = await started(config, store, clock)
    await record(store, clock, ("cancel_requested", "job-1"))
    await eventually(lambda: len(receiver.at("/old")) == 1 and len(receiver.at("/kept")) == 1, what="attempts")
    receiver.down = False
    (tmp_path / "two").mkdir()
    await hooks.reload(hooks_config(tmp_path / "two", hook(receiver.url("/kept"))))
    clock.advance(10)
    hooks.wake()
    await eventually(lambda: len(receiver.at("/kept")) == 2, what="the kept hook's retry")
    await hooks.close()
    (failed,) = await store.list_deliveries("failed")
    assert (failed["hook"], failed["last_error"]) == (config.notify.webhooks[0].key, "hook removed")
    assert len(receiver.at("/old")) == 1


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after("7") == 7.0
    assert retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after("soon") is None
    assert retry_after(None) is None
    assert retry_after("999999") == 3600.0
