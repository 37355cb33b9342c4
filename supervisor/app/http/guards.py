"""What stands between a request and a handler: the bearer token, the translation of known
failures into problem details, the request body's size, type and deadline."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supervisor.app import errors, inputs
from supervisor.app.http.responses import error_response
from supervisor.app.inputs import Body

log = structlog.get_logger("supervisor.http")

Handler = Callable[[Request], Awaitable[Response]]
B = TypeVar("B", bound=Body)


def bearer_only(handler: Handler, token: bytes | None) -> Handler:
    """`handler` behind the bearer token (compared in constant time); with no token
    configured, refused rather than open."""

    async def authenticated(request: Request) -> Response:
        if token is None:
            raise errors.AdminApiDisabled("no admin token is configured (http.token_env / http.token_file)")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise errors.Unauthorized("a valid bearer token is required")
        return await handler(request)

    return authenticated


def translated(handler: Handler) -> Handler:
    """Known failures as their JSON error (app/errors.py); anything else is a 500."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            error = errors.translate(exc)
            if error is None:
                raise
            if isinstance(error, errors.DatabaseUnavailable):
                log.warning(
                    "admin API request failed: database unavailable",
                    path=request.url.path,
                    error=type(exc).__name__,
                )
            elif isinstance(error, errors.Internal):
                log.error("admin API request failed", path=request.url.path, exc_info=exc)
            return error_response(error)

    return guarded


async def read_body(request: Request, model: type[B], max_bytes: int, empty_ok: bool = False) -> B:
    """The request's JSON body as `model`: at most `max_bytes`, declared as JSON; an empty
    one, if `empty_ok`, is the model's defaults."""
    too_large = errors.PayloadTooLarge(f"request bodies are limited to {max_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise too_large
    if not raw.strip() and empty_ok:
        return model()
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise errors.UnsupportedMediaType(
            f"send the body as JSON (Content-Type: application/json), not {media_type or 'without a type'}"
        )
    return inputs.body(model, inputs.json_body(bytes(raw)))


class _BodyTimedOut(BaseException):
    """Raised out of `receive` past the body deadline. A BaseException, so that no handler's
    `except Exception` (the API's error translation, starlette's 500 page) takes it for a bug."""


class BodyDeadline:
    """ASGI middleware: a request body that is not whole within `seconds` of its head is
    answered 408 (problem details) and its connection closed."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self._app = app
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self._seconds
        body_done = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # later receives wait for a disconnect: not the client's reading
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimedOut from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, timed_receive, tracked_send)
        except _BodyTimedOut:
            log.warning("admin API request closed: body not received in time", timeout_s=self._seconds)
            if not started:
                timed_out = error_response(errors.RequestTimeout(f"send the body within {self._seconds:g} s"))
                timed_out.headers["connection"] = "close"
                await timed_out(scope, receive, send)
