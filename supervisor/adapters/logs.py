"""structlog, configured once: JSON lines for machines, a console renderer on a TTY.

Library loggers (APScheduler, uvicorn, alembic) go through the same processors, so the
journal gets one format. Known secrets are redacted as a last line of defence: the code
never logs them, and this makes sure a mistake does not leak them either. So are the secret
parts of any URL in a log line (a password in it, a token= in its query), whether or not
they were registered: a webhook URL may carry its own credentials.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

_secrets: set[str] = set()
REDACTED = "[REDACTED]"


def register_secret(value: str | None) -> None:
    """Values that must never appear in a log line (API key, tokens)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if not _secrets:
        return event_dict
    return {key: _redact_value(value) for key, value in event_dict.items()}


# userinfo: what lies between "scheme://" and "@" before the host's end.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#@\s]+@")
# A query or fragment parameter whose name says it is a credential: its value goes.
_SECRET_PARAM = re.compile(
    r"(?i)([?&#;](?:[a-z0-9_.\-]*(?:token|key|secret|password|passwd|pwd|signature|sig|auth|credential)"
    r"[a-z0-9_.\-]*)=)[^&#\s\"'<>]*"
)


def redact_url_text(text: str) -> str:
    """`https://user:pw@host/p?token=abc&x=1` → `https://[REDACTED]@host/p?token=[REDACTED]&x=1`,
    wherever URLs appear in the text."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    if "://" in text:
        text = _SECRET_PARAM.sub(rf"\1{REDACTED}", text)
    return text


def _redact_urls(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url_text(value)
    if isinstance(value, dict):
        return {key: _redact_urls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_urls(item) for item in value)
    if isinstance(value, BaseException):  # an error logged as a value: its text names the URL
        return redact_url_text(str(value))
    return value


def redact_urls(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The structlog processor: every URL-looking value (and the message itself) redacted."""
    # exc_info stays for the renderer (in JSON it is formatted, then redacted, before this).
    return {key: value if key == "exc_info" else _redact_urls(value) for key, value in event_dict.items()}


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: Iterable[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
        redact_secrets,
        redact_urls,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=list(shared),
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their routine lines add nothing an operator needs.
    for name in ("httpx", "httpcore", "apscheduler", "uvicorn.access", "aiosqlite", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
