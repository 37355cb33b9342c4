"""What the three benchmarks share: the simulator in its own process, the daemon as a
subprocess, scratch databases, machine facts, quantiles, tables, JSON and plots.

Everything here talks to other processes the way a user would (HTTP, the CLI, SQL), so the
figures are those of the real daemon, not of an in-process imitation.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
API_KEY = "lk_bench_0123456789abcdef"
ADMIN_TOKEN = "bench-admin-token"


def _pg_admin_url() -> str:
    """The PostgreSQL server for the scratch databases: $CLADO_SUPERVISOR_BENCH_PG_URL, else
    the tests' $CLADO_SUPERVISOR_TEST_PG_URL, else the local server (trust auth), as a libpq URL."""
    url = (
        os.environ.get("CLADO_SUPERVISOR_BENCH_PG_URL")
        or os.environ.get("CLADO_SUPERVISOR_TEST_PG_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


PG_ADMIN_URL = _pg_admin_url()


# -- machine and output -----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan, math.nan, math.nan)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": [round(x, 2) for x in load],
        "code": code_version(),
        "packages": _versions(
            "httpx",
            "httpx-aiohttp",
            "aiohttp",
            "uvicorn",
            "starlette",
            "sqlalchemy",
            "aiosqlite",
            "psycopg",
            "apscheduler",
        ),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and the files of the daemon that differ from it (a dirty tree)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "supervisor", "migrations", "pyproject.toml")
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "subject": git("log", "-1", "--format=%s")[:120] or None,
        "dirty": [line[3:] for line in dirty.splitlines()],
    }


def _versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table (GitHub markdown, so it pastes into an issue as it is)."""
    body = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


# -- statistics -----------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default); NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": quantile(values, 0.5),
        "p95": quantile(values, 0.95),
        "p99": quantile(values, 0.99),
        "max": max(values) if values else math.nan,
        "mean": (sum(values) / len(values)) if values else math.nan,
    }


# -- Prometheus text ---------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        key = tuple(sorted(_LABEL.findall(labels or "")))
        try:
            samples[(name, key)] = float(value)
        except ValueError:
            continue
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    wanted = set(labels.items())
    for (sample, key), value in samples.items():
        if sample == name and wanted <= set(key):
            total += value
    return total


def histogram(samples: dict, name: str) -> dict[str, Any]:
    """{"buckets": [(le, cumulative count)], "count", "sum"} of a label-less histogram."""
    buckets = []
    for (sample, key), value in samples.items():
        if sample == name + "_bucket":
            le = dict(key)["le"]
            buckets.append((math.inf if le == "+Inf" else float(le), value))
    buckets.sort()
    return {"buckets": buckets, "count": metric(samples, name + "_count"), "sum": metric(samples, name + "_sum")}


def histogram_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    old = dict(before["buckets"])
    return {
        "buckets": [(le, count - old.get(le, 0.0)) for le, count in after["buckets"]],
        "count": after["count"] - before["count"],
        "sum": after["sum"] - before["sum"],
    }


def histogram_quantile(hist: dict[str, Any], q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the rank."""
    buckets = hist["buckets"]
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    low_le, low_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return low_le  # in the +Inf bucket: the best that can be said is "above low_le"
            if count == low_count:
                return le
            return low_le + (le - low_le) * (rank - low_count) / (count - low_count)
        low_le, low_count = le, count
    return buckets[-1][0]


# -- HTTP helpers ------------------------------------------------------------------------------


def http_json(
    url: str, body: Any | None = None, *, method: str | None = None, token: str | None = None, timeout: float = 60
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("GET" if body is None else "POST"))
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADO_")}
    env.update(CLADO_API_KEY=API_KEY, CLADO_SUPERVISOR_TOKEN=ADMIN_TOKEN, PYTHONUNBUFFERED="1", **extra)
    return env


def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# -- the simulator -----------------------------------------------------------------------------


class FakeApi:
    """`clado-supervisor fake-api` in its own process, driven through /_fake."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = (workdir / "fake-api.log").open("w")
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor", "fake-api", "--port", str(self.port)],
            cwd=workdir,
            env=child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("fake-api exited; see " + str(workdir / "fake-api.log"))
            try:
                self.stats()
                return True
            except OSError:
                return False

        wait_until(up, timeout=30, what="the fake API to start")

    def stats(self) -> dict[str, Any]:
        return dict(http_json(self.base_url + "/_fake/stats"))

    def bulk(self, count: int, **knobs: Any) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            chunk = min(5000, count - len(ids))
            ids += http_json(self.base_url + "/_fake/jobs/bulk", {"count": chunk, **knobs})["job_ids"]
        return ids

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(http_json(f"{self.base_url}/_fake/jobs/{job_id}"))

    def reset(self) -> None:
        http_json(self.base_url + "/_fake/reset", {})

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        stop_process(self.proc)
        self._log.close()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# -- databases -------------------------------------------------------------------------------


class ScratchPg:
    """A throwaway PostgreSQL database, dropped on close."""

    def __init__(self) -> None:
        import psycopg

        self.name = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        from sqlalchemy.engine import make_url

        self.url = (
            make_url(PG_ADMIN_URL)
            .set(drivername="postgresql+psycopg", database=self.name)
            .render_as_string(hide_password=False)
        )

    def close(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def pg_available() -> str | None:
    """None when the benchmark's PostgreSQL server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "skip the PostgreSQL rows"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def config_text(
    base_url: str,
    db_url: str,
    *,
    listen: str,
    supervisor: dict[str, str],
    policies: str,
    api: dict[str, str] | None = None,
) -> str:
    sup = "\n".join(f"{k} = {v}" for k, v in supervisor.items())
    api_extra = "\n".join(f"{k} = {v}" for k, v in (api or {}).items())
    return f"""
[api]
base_url = "{base_url}"
{api_extra}

[database]
url = "{db_url}"

[supervisor]
{sup}

{policies}

[http]
listen = "{listen}"

[logging]
format = "json"
level = "warning"
"""


def cli(args: Sequence[str], *, cwd: Path, config: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PY, "-m", "supervisor", "--config", str(config), *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"clado-supervisor {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


class Daemon:
    """The daemon as a subprocess: `python -m supervisor run`, or with `instrumented=True`
    `python -m bench.instrumented_daemon run` — the same CLI entry point with a SQLAlchemy
    statement counter registered on the daemon's own /metrics (see instrumented_daemon.py)."""

    def __init__(
        self, workdir: Path, config: Path, port: int, *, instrumented: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.admin_url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"daemon-{int(time.time() * 1000)}.log"
        self._log = self.log_path.open("w")
        module = "bench.instrumented_daemon" if instrumented else "supervisor"
        self.proc = subprocess.Popen(
            [PY, "-m", module, "--config", str(config), "run"],
            cwd=REPO if instrumented else workdir,
            env=child_env(**(env or {})),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}); see {self.log_path}")
            try:
                http_text(self.admin_url + "/healthz", timeout=2)
                return True
            except OSError:
                return False

        wait_until(up, timeout=60, what="the daemon to start")

    def metrics(self) -> dict:
        return parse_metrics(http_text(self.metrics_url))

    def track(self, job_ids: Sequence[str], **fields: Any) -> None:
        for start in range(0, len(job_ids), 5000):
            http_json(
                self.admin_url + "/v1/jobs",
                {"job_ids": list(job_ids[start : start + 5000]), **fields},
                token=ADMIN_TOKEN,
            )

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> int | None:
        code = stop_process(self.proc, timeout=30)
        self._log.close()
        return code

    def errors(self) -> list[str]:
        """Log lines at error level (JSON logs)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    lines.append(line)
                continue
            if entry.get("level") in ("error", "critical"):
                lines.append(entry.get("message", line))
        return lines


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"clado-bench-{prefix}-"))
