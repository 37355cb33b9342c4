"""Acceptance tests run the real CLI as subprocesses, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import API_KEY, config_text
from conftest import wait_for as wait_for  # re-exported: acceptance tests take their helpers from here
from fakeserver import free_port

PY = sys.executable


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADO_")}
    env.update(CLADO_API_KEY=API_KEY, PYTHONUNBUFFERED="1", **extra)
    return env


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "supervisor", *args],
        cwd=cwd,
        env=env or cli_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class FakeApiProcess:
    """`clado-supervisor fake-api` in its own process, driven through its /_fake endpoints."""

    def __init__(self, cwd: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor", "fake-api", "--port", str(self.port)],
            cwd=cwd,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self.get("/_fake/stats")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    output = self.proc.stderr.read() if self.proc.stderr else ""
                    raise RuntimeError(f"fake-api did not start: {output}") from None
                time.sleep(0.05)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=5) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def create_job(self, **knobs: Any) -> str:
        return str(self.post("/_fake/jobs", knobs)["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/_fake/jobs/{job_id}"))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class DaemonProcess:
    """`clado-supervisor run` in the background; its stderr (JSON log lines) goes to a file."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = cwd / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor", "run"],
            cwd=cwd,
            env=env or cli_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"message": line, "unparsed": True})
        return lines

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[FakeApiProcess]:
    server = FakeApiProcess(tmp_path)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def workdir(tmp_path: Path, fake_api: FakeApiProcess) -> Path:
    """A directory with a supervisor.toml pointing at the fake API and a SQLite file."""
    (tmp_path / "supervisor.toml").write_text(
        config_text(fake_api.base_url, "sqlite:///supervisor.db", supervisor={"lease_ttl": '"2s"'})
    )
    return tmp_path


def jobs_json(cwd: Path) -> dict[str, dict[str, Any]]:
    result = cli("jobs", "list", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return {job["job_id"]: job for job in json.loads(result.stdout)}
