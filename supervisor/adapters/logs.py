"""structlog, configured once: JSON lines for machines, a console renderer on a TTY.

The JSON keys are the ones log shippers expect without remapping (ECS, Loki, journald):
`message` is the line's text (structlog's "event", renamed: ECS's `event` is an object, so a
top-level string of that name breaks an ECS index), `level`, `logger`, `timestamp`, then the
line's fields. A field that was itself called `message` (the Clado API's own text, in the
cancel answer) is `api_message`, in JSON and on the console alike.

Under systemd, when stderr is the journal's stream (JOURNAL_STREAM names its device and
inode), every line starts with its syslog priority, `<3>` error ... `<7>` debug, which
journald strips and files the line under: `journalctl -p warning` shows the warnings and
errors. Colours follow the terminal: none when it is not a TTY or NO_COLOR is set.

Library loggers (APScheduler, uvicorn, alembic) go through the same processors, so the
journal gets one format. Known secrets are redacted as a last line of defence: the code
never logs them, and this makes sure a mistake does not leak them either. So are the secret
parts of any URL in a log line (a password in it, a token= in its query), whether or not
they were registered: a webhook URL may carry its own credentials.
"""

from __future__ import annotations

import logging
import os
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


def api_message(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A field named `message` (the API's text) becomes `api_message`: `message` is the line's."""
    if "message" in event_dict:
        event_dict["api_message"] = event_dict.pop("message")
    return event_dict


def shipper_keys(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """JSON only: the text under `message`, and the common keys first, for a person reading
    the raw lines (`journalctl -o cat`, `kubectl logs`)."""
    line = {"timestamp": event_dict.pop("timestamp", None), "level": event_dict.pop("level", None)}
    line["message"] = event_dict.pop("event", "")
    line["logger"] = event_dict.pop("logger", None)
    return {key: value for key, value in {**line, **event_dict}.items() if value is not None}


# Python's levels → syslog priorities (RFC 5424), the ones journald files lines under.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    return next((priority for level, priority in _PRIORITIES if levelno >= level), 7)


def is_journal_stream(stream: TextIO) -> bool:
    """Whether `stream` is the journal's: systemd sets JOURNAL_STREAM=<device>:<inode> of the
    stream it connected to stdout/stderr. Compared, so that a redirect (`2>file`) in the unit
    or a child that inherited the variable does not get the prefixes."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file behind it (StringIO, closed)
        return False
    return expected == f"{found.st_dev}:{found.st_ino}"


def use_colours(stream: TextIO) -> bool:
    """https://no-color.org: NO_COLOR set to anything but empty turns colours off."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


class _JournalFormatter(structlog.stdlib.ProcessorFormatter):
    """Each line prefixed with `<N>`, its record's syslog priority (a console traceback spans
    several lines: journald reads each as an entry, so each carries the prefix)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: Iterable[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
        api_message,
        redact_secrets,
        redact_urls,
    ]
    rendering: list[Any] = (
        [shipper_keys, structlog.processors.JSONRenderer()]
        if use_json
        else [structlog.dev.ConsoleRenderer(colors=use_colours(stream))]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = _JournalFormatter if is_journal_stream(stream) else structlog.stdlib.ProcessorFormatter
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        formatter(
            foreign_pre_chain=list(shared),
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their routine lines add nothing an operator needs.
    for name in ("httpx", "httpcore", "apscheduler", "uvicorn.access", "aiosqlite", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
