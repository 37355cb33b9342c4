"""Workloads users have, each beside the bare loop in the same run: can one daemon hold N
jobs at a 15 s poll, and what does a poll cost it against a bare request?

Against the minimal stdlib status server (bench/statusserver.py, its own process, started
fresh for each row so that every job is young), not the simulator: the daemon's share of a
poll is what is measured. The workloads (a job's behaviour is its id's prefix):
- steady: 1 result per 5 s;
- silent: 1 result per 100 s (probed for its rate until the rule ends it at 150 s);
- pending: pending for good;
- mix: 70 % silent, 20 % steady, 10 % pending;
- burst: N young silent jobs tracked at once, 100 of them with a 60 s `max_runtime`: the
  deadline lateness (cancel received by the server − the job's deadline) of those 100.

Each row: a fresh database (SQLite file or a scratch PostgreSQL database), the daemon
(`python -m bench.instrumented_daemon run`: the CLI plus a SQL statement counter) on the
install as it is (uvloop is a core dependency: what `make install` runs), the jobs tracked
at once with `clado-supervisor track --from-file`, then a window from `start` seconds after
tracking:
- polls/s: the server's status-call counter over the window, its per-second p10/p50/max
  (polls in bunches show as a p10 of 0);
- poll lag p99: the daemon's own clado_supervisor_poll_lag_seconds (bucket deltas over the
  window; taken when the handler starts, before the request waits for a client slot), and
  beside it the jobs table's (bench.throughput.LagTracker: exact for jobs polled at most
  once between its 3 s reads, so it overstates the lag of jobs being probed faster);
- daemon CPU per poll (/proc), SQL statements per poll;
- on PostgreSQL, the server's side of it: the CPU of the backends serving the daemon's
  connections (/proc of the pids pg_stat_activity lists for the row's database, alive over
  the whole window) and the bytes they read and wrote (/proc/<pid>/io rchar + wchar: the
  protocol's traffic and any file reads), per poll; SQL round trips per poll (statements
  plus transaction control);
- then the bare loop (bench/bareloop.py, same transport and loop, 32 in flight) against
  the same server for 5 s: its CPU per request, and the daemon's ratio to it.

The machine is shared: the load average is recorded beside each row; compare the ratios.
`python -m bench workloads [--quick]` (quick: 2,000 jobs, SQLite, 15 s windows).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import PY, REPO, Daemon, ScratchPg, histogram, histogram_delta, histogram_quantile, metric
from bench.throughput import POLICIES, LagTracker

POLL_S = 15.0
BURST_DEADLINED = 100
BURST_RUNTIME = "60s"


@dataclass
class Plan:
    sizes: tuple[int, ...]
    backends: tuple[str, ...]
    workloads: tuple[str, ...] = ("steady", "silent", "pending", "mix", "burst")
    start: float = 60.0  # the window opens this long after tracking (the targets' "from 60 s")
    window: float = 30.0
    snapshot_every: float = 3.0
    bare_duration: float = 5.0


FULL = Plan(sizes=(10_000, 20_000), backends=("sqlite", "postgresql"))
QUICK = Plan(sizes=(2_000,), backends=("sqlite",), window=15.0)


def job_ids(workload: str, n: int) -> list[str]:
    if workload == "mix":
        silent, steady = int(n * 0.7), int(n * 0.2)
        kinds = [("silent", silent), ("steady", steady), ("pending", n - silent - steady)]
    else:
        kinds = [("silent" if workload == "burst" else workload, n)]
    return [f"{kind}-{i:06d}" for kind, count in kinds for i in range(count)]


class StatusServer:
    def __init__(self, work: Path) -> None:
        self.port = common.free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = (work / f"statusserver-{self.port}.log").open("w")
        self.proc = subprocess.Popen(
            [PY, "-m", "bench.statusserver", "--port", str(self.port)],
            cwd=REPO,
            env=common.child_env(),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        if self.proc.stdout is None or self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the status server did not start")

    def stats(self) -> dict[str, Any]:
        return json.loads(common.http_text(self.base_url + "/_stats"))

    def close(self) -> None:
        common.stop_process(self.proc)
        self._log.close()


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def run_row(work: Path, backend: str, n: int, workload: str, plan: Plan, log: Any) -> dict[str, Any]:
    pg: ScratchPg | None = None
    if backend == "sqlite":
        db_path = work / f"{workload}-{n}.db"
        db_url = f"sqlite:///{db_path}"
    else:
        pg = ScratchPg()
        db_url = pg.url
    server = StatusServer(work)
    port = common.free_port()
    config = work / f"supervisor-{backend}-{n}-{workload}.toml"
    config.write_text(
        common.config_text(
            server.base_url,
            db_url,
            listen=f"127.0.0.1:{port}",
            supervisor={"poll_interval": f'"{POLL_S:g}s"'},
            policies=POLICIES,
            api={"max_concurrency": "32", "timeout": '"10s"', "transport": '"aiohttp"'},
        )
    )
    ids = job_ids(workload, n)
    daemon: Daemon | None = None
    lag: LagTracker | None = None
    try:
        common.cli(["migrate"], cwd=work, config=config)
        daemon = Daemon(work, config, port, instrumented=True)
        deadlined = ids[:BURST_DEADLINED] if workload == "burst" else []
        rest = ids[len(deadlined) :]
        tracked_at = time.monotonic()
        if deadlined:
            path = work / "deadlined.txt"
            path.write_text("\n".join(deadlined) + "\n")
            common.cli(["track", "--from-file", str(path), "--max-runtime", BURST_RUNTIME], cwd=work, config=config)
        path = work / "ids.txt"
        path.write_text("\n".join(rest) + "\n")
        common.cli(["track", "--from-file", str(path)], cwd=work, config=config)
        lag = LagTracker(db_url)
        while time.monotonic() - tracked_at < plan.start - plan.snapshot_every:
            time.sleep(0.5)
        lag.read(record=False)
        while time.monotonic() - tracked_at < plan.start:
            time.sleep(0.05)
        per_second: list[int] = []
        pg0 = _backends(pg.name) if pg is not None else {}
        s0, c0, m0, t0 = server.stats()["status"], daemon.cpu_seconds(), daemon.metrics(), time.monotonic()
        last, next_snapshot = s0, t0 + plan.snapshot_every
        load_during = _load()
        while (now := time.monotonic()) - t0 < plan.window:
            time.sleep(max(0.0, min(1.0 - (now - t0) % 1.0, plan.window - (now - t0))))
            count = server.stats()["status"]
            per_second.append(count - last)
            last = count
            if time.monotonic() >= next_snapshot:
                lag.read(record=True)
                next_snapshot += plan.snapshot_every
        s1, c1, m1, t1 = server.stats()["status"], daemon.cpu_seconds(), daemon.metrics(), time.monotonic()
        pg1 = _backends(pg.name) if pg is not None else {}
        lag.read(record=True)
        polls = s1 - s0
        sql = sum(
            metric(m1, "clado_supervisor_bench_sql_rows_total", kind=k)
            - metric(m0, "clado_supervisor_bench_sql_rows_total", kind=k)
            for k in _sql_kinds(m1)
            if k != "txn_control"
        )
        trips = sum(
            metric(m1, "clado_supervisor_bench_sql_calls_total", kind=k)
            - metric(m0, "clado_supervisor_bench_sql_calls_total", kind=k)
            for k in _sql_kinds(m1)
        )
        row: dict[str, Any] = {
            "backend": backend,
            "jobs": n,
            "workload": workload,
            "load_avg_1m": load_during,
            "window_from_s": plan.start,
            "window_s": round(t1 - t0, 1),
            "polls_per_s": round(polls / (t1 - t0), 1),
            "routine_demand_per_s": round(n / POLL_S, 1),
            "held": round(polls / (t1 - t0) / (n / POLL_S), 3),
            "per_second_p10_p50_max": [
                common.quantile(per_second, 0.1),
                common.quantile(per_second, 0.5),
                max(per_second),
            ],
            "lag_p99_s": round(histogram_quantile(histogram_delta(_lag(m1), _lag(m0)), 0.99), 3),
            "db_lag_p99_s": round(common.quantile(lag.lags, 0.99), 3) if lag.lags else None,
            "cpu_us_per_poll": round((c1 - c0) / max(1, polls) * 1e6),
            "sql_per_poll": round(sql / max(1, polls), 2),
            "round_trips_per_poll": round(trips / max(1, polls), 3),
            "daemon_cores": round((c1 - c0) / (t1 - t0), 2),
        }
        if pg is not None:
            both = pg0.keys() & pg1.keys()
            row["pg_backends"] = len(both)
            row["pg_cpu_us_per_poll"] = round(sum(pg1[p][0] - pg0[p][0] for p in both) / max(1, polls) * 1e6)
            row["pg_bytes_per_poll"] = round(sum(pg1[p][1] - pg0[p][1] for p in both) / max(1, polls))
        if deadlined:
            row["burst"] = _lateness(server, db_url, deadlined, tracked_at)
        server_cpu0 = server.stats()["cpu_s"]
        daemon.stop()
        daemon = None
        row["bare"] = _bare(work, server, ids, plan.bare_duration)
        row["bare"]["server_cpu_s"] = round(server.stats()["cpu_s"] - server_cpu0, 2)
        row["ratio_to_bare"] = round(row["cpu_us_per_poll"] / row["bare"]["cpu_us_per_request"], 2)
        log(
            f"  {backend} {n} {workload}: {row['polls_per_s']}/s ({row['held']} of N/15 s), lag p99 "
            f"{row['lag_p99_s']} s, {row['cpu_us_per_poll']} us/poll = {row['ratio_to_bare']} x bare "
            f"({row['bare']['cpu_us_per_request']} us), per s p10/p50/max {row['per_second_p10_p50_max']}, "
            f"load {load_during}" + (f", burst lateness {row['burst']}" if deadlined else "")
        )
        return row
    finally:
        if daemon is not None:
            daemon.stop()
        if lag is not None:
            lag.close()
        server.close()
        if pg is not None:
            pg.close()


def _lag(samples: dict) -> dict[str, Any]:
    return histogram(samples, "clado_supervisor_poll_lag_seconds")


def _sql_kinds(samples: dict) -> list[str]:
    return sorted(dict(labels)["kind"] for name, labels in samples if name == "clado_supervisor_bench_sql_calls_total")


def _backends(database: str) -> dict[int, tuple[float, int]]:
    """pid → (CPU seconds, bytes read + written) of the server processes on `database`."""
    import psycopg

    with psycopg.connect(common.PG_ADMIN_URL, autocommit=True) as conn:
        pids = [row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))]
    found = {}
    for pid in pids:
        try:
            io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
            found[pid] = (common.cpu_seconds(pid), int(io["rchar"]) + int(io["wchar"]))
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile
    return found


def _lateness(server: StatusServer, db_url: str, deadlined: list[str], tracked_at: float) -> dict[str, Any]:
    """Cancel received − deadline, for the jobs with a max_runtime: waits for their cancels."""
    from sqlalchemy import create_engine, pool, select

    from supervisor.adapters.store import sync_url
    from supervisor.adapters.tables import jobs
    from supervisor.core.job import Job

    common.wait_until(lambda: len(server.stats()["cancels"]) >= len(deadlined), timeout=120, what="the burst's cancels")
    cancels = server.stats()["cancels"]
    engine = create_engine(sync_url(db_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.job_id.in_(deadlined))).mappings().all()
    finally:
        engine.dispose()
    late = []
    for row in rows:
        job = Job.from_row(row)
        deadline = job.started_at.timestamp() + (job.max_runtime_s or 0)
        late.append(cancels[job.job_id] - deadline)
    return {
        "jobs": len(late),
        "lateness_p50_s": round(common.quantile(late, 0.5), 3),
        "lateness_p99_s": round(common.quantile(late, 0.99), 3),
        "lateness_max_s": round(max(late), 3),
    }


def _bare(work: Path, server: StatusServer, ids: list[str], duration: float) -> dict[str, Any]:
    path = work / "bare-ids.txt"
    path.write_text("\n".join(ids) + "\n")
    args = ["--base-url", server.base_url, "--ids", str(path), "--transport", "aiohttp", "--uvloop"]
    result = subprocess.run(
        [PY, "-m", "bench.bareloop", *args, "--duration", str(duration)],
        cwd=REPO,
        env=common.child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    bare = json.loads(result.stdout)
    return {
        "per_s": round(bare["per_s"]),
        "cpu_us_per_request": round(bare["client_cpu_s"] / max(1, bare["requests"]) * 1e6),
    }


def run(*, quick: bool, log: Any) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    work = common.workdir("workloads")
    rows: list[dict[str, Any]] = []
    skipped = common.pg_available() if "postgresql" in plan.backends else None
    for backend in plan.backends:
        if backend == "postgresql" and skipped:
            log(f"  postgresql rows skipped: {skipped}")
            continue
        for n in plan.sizes:
            for workload in plan.workloads:
                rows.append(run_row(work, backend, n, workload, plan, log))
    headers = ["backend", "jobs", "workload", "polls/s", "of N/15s", "per s p10/p50/max", "lag p99 s",
               "us/poll", "bare us", "x bare", "burst lateness p99 s", "load"]  # fmt: skip
    log(
        common.table(
            headers,
            [
                (
                    r["backend"],
                    r["jobs"],
                    r["workload"],
                    r["polls_per_s"],
                    r["held"],
                    "/".join(f"{v:g}" for v in r["per_second_p10_p50_max"]),
                    r["lag_p99_s"],
                    r["cpu_us_per_poll"],
                    r["bare"]["cpu_us_per_request"],
                    r["ratio_to_bare"],
                    r.get("burst", {}).get("lateness_p99_s", ""),
                    r["load_avg_1m"],
                )
                for r in rows
            ],
        )
    )
    payload = {"machine": common.machine_info(), "code": common.code_version(), "plan": plan.__dict__, "rows": rows}
    common.write_json("workloads-quick.json" if quick else "workloads.json", payload)
    return payload
