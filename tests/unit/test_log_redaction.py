"""Log lines never carry the secret parts of a URL: userinfo and credential query parameters,
in any value, the message itself, and the lines of libraries that log through ours."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from supervisor.adapters.logs import REDACTED, configure_logging, redact_url_text


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = []


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("https://bot:hunter2@hooks.example/…", f"https://{REDACTED}@hooks.example/…"),
        ("https://hooks.example/h?token=abc123&team=x", f"https://hooks.example/h?token={REDACTED}&team=x"),
        ("http://h/p?api_key=k1&secret=s2#sig=s3", f"http://h/p?api_key={REDACTED}&secret={REDACTED}#sig={REDACTED}"),
        ("postgresql+psycopg://app:pw@db:5432/cs", f"postgresql+psycopg://{REDACTED}@db:5432/cs"),
        ("POST https://a:b@x.y/z failed: 500", f"POST https://{REDACTED}@x.y/z failed: 500"),
    ],
)
def test_secret_parts_of_urls_are_redacted(text: str, redacted: str) -> None:
    assert redact_url_text(text) == redacted


@pytest.mark.parametrize(
    "text",
    ["https://search.clado.ai/api/search/deep_research/j1?page=1&page_size=1", "key=value, not a URL", "a@b.c"],
)
def test_urls_without_secrets_and_other_text_are_kept(text: str) -> None:
    assert redact_url_text(text) == text


def test_a_webhook_url_password_never_reaches_the_log(output: io.StringIO) -> None:
    url = "https://bot:hunter2@hooks.example/services/x?token=t0ps3cret"
    log = structlog.get_logger("supervisor.notify")
    log.warning("webhook delivery failed", url=url, hooks=[{"url": url}], error=ConnectionError(f"refused: {url}"))
    log.error(f"delivery to {url} failed")  # noqa: G004 - a URL in the message itself is the case
    logging.getLogger("httpx").warning("HTTP Request: POST %s", url)  # a library's own line
    text = output.getvalue()
    assert "hunter2" not in text
    assert "t0ps3cret" not in text
    first = lines(output)[0]
    assert first["url"] == f"https://{REDACTED}@hooks.example/services/x?token={REDACTED}"
    assert len(lines(output)) == 3
