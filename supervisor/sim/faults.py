"""Fault plans and their injection: what goes wrong with a request before the API logic sees it.

Faults are server-wide. Random ones (errors, throttling, slowness, garbage, drops) are drawn per
request from a seeded generator; `fail_next` and `not_found` are deterministic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supervisor.sim.model import count, flag, number

__all__ = [
    "NO_FAULT",
    "FaultInjector",
    "FaultPlan",
    "Faults",
    "HideInjectedDrops",
    "InjectedDrop",
    "rate_limited",
]


@dataclass(slots=True)
class Faults:
    error_rate: float = 0.0  # answered 500/502/503 without being handled
    throttle_rate: float = 0.0  # answered 429 without being handled
    retry_after: int = 60  # the 429 body's `retry_after`: the docs' example says 60
    slow_rate: float = 0.0  # delayed by slow_seconds, then handled (or faulted) as usual
    slow_seconds: float = 0.0
    garbage_rate: float = 0.0  # answered 200 with a body that is not valid JSON
    drop_rate: float = 0.0  # handled, then the connection is cut mid-response
    fail_next: int = 0  # the next N requests are answered 503, deterministically
    not_found: bool = False  # every request is 404 Not Found, as behind a wrong base_url path

    def is_random(self) -> bool:
        return any((self.error_rate, self.throttle_rate, self.slow_rate, self.garbage_rate, self.drop_rate))

    def updated(self, knobs: Mapping[str, object]) -> Faults:
        unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown fault knob(s): {', '.join(unknown)}")
        changes: dict[str, Any] = {}
        for name, value in knobs.items():
            if name in ("retry_after", "fail_next"):
                changes[name] = count(name, value)
            elif name == "not_found":
                changes[name] = flag(name, value)
            else:
                changes[name] = number(name, value)
                if name.endswith("_rate") and changes[name] > 1:
                    raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        f = dataclasses.replace(self, **changes)
        if f.error_rate + f.throttle_rate + f.garbage_rate + f.drop_rate > 1:
            raise ValueError("error_rate + throttle_rate + garbage_rate + drop_rate must be <= 1")
        return f

    def plan(self, rng: random.Random, *, retry_after_header: bool) -> FaultPlan:
        """The fault for one request; decrements `fail_next`. Call under the simulator's lock."""
        if self.not_found:
            return FaultPlan(response=JSONResponse({"detail": "Not Found"}, 404))
        if self.fail_next:
            self.fail_next -= 1
            return FaultPlan(response=server_error(503))
        if not self.is_random():
            return NO_FAULT
        delay = self.slow_seconds if rng.random() < self.slow_rate else 0.0
        # One draw over adjacent bands, so each rate is the fraction of requests it gets.
        draw = rng.random()
        response: Response | None = None
        drop = False
        if draw < self.error_rate:
            response = server_error(rng.choice((500, 502, 503)))
        elif (draw := draw - self.error_rate) < self.throttle_rate:
            response = rate_limited(self.retry_after, header=retry_after_header)
        elif (draw := draw - self.throttle_rate) < self.garbage_rate:
            body, media_type = rng.choice(_GARBAGE)
            response = Response(body, media_type=media_type)
        elif draw - self.garbage_rate < self.drop_rate:
            drop = True
        return FaultPlan(delay=delay, response=response, drop=drop)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    delay: float = 0.0
    response: Response | None = None  # sent instead of handling the request
    drop: bool = False  # handle the request, then cut the connection before the answer arrives

    @property
    def injected(self) -> int:
        """How many faults this plan counts as (a slow answer can also be an error)."""
        return int(self.delay > 0) + int(self.response is not None or self.drop)


NO_FAULT = FaultPlan()


def rate_limited(retry_after: int, *, header: bool) -> JSONResponse:
    """The documented 429: the wait is in the body; the header only when asked for (undocumented)."""
    headers = {"Retry-After": str(retry_after)} if header else None
    return JSONResponse({"error": "Rate limit exceeded", "retry_after": retry_after}, 429, headers=headers)


_GATEWAY_PAGES = {
    502: b"<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>",
    503: b"<html><head><title>503 Service Unavailable</title></head><body>Try later</body></html>",
}

# 200 bodies a client cannot parse: a captive portal's page, or JSON cut short.
_GARBAGE = (
    (b"<html><body>oops</body></html>", "text/html"),
    (b'{"job_id": "', "application/json"),
)


def server_error(status: int) -> Response:
    # Only the application answers JSON; a proxy in front of it answers HTML.
    if status in _GATEWAY_PAGES:
        return Response(_GATEWAY_PAGES[status], status, media_type="text/html")
    return JSONResponse({"detail": "Internal server error"}, status)


class InjectedDrop(Exception):
    """Raised once a response has started, so that uvicorn closes the connection mid-response."""


class HideInjectedDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every drop we inject on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], InjectedDrop))


# Given a request's scope: None for a request that is not to a real endpoint (never faulted),
# else its fault plan and a callback that learns the status code it was answered with.
Admit = Callable[[Scope], "tuple[FaultPlan, Callable[[int], None]] | None"]


class FaultInjector:
    """Raw ASGI middleware: admits each real-endpoint request and applies its fault plan."""

    def __init__(self, app: ASGIApp, admit: Admit) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admitted = self.admit(scope) if scope["type"] == "http" else None
        if admitted is None:
            await self.app(scope, receive, send)
            return
        plan, answered = admitted

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered(message["status"])
            await send(message)

        if plan.delay:
            await asyncio.sleep(plan.delay)
        if plan.response is not None:
            await plan.response(scope, receive, recording_send)
        elif plan.drop:
            await self.app(scope, receive, _discard)
            # uvicorn answers 500 to an exception raised before the response starts, but closes
            # the connection when one is raised after: the client sees a truncated response.
            await recording_send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
                }
            )
            raise InjectedDrop(f"injected connection drop on {scope['path']}")
        else:
            await self.app(scope, receive, recording_send)


async def _discard(message: Message) -> None:
    """An ASGI send that loses the response."""
