"""Webhooks, off the enforcement path.

`emit` only puts the event on each interested hook's bounded queue and returns: a slow or
failing hook never delays a cancel, nor another hook. Each hook has its own worker, which
posts with a timeout and a few retries and logs what it could not deliver.

Payload (format = "json"):
    {"event": "cancel_requested", "at": "2026-…Z", "job_id": "…", "policy": "default",
     "reason": "max_credits", "state": "cancelling", "credits": 203, "detail": {…},
     "budget": null, "config_hash": "…"}
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from supervisor.adapters import metrics
from supervisor.config import Config, ConfigError, WebhookConfig
from supervisor.adapters.secrets import read_secret

log = structlog.get_logger("supervisor.notify")

SIGNATURE_HEADER = "X-Clado-Supervisor-Signature"
TIMESTAMP_HEADER = "X-Clado-Supervisor-Timestamp"
_ATTEMPTS = 3
_QUEUE_SIZE = 10_000


@dataclass
class _Hook:
    config: WebhookConfig
    secret: bytes | None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(_QUEUE_SIZE))


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def slack_text(event: dict[str, Any]) -> str:
    subject = f"job {event['job_id']}" if event.get("job_id") else f"budget {event.get('budget')}"
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
    ) -> None:
        self._hooks = [
            _Hook(hook, _secret(config, index, hook)) for index, hook in enumerate(config.notify.webhooks)
        ]
        # An event carries the hash of the config in force when it happens (a reload changes
        # it); the hooks and their secrets are the ones read here (a change needs a restart).
        self._current_config = current_config or (lambda: config)
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False)
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
        payload = {
            "event": event,
            "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "config_hash": self._current_config().config_hash,
            **fields,
        }
        for hook in self._hooks:
            if event not in hook.config.events:
                continue
            try:
                hook.queue.put_nowait(payload)
            except asyncio.QueueFull:
                metrics.WEBHOOKS.labels("dropped").inc()
                log.error("webhook queue full; event dropped", url=_redact_url(hook.config.url), webhook_event=event)

    async def close(self, timeout: float = 5.0) -> None:
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
        headers = {"Content-Type": "application/json", "User-Agent": "clado-supervisor"}
        if hook.secret is not None:
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(hook.secret, timestamp, body)
        error = ""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                response = await self._client.post(
                    hook.config.url, content=body, headers=headers, timeout=hook.config.timeout.total_seconds()
                )
                if response.status_code < 300:
                    metrics.WEBHOOKS.labels("delivered").inc()
                    return
                error = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # the receiver refuses this payload; retrying will not help
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            if attempt < _ATTEMPTS:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        metrics.WEBHOOKS.labels("failed").inc()
        log.warning("webhook delivery failed", url=_redact_url(hook.config.url), webhook_event=payload["event"], error=error)


def _secret(config: Config, index: int, hook: WebhookConfig) -> bytes | None:
    value = read_secret(
        env_name=hook.secret_env, file=hook.secret_file,
        key=f"notify.webhooks[{index}].secret_file", source=config.source,
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
