"""Schemathesis against the real daemon's admin API: the published OpenAPI document is valid
and states the API's conventions, and no request generated from it (valid or not, with the
right token) gets a server error or an answer the document does not describe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis

from conftest import config_text
from fakeserver import free_port

from .conftest import DaemonProcess, FakeApiProcess, cli_env, wait_for

TOKEN = "adm-schema-3f9b2c71d5e04a68"
# No server error, and every answer as documented: its status, media type, headers and schema.
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance",
])  # fmt: skip


class RunningDaemon:
    def __init__(self, process: DaemonProcess, base_url: str) -> None:
        self.process = process
        self.base_url = base_url


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


@pytest.fixture
def daemon(tmp_path: Path, fake_api: FakeApiProcess) -> Iterator[RunningDaemon]:
    port = free_port()
    text = config_text(fake_api.base_url, "sqlite:///supervisor.db")
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
    (tmp_path / "supervisor.toml").write_text(text, encoding="utf-8")
    process = DaemonProcess(tmp_path, env=cli_env(CLADO_SUPERVISOR_TOKEN=TOKEN))
    base_url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if process.proc.poll() is not None:
                raise AssertionError(f"the daemon exited early:\n{process.log_path.read_text()}")
            return _status(base_url + "/healthz") == 200

        wait_for(healthy, timeout=30, what="/healthz")
        # Ready too (a tick has completed), so that /readyz answers 200 while it is fuzzed.
        wait_for(lambda: _status(base_url + "/readyz") == 200, timeout=30, what="/readyz")
        yield RunningDaemon(process, base_url)
    finally:
        code = process.stop()
        assert code == 0, process.log_path.read_text()


def test_the_openapi_document_is_valid(daemon: RunningDaemon) -> None:
    schema = schemathesis.openapi.from_url(daemon.base_url + "/openapi.json")
    schema.validate()  # raises on a document that is not valid OpenAPI
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()  # raises the InvalidSchema of a broken operation
        operations.append(f"{operation.method.upper()} {operation.path}")
    assert sorted(operations) == sorted(
        [
            "GET /healthz",
            "GET /readyz",
            "GET /metrics",
            "GET /v1/jobs",
            "POST /v1/jobs",
            "GET /v1/jobs/{job_id}",
            "POST /v1/jobs/{job_id}/cancel",
            "POST /v1/jobs/{job_id}/continue",
            "POST /v1/submit",
            "GET /v1/queue",
            "GET /v1/budgets",
            "GET /v1/queue/{id}",
            "POST /v1/queue/{id}/cancel",
            "GET /v1/deliveries",
            "GET /v1/deliveries/{delivery_id}",
            "POST /v1/deliveries/{delivery_id}/redeliver",
        ]
    )
    assert schema.iter_schema_warnings() == []

    # The conventions, as the document states them: errors are problem details, a 401 says
    # how to authenticate, a 201 where the new job is, the list pages by cursor.
    with urllib.request.urlopen(daemon.base_url + "/openapi.json", timeout=5) as response:
        document = json.loads(response.read())
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            for status, answer in operation["responses"].items():
                media_types = list(answer.get("content", {}))
                if int(status) >= 400 and path.startswith("/v1"):
                    assert media_types == ["application/problem+json"], (method, path, status)
                if status == "401":
                    assert "WWW-Authenticate" in answer["headers"], (method, path)
                if status == "201":
                    assert "Location" in answer["headers"], (method, path)
    listing = document["paths"]["/v1/jobs"]["get"]
    assert {"limit", "cursor"} <= {parameter["name"] for parameter in listing["parameters"]}
    page = document["components"]["schemas"]["JobPage"]
    assert set(page["required"]) == {"jobs", "next_cursor"}
    problem = document["components"]["schemas"]["ProblemView"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])


def test_schemathesis_finds_no_server_error(daemon: RunningDaemon, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLADO_", "SCHEMATHESIS_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            daemon.base_url + "/openapi.json",
            "--checks",
            CHECKS,
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--max-examples",
            "30",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "20240601",
            # One worker: with several, hypothesis's ast.parse in threads can raise a spurious
            # "AST constructor recursion depth mismatch" SystemError on CPython 3.11 (gh-106905).
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            "--no-color",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # What schemathesis recorded: every response, by operation.
    statuses = _recorded_statuses(report)
    assert set(statuses) == {
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /v1/jobs",
        "POST /v1/jobs",
        "GET /v1/jobs/{job_id}",
        "POST /v1/jobs/{job_id}/cancel",
        "POST /v1/jobs/{job_id}/continue",
        "POST /v1/submit",
        "GET /v1/queue",
        "GET /v1/budgets",
        "GET /v1/queue/{id}",
        "POST /v1/queue/{id}/cancel",
        "GET /v1/deliveries",
        "GET /v1/deliveries/{delivery_id}",
        "POST /v1/deliveries/{delivery_id}/redeliver",
    }, output
    server_errors = {label: codes for label, codes in statuses.items() if any(code >= 500 for code in codes)}
    assert not server_errors, output
    # The token was used: the authenticated operations were really exercised, not just refused.
    for label in ("GET /v1/jobs", "POST /v1/jobs", "POST /v1/submit", "GET /v1/jobs/{job_id}"):
        assert any(200 <= code < 300 for code in statuses[label]), (label, statuses[label])
    # The daemon logged no request crash and never the token.
    assert not [line for line in daemon.process.log_lines() if line.get("message") == "admin API request failed"]
    assert TOKEN not in daemon.process.log_path.read_text()


def _recorded_statuses(report: Path) -> dict[str, list[int]]:
    """Operation label → the status codes of every response in schemathesis's NDJSON report."""
    statuses: dict[str, list[int]] = {}
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        for interaction in (recorder.get("interactions") or {}).values():
            response = interaction.get("response")
            if response:
                statuses.setdefault(recorder["label"], []).append(int(response["status_code"]))
    return statuses
