"""Throughput: can one daemon hold 10,000 / 20,000 active jobs at a 15 s poll interval, and
three replicas 30,000 on PostgreSQL? And what does a poll cost it, against a bare request?

Setup per row (a fresh simulator state and a fresh database each time): the simulator
(`clado-supervisor fake-api`, its own process) makes N jobs that stay active for the whole
run (rate 0.2 result/s, limit 1000: see JOB_KNOBS); the daemon starts as a subprocess with a generated
config (poll_interval "15s", limits so high nothing is cancelled, warn_at = [], admin API on
a free port) on a database `clado-supervisor migrate` just made, and once it is up
`clado-supervisor track --from-file` hands it the N jobs at once. The daemon is
`python -m bench.instrumented_daemon run`: the CLI's own entry point plus a SQL statement
counter on its /metrics (see instrumented_daemon.py). Variants: `default` (api.transport
"aiohttp", uvloop: what `pip install 'clado-supervisor[fast]'` runs), `no-uvloop` (the same
on asyncio's own loop) and `httpx` (api.transport "httpx", uvloop).

Measured over a steady-state window (15 s, 30 s at 10,000 jobs: whole poll intervals)
after a warm-up (see run_row: every job over 30 s old so the daemon's rate probes are over,
and the first cycle's backlog worked off; or, overloaded, once it polls under 90% of the
demand; at most 90 s):
- polls/s: the simulator's status-call counter, delta over the window;
- poll lag: exact, from the database: every ~3 s the bench reads each job's
  (next_check_at, last_polled_at); a job whose last_polled_at moved was polled, and its lag
  is last_polled_at (the daemon's clock when the status answer came back) minus the due
  time it had in the previous read. Beside it, for comparison, the daemon's own
  clado_supervisor_poll_lag_seconds histogram (bucket deltas; it is taken when the handler
  starts, before the HTTP request waits for one of the 32 client slots);
- tick duration: clado_supervisor_tick_duration_seconds (sum/count delta; p99 from buckets);
- SQL statements per tick and per poll: the counter above (transaction control excluded);
- peak RSS: VmHWM of the daemon process at the end of the row; CPU: /proc/<pid>/stat, as
  CPU microseconds per poll, which the other tenants of a shared machine move far less than rates;
- the claim limit (clado_supervisor_claim_limit) every second or so.

Then, in the same run and on the same jobs, the bare loop (bench/bareloop.py: httpx on the
row's transport and event loop, 32 in flight, no database) for the physical limit: the
daemon's CPU microseconds per poll against the bare loop's per request is the ratio the
targets ask for. Each row also says what limited it: the simulator (one process: one core),
the daemon's CPU, or the machine (every core busy). Capacity is the
daemon's polls/s when demand exceeds it: an overloaded row's own window, or, for a
10,000-job row that held, a saturation phase (SIGHUP to poll_interval "1s"). The machine is
shared: rates move with the other tenants' load, so the same comparison is also made in
CPU time per poll (daemon vs bare loop), which they move far less.

Before the rows: the simulator alone (two aiohttp bare-loop processes, 64 in flight each,
and the simulator's CPU per request), and the bare loop with httpx's default transport vs
httpx-aiohttp, interleaved.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import common
from bench.common import PY, REPO, Daemon, FakeApi, ScratchPg, histogram, histogram_delta, histogram_quantile, metric

POLICIES = """
[policies.default]
max_runtime = "7d"
max_queued = "7d"
stall_timeout = "7d"
max_credits = 1000000000
warn_at = []
"""
# One result per 5 s, active for 83 minutes. The daemon probes a job whose rate it does not
# know yet (README, "When a job is polled") until two polls have seen its count grow: at this
# rate, within about 10 s, after which the job is polled every 15 s: the steady state the
# targets are about. A job that shows no result for minutes stays probed that long (at gaps
# of a tenth of its age, until that reaches the poll interval at 150 s): 10,000 of those
# tracked at once ask for more polls than a replica makes (measured at 0.01/s: README,
# Performance).
JOB_KNOBS = {"rate": 0.2, "limit": 1000}
TARGET_POLLS_10K = 10_000 / 15
# supervisor.batch_size / tick_interval at their defaults (1,000 and 1 s): a replica claims
# at most this many jobs a second.
CLAIMS_PER_TICK = 1000


# name: (api.transport, environment of the daemon, uvloop). The bare loop runs on the same
# transport and loop. `no-uvloop` is the daemon on asyncio's loop (bench/instrumented_daemon.py).
VARIANTS: dict[str, tuple[str, dict[str, str], bool]] = {
    "default": ("aiohttp", {}, True),
    "no-uvloop": ("aiohttp", {"BENCH_NO_UVLOOP": "1"}, False),
    "httpx": ("httpx", {}, True),
}


@dataclass
class Plan:
    rows: list[tuple[str, int, str, int]]  # (backend, jobs, variant, replicas)
    warmup_cap: float = 90.0
    settle: float = 2.0
    window: float = 15.0  # a whole number of poll intervals: each job is due once in it
    window_10k: float = 30.0
    snapshot_every: float = 3.0
    bare_duration: float = 5.0
    saturate_sizes: tuple[int, ...] = (10_000,)
    saturate_window: float = 12.0
    transport_rounds: int = 1
    transport_duration: float = 5.0


FULL = Plan(
    rows=[
        *((backend, n, "default", 1) for n in (10_000, 20_000) for backend in ("sqlite", "postgresql")),
        ("sqlite", 10_000, "no-uvloop", 1),
        ("sqlite", 10_000, "httpx", 1),
        ("postgresql", 30_000, "default", 3),
    ]
)
QUICK = Plan(
    rows=[("sqlite", 1_000, "default", 1), ("sqlite", 1_000, "no-uvloop", 1)],
    window=15.0,
    saturate_sizes=(1_000,),
    saturate_window=8.0,
    transport_duration=4.0,
    bare_duration=4.0,
)


# -- helpers ----------------------------------------------------------------------------------


class CpuSampler:
    """Machine-wide busy cores between two reads of /proc/stat."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    def busy_cores(self, nproc: int) -> float:
        total, idle = self._read()
        t0, i0 = self._start
        if total == t0:
            return math.nan
        return (1 - (idle - i0) / (total - t0)) * nproc


def bare_loop(
    base_url: str,
    ids_file: Path,
    *,
    concurrency: int = 32,
    transport: str = "httpx",
    duration: float = 8.0,
    procs: int = 1,
    uvloop: bool = False,
) -> dict[str, Any]:
    runs = [
        subprocess.Popen(
            [
                PY,
                "-m",
                "bench.bareloop",
                "--base-url",
                base_url,
                "--ids",
                str(ids_file),
                "--concurrency",
                str(concurrency),
                "--transport",
                transport,
                "--duration",
                str(duration),
                *(["--uvloop"] if uvloop else []),
            ],
            cwd=REPO,
            env=common.child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs)
    ]
    outs = []
    for proc in runs:
        out, _ = proc.communicate(timeout=duration + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"bare loop failed ({proc.returncode})")
        outs.append(json.loads(out))
    if procs == 1:
        return outs[0]
    return {
        "transport": transport,
        "concurrency": concurrency,
        "procs": procs,
        "per_s": sum(o["per_s"] for o in outs),
        "errors": sum(o["errors"] for o in outs),
        "latency_p50_ms": max(o["latency_p50_ms"] for o in outs),
        "runs": outs,
    }


class LagTracker:
    """Exact poll lag from the jobs table (see the module docstring)."""

    def __init__(self, db_url: str) -> None:
        from sqlalchemy import create_engine, pool, select

        from supervisor.adapters.store import sync_url
        from supervisor.adapters.tables import jobs

        self._engine = create_engine(sync_url(db_url), poolclass=pool.NullPool)
        self._query = select(jobs.c.job_id, jobs.c.last_polled_at, jobs.c.next_check_at)
        self._last: dict[str, tuple[datetime | None, datetime]] = {}
        self.lags: list[float] = []
        self.reads = 0
        self.read_seconds = 0.0
        self.overdue = 0  # jobs more than 2 s past due at the last read

    def read(self, record: bool) -> None:
        started = time.perf_counter()
        with self._engine.connect() as conn:
            rows = conn.execute(self._query).all()
        self.read_seconds += time.perf_counter() - started
        self.reads += 1
        current = {}
        late = datetime.now(UTC) - timedelta(seconds=2)
        self.overdue = sum(1 for _, _, due in rows if due < late)
        for job_id, polled, due in rows:
            current[job_id] = (polled, due)
            previous = self._last.get(job_id)
            if record and previous is not None and polled is not None and polled != previous[0]:
                self.lags.append((polled - previous[1]).total_seconds())
        self._last = current

    def close(self) -> None:
        self._engine.dispose()


class Fleet:
    """One daemon, or several replicas on one database, measured as one: counters and
    histograms summed, CPU summed, the largest peak RSS."""

    def __init__(self, daemons: list[Daemon]) -> None:
        self.daemons = daemons

    def metrics(self) -> dict:
        merged: dict = {}
        for daemon in self.daemons:
            for key, value in daemon.metrics().items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    def cpu_seconds(self) -> float:
        return sum(d.cpu_seconds() for d in self.daemons)

    def peak_rss_mb(self) -> float:
        return max(d.peak_rss_mb() for d in self.daemons)

    def send_signal(self, signum: int) -> None:
        for daemon in self.daemons:
            daemon.proc.send_signal(signum)

    def stop(self) -> int | None:
        codes = [d.stop() for d in self.daemons]
        return next((c for c in codes if c), codes[0] if codes else None)

    def errors(self) -> list[str]:
        return [line for d in self.daemons for line in d.errors()]


def sql_counts(samples: dict) -> dict[str, dict[str, float]]:
    calls: dict[str, float] = {}
    rows: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "clado_supervisor_bench_sql_calls_total":
            calls[dict(labels)["kind"]] = value
        elif name == "clado_supervisor_bench_sql_rows_total":
            rows[dict(labels)["kind"]] = value
    return {"calls": calls, "rows": rows}


def sql_delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {
        part: {k: v - before[part].get(k, 0.0) for k, v in after[part].items() if v - before[part].get(k, 0.0)}
        for part in ("calls", "rows")
    }


def scalar_deltas(after: dict, before: dict) -> dict[str, float]:
    names = {
        "ticks": "clado_supervisor_tick_duration_seconds_count",
        "tick_seconds": "clado_supervisor_tick_duration_seconds_sum",
        "claimed": "clado_supervisor_tick_jobs_claimed_sum",
        "write_batches": "clado_supervisor_db_write_batch_size_count",
        "writes": "clado_supervisor_db_write_batch_size_sum",
        "status_requests": "clado_supervisor_api_requests_total",
        "retries": "clado_supervisor_api_retries_total",
        "lease_lost": "clado_supervisor_lease_lost_writes_total",
    }
    return {key: metric(after, name) - metric(before, name) for key, name in names.items()}


# -- one row ----------------------------------------------------------------------------------


def run_row(
    fake: FakeApi, backend: str, n: int, variant: str, replicas: int, plan: Plan, work: Path, log: Any
) -> dict[str, Any]:
    transport, env, uvloop = VARIANTS[variant]
    fake.reset()
    ids = fake.bulk(n, **JOB_KNOBS)
    created = time.monotonic()
    first_cycle_s: float | None = None
    ids_file = work / f"ids-{n}.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    pg: ScratchPg | None = None
    if backend == "sqlite":
        db_path = work / f"bench-{n}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(str(db_path) + suffix).unlink(missing_ok=True)
        db_url = f"sqlite:///{db_path}"
    else:
        pg = ScratchPg()
        db_url = pg.url
    ports = [common.free_port() for _ in range(replicas)]
    configs = [work / f"supervisor-{backend}-{n}-{variant}-{i}.toml" for i in range(replicas)]
    config = configs[0]

    def write_config(poll_interval: str) -> None:
        for path, port in zip(configs, ports, strict=True):
            path.write_text(
                common.config_text(
                    fake.base_url,
                    db_url,
                    listen=f"127.0.0.1:{port}",
                    supervisor={"poll_interval": f'"{poll_interval}"'},
                    policies=POLICIES,
                    api={"max_concurrency": "32", "timeout": '"10s"', "transport": f'"{transport}"'},
                )
            )

    write_config("15s")
    daemon: Fleet | None = None
    lag: LagTracker | None = None
    limits: list[tuple[float, float]] = []  # (seconds since tracking, claim limit)
    try:
        # The daemon runs (warm, empty database) before the jobs arrive, as in production.
        common.cli(["migrate"], cwd=work, config=config)
        daemon = Fleet(
            [Daemon(work, path, port, instrumented=True, env=env) for path, port in zip(configs, ports, strict=True)]
        )
        base = fake.stats()["status"]
        started = time.monotonic()
        common.cli(["track", "--from-file", str(ids_file)], cwd=work, config=config)
        track_s = time.monotonic() - started
        lag = LagTracker(db_url)
        # Warm-up, until the steady state: the daemon probes a job whose rate it does not
        # know yet at doubling gaps since the job started (README, "When a job is polled"),
        # so polls only settle to one per 15 s once every job is over 30 s old; and the
        # first cycle's backlog must have been worked off (no job over 2 s late). An
        # overloaded daemon never gets there: its warm-up ends once, the probes over, it
        # polled under 90% of the demand over the last 8 s; or at the cap.
        t0 = started

        def sample_limit() -> None:
            limits.append(
                (round(time.monotonic() - started, 1), metric(daemon.metrics(), "clado_supervisor_claim_limit"))
            )

        steady_from = created + 30.0
        polls: list[tuple[float, int]] = []
        caught_up = False
        while True:
            lag.read(record=False)
            sample_limit()
            now = time.monotonic()
            polled_once = fake.stats()["status"] - base >= n
            if first_cycle_s is None and polled_once:
                first_cycle_s = now - t0
            caught_up = polled_once and lag.overdue <= n // 200
            if caught_up and now >= steady_from:
                break
            # Overloaded: past the probes, the last 8 s polled under 90% of the demand.
            polls.append((now, fake.stats()["status"]))
            older = [(t, c) for t, c in polls if t <= now - 8.0]
            if now >= steady_from and older and not caught_up:
                t_then, c_then = older[-1]
                if (polls[-1][1] - c_then) / (now - t_then) < 0.9 * n / 15:
                    break
            if now - t0 >= plan.warmup_cap:
                break
            time.sleep(2.0)
        warmup_s = time.monotonic() - t0
        time.sleep(plan.settle)
        lag.read(record=False)
        window = plan.window_10k if n >= 10_000 else plan.window

        # The window.
        overdue_start = lag.overdue
        m0, s0 = daemon.metrics(), fake.stats()
        cpu0, fcpu0, w0 = daemon.cpu_seconds(), fake.cpu_seconds(), time.monotonic()
        machine = CpuSampler()
        while time.monotonic() - w0 < window:
            time.sleep(min(plan.snapshot_every, max(0.0, window - (time.monotonic() - w0))))
            lag.read(record=True)
            sample_limit()
        window_s = time.monotonic() - w0
        m1, s1 = daemon.metrics(), fake.stats()
        cpu1, fcpu1 = daemon.cpu_seconds(), fake.cpu_seconds()
        busy = machine.busy_cores(common.machine_info()["nproc"] or 2)
        polls = s1["status"] - s0["status"]
        d = scalar_deltas(m1, m0)
        hist_lag = histogram_delta(
            histogram(m1, "clado_supervisor_poll_lag_seconds"), histogram(m0, "clado_supervisor_poll_lag_seconds")
        )
        hist_tick = histogram_delta(
            histogram(m1, "clado_supervisor_tick_duration_seconds"),
            histogram(m0, "clado_supervisor_tick_duration_seconds"),
        )
        sql = sql_delta(sql_counts(m1), sql_counts(m0))
        statements = sum(v for k, v in sql["rows"].items() if k != "txn_control")
        calls = sum(v for k, v in sql["calls"].items() if k != "txn_control")
        ticks = d["ticks"] or math.nan
        lags = common.summary(lag.lags)
        claim = sum(sql["calls"].get(k, 0.0) for k in ("claim_select", "claim_update", "db_now"))
        writes = sum(sql["calls"].get(k, 0.0) for k in ("write_check_lease", "write_update", "write_events"))
        row: dict[str, Any] = {
            "backend": backend,
            "jobs": n,
            "variant": variant,
            "replicas": replicas,
            "transport": transport,
            "uvloop": uvloop,
            "poll_interval_s": 15,
            "demand_per_s": n / 15,
            "track_cli_s": round(track_s, 2),
            "first_cycle_s": None if first_cycle_s is None else round(first_cycle_s, 2),
            "warmup_s": round(warmup_s, 1),
            "caught_up_before_window": caught_up,
            "overdue_jobs_at_start": overdue_start,
            "overdue_jobs_at_end": lag.overdue,
            "window_s": round(window_s, 2),
            "polls": polls,
            "polls_per_s": polls / window_s,
            "held_fraction": (polls / window_s) / (n / 15),
            "lag_exact_s": lags,
            "lag_exact_late_over_2s": sum(1 for x in lag.lags if x > 2.0),
            "lag_histogram_p50_s": histogram_quantile(hist_lag, 0.5),
            "lag_histogram_p99_s": histogram_quantile(hist_lag, 0.99),
            "lag_histogram_count": hist_lag["count"],
            "ticks": d["ticks"],
            "tick_mean_ms": 1000 * d["tick_seconds"] / ticks,
            "tick_p99_ms": 1000 * histogram_quantile(hist_tick, 0.99),
            "jobs_claimed_per_tick": d["claimed"] / ticks,
            "sql_statements": statements,
            "sql_calls": calls,
            "sql_statements_per_tick": statements / ticks,
            "sql_calls_per_tick": calls / ticks,
            "sql_statements_per_poll": statements / polls if polls else math.nan,
            "sql_calls_per_poll": calls / polls if polls else math.nan,
            "claim_calls_per_tick": claim / ticks,
            "write_calls_per_poll": writes / polls if polls else math.nan,
            "sql_by_kind": sql,
            "write_transactions": d["write_batches"],
            "writes_per_transaction": d["writes"] / d["write_batches"] if d["write_batches"] else math.nan,
            "api_retries": d["retries"],
            "lease_lost_writes": d["lease_lost"],
            "daemon_cpu_cores": (cpu1 - cpu0) / window_s,
            "fake_cpu_cores": (fcpu1 - fcpu0) / window_s,
            "machine_busy_cores": busy,
            "daemon_cpu_us_per_poll": 1e6 * (cpu1 - cpu0) / polls if polls else math.nan,
            "claim_limit_at_end": metric(m1, "clado_supervisor_claim_limit"),
            "claim_limit_series": limits,
            "lag_reader_s": round(lag.read_seconds, 2),
        }

        # Saturation: the same daemon told (SIGHUP) to poll every second.
        if n in plan.saturate_sizes and replicas == 1 and row["held_fraction"] >= 0.95:
            write_config("1s")
            daemon.send_signal(signal.SIGHUP)
            time.sleep(16)  # every job's 15 s poll has come round and now asks for 1 s
            m0, s0, w0 = daemon.metrics(), fake.stats(), time.monotonic()
            cpu0 = daemon.cpu_seconds()
            time.sleep(plan.saturate_window)
            m1, s1 = daemon.metrics(), fake.stats()
            sat_s = time.monotonic() - w0
            d = scalar_deltas(m1, m0)
            sql = sql_delta(sql_counts(m1), sql_counts(m0))
            statements = sum(v for k, v in sql["rows"].items() if k != "txn_control")
            sat_polls = s1["status"] - s0["status"]
            row["saturated"] = {
                "poll_interval_s": 1,
                "window_s": round(sat_s, 2),
                "polls_per_s": sat_polls / sat_s,
                "daemon_cpu_cores": (daemon.cpu_seconds() - cpu0) / sat_s,
                "daemon_cpu_us_per_poll": 1e6 * (daemon.cpu_seconds() - cpu0) / sat_polls if sat_polls else math.nan,
                "claim_limit_at_end": metric(m1, "clado_supervisor_claim_limit"),
                "ticks": d["ticks"],
                "jobs_claimed_per_tick": d["claimed"] / d["ticks"] if d["ticks"] else math.nan,
                "sql_statements_per_tick": statements / d["ticks"] if d["ticks"] else math.nan,
                "sql_statements_per_poll": statements / sat_polls if sat_polls else math.nan,
                "writes_per_transaction": d["writes"] / d["write_batches"] if d["write_batches"] else math.nan,
                "sql_by_kind": sql,
            }
        row["peak_rss_mb"] = daemon.peak_rss_mb()
        code = daemon.stop()
        row["daemon_exit"] = code
        row["daemon_errors"] = daemon.errors()[:5]
        daemon = None
        # The physical limit, on the same jobs, right after.
        bare = bare_loop(fake.base_url, ids_file, duration=plan.bare_duration, transport=transport, uvloop=uvloop)
        row["bare"] = bare
        # Capacity: what the daemon does when demand exceeds it (an overloaded row's own
        # window, else the saturation phase); a held row without one has none.
        if row.get("saturated"):
            capacity = row["saturated"]["polls_per_s"]
        elif row["held_fraction"] < 0.95:
            capacity = row["polls_per_s"]
        else:
            capacity = None
        row["capacity_per_s"] = capacity
        row["supervisor_over_bare"] = (capacity / bare["per_s"]) if capacity else None
        # The same comparison in CPU per poll, which foreign load on a shared machine moves
        # far less than rates: what one whole core would sustain, daemon vs bare loop.
        bare["cpu_us_per_request"] = 1e6 * bare["client_cpu_s"] / bare["requests"] if bare["requests"] else math.nan
        cpu_us = row.get("saturated", {}).get("daemon_cpu_us_per_poll") or row["daemon_cpu_us_per_poll"]
        row["cpu_us_per_poll_used"] = cpu_us
        row["cpu_bound_capacity_per_s"] = 1e6 / cpu_us if cpu_us else math.nan
        # The ratio: daemon CPU per poll over the bare loop's per request (target <= 2).
        row["daemon_over_bare_cpu"] = cpu_us / bare["cpu_us_per_request"] if bare["cpu_us_per_request"] else math.nan
        row["limit"] = _limit(row, replicas)
        row["held_over_bare"] = row["polls_per_s"] / bare["per_s"]
        log(
            f"  {backend:10} {n:>6} jobs {variant:11}: {row['polls_per_s']:.0f} polls/s of {n / 15:.0f} demanded, "
            f"lag p99 {lags['p99']:.3f}s (hist {row['lag_histogram_p99_s']:.3f}s), "
            f"tick {row['tick_mean_ms']:.1f} ms, {row['sql_statements_per_tick']:.1f} SQL/tick, "
            f"RSS {row['peak_rss_mb']:.0f} MB, bare {bare['per_s']:.0f}/s"
            + (f", capacity {capacity:.0f}/s" if capacity else "")
        )
        return row
    finally:
        if lag is not None:
            lag.close()
        if daemon is not None:
            daemon.stop()
        if pg is not None:
            pg.close()


# -- the benchmark ------------------------------------------------------------------------------


def simulator_alone(fake: FakeApi, ids_file: Path, duration: float) -> dict[str, Any]:
    """Drive the simulator as hard as this machine allows: two aiohttp loops (64 in flight
    each); its CPU per request bounds what one core of it can serve."""
    s0, c0, t0 = fake.stats()["status"], fake.cpu_seconds(), time.monotonic()
    result = bare_loop(
        fake.base_url, ids_file, concurrency=64, transport="aiohttp", duration=duration, procs=2, uvloop=_have_uvloop()
    )
    elapsed = time.monotonic() - t0
    served = fake.stats()["status"] - s0
    cpu = fake.cpu_seconds() - c0
    return {
        "clients": "2 processes x 64 in flight, httpx + aiohttp transport",
        "observed_per_s": result["per_s"],
        "fake_cpu_us_per_request": 1e6 * cpu / served if served else math.nan,
        "fake_capacity_one_core_per_s": served / cpu if cpu else math.nan,
        "fake_cpu_cores_used": cpu / elapsed,
    }


def transports(fake: FakeApi, ids_file: Path, plan: Plan) -> dict[str, Any]:
    """The bare loop by transport (the daemon's event loop: uvloop when installed), interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(plan.transport_rounds):
        for concurrency in (4, 32):
            for transport in ("httpx", "aiohttp"):
                key = f"{transport}@{concurrency}"
                runs.setdefault(key, []).append(
                    bare_loop(
                        fake.base_url,
                        ids_file,
                        concurrency=concurrency,
                        transport=transport,
                        duration=plan.transport_duration,
                        uvloop=_have_uvloop(),
                    )
                )
    out: dict[str, Any] = {"runs": runs}
    for key, results in runs.items():
        out[key] = sum(r["per_s"] for r in results) / len(results)
    out["aiohttp_over_httpx_at_32"] = out["aiohttp@32"] / out["httpx@32"]
    return out


def run(quick: bool = False, log: Any = print) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    started = time.monotonic()
    info = common.machine_info()
    work = common.workdir("throughput")
    planned = list(plan.rows)
    skipped: dict[str, str] = {}
    if any(row[0] == "postgresql" for row in planned):
        reason = common.pg_available()
        if reason:
            planned = [r for r in planned if r[0] != "postgresql"]
            skipped["postgresql"] = reason
            log(f"  PostgreSQL rows skipped: {reason}")
    if not _have_uvloop():
        planned = [r for r in planned if not VARIANTS[r[2]][2]]
        skipped["uvloop"] = "uvloop is not installed (pip install -e '.[bench]')"
    fake = FakeApi(work)
    try:
        probe_ids = fake.bulk(1000, **JOB_KNOBS)
        probe_file = work / "probe-ids.txt"
        probe_file.write_text("\n".join(probe_ids) + "\n")
        alone = simulator_alone(fake, probe_file, duration=plan.transport_duration)
        log(
            f"  simulator alone: {alone['observed_per_s']:.0f} req/s observed, "
            f"{alone['fake_cpu_us_per_request']:.0f} us CPU/request "
            f"-> ~{alone['fake_capacity_one_core_per_s']:.0f}/s on one core"
        )
        trans = transports(fake, probe_file, plan)
        log(
            "  bare loop by transport: "
            + ", ".join(f"{k} {v:.0f}/s" for k, v in trans.items() if isinstance(v, float) and "@" in k)
        )
        rows = [
            run_row(fake, backend, n, variant, replicas, plan, work, log) for backend, n, variant, replicas in planned
        ]
    finally:
        fake.close()
    result = {
        "benchmark": "throughput",
        "quick": quick,
        "machine": info,
        "plan": plan.__dict__ | {"saturate_sizes": list(plan.saturate_sizes)},
        "variants": {
            "default": "python -m supervisor run (+ a SQL statement counter): api.transport aiohttp, on uvloop",
            "no-uvloop": "default on asyncio's own event loop (uvloop disabled from bench/instrumented_daemon.py)",
            "httpx": "default with api.transport = httpx",
        },
        "job_knobs": JOB_KNOBS,
        "skipped": skipped,
        "simulator_alone": alone,
        "transports": trans,
        "rows": rows,
        "targets": targets(rows),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed, for its logs
    name = "throughput-quick" if quick else "throughput"
    common.write_json(f"{name}.json", result)
    plot(result, common.RESULTS / f"{name}.png")
    log(render(result))
    return result


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _limit(row: dict[str, Any], replicas: int) -> str:
    """What held the row back, if anything: the simulator is one process (one core at most),
    each daemon is one process, and the machine has `nproc` cores for everything."""
    nproc = common.machine_info()["nproc"] or 2
    if row["held_fraction"] >= 0.97 and row["lag_exact_s"]["p99"] <= 2.0:
        return "none (held)"
    found = []
    # The claims: a tick (1 s) claims at most batch_size (1,000, the default) jobs a replica.
    claim_cap = CLAIMS_PER_TICK * replicas
    if row["polls_per_s"] >= 0.9 * claim_cap:
        found.append(f"claims (supervisor.batch_size: {claim_cap:,} jobs/s)")
    if row["fake_cpu_cores"] >= 0.85:
        found.append(f"simulator ({row['fake_cpu_cores']:.2f} cores)")
    if row["daemon_cpu_cores"] / replicas >= 0.85:
        found.append(f"daemon CPU ({row['daemon_cpu_cores'] / replicas:.2f} cores each)")
    if row["machine_busy_cores"] >= 0.9 * nproc:
        found.append(f"machine ({row['machine_busy_cores']:.2f} of {nproc} cores busy)")
    return ", ".join(found) or "latency (no process CPU-bound)"


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        label = f"{row['backend']} {row['jobs']:,} {row['variant']}" + (
            f" x{row['replicas']}" if row["replicas"] > 1 else ""
        )
        if row["jobs"] in (10_000, 30_000):
            out.append(
                {
                    "row": label,
                    "target": f"{row['jobs']:,} jobs at 15 s: >= 97% of {row['demand_per_s']:.0f} polls/s",
                    "value": f"{row['polls_per_s']:.0f}/s ({100 * row['held_fraction']:.0f}%)",
                    "met": row["held_fraction"] >= 0.97,
                }
            )
            out.append(
                {
                    "row": label,
                    "target": "poll lag p99 <= 2 s",
                    "value": round(row["lag_exact_s"]["p99"], 3),
                    "met": row["lag_exact_s"]["p99"] <= 2.0,
                }
            )
        out.append(
            {
                "row": label,
                "target": "daemon CPU per poll <= 1,000 us",
                "value": round(row["cpu_us_per_poll_used"]),
                "met": row["cpu_us_per_poll_used"] <= 1000,
            }
        )
        out.append(
            {
                "row": label,
                "target": "daemon CPU per poll <= 2 x bare loop's per request",
                "value": round(row["daemon_over_bare_cpu"], 2),
                "met": row["daemon_over_bare_cpu"] <= 2.0,
            }
        )
        if row["jobs"] == 10_000:
            out.append(
                {
                    "row": label,
                    "target": "peak RSS <= 250 MB at 10,000 jobs",
                    "value": round(row["peak_rss_mb"], 1),
                    "met": row["peak_rss_mb"] <= 250,
                }
            )
    for backend in sorted({r["backend"] for r in rows}):
        mine = sorted(
            (r for r in rows if r["backend"] == backend and r["variant"] == "default" and r["replicas"] == 1),
            key=lambda r: r["jobs"],
        )
        if len(mine) < 2:
            continue
        low, high = mine[0], mine[-1]
        label = f"{backend}: {low['jobs']:,} -> {high['jobs']:,} jobs"
        out.append(
            {
                "row": label,
                "target": "claim SQL calls per tick do not grow with jobs per tick",
                "value": f"{low['claim_calls_per_tick']:.2f} -> {high['claim_calls_per_tick']:.2f}",
                "met": high["claim_calls_per_tick"] <= 1.2 * low["claim_calls_per_tick"],
            }
        )
        out.append(
            {
                "row": label,
                "target": "SQL calls (round trips) per poll do not grow with jobs",
                "value": f"{low['sql_calls_per_poll']:.3f} -> {high['sql_calls_per_poll']:.3f}",
                "met": high["sql_calls_per_poll"] <= 1.2 * low["sql_calls_per_poll"],
            }
        )
        out.append(
            {
                "row": label,
                "target": "SQL statements run per poll do not grow with jobs",
                "value": f"{low['sql_statements_per_poll']:.2f} -> {high['sql_statements_per_poll']:.2f}",
                "met": high["sql_statements_per_poll"] <= 1.2 * low["sql_statements_per_poll"],
            }
        )
    return out


def _label(row: dict[str, Any]) -> str:
    replicas = f" x{row['replicas']}" if row["replicas"] > 1 else ""
    return f"{'pg' if row['backend'] == 'postgresql' else 'sqlite'} {row['jobs'] // 1000}k{replicas}\n{row['variant']}"


def _limits(row: dict[str, Any]) -> str:
    values = [v for _, v in row.get("claim_limit_series", [])] or [row.get("claim_limit_at_end") or 0]
    return f"{min(values):.0f}-{max(values):.0f}"


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    alone = result["simulator_alone"]
    trans = result["transports"]
    lines = [
        (
            "Held at poll_interval 15 s (32 requests in flight; lag exact from the jobs table, "
            "hist = the daemon's histogram)"
        ),
        common.table(
            [
                "db",
                "jobs",
                "variant",
                "replicas",
                "demand/s",
                "polls/s",
                "held",
                "lag p50 s",
                "lag p99 s",
                "hist p99 s",
                "overdue at end",
                "claim limit min-max",
                "RSS MB",
            ],
            [
                [
                    r["backend"],
                    r["jobs"],
                    r["variant"],
                    r["replicas"],
                    r["demand_per_s"],
                    r["polls_per_s"],
                    f"{100 * r['held_fraction']:.0f}%",
                    r["lag_exact_s"]["p50"],
                    r["lag_exact_s"]["p99"],
                    r["lag_histogram_p99_s"],
                    r["overdue_jobs_at_end"],
                    _limits(r),
                    r["peak_rss_mb"],
                ]
                for r in rows
            ],
        ),
        "",
        (
            "Cost per poll (bare = the bare loop right after: same jobs, transport and event loop, 32 in flight; "
            "capacity = polls/s when demand exceeds it; CPU us = process CPU time per poll, all replicas summed; "
            "limit = what held the row back)"
        ),
        common.table(
            [
                "db",
                "jobs",
                "variant",
                "capacity/s",
                "bare/s",
                "daemon CPU us/poll",
                "bare CPU us/req",
                "daemon/bare CPU",
                "1-core capacity/s",
                "daemon cores",
                "simulator cores",
                "machine busy cores",
                "limit",
            ],
            [
                [
                    r["backend"],
                    r["jobs"],
                    r["variant"],
                    r["capacity_per_s"],
                    r["bare"]["per_s"],
                    r["cpu_us_per_poll_used"],
                    r["bare"]["cpu_us_per_request"],
                    r["daemon_over_bare_cpu"],
                    r["cpu_bound_capacity_per_s"],
                    (r.get("saturated") or r)["daemon_cpu_cores"],
                    r["fake_cpu_cores"],
                    r["machine_busy_cores"],
                    r["limit"],
                ]
                for r in rows
            ],
        ),
        "",
        (
            "Ticks and SQL (cursor executions in the window: an executemany is one call; "
            "statements = what the database runs, an executemany of N rows counts N; BEGIN/COMMIT not counted)"
        ),
        common.table(
            [
                "db",
                "jobs",
                "variant",
                "tick ms",
                "tick p99 ms",
                "jobs/tick",
                "claim calls/tick",
                "write txns/tick",
                "writes/txn",
                "SQL calls/tick",
                "SQL calls/poll",
                "statements/tick",
                "statements/poll",
            ],
            [
                [
                    r["backend"],
                    r["jobs"],
                    r["variant"],
                    r["tick_mean_ms"],
                    r["tick_p99_ms"],
                    r["jobs_claimed_per_tick"],
                    r["claim_calls_per_tick"],
                    r["write_transactions"] / r["ticks"] if r["ticks"] else None,
                    r["writes_per_transaction"],
                    r["sql_calls_per_tick"],
                    r["sql_calls_per_poll"],
                    r["sql_statements_per_tick"],
                    r["sql_statements_per_poll"],
                ]
                for r in rows
            ],
        ),
    ]
    saturated = [r for r in rows if r.get("saturated")]
    if saturated:
        lines += [
            "",
            "Rows that held, driven to saturation (SIGHUP to poll_interval 1 s)",
            common.table(
                [
                    "db",
                    "jobs",
                    "variant",
                    "polls/s",
                    "daemon CPU us/poll",
                    "daemon cores",
                    "claim limit",
                    "jobs/tick",
                    "SQL calls/tick",
                    "statements/poll",
                    "writes/txn",
                ],
                [
                    [
                        r["backend"],
                        r["jobs"],
                        r["variant"],
                        r["saturated"]["polls_per_s"],
                        r["saturated"]["daemon_cpu_us_per_poll"],
                        r["saturated"]["daemon_cpu_cores"],
                        r["saturated"]["claim_limit_at_end"],
                        r["saturated"]["jobs_claimed_per_tick"],
                        sum(v for k, v in r["saturated"]["sql_by_kind"]["calls"].items() if k != "txn_control")
                        / r["saturated"]["ticks"]
                        if r["saturated"]["ticks"]
                        else None,
                        r["saturated"]["sql_statements_per_poll"],
                        r["saturated"]["writes_per_transaction"],
                    ]
                    for r in saturated
                ],
            ),
        ]
    transport_rows = []
    for key, value in trans.items():
        if isinstance(value, float) and "@" in key:
            name, inflight = key.split("@")
            cpu = [1e6 * x["client_cpu_s"] / x["requests"] for x in trans["runs"][key] if x["requests"]]
            transport_rows.append(
                [f"bare loop, {name} transport, {inflight} in flight", value, sum(cpu) / len(cpu) if cpu else None]
            )
    lines += [
        "",
        "The simulator alone, and the bare loop by HTTP transport",
        common.table(
            ["measure", "req/s", "client CPU us/req"],
            [
                ["simulator driven by 2 aiohttp loops x 64 in flight", alone["observed_per_s"], None],
                ["simulator CPU per request, us", alone["fake_cpu_us_per_request"], None],
                ["simulator capacity on one core (from its CPU)", alone["fake_capacity_one_core_per_s"], None],
            ]
            + transport_rows
            + (
                [["aiohttp / httpx at 32 in flight (req/s)", trans["aiohttp_over_httpx_at_32"], None]]
                if "aiohttp_over_httpx_at_32" in trans
                else []
            ),
        ),
        "",
        "Targets",
        common.table(
            ["row", "target", "value", "met"],
            [[t["row"], t["target"], t["value"], "yes" if t["met"] else "NO"] for t in result["targets"]],
        ),
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.plt()
    rows = result["rows"]
    if not rows:
        return
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    labels = [_label(r) for r in rows]
    x = list(range(len(rows)))
    width = 0.2

    ax = axes[0][0]
    ax.bar(
        [i - 1.5 * width for i in x],
        [r["demand_per_s"] for r in rows],
        width,
        label="demand (jobs / 15 s)",
        color="#c7c7c7",
    )
    ax.bar(
        [i - 0.5 * width for i in x],
        [r["polls_per_s"] for r in rows],
        width,
        label="supervisor: polls/s at 15 s",
        color="#1f77b4",
    )
    ax.bar(
        [i + 0.5 * width for i in x],
        [r["capacity_per_s"] or 0 for r in rows],
        width,
        label="supervisor: capacity (demand above it)",
        color="#2ca02c",
    )
    ax.bar(
        [i + 1.5 * width for i in x],
        [r["bare"]["per_s"] for r in rows],
        width,
        label="bare loop, same transport",
        color="#ff7f0e",
    )
    ax.axhline(TARGET_POLLS_10K, color="red", ls="--", lw=1, label="target: 667/s (10,000 jobs / 15 s)")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("status polls per second")
    ax.set_title("Throughput (rates: moved by the shared machine's load)")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[0][1]
    ax.bar([i - 0.2 for i in x], [max(r["lag_exact_s"]["p50"], 1e-4) for r in rows], 0.4, label="p50", color="#9ecae1")
    ax.bar([i + 0.2 for i in x], [max(r["lag_exact_s"]["p99"], 1e-4) for r in rows], 0.4, label="p99", color="#1f77b4")
    ax.axhline(2.0, color="red", ls="--", lw=1, label="target: p99 <= 2 s")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("poll lag, seconds (log)")
    ax.set_title("Poll lag at 15 s (exact: polled at - due at)")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    ax.bar(
        [i - 0.2 for i in x], [r["cpu_us_per_poll_used"] for r in rows], 0.4, label="supervisor daemon", color="#1f77b4"
    )
    ax.bar(
        [i + 0.2 for i in x],
        [r["bare"]["cpu_us_per_request"] for r in rows],
        0.4,
        label="bare loop, same transport",
        color="#ff7f0e",
    )
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['daemon_over_bare_cpu']:.2f}",
            (i - 0.2, r["cpu_us_per_poll_used"]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("process CPU us per status poll")
    ax.set_title("CPU per poll (label: daemon / bare; robust to load)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    ax.bar(
        [i - 0.2 for i in x], [r["sql_calls_per_tick"] for r in rows], 0.4, label="SQL calls per tick", color="#d62728"
    )
    ax.bar(
        [i + 0.2 for i in x],
        [r["jobs_claimed_per_tick"] for r in rows],
        0.4,
        label="jobs claimed per tick",
        color="#7f7f7f",
    )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("per 1 s tick")
    ax2 = ax.twinx()
    ax2.plot(x, [r["sql_calls_per_poll"] for r in rows], "o-", color="black", label="SQL calls per poll")
    ax2.plot(x, [r["sql_statements_per_poll"] for r in rows], "s--", color="#9467bd", label="statements run per poll")
    ax2.set_ylabel("per poll")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title("SQL (calls: executemany = 1; statements: per row)")

    ax = axes[1][1]
    ax.bar([i - 0.2 for i in x], [r["tick_mean_ms"] for r in rows], 0.4, label="mean", color="#9ecae1")
    ax.bar([i + 0.2 for i in x], [r["tick_p99_ms"] for r in rows], 0.4, label="p99 (histogram)", color="#1f77b4")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms (log)")
    ax.set_title("Tick duration (claim + dispatch)")
    ax.legend(fontsize=8)

    ax = axes[1][2]
    ax.bar(x, [r["peak_rss_mb"] for r in rows], 0.5, color="#6a51a3", label="peak RSS (VmHWM)")
    ax.axhline(250, color="red", ls="--", lw=1, label="target: 250 MB")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("MB")
    ax.set_title("Daemon peak memory")
    ax.legend(fontsize=8, loc="lower right")

    m = result["machine"]
    fig.suptitle(
        f"clado-supervisor throughput, poll_interval 15 s, 32 in flight - {m['nproc']} cores "
        f"({m['cpu_model']}, shared), Python {m['python']}, {m['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
