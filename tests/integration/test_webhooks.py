"""Webhook delivery against a real local receiver: retries (tenacity) on 5xx, 408, 429 and
transport errors, honouring Retry-After (seconds or an HTTP date); no retry on a refusal; one
delivery id on every attempt of a delivery, another for the next delivery.

The waits between attempts are recorded through the injected `sleep`, not slept."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import config_text, load
from supervisor.adapters import webhooks
from supervisor.adapters.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, Webhooks, retry_after
from supervisor.config import Config

Answer = tuple[int, dict[str, str]]


class Receiver:
    """A webhook receiver on 127.0.0.1:0 answering each POST with the next scripted answer
    of its path (204 once the script is used up); it records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.scripts: dict[str, list[Answer]] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                    )
                    script = receiver.scripts.get(self.path) or []
                    status, headers = script.pop(0) if script else (204, {})
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
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def hooks_config(tmp_path: Path, *urls: str, secret: bool = False) -> Config:
    hooks = "".join(
        f'\n[[notify.webhooks]]\nurl = "{url}"\nevents = ["cancel_requested", "unconfirmed"]\ntimeout = "2s"\n'
        + ('secret_env = "TEST_WEBHOOK_SECRET"\n' if secret else "")
        for url in urls
    )
    path = tmp_path / "supervisor.toml"
    path.write_text(config_text("http://127.0.0.1:9", "sqlite:///s.db") + hooks, encoding="utf-8")
    return load(path)


class Waits:
    """The injected sleep: records each wait between attempts."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


async def deliver(config: Config, *events: str) -> Waits:
    waits = Waits()
    hooks = Webhooks(config, sleep=waits)
    hooks.start()
    for event in events:
        hooks.emit(event, job_id="job-1", reason="max_credits")
    await hooks.close(timeout=30)
    return waits


def delivery_ids(requests: list[dict[str, Any]]) -> list[str]:
    return [request["headers"][DELIVERY_HEADER] for request in requests]


async def test_retry_after_is_honoured_and_the_delivery_id_is_stable(tmp_path: Path, receiver: Receiver) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    receiver.scripts["/hook"] = [(503, {"Retry-After": "7"}), (429, {"Retry-After": when})]
    waits = await deliver(hooks_config(tmp_path, receiver.url("/hook")), "cancel_requested", "unconfirmed")

    requests = receiver.at("/hook")
    assert [request["json"]["event"] for request in requests] == ["cancel_requested"] * 3 + ["unconfirmed"]
    # 7 s as asked; the HTTP date about 30 s away (less the time the test took to get there).
    assert waits.seconds[0] == 7
    assert 25 <= waits.seconds[1] <= 30
    ids = delivery_ids(requests)
    assert len(set(ids[:3])) == 1  # every attempt of the first delivery: one id
    assert ids[3] != ids[0]  # the next event is another delivery
    assert all(len(value) == 36 for value in ids)  # a UUID


async def test_without_retry_after_the_backoff_applies_and_gives_up(tmp_path: Path, receiver: Receiver) -> None:
    receiver.scripts["/down"] = [(500, {})] * 5
    waits = await deliver(hooks_config(tmp_path, receiver.url("/down")), "cancel_requested")
    assert len(receiver.at("/down")) == webhooks.ATTEMPTS  # then it gives up
    assert waits.seconds == [webhooks.FIRST_DELAY, webhooks.FIRST_DELAY * 2]
    assert len(set(delivery_ids(receiver.at("/down")))) == 1


async def test_a_refusal_is_not_retried_and_a_long_retry_after_is_capped(tmp_path: Path, receiver: Receiver) -> None:
    receiver.scripts["/refuses"] = [(400, {"Retry-After": "1"})]
    receiver.scripts["/slow"] = [(503, {"Retry-After": "86400"}), (408, {})]
    config = hooks_config(tmp_path, receiver.url("/refuses"), receiver.url("/slow"))
    waits = await deliver(config, "cancel_requested")
    assert len(receiver.at("/refuses")) == 1  # a 4xx is the receiver saying no, for good
    assert len(receiver.at("/slow")) == 3  # 503, 408, then delivered
    assert sorted(waits.seconds) == sorted([webhooks.MAX_RETRY_AFTER, webhooks.FIRST_DELAY * 2])


async def test_transport_errors_are_retried_with_the_same_signed_delivery(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "whsec-test-1")
    config = hooks_config(tmp_path, receiver.url("/signed"), secret=True)
    waits = Waits()
    hooks = Webhooks(config, sleep=waits)
    real_post = hooks._client.post
    calls = 0

    async def flaky_post(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first attempt never reaches the receiver
            import httpx

            raise httpx.ConnectError("connection refused")
        return await real_post(*args, **kwargs)

    monkeypatch.setattr(hooks._client, "post", flaky_post)
    hooks.start()
    hooks.emit("cancel_requested", job_id="job-2")
    await hooks.close(timeout=30)
    (request,) = receiver.at("/signed")
    assert calls == 2
    assert waits.seconds == [webhooks.FIRST_DELAY]
    assert request["headers"][SIGNATURE_HEADER].startswith("sha256=")
    assert request["json"]["job_id"] == "job-2"


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("120", now) == 60  # capped
    assert retry_after(" 3 ", now) == 3
    assert retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now) == 10
    assert retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0  # in the past: now
    for unreadable in (None, "", "soon", "-1", "1.5e3"):
        assert retry_after(unreadable, now) is None
