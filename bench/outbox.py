"""Outbox: how fast a burst of webhook events drains, and what it costs the decisions.

`python -m bench.outbox [--quick] [--db sqlite|postgres]`. In one process, on a fresh
database (SQLite by default):

1. Decisions: `JOBS` jobs are tracked, then cancelled by one budget-style sweep: lease-less
   `decide_cancel` writes applied in batches of `BATCH` (what chores.Enforcer does), each
   batch one transaction. Run three times on fresh databases: without hooks; with two hooks
   that want `cancel_requested` (so each batch also inserts 2 × BATCH outbox rows), the
   delivery worker started once the sweep is done ("drained after": the cost of the rows);
   and the same with the worker draining them concurrently in the same event loop and
   process ("draining": what the daemon does). The figure is the time
   each batch's commit takes (p50 / p99 / max) and the whole sweep: the enforcement latency a
   budget's cancel sees before its cancel call can be sent.
2. Drain: the 2 × JOBS rows are delivered to a local receiver (a separate process, a
   ThreadingHTTPServer answering 204); deliveries/s from the first claim to the last record,
   per hook and overall.

This is not a timed test: it prints what this machine did (other engineers' load included).
Results: bench/results/outbox.json (outbox-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import common

JOBS = 10_000
BATCH = 500
RECEIVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

ThreadingHTTPServer.request_queue_size = 256  # the default 5 drops SYNs of concurrent posts (1 s retries)
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
server.daemon_threads = True
print("ready", flush=True)
server.serve_forever()
"""


def _config(tmp: Path, url: str, port: int | None) -> Any:
    from supervisor.config import load_config

    hooks = (
        "".join(
            f'\n[[notify.webhooks]]\nurl = "http://127.0.0.1:{port}/{name}"\nevents = ["cancel_requested"]\n'
            for name in ("a", "b")
        )
        if port
        else ""
    )
    path = tmp / "supervisor.toml"
    path.write_text(
        f'[api]\nbase_url = "http://127.0.0.1:9"\n[database]\nurl = "{url}"\n'
        f'[policies.default]\nmax_runtime = "30m"\n{hooks}',
        encoding="utf-8",
    )
    return load_config(path)


async def _sweep(url: str, tmp: Path, jobs: int, port: int | None, drain: bool = True) -> dict[str, Any]:
    from supervisor.adapters import migrate
    from supervisor.adapters.store import JobWrite, NewJob, Store
    from supervisor.adapters.webhooks import Webhooks
    from supervisor.core import transitions
    from supervisor.core.transitions import Change

    await asyncio.to_thread(migrate.upgrade, url)
    config = _config(tmp, url, port)
    store = Store(url)
    hooks = Webhooks(config, store) if port else None
    try:
        now = datetime.now(UTC)
        ids = [f"bench-{n:05d}" for n in range(jobs)]
        for start in range(0, jobs, 1000):
            await store.add_jobs([NewJob(job_id, "default") for job_id in ids[start : start + 1000]], now)
        tracked = await store.list_jobs("watching")
        if hooks is not None and drain:
            hooks.start()
        detail = transitions.decision_detail("budgets.bench", 0, config.config_hash)
        commits: list[float] = []
        began = time.perf_counter()
        for start in range(0, len(tracked), BATCH):
            writes = [
                JobWrite(transitions.decide_cancel(Change.of(job), "budget:bench", detail, datetime.now(UTC)), None)
                for job in tracked[start : start + BATCH]
            ]
            t0 = time.perf_counter()
            await store.apply_each(writes)
            commits.append((time.perf_counter() - t0) * 1000)
            if hooks is not None:
                hooks.wake()
            await asyncio.sleep(0)  # let the worker take its turn, as the daemon's loop would
        sweep_s = time.perf_counter() - began
        result: dict[str, Any] = {
            "jobs": len(tracked),
            "batch": BATCH,
            "commit_ms": common.summary(commits),
            "sweep_s": round(sweep_s, 3),
        }
        if hooks is not None and not drain:
            hooks.start()  # only now: the sweep ran with the rows' inserts but no worker beside it
        if hooks is not None:
            total = 2 * len(tracked)
            while True:
                backlog = await store.outbox_backlog()
                if not backlog:
                    break
                await asyncio.sleep(0.05)
            drained_s = time.perf_counter() - began
            rows = await store.list_deliveries("delivered", limit=total + 10)
            firsts = [row["delivered_at"] for row in rows]
            result["deliveries"] = len(rows)
            result["drain_s_from_first_decision"] = round(drained_s, 3)
            span = (max(firsts) - min(r["created_at"] for r in rows)).total_seconds()
            result["deliveries_per_s"] = round(len(rows) / drained_s, 1)
            result["deliveries_per_s_db_clock"] = round(len(rows) / span, 1) if span > 0 else None
            result["failed"] = len(await store.list_deliveries("failed"))
        return result
    finally:
        if hooks is not None:
            await hooks.close()
        await store.close()


def run(quick: bool = False, log: Any = print, db: str = "sqlite") -> dict[str, Any]:
    jobs = 2_000 if quick else JOBS
    port = common.free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        if receiver.stdout is None or receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("the receiver did not start")
        runs: dict[str, Any] = {}
        variants = (
            ("no hooks", None, False),
            ("two hooks, drained after", port, False),
            ("two hooks, draining", port, True),
        )
        for name, hook_port, drain in variants:
            with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
                if db == "postgres":
                    problem = common.pg_available()
                    if problem is not None:
                        raise SystemExit(f"PostgreSQL not available: {problem}")
                    scratch = common.ScratchPg()
                    try:
                        runs[name] = asyncio.run(_sweep(scratch.url, Path(tmp), jobs, hook_port, drain))
                    finally:
                        scratch.close()
                else:
                    runs[name] = asyncio.run(_sweep(f"sqlite:///{tmp}/bench.db", Path(tmp), jobs, hook_port, drain))
            log(f"{name}: {runs[name]}")
    finally:
        common.stop_process(receiver)
    result = {
        "machine": common.machine_info(),
        "code": common.code_version(),
        "db": db,
        "runs": runs,
    }
    log(render(result))
    common.write_json("outbox-quick.json" if quick else f"outbox{'-pg' if db == 'postgres' else ''}.json", result)
    return result


def render(result: dict[str, Any]) -> str:
    rows = []
    for name, r in result["runs"].items():
        c = r["commit_ms"]
        rows.append([name, r["jobs"], c["p50"], c["p99"], c["max"], r["sweep_s"], r.get("deliveries_per_s", "-")])
    return common.table(["run", "jobs cancelled", "commit p50 ms", "p99 ms", "max ms", "sweep s", "deliveries/s"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.outbox", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    run(quick=args.quick, db=args.db)
