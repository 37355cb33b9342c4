"""Drift: 10,000 watched jobs whose status answers all lose their `status` field at once (a
proxy rewriting bodies, an API change). Issue 24's target: one `api_drift` alarm, not one per
job, and a status request rate no higher than in normal running.

Setup: the simulator in its own process with N jobs (rate 0.2 result/s, limit 1000: active for
the whole run), the daemon as a subprocess (poll_interval "15s", limits so high nothing is
cancelled, on_blind "alert", a webhook to a local receiver), the N jobs tracked at once. After
a warm-up (every job polled and past its rate probes), a window of normal running measures
the simulator's status calls/s; then `/_fake/reshape {"hide_status": true}` drifts every job,
and a second window of the same length, once every job is blind, measures them again. The
receiver counts the webhooks by event.

`python -m bench.drift [--jobs N] [--window S]` prints the figures and writes
bench/results/drift.json (drift-quick.json with --quick: 1,000 jobs).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench import common
from bench.common import Daemon, FakeApi, metric

POLICIES = """
[policies.default]
max_runtime = "7d"
max_queued = "7d"
stall_timeout = "7d"
max_credits = 1000000000
warn_at = []
"""
JOB_KNOBS = {"rate": 0.2, "limit": 1000}


class Receiver:
    """Webhook deliveries counted by event."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        lock = threading.Lock()
        events = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with lock:
                    events[body.get("event", "?")] += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rate(fake: FakeApi, seconds: float) -> float:
    before, started = fake.stats()["status"], time.monotonic()
    time.sleep(seconds)
    return (fake.stats()["status"] - before) / (time.monotonic() - started)


def run(quick: bool = False, log: Any = print, jobs: int | None = None, window: float = 30.0) -> dict[str, Any]:
    n = jobs or (1_000 if quick else 10_000)
    work = common.workdir("drift")
    fake = FakeApi(work)
    receiver = Receiver()
    daemon: Daemon | None = None
    try:
        ids = fake.bulk(n, **JOB_KNOBS)
        ids_file = work / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        port = common.free_port()
        config = work / "supervisor.toml"
        config.write_text(
            common.config_text(
                fake.base_url,
                f"sqlite:///{work / 'drift.db'}",
                listen=f"127.0.0.1:{port}",
                supervisor={"poll_interval": '"15s"'},
                policies=POLICIES,
                api={"max_concurrency": "32", "timeout": '"10s"'},
            )
            + f'\n[[notify.webhooks]]\nurl = "{receiver.url}"\nallow_insecure_http = true\n'
        )
        common.cli(["migrate"], cwd=work, config=config)
        daemon = Daemon(work, config, port)
        common.cli(["track", "--from-file", str(ids_file)], cwd=work, config=config)
        tracked = time.monotonic()
        # Warm-up: every job polled, and past its rate probes (about 30 s at this rate).
        common.wait_until(lambda: fake.stats()["status"] >= n, timeout=300, what="every job polled once")
        time.sleep(max(0.0, tracked + 45 - time.monotonic()))
        log(f"drift: {n} jobs tracked; measuring normal running for {window:.0f} s")
        normal = _rate(fake, window)

        common.http_json(fake.base_url + "/_fake/reshape", {"hide_status": True})
        drifted_at = time.monotonic()

        def all_blind() -> bool:
            blind = metric(daemon.metrics(), "clado_supervisor_jobs_blind", reason="no_status")
            return blind >= n

        common.wait_until(
            lambda: metric(daemon.metrics(), "clado_supervisor_api_drift") == 1, timeout=120, what="api_drift"
        )
        drift_s = time.monotonic() - drifted_at
        common.wait_until(all_blind, timeout=300, what="every job blind", interval=1.0)
        all_blind_s = time.monotonic() - drifted_at
        log(f"drift: api_drift after {drift_s:.1f} s, every job blind after {all_blind_s:.1f} s; measuring")
        drifting = _rate(fake, window)
        time.sleep(2)  # the last webhooks delivered
        result = {
            "jobs": n,
            "window_s": window,
            "status_calls_per_s": {"normal": round(normal, 1), "drifting": round(drifting, 1)},
            "api_drift_after_s": round(drift_s, 1),
            "all_blind_after_s": round(all_blind_s, 1),
            "webhooks": dict(receiver.events),
            "daemon_errors": len(daemon.errors()),
            "machine": common.machine_info(),
            "code": common.code_version(),
        }
    finally:
        if daemon is not None:
            daemon.stop()
        receiver.close()
        fake.close()
    log(
        common.table(
            ["jobs", "status calls/s normal", "drifting", "api_drift after", "every job blind after", "webhooks"],
            [
                [
                    n,
                    result["status_calls_per_s"]["normal"],
                    result["status_calls_per_s"]["drifting"],
                    f"{result['api_drift_after_s']} s",
                    f"{result['all_blind_after_s']} s",
                    ", ".join(f"{k} {v}" for k, v in sorted(result["webhooks"].items())),
                ]
            ],
        )
    )
    path = common.write_json("drift-quick.json" if quick else "drift.json", result)
    log(f"drift: results in {path}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drift", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1,000 jobs")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()
    run(quick=args.quick, jobs=args.jobs, window=args.window)


if __name__ == "__main__":
    main()
