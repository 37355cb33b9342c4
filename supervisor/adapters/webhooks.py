"""Webhooks: delivered from the outbox, off the enforcement path.

Every webhook event is an outbox row, committed with its cause (adapters.store.routes): a
job's Change, a budget's crossing, a submission's announcement. `emit` is for the events
whose cause is recorded nowhere else (the API key rejected, the account below its floor,
the API misconfigured): it writes their rows in a transaction of their own.

The daemon's worker (`start`) has one loop per hook: it claims that hook's due rows under
a lease (several replicas share them; a stale lease is taken over), at most
`max_in_flight` at once and only the oldest pending row per job or submission (commit
order), posts them, and records each attempt. A failed attempt (a transport error, a
timeout, a 5xx, 408 or 429) is tried again after a growing, jittered gap
(core.notify.next_attempt), or the receiver's `Retry-After` if longer, until
`notify.retry_for` after the event; then the row is `failed` with its last error. Any other
4xx is the receiver refusing the payload: `failed` at once. A 410 Gone disables the hook's
deliveries (its rows wait, pending) until a reload. A slow or failing hook never delays
another hook, nor any enforcement: each hook has its own loop, and no enforcement waits on
a delivery.

Payload (format = "json"):
    {"event": "cancel_requested", "at": "2026-…Z", "job_id": "…", "policy": "default",
     "reason": "max_credits", "state": "cancelling", "credits": 203, "detail": {…},
     "config_hash": "…"}
A submission's events (queued, orphaned, expired) carry `submission_id` instead of
`job_id`, a budget's `budget`. Slack format: {"text": "<one line for humans>"}.

Signatures (signature = "standard", the default): Standard Webhooks. `webhook-id` is the
delivery id (the same on every attempt: a receiver drops a copy it already has),
`webhook-timestamp` the attempt's time in epoch seconds, and with a secret
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed by the secret's
bytes (a `whsec_<base64>` secret: the decoded bytes). signature = "legacy" sends the
earlier `X-Clado-Supervisor-{Delivery,Timestamp,Signature}` headers instead
(`sha256=<hex HMAC of "timestamp.body">`), for one release.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import structlog

from supervisor.adapters import metrics
from supervisor.adapters.secrets import read_secret
from supervisor.adapters.store import Store, utcnow
from supervisor.adapters.store.routes import DELIVERED, FAILED, PENDING, Routes
from supervisor.config import Config, ConfigError, WebhookConfig
from supervisor.core.notify import Notice, next_attempt

log = structlog.get_logger("supervisor.notify")

SIGNATURE_HEADER = "X-Clado-Supervisor-Signature"
TIMESTAMP_HEADER = "X-Clado-Supervisor-Timestamp"
DELIVERY_HEADER = "X-Clado-Supervisor-Delivery"
MAX_RETRY_AFTER = 3600.0  # a receiver asking for more is retried within the hour anyway
IDLE = 1.0  # seconds between claims of a hook with nothing due (a wake-up comes sooner)
BACKLOG_EVERY = 5.0  # seconds between refreshes of the backlog gauges
_RETRIED_STATUSES = frozenset({408, 429})  # 4xx answers that mean "later", not "never"
GONE = 410


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


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: a `whsec_<base64>` secret's decoded bytes, else its text."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            pass  # not base64 after all: the whole string is the key
    return secret.encode()


def sign_standard(key: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(key, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The legacy signature (signature = "legacy")."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def headers_for(
    hook: WebhookConfig, secret: str | None, delivery_id: str, timestamp: str, body: bytes
) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "clado-supervisor"}
    if hook.signature == "legacy":
        headers[DELIVERY_HEADER] = delivery_id
        if secret is not None:
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(secret.encode(), timestamp, body)
        return headers
    headers["webhook-id"] = delivery_id
    headers["webhook-timestamp"] = timestamp
    if secret is not None:
        headers["webhook-signature"] = sign_standard(signing_key(secret), delivery_id, timestamp, body)
    return headers


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


def body_of(hook: WebhookConfig, payload: dict[str, Any]) -> bytes:
    body_obj = {"text": slack_text(payload)} if hook.format == "slack" else payload
    return json.dumps(body_obj, separators=(",", ":"), default=str).encode()


def subject_of(fields: dict[str, Any]) -> str:
    """The unit within which a hook's deliveries keep their commit order."""
    for key, prefix in (("job_id", "job"), ("submission_id", "submission"), ("budget", "budget")):
        if fields.get(key):
            return f"{prefix}:{fields[key]}"
    return "account"


@dataclass(frozen=True)
class Attempt:
    """One POST's outcome: delivered, or an error and whether it is worth repeating."""

    status: int | None
    error: str | None
    retry: bool = False
    retry_after: float | None = None

    @property
    def gone(self) -> bool:
        return self.status == GONE


@dataclass
class _Hook:
    config: WebhookConfig
    secret: str | None
    disabled: bool = False
    failing: bool = False  # its last attempt failed (said once when it starts, once when it ends)
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Webhooks:
    def __init__(
        self,
        config: Config,
        store: Store,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._clock = clock
        self._jitter = jitter
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False)
        self._writes: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._backlog_task: asyncio.Task[None] | None = None
        self._started = False
        self._config = config
        self._hooks = _hooks(config)
        store.routes = Routes.of(config)

    @property
    def enabled(self) -> bool:
        return bool(self._hooks)

    def start(self) -> None:
        """Deliver (the daemon): one loop per hook, and the backlog gauges."""
        self._started = True
        for hook in self._hooks.values():
            self._start_hook(hook)
        self._backlog_task = asyncio.create_task(self._backlog(), name="outbox-backlog")

    def wake(self) -> None:
        """Rows were committed: claim now rather than at the next idle check."""
        for hook in self._hooks.values():
            hook.wake.set()

    def emit(self, event: str, **fields: Any) -> None:
        """Record an event whose cause is stored nowhere else: its outbox rows, in a
        transaction of their own (in the background: never blocks, never raises)."""
        if not any(event in events for _, events in self._store.routes.hooks):
            return
        notice = Notice(event, self._clock(), subject_of(fields), fields)
        task = asyncio.create_task(self._record(notice), name=f"outbox-{event}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _record(self, notice: Notice) -> None:
        try:
            await self._store.record_notices([notice], self._clock())
        except Exception as exc:  # noqa: BLE001 - logged; the cause is not recorded anywhere else
            log.error("webhook event not recorded", webhook_event=notice.event, error=str(exc)[:300])
            metrics.WEBHOOKS.labels("dropped").inc()
            return
        self.wake()

    @staticmethod
    def check(config: Config) -> None:
        """ConfigError if a hook's secret cannot be read (before a reload adopts it)."""
        _hooks(config)

    async def reload(self, config: Config) -> None:
        """Apply a reload's hooks: new or changed ones (re)start, removed ones stop and their
        pending rows become failed ("hook removed"); a hook disabled by a 410 is enabled
        again. The config hash events carry is the new one."""
        fresh = _hooks(config)  # raises ConfigError before anything changes
        self._store.routes = Routes.of(config)
        self._config = config
        old, self._hooks = self._hooks, {}
        for key, hook in fresh.items():
            kept = old.get(key)
            if kept is not None and kept.config == hook.config and kept.secret == hook.secret:
                kept.disabled = False
                self._hooks[key] = kept
            else:
                self._hooks[key] = hook
        for key, hook in old.items():
            if self._hooks.get(key) is not hook:
                await self._stop(hook)
        metrics.WEBHOOK_DISABLED.clear()
        removed = await self._store.fail_removed_hooks(set(self._hooks), self._clock())
        if removed:
            log.warning("webhook hook removed; its pending deliveries are marked failed", deliveries=removed)
        if self._started:
            for hook in self._hooks.values():
                if hook.task is None:
                    self._start_hook(hook)
        self.wake()

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - how long to wait, not a cancel scope
        """Stop delivering (what is pending stays in the outbox for the next start) after
        the background writes of `emit` are done (bounded by `timeout`). Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)
        for hook in self._hooks.values():
            await self._stop(hook)
        if self._backlog_task is not None:
            self._backlog_task.cancel()
            await asyncio.gather(self._backlog_task, return_exceptions=True)
        await self._client.aclose()

    # -- delivery ---------------------------------------------------------------------

    async def _stop(self, hook: _Hook) -> None:
        """Stop a hook's loop; the rows it held in flight are given back at once (they are
        delivered again, with the same id, rather than wait for their lease to expire)."""
        if hook.task is None:
            return
        hook.task.cancel()
        await asyncio.gather(hook.task, return_exceptions=True)
        hook.task = None
        try:
            await self._store.release_deliveries(hook.config.key)
        except Exception as exc:  # noqa: BLE001 - their leases then expire
            log.warning("could not give back in-flight deliveries", hook=hook.config.key, error=str(exc)[:300])

    def _start_hook(self, hook: _Hook) -> None:
        hook.task = asyncio.create_task(self._run(hook), name=f"webhook-{hook.config.key}")

    async def _run(self, hook: _Hook) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                done = 0 if hook.disabled else await self._round(hook)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the database away: back off, carry on
                failures += 1
                if failures == 1:
                    log.warning("outbox unavailable; deliveries wait", hook=hook.config.key, error=str(exc)[:300])
                done = 0
                await asyncio.sleep(min(30.0, IDLE * 2**failures))
            if done == 0:
                hook.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hook.wake.wait(), IDLE)

    async def _round(self, hook: _Hook) -> int:
        """Claim, post and record one batch of this hook's due rows; how many."""
        config = hook.config
        lease = timedelta(seconds=max(60.0, 3 * config.timeout.total_seconds()))
        rows = await self._store.claim_deliveries(config.key, self._clock(), limit=config.max_in_flight, lease=lease)
        if not rows:
            return 0
        attempts = await asyncio.gather(*(self._attempt(hook, row) for row in rows))
        outcomes = [self._outcome(hook, row, attempt, at) for row, (attempt, at, _) in zip(rows, attempts, strict=True)]
        for outcome, (_, _, duration) in zip(outcomes, attempts, strict=True):
            outcome["duration_ms"] = duration
        await self._store.finish_deliveries(outcomes)
        return len(rows)

    def _outcome(self, hook: _Hook, row: dict[str, Any], attempt: Attempt, at: datetime) -> dict[str, Any]:
        count = row["attempts"] + 1
        state, when = PENDING, at
        if attempt.error is not None and not hook.failing:
            hook.failing = True
            log.warning(
                "webhook receiver failing; its deliveries wait and are retried",
                hook=hook.config.key, url=redact_url(hook.config.url), error=attempt.error,
            )  # fmt: skip
        elif attempt.error is None and hook.failing:
            hook.failing = False
            log.info("webhook receiver answers again", hook=hook.config.key, url=redact_url(hook.config.url))
        if attempt.error is None:
            state = DELIVERED
            metrics.WEBHOOKS.labels("delivered").inc()
        elif attempt.gone:
            if not hook.disabled:
                hook.disabled = True
                metrics.WEBHOOK_DISABLED.labels(hook.config.key).set(1)
                log.error(
                    "webhook receiver answers 410 Gone: this hook's deliveries stop until a reload",
                    hook=hook.config.key,
                    url=redact_url(hook.config.url),
                )
        elif attempt.retry:
            retry_for = self._config.notify.retry_for
            later = next_attempt(
                count, row["created_at"], at, retry_for, retry_after=attempt.retry_after, jitter=self._jitter()
            )
            if later is None:
                state = FAILED
            else:
                when = later
        else:
            state = FAILED
        if state == FAILED:
            metrics.WEBHOOKS.labels("failed").inc()
            log.warning(
                "webhook delivery failed",
                hook=hook.config.key,
                url=redact_url(hook.config.url),
                webhook_event=row["payload"].get("event"),
                delivery=row["delivery_id"],
                attempts=count,
                error=attempt.error,
            )
        return {
            "delivery_id": row["delivery_id"],
            "at": at,
            "status": attempt.status,
            "error": attempt.error,
            "state": state,
            "attempts": count,
            "next_attempt_at": when,
        }

    async def _attempt(self, hook: _Hook, row: dict[str, Any]) -> tuple[Attempt, datetime, int]:
        """One POST, bounded by the hook's timeout; the receiver's body is never read (a
        10 MB answer costs nothing). Returns the attempt, when it ended and its ms."""
        config = hook.config
        body = body_of(config, row["payload"])
        headers = headers_for(config, hook.secret, row["delivery_id"], str(int(time.time())), body)
        started = time.perf_counter()
        attempt: Attempt
        try:
            async with asyncio.timeout(config.timeout.total_seconds()):
                async with self._client.stream(
                    "POST", config.url, content=body, headers=headers, timeout=config.timeout.total_seconds()
                ) as response:
                    status = response.status_code
                    wish = retry_after(response.headers.get("retry-after"))
            if status < 300:
                attempt = Attempt(status, None)
            elif status >= 500 or status in _RETRIED_STATUSES:
                attempt = Attempt(status, f"HTTP {status}", retry=True, retry_after=wish)
            else:
                attempt = Attempt(status, f"HTTP {status}")  # refused for good (410: the hook stops)
        except (httpx.HTTPError, TimeoutError) as exc:
            attempt = Attempt(None, type(exc).__name__, retry=True)
        return attempt, self._clock(), int((time.perf_counter() - started) * 1000)

    async def _backlog(self) -> None:
        while True:
            try:
                backlog = await self._store.outbox_backlog()
            except Exception:  # noqa: BLE001 - the next refresh tries again
                backlog = None
            if backlog is not None:
                now = self._clock()
                # Only hooks configured now or still holding rows: a removed hook's series go.
                metrics.OUTBOX_PENDING.clear()
                metrics.OUTBOX_OLDEST.clear()
                for key in set(self._hooks) | set(backlog):
                    pending, oldest = backlog.get(key, (0, None))
                    metrics.OUTBOX_PENDING.labels(key).set(pending)
                    age = (now - oldest).total_seconds() if oldest is not None else 0.0
                    metrics.OUTBOX_OLDEST.labels(key).set(max(0.0, age))
            await asyncio.sleep(BACKLOG_EVERY)


def _hooks(config: Config) -> dict[str, _Hook]:
    return {hook.key: _Hook(hook, _secret(config, index, hook)) for index, hook in enumerate(config.notify.webhooks)}


def _secret(config: Config, index: int, hook: WebhookConfig) -> str | None:
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
    return value or None


def redact_url(url: str) -> str:
    """Hook URLs often carry a token in their path (Slack): log the host only."""
    return "/".join(url.split("/")[:3]) + "/…"
