"""Webhooks, off the enforcement path.

`emit` only puts the event on each interested hook's bounded queue and returns: a slow or
failing hook never delays a cancel, nor another hook. Each hook has its own worker, which
posts with a timeout and logs what it could not deliver. A failed attempt (a transport error,
a 5xx, 408 or 429) is retried, 3 attempts in all (tenacity), after the receiver's
`Retry-After` (seconds or an HTTP date, at most 60 s) or else the usual backoff; any other
4xx is the receiver refusing the payload and is not retried. Every attempt of one delivery
carries the same `X-Clado-Supervisor-Delivery` id, so a receiver can drop a duplicate
(an attempt it processed but whose answer was lost).

Payload (format = "json"):
    {"event": "cancel_requested", "at": "2026-…Z", "job_id": "…", "policy": "default",
     "reason": "max_credits", "state": "cancelling", "credits": 203, "detail": {…},
     "budget": null, "config_hash": "…"}
A submission's events (queued, orphaned, expired) carry `submission_id` instead of `job_id`.
Slack format: {"text": "<one line for humans>"}.
With a secret, the header `X-Clado-Supervisor-Signature: sha256=<hex>` is the
HMAC-SHA256 of `<X-Clado-Supervisor-Timestamp>.<body>` under the secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from supervisor.adapters import metrics
from supervisor.adapters.secrets import read_secret
from supervisor.config import Config, ConfigError, WebhookConfig
from supervisor.core.backoff import delay
from supervisor.core.forecast import money

log = structlog.get_logger("supervisor.notify")

SIGNATURE_HEADER = "X-Clado-Supervisor-Signature"
TIMESTAMP_HEADER = "X-Clado-Supervisor-Timestamp"
DELIVERY_HEADER = "X-Clado-Supervisor-Delivery"
ATTEMPTS = 3
FIRST_DELAY, MAX_DELAY = 0.5, 8.0  # the backoff between attempts, without a Retry-After
MAX_RETRY_AFTER = 60.0  # a longer Retry-After would hold this hook's queue for too long
_RETRIED_STATUSES = frozenset({408, 429})  # 4xx answers that mean "later", not "never"
_QUEUE_SIZE = 10_000


class _AttemptFailed(Exception):
    """One attempt that is worth repeating; `retry_after` is the receiver's wish, if any."""

    def __init__(self, error: str, retry_after: float | None = None) -> None:
        super().__init__(error)
        self.retry_after = retry_after


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), capped at
    MAX_RETRY_AFTER; None if absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        seconds = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _wait(state: RetryCallState) -> float:
    failure = state.outcome.exception() if state.outcome is not None else None
    wish = failure.retry_after if isinstance(failure, _AttemptFailed) else None
    return wish if wish is not None else delay(state.attempt_number, FIRST_DELAY, MAX_DELAY)


@dataclass
class _Hook:
    config: WebhookConfig
    secret: bytes | None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(_QUEUE_SIZE))


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def slack_text(event: dict[str, Any]) -> str:
    if event.get("job_id"):
        subject = f"job {event['job_id']}"
    elif event.get("submission_id"):  # queued, orphaned, expired: no job id (yet, or ever)
        subject = f"submission {event['submission_id']}"
    else:
        subject = f"budget {event.get('budget')}"
    parts = [f"clado-supervisor: {event['event'].replace('_', ' ')} — {subject}"]
    for key in ("reason", "state", "credits", "policy"):
        if event.get(key) is not None:
            parts.append(f"{key} {event[key]}")
    return "; ".join(parts)


class Webhooks:
    def __init__(
        self,
        config: Config,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        current_config: Callable[[], Config] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._hooks = [_Hook(hook, _secret(config, index, hook)) for index, hook in enumerate(config.notify.webhooks)]
        # An event carries the hash of the config in force when it happens (a reload changes
        # it); the hooks and their secrets are the ones read here (a change needs a restart).
        self._current_config = current_config or (lambda: config)
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False)
        self._sleep = sleep  # between attempts (a test records the waits instead)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return bool(self._hooks)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(hook), name=f"webhook-{index}") for index, hook in enumerate(self._hooks)
        ]

    def emit(self, event: str, **fields: Any) -> None:
        """Queue an event for the hooks that want it; never blocks, never raises."""
        config = self._current_config()
        payload = {
            "event": event,
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "config_hash": config.config_hash,
            **fields,
        }
        if "money" not in payload and isinstance(payload.get("credits"), int | float):
            # A job's or a submission's credits, in money (budget events bring their own twin).
            payload["money"] = money(config.billing, {"credits": payload["credits"]})
        for hook in self._hooks:
            if event not in hook.config.events:
                continue
            try:
                hook.queue.put_nowait(payload)
            except asyncio.QueueFull:
                metrics.WEBHOOKS.labels("dropped").inc()
                log.error("webhook queue full; event dropped", url=_redact_url(hook.config.url), webhook_event=event)

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - how long to drain, not a cancel scope
        """Deliver what is queued (bounded by `timeout`), then stop."""
        if self._tasks:
            try:
                await asyncio.wait_for(asyncio.gather(*(hook.queue.join() for hook in self._hooks)), timeout)
            except TimeoutError:
                pending = sum(hook.queue.qsize() for hook in self._hooks)
                log.warning("webhooks not delivered before shutdown", pending=pending)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self, hook: _Hook) -> None:
        while True:
            payload = await hook.queue.get()
            try:
                await self._deliver(hook, payload)
            finally:
                hook.queue.task_done()

    async def _deliver(self, hook: _Hook, payload: dict[str, Any]) -> None:
        body_obj = {"text": slack_text(payload)} if hook.config.format == "slack" else payload
        body = json.dumps(body_obj, separators=(",", ":"), default=str).encode()
        # The same id, timestamp and signature on every attempt: it is one delivery.
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "clado-supervisor",
            DELIVERY_HEADER: str(uuid.uuid4()),
        }
        if hook.secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(hook.secret, timestamp, body)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=_wait,
            retry=retry_if_exception_type(_AttemptFailed),
            sleep=self._sleep,
            reraise=True,
        )
        error: str | None
        try:
            error = await retrying(self._attempt, hook, body, headers)
        except _AttemptFailed as exc:
            error = str(exc)
        if error is None:
            metrics.WEBHOOKS.labels("delivered").inc()
            return
        metrics.WEBHOOKS.labels("failed").inc()
        log.warning(
            "webhook delivery failed",
            url=_redact_url(hook.config.url),
            webhook_event=payload["event"],
            delivery=headers[DELIVERY_HEADER],
            error=error,
        )

    async def _attempt(self, hook: _Hook, body: bytes, headers: dict[str, str]) -> str | None:
        """One POST: None once delivered, the error if the receiver refuses the payload for
        good; raises _AttemptFailed for a failure worth another attempt."""
        try:
            response = await self._client.post(
                hook.config.url, content=body, headers=headers, timeout=hook.config.timeout.total_seconds()
            )
        except httpx.HTTPError as exc:
            raise _AttemptFailed(type(exc).__name__) from None
        status = response.status_code
        if status < 300:
            return None
        if status >= 500 or status in _RETRIED_STATUSES:
            raise _AttemptFailed(f"HTTP {status}", retry_after(response.headers.get("retry-after")))
        return f"HTTP {status}"  # the receiver refuses this payload; retrying will not help


def _secret(config: Config, index: int, hook: WebhookConfig) -> bytes | None:
    value = read_secret(
        env_name=hook.secret_env,
        file=hook.secret_file,
        key=f"notify.webhooks[{index}].secret_file",
        source=config.source,
    )
    if value is None and (hook.secret_env or hook.secret_file):
        # Fail closed: a hook configured to be signed is never sent unsigned.
        raise ConfigError(
            f"{config.source}: notify.webhooks[{index}].secret_env: the environment variable it names "
            "is not set or empty"
        )
    return value.encode() if value else None


def _redact_url(url: str) -> str:
    """Hook URLs often carry a token in their path (Slack): log the host only."""
    return "/".join(url.split("/")[:3]) + "/…"
